//! The runtime owns every piece of IO of the pipeline: it opens the log and
//! the store, starts one task per (processor, partition) and one ingest
//! sequencer per partition, flushes the store and applies retention, and
//! shuts everything down in order. The layers above reach it through
//! [`Runtime`]'s named views and commands, never through its fields.
//!
//! Files: `startup` (backends, checkpoints, spawning), `supervisor` (a
//! failed task restarted with backoff, or kpay stopped with the reason),
//! `task` (the loop of one task: read, apply, produce, checkpoint), `task_view` (what a task
//! shares), `ingest` (the sequencers behind `POST /payments`), `flush`
//! (durability and retention), `views` (what the layers above read),
//! `dead_letter`, `space` (free space on the data device), `core` (the
//! state they share).

mod core;
pub mod dead_letter;
mod flush;
pub mod ingest;
mod own_writes;
pub mod ownership;
pub mod payment_list;
mod positions;
mod snapshot;
pub mod space;
mod startup;
mod supervisor;
mod task;
mod task_view;
pub mod throttle;
mod views;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use self::core::{NoObserver, Observer};
pub use startup::open_backends;
pub use task::Positions;
pub use views::InputPosition;

use self::core::Core;
use crate::config::{Config, TopicsConfig};
use crate::log::{Log, LogError};
use crate::model::{now_ms, partition_for, ControlCommand, Event, SourceTopic};
use crate::pipeline::account::Accounts;
use crate::pipeline::control::ControlState;
use crate::pipeline::Processor;
use crate::store::{Store, StoreError};

/// Store key saying the demo accounts were opened (or came with a snapshot).
const DEMO_SEEDED: &str = "m/demo_seeded";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Startup(String),
    /// Refused for want of space on the data directory's device; the text
    /// says how much is free and where.
    #[error("{0}")]
    NoSpace(String),
}

impl RuntimeError {
    /// Whether this is a full device (of the log, the store or the floor
    /// `data.min_free_bytes`): the same call may succeed once space is freed.
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::Log(error) => error.is_no_space(),
            Self::Store(error) => error.is_no_space(),
            Self::NoSpace(_) => true,
            Self::Startup(_) => false,
        }
    }
}

/// Where each task (processor name, partition) stops a replay.
pub type Targets = BTreeMap<(String, u32), Positions>;

/// The running pipeline: a cheap handle (clones share it).
#[derive(Clone)]
pub struct Runtime {
    core: Arc<Core>,
    ingest: Arc<ingest::Ingest>,
}

impl Runtime {
    /// Starts every task and sequencer over the given backends; `observer`
    /// sees each completion (the instrumentation plane's live views).
    pub async fn start(
        config: Config,
        log: Arc<dyn Log>,
        store: Store,
        observer: Arc<dyn Observer>,
    ) -> Result<Self, RuntimeError> {
        let core = startup::start_tasks(config, log, store, observer, None).await?;
        let ingest = Arc::new(ingest::start(&core).await?);
        core.tracker.spawn(flush::flusher(core.clone()));
        let runtime = Self { core, ingest };
        runtime.seed_demo_accounts().await?;
        Ok(runtime)
    }

    /// Replays the log into `store` (which starts empty): every task reads
    /// its inputs up to its position in `targets` and stops, appending
    /// nothing. Returns once all are done and the store is flushed.
    pub async fn replay(
        config: Config,
        log: Arc<dyn Log>,
        store: Store,
        targets: &Targets,
    ) -> Result<(), RuntimeError> {
        let observer = Arc::new(NoObserver);
        let core = startup::start_tasks(config, log, store, observer, Some(targets)).await?;
        core.tracker.close();
        core.tracker.wait().await;
        if let Some(reason) = core.failure.lock().expect("failure lock").clone() {
            return Err(RuntimeError::Startup(reason));
        }
        core.store.flush().await?;
        Ok(())
    }

    /// The settings the runtime runs with.
    pub fn config(&self) -> &Config {
        &self.core.config
    }

    /// Topic names.
    pub fn topics(&self) -> &TopicsConfig {
        &self.core.config.topics
    }

    /// The log every topic lives in.
    pub fn log(&self) -> &Arc<dyn Log> {
        &self.core.log
    }

