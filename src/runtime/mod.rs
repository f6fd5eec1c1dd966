//! The runtime owns every piece of IO: it opens the log and the store, starts
//! one task per (processor, partition) and one ingest sequencer per partition,
//! flushes the store and applies retention, and shuts everything down in order.

pub mod ingest;
pub mod space;
pub mod task;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, TopicsConfig};
use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::control::processor::{ControlPlane, ControlState};
use crate::instrument::slo::{evaluate, Inputs, SloStatus, SloTracker};
use crate::instrument::windows::WindowStats;
use crate::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
use crate::log::{Log, LogError, Record, TopicPartition};
use crate::model::{codec, now_ms, partition_for, Envelope, Event, SourceTopic};
use crate::pipeline::account::{Account, AccountStats, Accounts};
use crate::pipeline::confirmed::{Confirmed, ConfirmedStats};
use crate::pipeline::inflight::{Inflight, InflightStats};
use crate::pipeline::Processor;
use crate::store::{checkpoint_key, Checkpoint, Store, StoreError};
use task::TaskShared;

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

impl TopicsConfig {
    pub fn name(&self, kind: SourceTopic) -> &str {
        match kind {
            SourceTopic::Incoming => &self.incoming,
            SourceTopic::Inflight => &self.inflight,
            SourceTopic::Complete => &self.complete,
            SourceTopic::Control => &self.commands,
            // Replays come from the DLQ (they are appended to the source topic).
            SourceTopic::Replay => &self.dlq,
        }
    }

    pub fn all(&self) -> [&str; 5] {
        [
            &self.incoming,
            &self.inflight,
            &self.complete,
            &self.confirmed,
            &self.dlq,
        ]
    }
}

/// Everything tasks, sequencers and HTTP handlers share.
pub struct Shared {
    pub config: Config,
    /// Topic names, from config.
    pub topics: TopicsConfig,
    pub log: Arc<dyn Log>,
    pub store: Store,
    /// Per partition, the tasks' shared views (index = partition).
    pub inflight: Vec<Arc<TaskShared<Inflight>>>,
    pub accounts: Vec<Arc<TaskShared<Accounts>>>,
    pub confirmed: Vec<Arc<TaskShared<Confirmed>>>,
    /// The control processor (pillar 3): paused or not, rate limit.
    pub control: Arc<TaskShared<ControlPlane>>,
    /// Tasks hold it shared while applying a batch; readers that need one
    /// consistent view across partitions (the ledger check) hold it exclusively.
    pub apply_gate: RwLock<()>,
    /// Cancelled first: stop intake (HTTP submissions, sequencers).
    pub shutdown: CancellationToken,
    /// Cancelled after the drain: processors checkpoint and stop.
    pub processors_stop: CancellationToken,
    /// Every spawned task, so shutdown can wait for all of them.
    pub tracker: TaskTracker,
    /// Since when each business goal has been met or missed.
    pub slo: SloTracker,
    /// The admission token bucket, rebuilt when the rate limit changes.
    admission: std::sync::Mutex<Option<(u64, Arc<DefaultDirectRateLimiter>)>>,
    /// Serialises replays and deletions of dead letters.
    pub dlq_lock: tokio::sync::Mutex<()>,
    /// Dead letters waiting in the store, against `limits.dlq_entries`.
    dlq_stored: AtomicU64,
    /// Free space on the data directory's device, and the last write that
    /// met a full device.
    pub space: space::SpaceGuard,
}

impl Shared {
    /// Notes the outcome of an append for readiness: a full device is
    /// reported by `/readyz` until an append succeeds again.
    pub fn note_append<T>(&self, result: &Result<T, LogError>) {
        match result {
            Ok(_) => self.space.note_success(),
            Err(error) if error.is_no_space() => self.space.note_refusal(error.to_string()),
            Err(_) => {}
        }
    }

