//! Membership of a Kafka consumer group, so that several kpay instances
//! divide a topic's partitions between them through Kafka's own group
//! coordinator (the classic protocol: FindCoordinator, JoinGroup, SyncGroup,
//! Heartbeat, LeaveGroup), spoken over one TCP connection (`wire`), since
//! rskafka has no group APIs.
//!
//! The group's protocol type is `kpay`, with one protocol, `sticky`. Each
//! member joins with its HTTP URL and the partitions it last owned
//! (`protocol`); the leader divides the partitions (`assign`: each exactly
//! once, balanced, sticky) and gives every member the whole membership, so
//! that each knows who owns what and where to reach it.
//!
//! A [`Member`] runs in a task of its own (`session`) and publishes its
//! [`MemberState`]: [`MemberState::Stable`] with what it owns, or
//! [`MemberState::Joining`] while it owns nothing. Rebalances are eager:
//! on any change the member goes `Joining` at once, waits until its owner
//! calls [`Member::released`] (every partition stopped and checkpointed),
//! then rejoins.

mod assign;
mod protocol;
mod session;
mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::error::ResponseError;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::Config;

pub use assign::assign;

/// The target of this module's log events.
const TARGET: &str = "kpay::cluster";

/// Most partitions a group divides (as `log.partitions`).
pub const MAX_PARTITIONS: u32 = 256;

/// Where to find the group and how this member takes part in it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberConfig {
    /// Bootstrap brokers, `host:port`; any of them names the coordinator.
    pub brokers: Vec<String>,
    /// The consumer group.
    pub group: String,
    /// This member's HTTP URL, told to the others.
    pub url: String,
    /// Partitions to divide: `0..partitions`.
    pub partitions: u32,
    /// The coordinator drops a member it has not heard from for this long.
    pub session_timeout: Duration,
    /// How often the member heartbeats.
    pub heartbeat_interval: Duration,
    /// Longest wait of a join (and for [`Member::released`]).
    pub rebalance_timeout: Duration,
    /// Deadline of every other call (connect, FindCoordinator, Heartbeat, LeaveGroup).
    pub call_timeout: Duration,
}

impl MemberConfig {
    /// The membership a kpay configuration asks for: the Kafka brokers of
    /// `log.kafka`, `log.partitions`, the `[cluster]` settings, and the URL
    /// `cluster.advertised_url` (or `http://<server.listen>`).
    pub fn from_config(config: &Config) -> Self {
        let cluster = &config.cluster;
        let url = if cluster.advertised_url.is_empty() {
            format!("http://{}", config.server.listen)
        } else {
            cluster.advertised_url.trim_end_matches('/').to_owned()
        };
        Self {
            brokers: config.log.kafka.brokers.clone(),
            group: cluster.group.clone(),
            url,
            partitions: config.log.partitions,
            session_timeout: Duration::from_millis(cluster.session_timeout_ms),
            heartbeat_interval: Duration::from_millis(cluster.heartbeat_interval_ms),
            rebalance_timeout: Duration::from_millis(cluster.rebalance_timeout_ms),
            call_timeout: Duration::from_millis(config.log.kafka.request_timeout_ms),
        }
    }

    fn check(&self) -> Result<(), ClusterError> {
        let bad = |why: &str| Err(ClusterError::Config(why.to_owned()));
        if self.brokers.is_empty() {
            return bad("no broker to find the group coordinator through");
        }
        if self.group.is_empty() {
            return bad("the group name is empty");
        }
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return bad("partitions must be between 1 and 256");
        }
        let session = self.session_timeout;
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= session {
            return bad("the heartbeat interval must be above 0 and below the session timeout");
        }
        if self.rebalance_timeout < session || self.call_timeout.is_zero() {
            return bad("the rebalance timeout must be at least the session timeout");
        }
        if protocol::millis(self.rebalance_timeout).is_none() {
            return bad("the rebalance timeout must fit in 32 bits of milliseconds");
        }
        Ok(())
    }
}

/// What a member owns in one generation of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The group's generation this assignment belongs to.
    pub generation: i32,
    /// This member's id, given by the coordinator.
    pub member_id: String,
    /// The partitions this member owns, ascending.
    pub partitions: Vec<u32>,
    /// Every member of the generation (this one too), by id.
    pub members: Vec<MemberView>,
}

impl Assignment {
    /// The URL of the member owning `partition` in this generation.
    pub fn owner_url(&self, partition: u32) -> Option<&str> {
        self.members
            .iter()
            .find(|m| m.partitions.contains(&partition))
            .map(|m| m.url.as_str())
    }
}

