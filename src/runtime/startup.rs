//! Startup: open the backends, create the topics, load every task's
//! checkpoint, refuse a state and a log that do not belong together, and
//! spawn one task per (processor, partition), live or replaying.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::core::{Core, Observer};
use super::own_writes::OwnWrites;
use super::ownership::Ownership;
use super::space::SpaceGuard;
use super::supervisor::{spawn_task, Reload};
use super::task::Positions;
use super::task_view::TaskView;
use super::{dead_letter, RuntimeError, Targets};
use crate::config::{Backend, Config, TopicsConfig};
use crate::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
use crate::log::{Log, TopicPartition};
use crate::model::seal::Sealer;
use crate::model::{partition_for, SourceTopic};
use crate::pipeline::account::Accounts;
use crate::pipeline::confirmed::{Confirmed, ConfirmedStats};
use crate::pipeline::control::ControlPlane;
use crate::pipeline::inflight::Inflight;
use crate::pipeline::Processor;
use crate::store::{checkpoint_key, dead_copies, BlockIndex, Checkpoint, Store, StoreError};

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
    let log: Arc<dyn Log> = match config.log.backend() {
        Backend::Kafka(kafka) => crate::log::kafka::KafkaLog::connect(kafka).await?,
        Backend::Embedded(settings) => {
            let log_config = EmbeddedLogConfig {
                segment_bytes: settings.segment_bytes,
                max_retained_bytes: settings.max_retained_bytes,
                history_bytes: settings.history_bytes,
                tail_cache_records: settings.tail_cache_records,
                ..EmbeddedLogConfig::with_dir(dir.join("log"))
            };
            EmbeddedLog::open(log_config)?
        }
    };
    Ok((log, store))
}

/// The checkpoint of every task, as the store holds them.
struct Checkpoints {
    /// Per partition (index = partition).
    inflight: Vec<Checkpoint<<Inflight as Processor>::Stats>>,
    accounts: Vec<Checkpoint<<Accounts as Processor>::Stats>>,
    confirmed: Vec<Checkpoint<<Confirmed as Processor>::Stats>>,
    /// The one control task.
    control: Checkpoint<<ControlPlane as Processor>::Stats>,
}

impl Checkpoints {
    fn load(store: &Store, partitions: u32) -> Result<Self, StoreError> {
        let mut all = Self {
            inflight: Vec::new(),
            accounts: Vec::new(),
            confirmed: Vec::new(),
            control: load_checkpoint::<ControlPlane>(store, 0)?,
        };
        for p in 0..partitions {
            all.inflight.push(load_checkpoint::<Inflight>(store, p)?);
            all.accounts.push(load_checkpoint::<Accounts>(store, p)?);
            all.confirmed.push(load_checkpoint::<Confirmed>(store, p)?);
        }
        Ok(all)
    }

    /// Every task's next offsets.
    fn positions(&self) -> impl Iterator<Item = &Positions> {
        (self.inflight.iter().map(|c| &c.next_offsets))
            .chain(self.accounts.iter().map(|c| &c.next_offsets))
            .chain(self.confirmed.iter().map(|c| &c.next_offsets))
            .chain(std::iter::once(&self.control.next_offsets))
    }

    /// Every task input with the offsets of the task that reads it.
    fn inputs(&self) -> Vec<(&Positions, (SourceTopic, u32))> {
        let mut inputs = Vec::new();
        for (p, ((inflight, accounts), confirmed)) in (self.inflight.iter())
            .zip(&self.accounts)
            .zip(&self.confirmed)
            .enumerate()
        {
            let p = p as u32;
            inputs.extend([
                (&inflight.next_offsets, (SourceTopic::Incoming, p)),
                (&inflight.next_offsets, (SourceTopic::Complete, p)),
                (&accounts.next_offsets, (SourceTopic::Inflight, p)),
                (&confirmed.next_offsets, (SourceTopic::Complete, p)),
            ]);
        }
        inputs.push((&self.control.next_offsets, (SourceTopic::Control, 0)));
        inputs
    }
}