    /// Takes a place for one more stored dead letter; false when the DLQ is
    /// full (the letter then only goes to the DLQ topic).
    pub fn dlq_admit(&self) -> bool {
        let limit = self.config.limits.dlq_entries as u64;
        self.dlq_stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back places of dead letters replayed or deleted.
    pub fn dlq_released(&self, count: u64) {
        let _ = self
            .dlq_stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(count))
            });
    }

    /// The control state as applied so far.
    pub fn control_state(&self) -> ControlState {
        self.control.stats.read().expect("stats lock").clone()
    }

    /// Whether the inflight processor must leave `payment.incoming` alone:
    /// paused by command, or shutting down (a stop is pause + drain, but
    /// not a command: the next start runs as before).
    pub fn admission_paused(&self) -> bool {
        self.shutdown.is_cancelled() || self.control.stats.read().expect("stats lock").paused
    }

    /// Whether a rate limit is set.
    pub fn admission_limited(&self) -> bool {
        self.control
            .stats
            .read()
            .expect("stats lock")
            .rate_limit_per_second
            > 0
    }

    /// How many of `wanted` new payments may be admitted now under the rate
    /// limit (a token bucket; bursts up to 1/5 s of the rate, so a task
    /// loop that takes that long, as one round trip to a Kafka broker may,
    /// still admits the full rate).
    pub fn admission_tokens(&self, wanted: usize) -> usize {
        let rate = self
            .control
            .stats
            .read()
            .expect("stats lock")
            .rate_limit_per_second;
        let Some(per_second) = NonZeroU32::new(rate.min(u64::from(u32::MAX)) as u32) else {
            return wanted;
        };
        let limiter = {
            let mut current = self.admission.lock().expect("admission lock");
            match current.as_ref() {
                Some((r, limiter)) if *r == rate => limiter.clone(),
                _ => {
                    let burst = NonZeroU32::new((per_second.get() / 5).max(1)).expect("at least 1");
                    let quota = Quota::per_second(per_second).allow_burst(burst);
                    let limiter = Arc::new(RateLimiter::direct(quota));
                    *current = Some((rate, limiter.clone()));
                    limiter
                }
            }
        };
        (0..wanted).take_while(|_| limiter.check().is_ok()).count()
    }
}

/// The running system: shared state plus the ingest handles.
pub struct Runtime {
    pub shared: Arc<Shared>,
    pub ingest: ingest::Ingest,
}

fn load_checkpoint<P: Processor>(
    store: &Store,
    partition: u32,
) -> Result<Checkpoint<P::Stats>, StoreError> {
    Ok(store
        .get(&checkpoint_key(P::NAME, partition))?
        .unwrap_or_default())
}

/// Opens the backends named by `config`: the store, then the embedded log
/// or a connection to the Kafka cluster.
pub async fn open_backends(config: &Config) -> Result<(Arc<dyn Log>, Store), RuntimeError> {
    let dir = &config.data.dir;
    std::fs::create_dir_all(dir)
        .map_err(|e| RuntimeError::Startup(format!("cannot create {}: {e}", dir.display())))?;
    // The store first: sled holds an exclusive lock on its directory, so a
    // second kpay on the same data stops here, before it touches the log.
    let store = Store::open(&dir.join("state"), config.data.state_cache_bytes)?
        .with_batch_rows(config.data.store_batch_rows);
    let log: Arc<dyn Log> = match config.log.backend.as_str() {
        "kafka" => crate::log::kafka::KafkaLog::connect(&config.log.kafka).await?,
        _ => {
            let log_config = EmbeddedLogConfig {
                segment_bytes: config.log.segment_bytes,
                max_retained_bytes: config.log.max_retained_bytes,
                history_bytes: config.log.history_bytes,
                tail_cache_records: config.log.tail_cache_records,
                ..EmbeddedLogConfig::with_dir(dir.join("log"))
            };
            EmbeddedLog::open(log_config)?
        }
    };
    Ok((log, store))
}

impl Runtime {
    /// Starts every task and sequencer over the given backends.
    pub async fn start(
        config: Config,
        log: Arc<dyn Log>,
        store: Store,
    ) -> Result<Self, RuntimeError> {
        let shared = start_tasks(config, log, store, None).await?;
        crate::ops::logs::start(&shared);
        let ingest = ingest::start(&shared).await?;
        shared.tracker.spawn(flusher(shared.clone()));
        shared.tracker.spawn(slo_watch(shared.clone()));
        if shared.config.instrument.enabled {
            shared.tracker.spawn(metrics_upkeep(shared.clone()));
        }
        let runtime = Self { shared, ingest };
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
        let shared = start_tasks(config, log, store, Some(targets)).await?;
        shared.tracker.close();
        shared.tracker.wait().await;
        if shared.processors_stop.is_cancelled() {
            return Err(RuntimeError::Startup(
                "a task failed during the replay (see the log above)".into(),
            ));
        }
        shared.store.flush().await?;
        Ok(())
    }
}

