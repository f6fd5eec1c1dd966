//! The member's task: find the coordinator, join (JoinGroup, answering
//! MEMBER_ID_REQUIRED), lead when chosen (divide the partitions), sync
//! (SyncGroup), publish `Stable`, heartbeat; and on any change publish
//! `Joining`, wait for the owner to release its partitions, and join again.
//!
//! - REBALANCE_IN_PROGRESS: the group changes; the member keeps its id and
//!   keeps heartbeating (so that it is not dropped) while its owner releases.
//! - ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID: the
//!   coordinator dropped the member and its partitions may already be
//!   someone else's: `Joining` at once, then join as a new member.
//! - Coordinator errors and failed calls: find the coordinator again, with
//!   a growing pause. A stable member goes on heartbeating meanwhile, but
//!   gives its partitions up (`Joining`) once it has not reached the
//!   coordinator for a session timeout less one heartbeat interval: by then
//!   the coordinator may have dropped it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{
    FindCoordinatorRequest, HeartbeatRequest, JoinGroupRequest, JoinGroupResponse,
    LeaveGroupRequest, SyncGroupRequest,
};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::assign::{plan, Joined};
use super::protocol::{self, versions, JoinMetadata, Membership, Reaction, FORMAT_VERSION};
use super::wire::{Connection, Request};
use super::{Assignment, ClusterError, MemberConfig, MemberState, TARGET};

/// First pause after a failed join; doubled after each failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Longest pause between two failed joins.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// JoinGroup answers in a row that ask to join again (MEMBER_ID_REQUIRED,
/// UNKNOWN_MEMBER_ID) before the join counts as failed.
const MAX_JOIN_ATTEMPTS: usize = 4;

/// Why a member left a stable generation, or a join led to none.
#[derive(Debug)]
enum End {
    /// The group rebalances: release, rejoin with the same id.
    Rejoin,
    /// The coordinator dropped the member (why): rejoin as a new member.
    Fenced(String),
    /// No answer from the coordinator for nearly a session: the member
    /// must assume it was dropped.
    Lost,
    /// A call failed: find the coordinator again after a pause.
    Retry(ClusterError),
    /// Retrying cannot help (why): stop.
    Fatal(String),
}

impl From<ClusterError> for End {
    fn from(error: ClusterError) -> Self {
        match protocol::reaction_to(&error) {
            Reaction::Rejoin => End::Rejoin,
            Reaction::Fenced => End::Fenced(error.to_string()),
            Reaction::Rediscover => End::Retry(error),
            Reaction::Fatal => End::Fatal(error.to_string()),
        }
    }
}

/// Everything the member's task keeps.
pub(super) struct Session {
    config: MemberConfig,
    /// The connection to the coordinator, once found.
    connection: Option<Connection>,
    /// The id the coordinator gave this member (empty: none yet).
    member_id: String,
    /// The last assignment the member had: what it says it released when
    /// it rejoins, and the leader's view of who may still hold what.
    last: Option<Assignment>,
    state: watch::Sender<MemberState>,
    /// Counts [`super::Member::released`] calls.
    releases: watch::Receiver<u64>,
    paused: Arc<AtomicBool>,
    backoff: Duration,
    /// When the last heartbeat (or sync) the coordinator accepted was sent:
    /// its count of the member's session started no earlier.
    heard: Instant,
}

/// Runs the member until it stops (a fatal error), leaves (`leave` fires:
/// LeaveGroup), or its handle is dropped.
pub(super) async fn run(mut session: Session, leave: oneshot::Receiver<()>) {
    let leaving = tokio::select! {
        () = session.serve() => return,
        asked = leave => asked.is_ok(),
    };
    if leaving {
        session.leave_group().await;
        session
            .state
            .send_replace(MemberState::Stopped("left the group".into()));
    }
}

impl Session {
    pub(super) fn new(
        config: MemberConfig,
        state: watch::Sender<MemberState>,
        releases: watch::Receiver<u64>,
        paused: Arc<AtomicBool>,
    ) -> Self {
        Self {
            config,
            connection: None,
            member_id: String::new(),
            last: None,
            state,
            releases,
            paused,
            backoff: FIRST_BACKOFF,
            heard: Instant::now(),
        }
    }

    /// Joins, stays while stable, and acts on why it stopped being, until
    /// an error retrying cannot solve.
    async fn serve(&mut self) {
        loop {
            let end = match self.join_and_sync().await {
                Ok(assignment) => {
                    self.backoff = FIRST_BACKOFF;
                    self.publish_stable(assignment);
                    self.stay().await
                }
                Err(end) => end,
            };
            if let End::Fatal(why) = end {
                tracing::error!(target: TARGET, group = %self.config.group, %why, "member stopped");
                self.state.send_replace(MemberState::Stopped(why));
                return;
            }
            self.recover(end).await;
        }
    }