/// One member of a generation as every member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Its member id.
    pub id: String,
    /// Its HTTP URL.
    pub url: String,
    /// The partitions it owns, ascending.
    pub partitions: Vec<u32>,
}

/// Where a member stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberState {
    /// Between generations: the member owns nothing. Its owner stops every
    /// partition it had, checkpoints them and calls [`Member::released`].
    Joining,
    /// A member of a stable generation, owning `partitions`.
    Stable(Assignment),
    /// The member left the group, or met a problem retrying cannot solve
    /// (why). It owns nothing, and its task has ended.
    Stopped(String),
}

impl MemberState {
    /// The partitions owned in this state (none unless stable).
    pub fn partitions(&self) -> &[u32] {
        match self {
            Self::Stable(assignment) => &assignment.partitions,
            _ => &[],
        }
    }
}

/// Why the group could not be joined or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The member's configuration cannot work.
    #[error("cluster config: {0}")]
    Config(String),
    /// No broker answered, or not in time: worth trying again.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// The broker answered something this module cannot use.
    #[error("cluster protocol: {0}")]
    Protocol(String),
    /// The coordinator answered a call with an error code.
    #[error("{call} failed: {error}")]
    Refused {
        /// The request, e.g. `JoinGroup`.
        call: &'static str,
        /// The error the coordinator answered.
        error: ResponseError,
    },
}

/// Tells a member its partitions are released (see [`Member::released`]).
#[derive(Clone)]
pub struct Releaser {
    releases: Arc<watch::Sender<u64>>,
}

impl Releaser {
    pub fn released(&self) {
        self.releases.send_modify(|count| *count += 1);
    }
}

/// A member of the group: the handle of its task.
pub struct Member {
    state: watch::Receiver<MemberState>,
    releases: Arc<watch::Sender<u64>>,
    paused: Arc<AtomicBool>,
    leave: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Member {
    /// Finds the group's coordinator and starts the member's task, which
    /// joins the group; the state starts as [`MemberState::Joining`]. Fails
    /// when the settings cannot work, when no broker answers within the call
    /// timeout, or when it lacks the group APIs.
    pub async fn start(config: MemberConfig) -> Result<Member, ClusterError> {
        config.check()?;
        let (state_tx, state) = watch::channel(MemberState::Joining);
        let (releases, releases_rx) = watch::channel(0);
        let paused = Arc::new(AtomicBool::new(false));
        let mut session = session::Session::new(config, state_tx, releases_rx, paused.clone());
        match session.find_coordinator().await {
            Ok(()) => {}
            // A broker that answers, but has no coordinator ready yet: the task keeps asking.
            Err(error @ ClusterError::Refused { .. })
                if protocol::reaction_to(&error) == protocol::Reaction::Rediscover =>
            {
                tracing::warn!(target: TARGET, %error, "no group coordinator yet");
            }
            Err(error) => return Err(error),
        }
        let (leave, leave_rx) = oneshot::channel();
        let task = tokio::spawn(session::run(session, leave_rx));
        Ok(Member {
            state,
            releases: Arc::new(releases),
            paused,
            leave: Some(leave),
            task: Some(task),
        })
    }

    /// The member's state, as it changes.
    pub fn state(&self) -> watch::Receiver<MemberState> {
        self.state.clone()
    }

    /// A handle that may tell the member its partitions are released, for
    /// a task apart from the one that holds the member.
    pub fn releaser(&self) -> Releaser {
        Releaser {
            releases: self.releases.clone(),
        }
    }

    /// Tells the member that every partition it owned has been stopped and
    /// checkpointed, in answer to [`MemberState::Joining`]: it rejoins then
    /// (or after the rebalance timeout, whichever comes first).
    pub fn released(&self) {
        self.releases.send_modify(|count| *count += 1);
    }

    /// Leaves the group (LeaveGroup), for a graceful shutdown: the others
    /// rebalance at once rather than after the session timeout. The state
    /// ends as [`MemberState::Stopped`].
    pub async fn leave(mut self) {
        if let Some(leave) = self.leave.take() {
            let _ = leave.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(error) = task.await {
                tracing::warn!(target: TARGET, %error, "the member task ended badly");
            }
        }
    }

    /// Stops (or resumes) heartbeats, as a process frozen in a pause would:
    /// the coordinator drops a member that is silent for the session timeout.
    pub fn pause_heartbeats(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }
}

impl Drop for Member {
    // A member dropped without `leave` stops at once; the coordinator drops
    // it after the session timeout.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