/// Refuses to start when the state has consumed records the log no longer
/// has (a log truncated, lost or replaced under a kept state): new records
/// would reuse those offsets and be skipped as already read.
async fn check_state_within_log(
    log: &dyn Log,
    topics: &TopicsConfig,
    offsets: &BTreeMap<(SourceTopic, u32), u64>,
) -> Result<(), RuntimeError> {
    for (&(kind, partition), &next) in offsets {
        let tp = TopicPartition::new(topics.name(kind), partition);
        let end = log.high_watermark(&tp).await?;
        if next > end {
            return Err(RuntimeError::Startup(format!(
                "the state has read {tp} up to offset {next}, but the log ends at {end}: the \
                 log was truncated, lost or replaced while the state was kept. Restore the \
                 log, or move the data directory's state aside to rebuild it from the log"
            )));
        }
    }
    Ok(())
}

/// Refuses to start when the log no longer holds records the state has not
/// read (retention removed them): a state lost or deleted after retention
/// ran, restarted empty, would silently miss them.
async fn check_log_within_state(
    log: &dyn Log,
    topics: &TopicsConfig,
    inputs: &[(&task::Positions, (SourceTopic, u32))],
) -> Result<(), RuntimeError> {
    for (offsets, input) in inputs {
        let next = offsets.get(input).copied().unwrap_or(0);
        let tp = TopicPartition::new(topics.name(input.0), input.1);
        let start = log.log_start(&tp).await?;
        if next < start {
            return Err(RuntimeError::Startup(format!(
                "the state has read {tp} up to offset {next}, but the log now starts at \
                 {start}: the records before it were removed by retention, so this state \
                 would never see them. The state directory was lost or replaced by an \
                 older one after retention ran. Restore the state from a backup taken \
                 with the log; a state rebuilt from this log would miss those records"
            )));
        }
    }
    Ok(())
}

/// Where each task (processor name, partition) stops a replay.
pub type Targets = BTreeMap<(String, u32), task::Positions>;