    /// Publishes `Joining` if the member was stable, then does what `end`
    /// asks before the next join: wait for the release, forget the member
    /// id, or pause before finding the coordinator again.
    async fn recover(&mut self, end: End) {
        // Marked before `Joining` is published, so that a release answering it counts.
        self.releases.mark_unchanged();
        let owned = match &*self.state.borrow() {
            MemberState::Stable(assignment) => Some(!assignment.partitions.is_empty()),
            _ => None,
        };
        if owned.is_some() {
            self.state.send_replace(MemberState::Joining);
        }
        let group = &self.config.group;
        match end {
            End::Rejoin => tracing::info!(target: TARGET, %group, "the group rebalances"),
            End::Fenced(ref why) => {
                tracing::warn!(target: TARGET, %group, %why, "dropped by the coordinator");
                self.member_id.clear();
            }
            End::Lost => tracing::warn!(
                target: TARGET, %group, "no answer from the coordinator for a session: partitions given up"
            ),
            End::Retry(ref error) => {
                // Warned once in a row of failures, the rest at debug level.
                if self.backoff == FIRST_BACKOFF {
                    tracing::warn!(target: TARGET, %group, %error, "joining failed; trying again");
                } else {
                    tracing::debug!(target: TARGET, %group, %error, "joining failed again");
                }
                self.connection = None;
                self.pause().await;
            }
            End::Fatal(_) => {}
        }
        match owned {
            Some(true) => self.await_release(matches!(end, End::Rejoin)).await,
            Some(false) => {}
            // A join that failed: the next one not at full speed.
            None if !matches!(end, End::Retry(_)) => self.pause().await,
            None => {}
        }
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn publish_stable(&mut self, assignment: Assignment) {
        tracing::info!(
            target: TARGET,
            group = %self.config.group,
            generation = assignment.generation,
            member = %assignment.member_id,
            partitions = ?assignment.partitions,
            members = assignment.members.len(),
            "stable"
        );
        self.last = Some(assignment.clone());
        self.state.send_replace(MemberState::Stable(assignment));
    }

    /// Waits until the owner has released the partitions (or the rebalance
    /// timeout passed), heartbeating meanwhile if `heartbeat`, so that the
    /// coordinator keeps the member while it waits.
    async fn await_release(&mut self, heartbeat: bool) {
        let deadline = Instant::now() + self.config.rebalance_timeout;
        let mut heartbeat = heartbeat;
        loop {
            let next = (Instant::now() + self.config.heartbeat_interval).min(deadline);
            if tokio::time::timeout_at(next, self.releases.changed())
                .await
                .is_ok()
            {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    target: TARGET,
                    group = %self.config.group,
                    timeout = ?self.config.rebalance_timeout,
                    "partitions not released within the rebalance timeout: rejoining anyway"
                );
                return;
            }
            if heartbeat && !self.paused.load(Ordering::Relaxed) {
                let generation = self.last.as_ref().map_or(-1, |a| a.generation);
                if let Err(error) = self.heartbeat(generation).await {
                    if protocol::reaction_to(&error) == Reaction::Fenced {
                        tracing::warn!(target: TARGET, %error, "dropped while releasing");
                        self.member_id.clear();
                        heartbeat = false;
                    }
                }
            }
        }
    }

    /// Heartbeats while the generation lasts; answers why it ended. While
    /// heartbeats fail, the member gives up once the coordinator may have
    /// dropped it (a heartbeat interval before its session could end).
    /// Paused, it checks nothing: on resume it heartbeats first, as a
    /// process back from a freeze would.
    async fn stay(&mut self) -> End {
        let generation = self.last.as_ref().map_or(-1, |a| a.generation);
        let interval = self.config.heartbeat_interval;
        let mut failing = false;
        loop {
            tokio::time::sleep(interval).await;
            if self.paused.load(Ordering::Relaxed) {
                continue;
            }
            let deadline = self.heard + self.config.session_timeout.saturating_sub(interval);
            let left = deadline.saturating_duration_since(Instant::now());
            let bound = if left.is_zero() {
                self.config.call_timeout
            } else {
                left
            };
            let error = match tokio::time::timeout(bound, self.heartbeat(generation)).await {
                Ok(Ok(())) => {
                    if failing {
                        tracing::info!(target: TARGET, "the coordinator answers again");
                    }
                    failing = false;
                    continue;
                }
                Ok(Err(error)) => error,
                Err(_) => {
                    ClusterError::Unavailable(format!("no heartbeat answer within {bound:?}"))
                }
            };
            match protocol::reaction_to(&error) {
                Reaction::Rejoin => return End::Rejoin,
                Reaction::Fenced => return End::Fenced(error.to_string()),
                Reaction::Fatal => return End::Fatal(error.to_string()),
                Reaction::Rediscover => {}
            }
            if !failing {
                tracing::warn!(target: TARGET, %error, "heartbeat failed; finding the coordinator again");
                failing = true;
            }
            self.connection = None;
            if Instant::now() >= deadline {
                return End::Lost;
            }
        }
    }