pub(super) fn load_checkpoint<P: Processor>(
    store: &Store,
    partition: u32,
) -> Result<Checkpoint<P::Stats>, StoreError> {
    Ok(store
        .get(&checkpoint_key(P::NAME, partition))?
        .unwrap_or_default())
}

/// Refuses to start when the state has consumed records the log no longer
/// has (a log truncated, lost or replaced under a kept state): new records
/// would reuse those offsets and be skipped as already read.
async fn check_state_within_log(
    log: &dyn Log,
    topics: &TopicsConfig,
    offsets: &Positions,
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
    inputs: &[(&Positions, (SourceTopic, u32))],
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

/// Creates every topic kpay uses (if missing) and checks the store's format.
async fn prepare(config: &Config, log: &dyn Log, store: &Store) -> Result<(), RuntimeError> {
    let partitions = config.log.partitions;
    for topic in config.topics.all() {
        log.ensure_topic(topic, partitions).await?;
    }
    if config.scales_out() {
        log.ensure_topic(&config.topics.positions, partitions)
            .await?;
        log.ensure_topic(&config.topics.snapshots, partitions)
            .await?;
    }
    for one_partition in [
        &config.topics.commands,
        &config.topics.audit,
        &config.topics.logs,
    ] {
        log.ensure_topic(one_partition, 1).await?;
    }
    store.check_format()?;
    let restored = store.roll_back_partial()?;
    if restored > 0 {
        tracing::warn!(restored, "rolled back a checkpoint a crash interrupted");
    }
    Ok(())
}

/// Opens the topics and the store's checkpoints and spawns every task: live,
/// or replaying up to `targets`.
pub(super) async fn start_tasks(
    config: Config,
    log: Arc<dyn Log>,
    store: Store,
    observer: Arc<dyn Observer>,
    targets: Option<&Targets>,
) -> Result<Arc<Core>, RuntimeError> {
    prepare(&config, &*log, &store).await?;
    if config.scales_out() && targets.is_none() {
        // A task partition this data directory has never held starts from
        // its latest snapshot rather than from the start of the log.
        if super::snapshot::restore_missing(&config, &*log, &store).await? > 0 {
            // The cluster's state came with the snapshots: no demo accounts to open again.
            store.put(super::DEMO_SEEDED, &config.demo.accounts)?;
        }
    }
    let mut checkpoints = Checkpoints::load(&store, config.log.partitions)?;
    if targets.is_none() {
        for offsets in checkpoints.positions() {
            check_state_within_log(&*log, &config.topics, offsets).await?;
        }
        check_log_within_state(&*log, &config.topics, &checkpoints.inputs()).await?;
    }
    for checkpoint in &mut checkpoints.confirmed {
        shape_windows(&config, &mut checkpoint.stats);
    }
    let core = Arc::new(new_core(config, log, store, observer, &checkpoints)?);
    if core.config.scales_out() && targets.is_none() {
        // Owns nothing until the group assigns it partitions.
        core.ownership.set(0, Default::default());
        super::positions::start(&core);
        let _ = core.snapshots.set(super::snapshot::start(&core));
    }
    load_blocks(&core.store, &core.inflight)?;
    load_blocks(&core.store, &core.accounts)?;
    fill_presence_filters(&core);
    spawn_tasks(&core, checkpoints, targets);
    Ok(core)
}

fn new_core(
    config: Config,
    log: Arc<dyn Log>,
    store: Store,
    observer: Arc<dyn Observer>,
    checkpoints: &Checkpoints,
) -> Result<Core, RuntimeError> {
    let dlq_stored = store.count(dead_letter::TABLE);
    let space = SpaceGuard::new(&config.data.dir, config.data.min_free_bytes);
    let secret = &config.cluster.secret;
    let sealer = (!secret.is_empty()).then(|| Sealer::new(secret.expose()));
    let own_writes = OwnWrites::open(&store)?;
    Ok(Core {
        inflight: shared_views::<Inflight>(&checkpoints.inflight, &config),
        accounts: shared_views::<Accounts>(&checkpoints.accounts, &config),
        confirmed: shared_views::<Confirmed>(&checkpoints.confirmed, &config),
        control: shared_views::<ControlPlane>(std::slice::from_ref(&checkpoints.control), &config)
            .remove(0),
        config,
        log,
        store,
        apply_gate: RwLock::new(()),
        shutdown: CancellationToken::new(),
        processors_stop: CancellationToken::new(),
        tasks_running: Default::default(),
        tracker: TaskTracker::new(),
        observer,
        admission: std::sync::Mutex::new(None),
        throttle: Default::default(),
        dlq_lock: tokio::sync::Mutex::new(()),
        dlq_stored: AtomicU64::new(dlq_stored),
        space,
        failure: std::sync::Mutex::new(None),
        sealer,
        own_writes,
        ownership: Ownership::everything(),
        board: std::sync::OnceLock::new(),
        snapshots: std::sync::OnceLock::new(),
    })
}

/// The confirmed processor's windows as the settings cut them.
fn shape_windows(config: &Config, stats: &mut ConfirmedStats) {
    let instrument = &config.instrument;
    let window_ms = i64::from(instrument.window_seconds) * 1_000;
    let keep = if instrument.enabled {
        instrument.windows_kept
    } else {
        0
    };
    stats.windows.configure(window_ms, keep);
}

/// Reads the checkpoint of `P`'s task on `partition` again (for a restart).
fn reload<P: Processor>(core: &Arc<Core>, partition: u32) -> Reload<P::Stats> {
    let core = core.clone();
    Box::new(move || load_checkpoint::<P>(&core.store, partition))
}

/// One task per processor and partition, and the control task.
fn spawn_tasks(core: &Arc<Core>, checkpoints: Checkpoints, targets: Option<&Targets>) {
    let Checkpoints {
        inflight,
        accounts,
        confirmed,
        control,
    } = checkpoints;
    let until = |name: &str, partition: u32| {
        let key = (name.to_owned(), partition);
        targets.map(|targets| targets.get(&key).cloned().unwrap_or_default())
    };
    for (p, ((a, b), c)) in inflight
        .into_iter()
        .zip(accounts)
        .zip(confirmed)
        .enumerate()
    {
        let p32 = p as u32;
        let inputs = vec![(SourceTopic::Incoming, p32), (SourceTopic::Complete, p32)];
        let (view, reload_it) = (core.inflight[p].clone(), reload::<Inflight>(core, p32));
        spawn_task(core, view, a, inputs, until(Inflight::NAME, p32), reload_it);
        let inputs = vec![(SourceTopic::Inflight, p32)];
        let (view, reload_it) = (core.accounts[p].clone(), reload::<Accounts>(core, p32));
        spawn_task(core, view, b, inputs, until(Accounts::NAME, p32), reload_it);
        let inputs = vec![(SourceTopic::Complete, p32)];
        let shaped = core.clone();
        let reload_it: Reload<ConfirmedStats> = Box::new(move || {
            let mut checkpoint = load_checkpoint::<Confirmed>(&shaped.store, p32)?;
            shape_windows(&shaped.config, &mut checkpoint.stats);
            Ok(checkpoint)
        });
        let view = core.confirmed[p].clone();
        spawn_task(
            core,
            view,
            c,
            inputs,
            until(Confirmed::NAME, p32),
            reload_it,
        );
    }
    let inputs = vec![(SourceTopic::Control, 0)];
    let (view, reload_it) = (core.control.clone(), reload::<ControlPlane>(core, 0));
    spawn_task(
        core,
        view,
        control,
        inputs,
        until(ControlPlane::NAME, 0),
        reload_it,
    );
}

fn shared_views<P: Processor>(
    checkpoints: &[Checkpoint<P::Stats>],
    config: &Config,
) -> Vec<Arc<TaskView<P>>> {
    let items = match P::TABLE {
        "-" => 1,
        _ => config.pipeline.presence_filter_items,
    };
    checkpoints
        .iter()
        .enumerate()
        .map(|(p, c)| Arc::new(TaskView::new(p as u32, c, items)))
        .collect()
}

/// Reads where each task's rows in blocks are (the heads of its blocks, 8
/// bytes of memory per row) and notes their keys in its presence filter,
/// before any task runs: a lookup must find every row in a block.
fn load_blocks<P: Processor>(store: &Store, views: &[Arc<TaskView<P>>]) -> Result<(), StoreError> {
    if P::TABLE == "-" {
        return Ok(());
    }
    for view in views {
        // A packed table's keys are rows of their own too, noted with the others.
        let index = BlockIndex::load(store, P::TABLE, view.partition, P::PACKED, |key| {
            if !P::PACKED {
                view.note_present(key)
            }
        })?;
        *view.blocks.write().expect("blocks lock") = index;
    }
    Ok(())
}

/// Fills the presence filters with the keys already in the store, on a
/// thread of its own: the tasks start at once and ask the store for every
/// key until their filter is complete (a scan of a million rows takes
/// seconds). A failed scan leaves the filters incomplete: still correct.
///
/// Then it counts the dead copies in the account blocks found at start,
/// which a start counts live (`store::dead_copies`), so that collection
/// can take them.
fn fill_presence_filters(core: &Arc<Core>) {
    let core = core.clone();
    let found: Vec<u64> = (core.accounts.iter())
        .map(|view| view.blocks.read().expect("blocks lock").next_seq)
        .collect();
    let fill = move || {
        // Stops early on shutdown, so that the store is not held open.
        let stop = &core.shutdown;
        let filled = note_stored_keys(&core.store, &core.inflight, stop)
            .and_then(|()| note_stored_keys(&core.store, &core.accounts, stop));
        match filled {
            Ok(()) if stop.is_cancelled() => {}
            Ok(()) => {
                core.inflight
                    .iter()
                    .for_each(|view| view.presence_complete());
                core.accounts
                    .iter()
                    .for_each(|view| view.presence_complete());
            }
            Err(error) => {
                tracing::warn!(%error, "presence filters not filled: every lookup asks the store")
            }
        }
        if let Err(error) = count_dead_copies(&core.store, &core.accounts, &found, stop) {
            tracing::warn!(%error, "dead copies in account blocks not counted: kept until a restart");
        }
    };
    if let Err(error) = std::thread::Builder::new()
        .name("kpay-presence".into())
        .spawn(fill)
    {
        tracing::warn!(%error, "presence filters not filled: every lookup asks the store");
    }
}

/// Counts, per task of a packed table, the dead copies in the blocks below
/// `found` (those its start found) into its index.
fn count_dead_copies<P: Processor>(
    store: &Store,
    views: &[Arc<TaskView<P>>],
    found: &[u64],
    stop: &CancellationToken,
) -> Result<(), StoreError> {
    if !P::PACKED {
        return Ok(());
    }
    for (view, &below) in views.iter().zip(found) {
        if stop.is_cancelled() {
            break;
        }
        let dead = dead_copies(store, P::TABLE, view.partition, below)?;
        let mut index = view.blocks.write().expect("blocks lock");
        for (seq, count) in dead {
            index.release(seq, count);
        }
    }
    Ok(())
}

/// Adds the keys already in the store to each task's presence filter.
fn note_stored_keys<P: Processor>(
    store: &Store,
    views: &[Arc<TaskView<P>>],
    stop: &CancellationToken,
) -> Result<(), StoreError> {
    let partitions = views.len() as u32;
    store.for_each_key(P::TABLE, |key| {
        views[partition_for(key, partitions) as usize].note_present(key);
        !stop.is_cancelled()
    })
}