/// Opens the topics and the store's checkpoints and spawns every task: live,
/// or replaying up to `targets`.
async fn start_tasks(
    config: Config,
    log: Arc<dyn Log>,
    store: Store,
    targets: Option<&Targets>,
) -> Result<Arc<Shared>, RuntimeError> {
    let partitions = config.log.partitions;
    if config.instrument.enabled {
        crate::instrument::prometheus::install()?;
        crate::instrument::prometheus::describe();
    }
    for topic in config.topics.all() {
        log.ensure_topic(topic, partitions).await?;
    }
    log.ensure_topic(&config.topics.commands, 1).await?;
    log.ensure_topic(&config.topics.audit, 1).await?;
    log.ensure_topic(&config.topics.logs, 1).await?;
    store.check_format()?;
    let restored = store.roll_back_partial()?;
    if restored > 0 {
        tracing::warn!(restored, "rolled back a checkpoint a crash interrupted");
    }
    let mut checkpoints = (Vec::new(), Vec::new(), Vec::new());
    for p in 0..partitions {
        checkpoints.0.push(load_checkpoint::<Inflight>(&store, p)?);
        checkpoints.1.push(load_checkpoint::<Accounts>(&store, p)?);
        checkpoints.2.push(load_checkpoint::<Confirmed>(&store, p)?);
    }
    let control_checkpoint = load_checkpoint::<ControlPlane>(&store, 0)?;
    if targets.is_none() {
        let positions = (checkpoints.0.iter().map(|c| &c.next_offsets))
            .chain(checkpoints.1.iter().map(|c| &c.next_offsets))
            .chain(checkpoints.2.iter().map(|c| &c.next_offsets))
            .chain(std::iter::once(&control_checkpoint.next_offsets));
        for offsets in positions {
            check_state_within_log(&*log, &config.topics, offsets).await?;
        }
        let mut inputs = Vec::new();
        for p in 0..partitions {
            let (a, b, c) = (
                &checkpoints.0[p as usize],
                &checkpoints.1[p as usize],
                &checkpoints.2[p as usize],
            );
            inputs.extend([
                (&a.next_offsets, (SourceTopic::Incoming, p)),
                (&a.next_offsets, (SourceTopic::Complete, p)),
                (&b.next_offsets, (SourceTopic::Inflight, p)),
                (&c.next_offsets, (SourceTopic::Complete, p)),
            ]);
        }
        inputs.push((&control_checkpoint.next_offsets, (SourceTopic::Control, 0)));
        check_log_within_state(&*log, &config.topics, &inputs).await?;
    }
    let instrument = &config.instrument;
    let window_ms = i64::from(instrument.window_seconds) * 1_000;
    let keep = if instrument.enabled {
        instrument.windows_kept
    } else {
        0
    };
    for checkpoint in &mut checkpoints.2 {
        checkpoint.stats.windows.configure(window_ms, keep);
    }
    let dlq_stored = store.count(crate::ops::dlq::TABLE);
    let (config_dir, min_free_bytes) = (config.data.dir.clone(), config.data.min_free_bytes);
    let shared = Arc::new(Shared {
        topics: config.topics.clone(),
        inflight: shared_views::<Inflight>(&checkpoints.0, &config),
        accounts: shared_views::<Accounts>(&checkpoints.1, &config),
        confirmed: shared_views::<Confirmed>(&checkpoints.2, &config),
        control: shared_views::<ControlPlane>(std::slice::from_ref(&control_checkpoint), &config)
            .remove(0),
        config,
        log,
        store,
        apply_gate: RwLock::new(()),
        shutdown: CancellationToken::new(),
        processors_stop: CancellationToken::new(),
        tracker: TaskTracker::new(),
        slo: SloTracker::default(),
        admission: std::sync::Mutex::new(None),
        dlq_lock: tokio::sync::Mutex::new(()),
        dlq_stored: AtomicU64::new(dlq_stored),
        space: space::SpaceGuard::new(&config_dir, min_free_bytes),
    });
    note_stored_keys(&shared.store, &shared.inflight)?;
    note_stored_keys(&shared.store, &shared.accounts)?;
    for (p, ((a, b), c)) in checkpoints
        .0
        .into_iter()
        .zip(checkpoints.1)
        .zip(checkpoints.2)
        .enumerate()
    {
        let p32 = p as u32;
        let inflight_inputs = vec![(SourceTopic::Incoming, p32), (SourceTopic::Complete, p32)];
        let inflight = shared.inflight[p].clone();
        spawn_task(&shared, inflight, a, inflight_inputs, targets);
        let account_inputs = vec![(SourceTopic::Inflight, p32)];
        let accounts = shared.accounts[p].clone();
        spawn_task(&shared, accounts, b, account_inputs, targets);
        let confirmed_inputs = vec![(SourceTopic::Complete, p32)];
        let confirmed = shared.confirmed[p].clone();
        spawn_task(&shared, confirmed, c, confirmed_inputs, targets);
    }
    let control_inputs = vec![(SourceTopic::Control, 0)];
    spawn_task(
        &shared,
        shared.control.clone(),
        control_checkpoint,
        control_inputs,
        targets,
    );
    Ok(shared)
}

impl Runtime {
    /// Opens the configured demo accounts once, on the first start.
    async fn seed_demo_accounts(&self) -> Result<(), RuntimeError> {
        let demo = &self.shared.config.demo;
        const MARKER: &str = "m/demo_seeded";
        if demo.accounts == 0 || self.shared.store.get::<u32>(MARKER)?.is_some() {
            return Ok(());
        }
        let events = (0..demo.accounts).map(|n| Event::OpenAccount {
            account: format!("demo-{n:04}"),
            opening_balance_cents: demo.opening_balance_cents,
            at_ms: now_ms(),
        });
        self.append_account_events(events.collect()).await?;
        self.shared.store.put(MARKER, &demo.accounts)?;
        Ok(())
    }