    /// One join: JoinGroup, the leader's division, SyncGroup.
    async fn join_and_sync(&mut self) -> Result<Assignment, End> {
        let started = Instant::now();
        let joined = self.join().await?;
        let generation = joined.generation_id;
        let leading = joined.leader.as_str() == self.member_id;
        let assignments = if leading {
            self.lead(&joined)?
        } else {
            Vec::new()
        };
        let bytes = self.sync(generation, assignments).await?;
        tracing::debug!(
            target: TARGET,
            generation,
            leading,
            took = ?started.elapsed(),
            "joined"
        );
        self.assignment_from(generation, &bytes)
    }

    /// JoinGroup, answering MEMBER_ID_REQUIRED (and UNKNOWN_MEMBER_ID for an
    /// id the coordinator forgot) by joining again.
    async fn join(&mut self) -> Result<JoinGroupResponse, End> {
        let metadata = protocol::encode(&self.metadata())?;
        let timeout = self.config.rebalance_timeout + self.config.call_timeout;
        for _ in 0..MAX_JOIN_ATTEMPTS {
            let version = self
                .version::<JoinGroupRequest>(versions::JOIN_GROUP_MIN, versions::JOIN_GROUP)
                .await?;
            let request =
                protocol::join_group(&self.config, &self.member_id, metadata.clone(), version);
            let response = self.call(&request, version, timeout).await?;
            match ResponseError::try_from_code(response.error_code) {
                None => {
                    self.member_id = response.member_id.to_string();
                    return Ok(response);
                }
                Some(ResponseError::MemberIdRequired) => {
                    self.member_id = response.member_id.to_string();
                }
                Some(ResponseError::UnknownMemberId) if !self.member_id.is_empty() => {
                    self.member_id.clear();
                }
                Some(error) => {
                    return Err(ClusterError::Refused {
                        call: "JoinGroup",
                        error,
                    }
                    .into())
                }
            }
        }
        Err(End::Retry(ClusterError::Protocol(
            "JoinGroup kept asking to join again".into(),
        )))
    }

    /// What this member says when it joins: its URL and what it released.
    fn metadata(&self) -> JoinMetadata {
        JoinMetadata {
            version: FORMAT_VERSION,
            url: self.config.url.clone(),
            generation: self.last.as_ref().map_or(-1, |a| a.generation),
            owned: self
                .last
                .as_ref()
                .map(|a| a.partitions.clone())
                .unwrap_or_default(),
        }
    }

    /// The leader's part: divide the partitions among the members of the
    /// JoinGroup answer, the same membership document for each.
    fn lead(&self, joined: &JoinGroupResponse) -> Result<Vec<(String, Bytes)>, End> {
        let members: Vec<Joined> = joined
            .members
            .iter()
            .map(|m| {
                let metadata = protocol::decode::<JoinMetadata>(&m.metadata);
                if let Err(error) = &metadata {
                    tracing::warn!(target: TARGET, member = %m.member_id.as_str(), %error, "unreadable join metadata");
                }
                Joined {
                    id: m.member_id.to_string(),
                    metadata: metadata.ok(),
                }
            })
            .collect();
        let membership = Membership {
            version: FORMAT_VERSION,
            generation: joined.generation_id,
            members: plan(self.config.partitions, &members, self.last.as_ref()),
        };
        tracing::info!(
            target: TARGET,
            group = %self.config.group,
            generation = joined.generation_id,
            members = members.len(),
            "leading the rebalance"
        );
        let bytes = protocol::encode(&membership)?;
        Ok(members.into_iter().map(|m| (m.id, bytes.clone())).collect())
    }

    /// SyncGroup: the leader hands out `assignments`; everyone gets its own.
    async fn sync(
        &mut self,
        generation: i32,
        assignments: Vec<(String, Bytes)>,
    ) -> Result<Bytes, ClusterError> {
        let version = self
            .version::<SyncGroupRequest>(0, versions::SYNC_GROUP)
            .await?;
        let request = protocol::sync_group(
            &self.config,
            generation,
            &self.member_id,
            assignments,
            version,
        );
        let timeout = self.config.rebalance_timeout + self.config.call_timeout;
        let sent = Instant::now();
        let response = self.call(&request, version, timeout).await?;
        protocol::refused("SyncGroup", response.error_code)?;
        self.heard = sent;
        Ok(response.assignment)
    }