    /// The state store (tables of the processors and of the planes above).
    pub fn store(&self) -> &Store {
        &self.core.store
    }

    /// The intake of new payments (one sequencer per partition).
    pub fn ingest(&self) -> &ingest::Ingest {
        &self.ingest
    }

    /// Free space on the data directory's device, and the last refusal.
    pub fn space(&self) -> &space::SpaceGuard {
        &self.core.space
    }

    /// Why the runtime stopped on an error (a task that could not go on,
    /// the state store full), if it did; `None` after a clean stop.
    pub fn failure(&self) -> Option<String> {
        self.core.failure.lock().expect("failure lock").clone()
    }

    /// Runs `future` as part of the runtime: shutdown waits for it. It
    /// should end once [`Runtime::stopped`] resolves.
    pub fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) {
        self.core.tracker.spawn(future);
    }

    /// Resolves once the processors stop (after the drain, or a failure).
    pub async fn stopped(&self) {
        self.core.processors_stop.cancelled().await;
    }

    /// Cancelled when intake stops: shutdown began, or a task failed.
    pub fn intake_closing(&self) -> CancellationToken {
        self.core.shutdown.clone()
    }

    /// The control state as applied so far.
    pub fn control_state(&self) -> ControlState {
        self.core.control_state()
    }

    /// Whether new payments wait (paused by command, or shutting down).
    pub fn admission_paused(&self) -> bool {
        self.core.admission_paused()
    }

    /// Serialises replays and deletions of dead letters.
    pub fn dlq_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.core.dlq_lock
    }

    /// Gives back places of dead letters replayed or deleted.
    pub fn dlq_released(&self, count: u64) {
        self.core.dlq_released(count);
    }

    /// Stops (`true`) or restarts reading input `topic` in every task of
    /// `processor`: its records wait in the log and show up as lag (drills
    /// and tests of a stopped stream).
    pub fn hold_input(&self, processor: &str, topic: SourceTopic, held: bool) {
        let core = &self.core;
        match processor {
            "inflight" => core.inflight.iter().for_each(|t| t.hold(topic, held)),
            "account" => core.accounts.iter().for_each(|t| t.hold(topic, held)),
            "confirmed" => core.confirmed.iter().for_each(|t| t.hold(topic, held)),
            "control" => core.control.hold(topic, held),
            _ => {}
        }
    }

    /// Opens the configured demo accounts once, on the first start (on a
    /// cluster, not again by a member restored from the others' snapshots).
    async fn seed_demo_accounts(&self) -> Result<(), RuntimeError> {
        let demo = &self.core.config.demo;
        if demo.accounts == 0 || self.core.store.get::<u32>(DEMO_SEEDED)?.is_some() {
            return Ok(());
        }
        let events = (0..demo.accounts).map(|n| Event::OpenAccount {
            account: format!("demo-{n:04}"),
            opening_balance_cents: demo.opening_balance_cents,
            at_ms: now_ms(),
        });
        self.append_account_events(events.collect()).await?;
        self.core.store.put(DEMO_SEEDED, &demo.accounts)?;
        Ok(())
    }

    /// `value` as a record of `kind` keyed `key` must be written: with the
    /// cluster's HMAC tag on the internal topics when `cluster.secret` is
    /// set, else unchanged. Whatever kpay itself appends there goes through it.
    pub fn signed(&self, kind: SourceTopic, key: &[u8], value: Vec<u8>) -> Vec<u8> {
        self.core.seal(kind, key, value)
    }

    /// Appends account events (open, deposit, close) to `payment.inflight`,
    /// each keyed and partitioned by its account, sourced so that a copy of
    /// one is never applied twice (see `own_writes`). Returns the offset of
    /// the last record appended.
    pub async fn append_account_events(
        &self,
        events: Vec<Event>,
    ) -> Result<Option<u64>, RuntimeError> {
        let keyed = events
            .into_iter()
            .map(|event| {
                let account = Accounts::state_key(&event).expect("account events have an account");
                (account.to_owned(), event)
            })
            .collect();
        let core = &self.core;
        core.own_writes
            .append(core, SourceTopic::Inflight, keyed)
            .await
    }

    /// Appends one account event like [`Self::append_account_events`] and
    /// waits, at most `wait`, until this instance's account task for its
    /// partition has applied it. Returns whether it has.
    pub async fn apply_account_event(
        &self,
        event: Event,
        wait: Duration,
    ) -> Result<bool, RuntimeError> {
        let account = Accounts::state_key(&event).expect("account events have an account");
        let partition = partition_for(account, self.core.config.log.partitions);
        let appended = self.append_account_events(vec![event]).await?;
        let offset = appended.expect("one record appended");
        let task = &self.core.accounts[partition as usize];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let position = (task.positions.lock().expect("positions lock"))
                .get(&(SourceTopic::Inflight, partition))
                .copied();
            if position.is_some_and(|next| next > offset) {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The intake's rate set by a controller (`control::adaptive`), and the
    /// test hooks that slow a processor down.
    pub fn throttle(&self) -> &throttle::Throttle {
        &self.core.throttle
    }

    /// This instance's part of the operator's rate limit (0: none): all of
    /// it alone, its partitions' share on a cluster.
    pub fn rate_limit_share(&self) -> u64 {
        self.core.rate_limit_share()
    }

    /// Appends an operator's review of a held payment to `payment.incoming`
    /// (keyed by the payment, so its inflight task applies it in order, and
    /// a pause holds it like new payments), sourced like account events.
    /// `held` is where the hold was read (the `held` hop's partition and
    /// offset of `payment.complete`).
    pub async fn append_review(
        &self,
        payment_id: &str,
        approve: bool,
        principal: &str,
        held: (u32, u64),
    ) -> Result<(), RuntimeError> {
        let event = Event::Review {
            payment_id: payment_id.to_owned(),
            approve,
            principal: principal.to_owned(),
            at_ms: crate::model::now_ms(),
            held_partition: held.0,
            held_offset: held.1,
        };
        let core = &self.core;
        let keyed = vec![(payment_id.to_owned(), event)];
        core.own_writes
            .append(core, SourceTopic::Incoming, keyed)
            .await?;
        Ok(())
    }

    /// Which partitions this instance owns, and which its tasks act for.
    pub fn ownership(&self) -> &ownership::Ownership {
        &self.core.ownership
    }

    /// Whether every checkpoint position handed to the publisher is
    /// appended (a partition given up is then safe to move).
    pub fn positions_published(&self) -> bool {
        self.core.board().published_all()
    }

    /// Appends an operator's command to `control.commands`, sourced like
    /// account events; returns its offset.
    pub async fn append_command(&self, command: ControlCommand) -> Result<u64, RuntimeError> {
        let keyed = vec![("control".to_owned(), Event::Control(command))];
        let core = &self.core;
        let offset = core
            .own_writes
            .append(core, SourceTopic::Control, keyed)
            .await?;
        Ok(offset.expect("one record appended"))
    }

    /// Refuses new work while the data directory's device is below
    /// `data.min_free_bytes` free.
    pub fn check_space(&self) -> Result<(), RuntimeError> {
        match self.core.space.below_floor() {
            Some(reason) => Err(RuntimeError::NoSpace(reason)),
            None => Ok(()),
        }
    }

    /// Stops intake and admission (pause), lets admitted payments finish
    /// (drain, bounded), stops the processors after a final checkpoint, and
    /// flushes the store. Accepted payments not yet admitted wait in the log.
    pub async fn shutdown(&self) -> Result<(), RuntimeError> {
        self.core.shutdown.cancel();
        let drain = Duration::from_millis(self.core.config.pipeline.shutdown_drain_ms);
        let deadline = tokio::time::Instant::now() + drain;
        // Processors stopped already (a task failed): nothing would drain.
        while self.inflight_totals().inflight_count > 0
            && tokio::time::Instant::now() < deadline
            && !self.core.processors_stop.is_cancelled()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.inflight_totals().inflight_count;
        if left > 0 {
            tracing::warn!(left, "drain timed out; the rest resumes after restart");
        }
        self.core.processors_stop.cancel();
        self.core.tracker.close();
        self.core.tracker.wait().await;
        self.core.store.flush().await?;
        Ok(())
    }
}