    /// Appends account events (open, deposit, close) to `payment.inflight`,
    /// each keyed and partitioned by its account.
    pub async fn append_account_events(&self, events: Vec<Event>) -> Result<(), RuntimeError> {
        let partitions = self.shared.config.log.partitions;
        let mut groups: BTreeMap<u32, Vec<Record>> = BTreeMap::new();
        for event in events {
            let account = Accounts::state_key(&event)
                .expect("account events have an account")
                .to_owned();
            let envelope = Envelope {
                source: None,
                event,
            };
            groups
                .entry(partition_for(&account, partitions))
                .or_default()
                .push(Record {
                    key: Bytes::from(account.into_bytes()),
                    value: Bytes::from(codec::encode(&envelope)),
                    timestamp_ms: now_ms(),
                });
        }
        for (partition, records) in groups {
            let tp = TopicPartition::new(self.shared.topics.inflight.clone(), partition);
            self.shared.log.append(&tp, records).await?;
        }
        Ok(())
    }

    /// Refuses new work while the data directory's device is below
    /// `data.min_free_bytes` free.
    pub fn check_space(&self) -> Result<(), RuntimeError> {
        match self.shared.space.below_floor() {
            Some(reason) => Err(RuntimeError::NoSpace(reason)),
            None => Ok(()),
        }
    }

    /// True once every task has caught up with the log as it was at start.
    pub fn ready(&self) -> bool {
        let s = &self.shared;
        s.inflight
            .iter()
            .all(|t| t.caught_up.load(Ordering::Relaxed))
            && s.accounts
                .iter()
                .all(|t| t.caught_up.load(Ordering::Relaxed))
            && s.confirmed
                .iter()
                .all(|t| t.caught_up.load(Ordering::Relaxed))
    }

    pub fn inflight_totals(&self) -> InflightStats {
        let mut total = InflightStats::default();
        for task in &self.shared.inflight {
            let stats = task.stats.read().expect("stats lock");
            total.inflight_count += stats.inflight_count;
            total.inflight_amount_cents += stats.inflight_amount_cents;
            total.admitted_count += stats.admitted_count;
            total.duplicate_count += stats.duplicate_count;
        }
        total
    }

    pub fn confirmed_totals(&self) -> ConfirmedStats {
        let mut total = ConfirmedStats::default();
        let today = now_ms().div_euclid(crate::pipeline::confirmed::MS_PER_DAY);
        for task in &self.shared.confirmed {
            let stats = task.stats.read().expect("stats lock");
            total.confirmed_count += stats.confirmed_count;
            total.confirmed_amount_cents += stats.confirmed_amount_cents;
            if stats.today_day == today {
                total.today_count += stats.today_count;
                total.today_amount_cents += stats.today_amount_cents;
            }
            total.rejected_count += stats.rejected_count;
            total.reversed_count += stats.reversed_count;
            for (reason, n) in &stats.rejected_by_reason {
                *total.rejected_by_reason.entry(reason.clone()).or_default() += n;
            }
            for (reason, n) in &stats.reversed_by_reason {
                *total.reversed_by_reason.entry(reason.clone()).or_default() += n;
            }
        }
        total.today_day = today;
        total
    }

    /// Account totals over all partitions, read as one consistent snapshot.
    pub fn ledger(&self) -> AccountStats {
        let _exclusive = self.shared.apply_gate.write().expect("apply gate");
        let mut total = AccountStats::default();
        for task in &self.shared.accounts {
            let s = task.stats.read().expect("stats lock");
            total.account_count += s.account_count;
            total.funded_cents += s.funded_cents;
            total.balance_sum_cents += s.balance_sum_cents;
            total.debited_cents += s.debited_cents;
            total.credited_cents += s.credited_cents;
            total.refunded_cents += s.refunded_cents;
        }
        total
    }

    pub fn account(&self, id: &str) -> Result<Option<Account>, RuntimeError> {
        let partition = partition_for(id, self.shared.config.log.partitions) as usize;
        self.shared.accounts[partition].get(&self.shared, id)
    }

    /// A page of accounts in id order across all partitions.
    pub fn accounts_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Account>, RuntimeError> {
        let mut page: BTreeMap<String, Account> = self
            .shared
            .store
            .scan::<Account>(Accounts::TABLE, after, limit)?
            .into_iter()
            .collect();
        for task in &self.shared.accounts {
            page.extend(task.dirty_rows_after(after));
        }
        Ok(page.into_values().take(limit).collect())
    }