    /// This member's assignment in the membership the leader handed out.
    fn assignment_from(&self, generation: i32, bytes: &[u8]) -> Result<Assignment, End> {
        if bytes.is_empty() {
            return Err(End::Retry(ClusterError::Protocol(
                "SyncGroup gave no assignment".into(),
            )));
        }
        let membership: Membership = protocol::decode(bytes)?;
        let Some(own) = membership.members.iter().find(|m| m.id == self.member_id) else {
            return Err(End::Retry(ClusterError::Protocol(format!(
                "the membership of generation {generation} leaves out {}",
                self.member_id
            ))));
        };
        Ok(Assignment {
            generation,
            member_id: self.member_id.clone(),
            partitions: own.partitions.clone(),
            members: membership.members,
        })
    }

    async fn heartbeat(&mut self, generation: i32) -> Result<(), ClusterError> {
        let version = self
            .version::<HeartbeatRequest>(0, versions::HEARTBEAT)
            .await?;
        let request = protocol::heartbeat(&self.config, generation, &self.member_id);
        let sent = Instant::now();
        let response = self
            .call(&request, version, self.config.call_timeout)
            .await?;
        protocol::refused("Heartbeat", response.error_code)?;
        self.heard = sent;
        Ok(())
    }

    /// LeaveGroup, once; a failure only costs the others a session timeout.
    async fn leave_group(&mut self) {
        if self.member_id.is_empty() {
            return;
        }
        let result = async {
            let version = self
                .version::<LeaveGroupRequest>(versions::LEAVE_GROUP_MIN, versions::LEAVE_GROUP)
                .await?;
            let request = protocol::leave_group(&self.config, &self.member_id, version);
            let response = self
                .call(&request, version, self.config.call_timeout)
                .await?;
            protocol::refused("LeaveGroup", response.error_code)?;
            let own = response.members.first().map_or(0, |m| m.error_code);
            protocol::refused("LeaveGroup", own)
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(target: TARGET, group = %self.config.group, member = %self.member_id, "left the group")
            }
            Err(error) => tracing::warn!(target: TARGET, %error, "leaving the group failed"),
        }
    }

    /// Finds the coordinator through the first broker that names it, and
    /// connects to it.
    pub(super) async fn find_coordinator(&mut self) -> Result<(), ClusterError> {
        let mut failure = ClusterError::Unavailable("no broker configured".into());
        for broker in &self.config.brokers {
            match self.coordinator_via(broker).await {
                Ok(connection) => {
                    tracing::debug!(target: TARGET, coordinator = %connection.address(), "coordinator found");
                    self.connection = Some(connection);
                    return Ok(());
                }
                Err(error) => failure = error,
            }
        }
        Err(failure)
    }

    async fn coordinator_via(&self, broker: &str) -> Result<Connection, ClusterError> {
        let timeout = self.config.call_timeout;
        let mut connection = Connection::open(broker, timeout).await?;
        let version =
            connection.version::<FindCoordinatorRequest>(1, versions::FIND_COORDINATOR)?;
        let request = protocol::find_coordinator(&self.config, version);
        let response = connection.call(&request, version).await?;
        let address = protocol::coordinator_address(&response, version)?;
        if address == connection.address() {
            return Ok(connection);
        }
        Connection::open(&address, timeout).await
    }

    /// The connection to the coordinator, found again if there is none or
    /// the last call left it unusable.
    async fn connection(&mut self) -> Result<&mut Connection, ClusterError> {
        if !self.connection.as_ref().is_some_and(Connection::is_usable) {
            self.connection = None;
            self.find_coordinator().await?;
        }
        self.connection
            .as_mut()
            .ok_or_else(|| ClusterError::Unavailable("no coordinator".into()))
    }

    async fn version<R: Request>(&mut self, min: i16, max: i16) -> Result<i16, ClusterError> {
        self.connection().await?.version::<R>(min, max)
    }

    /// One call to the coordinator; a failed call drops the connection.
    async fn call<R: Request>(
        &mut self,
        request: &R,
        version: i16,
        timeout: Duration,
    ) -> Result<R::Response, ClusterError> {
        let result = self
            .connection()
            .await?
            .call_within(request, version, timeout)
            .await;
        if result.is_err() {
            self.connection = None;
        }
        result
    }
}