    /// Stops intake and admission (pause), lets admitted payments finish
    /// (drain, bounded), stops the processors after a final checkpoint, and
    /// flushes the store. Accepted payments not yet admitted wait in the log.
    pub async fn shutdown(&self) -> Result<(), RuntimeError> {
        self.shared.shutdown.cancel();
        let drain = Duration::from_millis(self.shared.config.pipeline.shutdown_drain_ms);
        let deadline = tokio::time::Instant::now() + drain;
        // Processors stopped already (a task failed): nothing would drain.
        while self.inflight_totals().inflight_count > 0
            && tokio::time::Instant::now() < deadline
            && !self.shared.processors_stop.is_cancelled()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.inflight_totals().inflight_count;
        if left > 0 {
            tracing::warn!(left, "drain timed out; the rest resumes after restart");
        }
        self.shared.processors_stop.cancel();
        self.shared.tracker.close();
        self.shared.tracker.wait().await;
        self.shared.store.flush().await?;
        Ok(())
    }
}

fn shared_views<P: Processor>(
    checkpoints: &[Checkpoint<P::Stats>],
    config: &Config,
) -> Vec<Arc<TaskShared<P>>> {
    let items = match P::TABLE {
        "-" => 1,
        _ => config.pipeline.presence_filter_items,
    };
    checkpoints
        .iter()
        .enumerate()
        .map(|(p, c)| Arc::new(TaskShared::new(p as u32, c, items)))
        .collect()
}

/// Fills each task's presence filter with the keys already in the store.
fn note_stored_keys<P: Processor>(
    store: &Store,
    views: &[Arc<TaskShared<P>>],
) -> Result<(), StoreError> {
    let partitions = views.len() as u32;
    store.for_each_key(P::TABLE, |key| {
        views[partition_for(key, partitions) as usize].note_present(key);
    })
}

fn spawn_task<P: Processor>(
    shared: &Arc<Shared>,
    task: Arc<TaskShared<P>>,
    checkpoint: Checkpoint<P::Stats>,
    inputs: Vec<(SourceTopic, u32)>,
    targets: Option<&Targets>,
) {
    let shared = shared.clone();
    let tracker = shared.tracker.clone();
    let until = targets.map(|targets| {
        let key = (P::NAME.to_owned(), task.partition);
        targets.get(&key).cloned().unwrap_or_default()
    });
    tracker.spawn(async move {
        let partition = task.partition;
        if let Err(error) = task::run(shared.clone(), task, checkpoint, inputs, until).await {
            // A task that cannot go on stops the whole pipeline rather than
            // let the others run ahead of it.
            if let RuntimeError::Store(store) = &error {
                if store.is_no_space() {
                    // sled refuses every write after an IO error until it is
                    // reopened, so the pipeline cannot go on in this process.
                    let reason = format!(
                        "the state store in {} ran out of space ({store}); it refuses every \
                         write from now on: kpay stops. Free space and start it again: nothing \
                         acknowledged is lost, the log holds every accepted payment",
                        shared.config.data.dir.join("state").display()
                    );
                    shared.space.note_refusal(reason.clone());
                    tracing::error!(processor = P::NAME, partition, %reason, "task failed; shutting down");
                    shared.shutdown.cancel();
                    shared.processors_stop.cancel();
                    return;
                }
            }
            tracing::error!(processor = P::NAME, partition, %error, "task failed; shutting down");
            shared.shutdown.cancel();
            shared.processors_stop.cancel();
        }
    });
}

/// Folds recorded histogram samples into their buckets every few seconds:
/// the exporter keeps raw samples until then, which would grow without bound
/// between scrapes.
async fn metrics_upkeep(shared: Arc<Shared>) {
    let Ok(handle) = crate::instrument::prometheus::install() else {
        return;
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => handle.run_upkeep(),
            () = shared.processors_stop.cancelled() => break,
        }
    }
}

/// Judges the business goals every second, so `since` is right to the second.
async fn slo_watch(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shared.processors_stop.cancelled() => break,
        }
        if let Err(error) = slo_status(&shared).await {
            tracing::warn!(%error, "cannot judge business goals");
        }
    }
}

/// The throughput and latency windows of all partitions, merged.
pub fn windows(shared: &Shared) -> WindowStats {
    let parts: Vec<WindowStats> = shared
        .confirmed
        .iter()
        .map(|task| task.stats.read().expect("stats lock").windows.clone())
        .collect();
    WindowStats::merge(&parts)
}

/// Every business goal now: value, met or not, since when.
pub async fn slo_status(shared: &Shared) -> Result<Vec<SloStatus>, RuntimeError> {
    let lag_records = crate::instrument::lag::lag(shared)
        .await?
        .iter()
        .map(|l| l.lag_records)
        .sum();
    let dlq_size = shared.store.count(crate::ops::dlq::TABLE);
    let now = now_ms();
    let windows = windows(shared);
    let inputs = Inputs {
        windows: &windows,
        dlq_size,
        lag_records,
        now_ms: now,
    };
    Ok(shared
        .slo
        .observe(evaluate(&shared.config.slo, &inputs), now))
}

/// Flushes the store on a timer, then marks the flushed checkpoints durable
/// and lets the log drop what every consumer has durably passed.
async fn flusher(shared: Arc<Shared>) {
    let every = Duration::from_millis(shared.config.pipeline.flush_interval_ms);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shared.processors_stop.cancelled() => break,
        }
        if let Err(error) = flush_once(&shared).await {
            tracing::error!(%error, "store flush failed");
        }
    }
}

async fn flush_once(shared: &Shared) -> Result<(), RuntimeError> {
    let snapshot: Vec<_> = (shared.inflight.iter().map(|t| (&t.committed, &t.durable)))
        .chain(shared.accounts.iter().map(|t| (&t.committed, &t.durable)))
        .chain(shared.confirmed.iter().map(|t| (&t.committed, &t.durable)))
        .chain(std::iter::once(&shared.control).map(|t| (&t.committed, &t.durable)))
        .map(|(committed, durable)| (committed.lock().expect("lock").clone(), durable))
        .collect();
    shared.store.flush().await?;
    for (committed, durable) in snapshot {
        *durable.lock().expect("lock") = committed;
    }
    retention(shared).await
}

async fn retention(shared: &Shared) -> Result<(), RuntimeError> {
    if shared.config.log.backend == "kafka" {
        // The cluster's own retention settings apply.
        return Ok(());
    }
    let topics = &shared.topics;
    // Commands live on in the control state; their records need not pin segments.
    let commands = TopicPartition::new(topics.commands.clone(), 0);
    let applied = shared.control.durable_offset((SourceTopic::Control, 0));
    shared.log.release_before(&commands, applied).await?;
    // Journals are kept in the store as they are appended.
    for journal in [&topics.audit, &topics.logs] {
        let tp = TopicPartition::new(journal.clone(), 0);
        let end = shared.log.high_watermark(&tp).await?;
        shared.log.release_before(&tp, end).await?;
    }
    for p in 0..shared.config.log.partitions {
        let i = p as usize;
        let incoming = shared.inflight[i].durable_offset((SourceTopic::Incoming, p));
        let inflight = shared.accounts[i].durable_offset((SourceTopic::Inflight, p));
        let complete = shared.inflight[i]
            .durable_offset((SourceTopic::Complete, p))
            .min(shared.confirmed[i].durable_offset((SourceTopic::Complete, p)));
        let releases = [
            (&topics.incoming, incoming),
            (&topics.inflight, inflight),
            (&topics.complete, complete),
        ];
        for (topic, offset) in releases {
            let tp = TopicPartition::new(topic.clone(), p);
            shared.log.release_before(&tp, offset).await?;
        }
        let confirmed = TopicPartition::new(topics.confirmed.clone(), p);
        let end = shared.log.high_watermark(&confirmed).await?;
        let keep = shared.config.log.sink_retain_records;
        shared
            .log
            .release_before(&confirmed, end.saturating_sub(keep))
            .await?;
        // Dead letters are kept in the store; a rare record must not pin a
        // segment of the shared log.
        let dlq = TopicPartition::new(topics.dlq.clone(), p);
        let end = shared.log.high_watermark(&dlq).await?;
        shared.log.release_before(&dlq, end).await?;
    }
    Ok(())
}
