//! One task per (processor, partition): read a batch from each input, apply it
//! through the pure processor, append the outputs (durably), and every commit
//! interval write changed rows, dead letters, input offsets and statistics to
//! the store in one atomic batch.
//!
//! Exactly-once effect: after a crash a task restarts from its last checkpoint
//! and reprocesses what followed, emitting copies of outputs it already wrote.
//! Every output carries its source (topic, partition, offset), and every task
//! checkpoints the highest source offset it applied per upstream partition, so
//! a copy is recognised and skipped. Processing is deterministic given the
//! state and the input order, so the skipped copy says what the first did.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fastbloom::AtomicBloomFilter;
use futures::future::{select_all, try_join_all};

use super::{RuntimeError, Shared};
use crate::failpoint::{self, Point};
use crate::log::{Record, StoredRecord, TopicPartition};
use crate::model::{codec, now_ms, partition_for, Envelope, Event, Source, SourceTopic};
use crate::ops::dlq::DeadLetter;
use crate::pipeline::{Ctx, Emit, OutTopic, Processor};
use crate::store::{
    checkpoint_key, encode_row, kept_key, kept_table, parts_by_size, row_key, undo_key, AppliedKey,
    Batch, Checkpoint, RowWrite, StoredBytes, MAX_BATCH_ROWS,
};

/// A cached state row; `dirty` rows are newer than the store.
struct Row<S> {
    value: S,
    dirty: bool,
    /// The row's bytes in the store (`None`: not stored yet), kept so a
    /// chunked checkpoint can be undone without reading the store again.
    stored: Option<StoredBytes>,
}

/// What a task shares with the HTTP layer and the flusher.
pub struct TaskShared<P: Processor> {
    /// The partition this task owns.
    pub partition: u32,
    /// Rows read or written recently; the store has the rest.
    rows: RwLock<HashMap<String, Row<P::State>>>,
    /// Live statistics (checkpointed with the offsets).
    pub stats: RwLock<P::Stats>,
    /// Input offsets of the last checkpoint applied to the store.
    pub committed: Mutex<BTreeMap<(SourceTopic, u32), u64>>,
    /// Input offsets of the last checkpoint the store has flushed to disk;
    /// retention and the ingest dedup index trust only these.
    pub durable: Mutex<BTreeMap<(SourceTopic, u32), u64>>,
    /// Set once the task has read up to the high-water mark seen at start.
    pub caught_up: AtomicBool,
    /// Next offset to read per input, as of the last batch (for lag).
    pub positions: Mutex<BTreeMap<(SourceTopic, u32), u64>>,
    /// Input topics this task does not read for now (a stopped stream);
    /// records wait in the log and show up as lag.
    held: Mutex<Vec<SourceTopic>>,
    /// Every key this task has ever stored (with rare false positives): a
    /// miss here skips the store lookup, which most new payment ids would
    /// otherwise pay twice (ingest dedup and admission).
    presence: AtomicBloomFilter,
}

impl<P: Processor> TaskShared<P> {
    pub fn new(partition: u32, checkpoint: &Checkpoint<P::Stats>, filter_items: usize) -> Self {
        Self {
            presence: AtomicBloomFilter::with_false_pos(0.01).expected_items(filter_items.max(1)),
            partition,
            rows: RwLock::new(HashMap::new()),
            stats: RwLock::new(checkpoint.stats.clone()),
            committed: Mutex::new(checkpoint.next_offsets.clone()),
            durable: Mutex::new(checkpoint.next_offsets.clone()),
            caught_up: AtomicBool::new(false),
            positions: Mutex::new(checkpoint.next_offsets.clone()),
            held: Mutex::new(Vec::new()),
        }
    }

    /// The freshest value of a row: the task's cache, else the store.
    pub fn get(&self, shared: &Shared, key: &str) -> Result<Option<P::State>, RuntimeError> {
        if let Some(row) = self.rows.read().expect("rows lock").get(key) {
            return Ok(Some(row.value.clone()));
        }
        self.load(shared, key)
    }

    /// Reads a row from the store, unless the presence filter knows it is absent.
    fn load(&self, shared: &Shared, key: &str) -> Result<Option<P::State>, RuntimeError> {
        Ok(self.load_raw(shared, key)?.map(|(value, _)| value))
    }

    fn load_raw(
        &self,
        shared: &Shared,
        key: &str,
    ) -> Result<Option<(P::State, StoredBytes)>, RuntimeError> {
        if !self.presence.contains(key) {
            return Ok(None);
        }
        Ok(shared.store.get_raw(&row_key(P::TABLE, key))?)
    }

    /// Records that `key` exists in the store (called for rows found at start).
    pub fn note_present(&self, key: &str) {
        self.presence.insert(key);
    }

    /// Rows in the cache newer than the store, with keys after `after` (for listings).
    pub fn dirty_rows_after(&self, after: Option<&str>) -> Vec<(String, P::State)> {
        let rows = self.rows.read().expect("rows lock");
        rows.iter()
            .filter(|(key, row)| row.dirty && after.is_none_or(|a| key.as_str() > a))
            .map(|(key, row)| (key.clone(), row.value.clone()))
            .collect()
    }

    /// Stops (`true`) or restarts reading the inputs of kind `topic`.
    pub fn hold(&self, topic: SourceTopic, held: bool) {
        let mut inputs = self.held.lock().expect("held lock");
        inputs.retain(|t| *t != topic);
        if held {
            inputs.push(topic);
        }
    }

    fn is_held(&self, topic: SourceTopic) -> bool {
        self.held.lock().expect("held lock").contains(&topic)
    }

    pub fn durable_offset(&self, input: (SourceTopic, u32)) -> u64 {
        self.durable
            .lock()
            .expect("durable lock")
            .get(&input)
            .copied()
            .unwrap_or(0)
    }
}

/// The running state of one task, owned by its loop.
struct TaskLoop<P: Processor> {
    shared: Arc<Shared>,
    task: Arc<TaskShared<P>>,
    /// Each input: kind, topic-partition and the next offset to read.
    inputs: Vec<(SourceTopic, TopicPartition, u64)>,
    /// Highest source offset applied per upstream partition.
    applied_sources: BTreeMap<AppliedKey, u64>,
    /// Dead letters waiting for the next checkpoint.
    dead_letters: Vec<DeadLetter>,
    /// When the last checkpoint was written.
    last_commit: Instant,
    /// Whether anything changed since the last checkpoint.
    uncommitted: bool,
    /// Rows changed since the last checkpoint (upper bound).
    dirty_rows: usize,
    /// The last read found new payments but no admission tokens.
    throttled: bool,
    /// Replaying (`kpay rebuild`): read every input up to these positions,
    /// ignoring pause and rate limit, append nothing, then stop.
    until: Option<Positions>,
    /// A record waits for its prerequisite: read this input up to this
    /// offset first (pause and rate limit do not apply: it was admitted
    /// before the restart).
    catch_up: Option<(usize, u64)>,
    /// The record (input, offset) waiting for the catch-up.
    deferred: Option<(usize, u64)>,
    /// The record (input, offset) whose prerequisite does not exist; it is
    /// processed without it (and dead-lettered by the processor).
    orphan: Option<(usize, u64)>,
    /// The retention's clock: the newest append time of a
    /// `payment.incoming` record read.
    clock_ms: i64,
    /// How long rows that may be forgotten are kept (`limits.payment_retention_seconds`).
    retention_ms: i64,
    /// Rows that became forgettable since the last checkpoint: (time, key).
    newly_kept: Vec<(i64, String)>,
}

/// Next offset to read per input (topic kind, partition).
pub type Positions = BTreeMap<(SourceTopic, u32), u64>;

/// Pause before calling the log again after it was unavailable.
const LOG_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How often a rate-limited task looks for new admission tokens.
const THROTTLE_POLL: Duration = Duration::from_millis(5);

/// Runs one task until shutdown; writes a final checkpoint on the way out.
pub async fn run<P: Processor>(
    shared: Arc<Shared>,
    task: Arc<TaskShared<P>>,
    checkpoint: Checkpoint<P::Stats>,
    input_partitions: Vec<(SourceTopic, u32)>,
    until: Option<Positions>,
) -> Result<(), RuntimeError> {
    let inputs = input_partitions
        .into_iter()
        .map(|(kind, partition)| {
            let tp = TopicPartition::new(shared.topics.name(kind), partition);
            let next = checkpoint.next_offsets.get(&(kind, partition)).copied();
            (kind, tp, next.unwrap_or(0))
        })
        .collect();
    let mut state = TaskLoop {
        shared: shared.clone(),
        task,
        inputs,
        applied_sources: checkpoint.applied_sources,
        dead_letters: Vec::new(),
        last_commit: Instant::now(),
        uncommitted: false,
        dirty_rows: 0,
        throttled: false,
        until,
        catch_up: None,
        deferred: None,
        orphan: None,
        clock_ms: checkpoint.clock_ms,
        retention_ms: i64::try_from(shared.config.limits.payment_retention_seconds)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000),
        newly_kept: Vec::new(),
    };
    state.start_positions().await?;
    state.publish_positions();
    let start_hw = state.high_watermarks().await?;
    let commit_every = Duration::from_millis(shared.config.pipeline.commit_interval_ms);
    loop {
        if shared.processors_stop.is_cancelled() || state.replayed_all() {
            break;
        }
        let batch = match state.read_batch().await {
            Ok(batch) => batch,
            Err(RuntimeError::Log(error)) if error.is_transient() => {
                state.pause_for_log(&error).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        if !state.task.caught_up.load(Ordering::Relaxed) && state.reached(&start_hw) {
            state.task.caught_up.store(true, Ordering::Relaxed);
        }
        if batch.is_empty() {
            if state.uncommitted {
                state.checkpoint()?;
            }
            match state.wait_for_input(commit_every).await {
                Err(RuntimeError::Log(error)) if error.is_transient() => {
                    state.pause_for_log(&error).await;
                }
                other => other?,
            }
            continue;
        }
        let outputs = state.apply(batch)?;
        while state.until.is_none() {
            match state.produce(&outputs).await {
                Ok(()) => {
                    if !outputs.is_empty() {
                        shared.space.note_success();
                    }
                    break;
                }
                // The outputs are appended again whole: copies of those that
                // did land are skipped downstream like any replayed record.
                // A full device is retried the same way: the log cut back
                // what it could not keep, and appends succeed once space is freed.
                Err(RuntimeError::Log(error))
                    if error.is_transient() && !shared.processors_stop.is_cancelled() =>
                {
                    if error.is_no_space() {
                        shared.space.note_refusal(error.to_string());
                    }
                    state.pause_for_log(&error).await;
                }
                // Stopping with outputs not appended: no checkpoint past
                // them; the next start processes this batch again.
                Err(error) => return Err(error),
            }
        }
        if state.until.is_none() {
            failpoint::pass(Point::TaskAfterProduce);
        }
        let rows = state.dirty_rows;
        if rows >= shared.config.pipeline.checkpoint_max_rows
            || state.last_commit.elapsed() >= commit_every
        {
            state.checkpoint()?;
        }
    }
    state.checkpoint()
}

impl<P: Processor> TaskLoop<P> {
    /// Moves a start position below the log start up to it (records removed
    /// by retention were consumed by a checkpoint that a crash may have lost
    /// only if retention ran ahead of the store, which it never does).
    async fn start_positions(&mut self) -> Result<(), RuntimeError> {
        for (_, tp, next) in &mut self.inputs {
            let start = self.shared.log.log_start(tp).await?;
            if *next < start {
                tracing::warn!(%tp, next = *next, start, "start offset below log start");
                *next = start;
            }
        }
        Ok(())
    }

    /// Inputs not read for now: held by hand, or new payments while paused
    /// (the pause gate: admitted payments still drain through the rest).
    /// A replay reads everything up to its positions.
    fn is_held(&self, kind: SourceTopic) -> bool {
        self.until.is_none()
            && (self.task.is_held(kind)
                || (kind == SourceTopic::Incoming && self.shared.admission_paused()))
    }

    /// Whether a replay has read every input up to its positions.
    fn replayed_all(&self) -> bool {
        self.until.as_ref().is_some_and(|until| {
            self.inputs.iter().all(|(kind, tp, next)| {
                *next >= until.get(&(*kind, tp.partition)).copied().unwrap_or(0)
            })
        })
    }

    /// Shows where this task reads, for lag.
    fn publish_positions(&self) {
        let positions = self
            .inputs
            .iter()
            .map(|(kind, tp, next)| ((*kind, tp.partition), *next));
        *self.task.positions.lock().expect("positions lock") = positions.collect();
    }

    async fn high_watermarks(&self) -> Result<Vec<u64>, RuntimeError> {
        let mut marks = Vec::with_capacity(self.inputs.len());
        for (_, tp, _) in &self.inputs {
            marks.push(self.shared.log.high_watermark(tp).await?);
        }
        Ok(marks)
    }

    /// Whether every input has been read up to `marks`; a held input (new
    /// payments while paused) waits on purpose and counts as read.
    fn reached(&self, marks: &[u64]) -> bool {
        self.inputs
            .iter()
            .zip(marks)
            .all(|((kind, _, next), mark)| next >= mark || self.is_held(*kind))
    }

    async fn read_batch(&mut self) -> Result<Vec<(usize, StoredRecord)>, RuntimeError> {
        let max = (self.shared.config.pipeline.batch_records / self.inputs.len()).max(1);
        self.throttled = false;
        if let Some((index, offset)) = self.catch_up {
            let (_, tp, next) = &self.inputs[index];
            if *next <= offset {
                if offset < self.shared.log.high_watermark(tp).await? {
                    let take = max.min((offset + 1 - *next) as usize);
                    let records = self.shared.log.read(tp, *next, take).await?;
                    return Ok(records.into_iter().map(|r| (index, r)).collect());
                }
                // A prerequisite that was never written (a foreign record).
                self.orphan = self.deferred;
            }
            self.catch_up = None;
        }
        let mut batch = Vec::new();
        for index in 0..self.inputs.len() {
            let (kind, tp, next) = &self.inputs[index];
            if self.is_held(*kind) {
                continue;
            }
            let mut take = max;
            if let Some(until) = &self.until {
                let end = until.get(&(*kind, tp.partition)).copied().unwrap_or(0);
                take = take.min(end.saturating_sub(*next) as usize);
                if take == 0 {
                    continue;
                }
            } else if *kind == SourceTopic::Incoming && self.shared.admission_limited() {
                // The rate limit counts admissions: only records that are
                // there take tokens.
                let waiting = self
                    .shared
                    .log
                    .high_watermark(tp)
                    .await?
                    .saturating_sub(*next);
                take = self.shared.admission_tokens(max.min(waiting as usize));
                if take == 0 {
                    self.throttled = waiting > 0;
                    continue;
                }
            }
            let records = self.shared.log.read(tp, *next, take).await?;
            batch.extend(records.into_iter().map(|record| (index, record)));
        }
        Ok(batch)
    }

    async fn wait_for_input(&self, timeout: Duration) -> Result<(), RuntimeError> {
        let log = &self.shared.log;
        // Rate-limited with records waiting: look again when tokens refill,
        // not when the (already full) input wakes us, nor when a broker
        // answers a short wait (Kafka brokers may hold it much longer).
        let throttled = self.throttled;
        if throttled {
            tokio::select! {
                () = tokio::time::sleep(THROTTLE_POLL) => {}
                () = self.shared.processors_stop.cancelled() => {}
            }
            return Ok(());
        }
        let timeout = if throttled {
            timeout.min(THROTTLE_POLL)
        } else {
            timeout
        };
        let waits: Vec<_> = self
            .inputs
            .iter()
            .filter(|(kind, _, _)| !self.is_held(*kind))
            .filter(|(kind, _, _)| !(throttled && *kind == SourceTopic::Incoming))
            .map(|(_, tp, next)| Box::pin(log.wait_for(tp, *next, timeout)))
            .collect();
        if waits.is_empty() {
            // Every input is held: look again after the timeout.
            tokio::select! {
                () = tokio::time::sleep(timeout) => {}
                () = self.shared.processors_stop.cancelled() => {}
            }
            return Ok(());
        }
        tokio::select! {
            (result, _, _) = select_all(waits) => { result?; }
            () = self.shared.processors_stop.cancelled() => {}
        }
        Ok(())
    }

    /// Applies a batch to the state; returns the records to append.
    fn apply(
        &mut self,
        batch: Vec<(usize, StoredRecord)>,
    ) -> Result<Vec<(Emit, Source)>, RuntimeError> {
        // Guards borrow local handles, so the loop may call `&mut self` helpers.
        let (shared, task) = (self.shared.clone(), self.task.clone());
        let gate = shared.apply_gate.read().expect("apply gate");
        let mut outputs = Vec::with_capacity(batch.len());
        let mut rows = task.rows.write().expect("rows lock");
        let mut stats = task.stats.write().expect("stats lock");
        let now = now_ms();
        let count = batch.len() as u64;
        let instrumented = shared.config.instrument.enabled;
        if instrumented {
            metrics::histogram!("kpay_task_batch_records", "processor" => P::NAME)
                .record(count as f64);
        }
        for (index, stored) in batch {
            let (kind, tp, next) = &mut self.inputs[index];
            debug_assert!(stored.offset >= *next, "offsets only move forward");
            *next = stored.offset + 1;
            if *kind == SourceTopic::Incoming {
                self.clock_ms = self.clock_ms.max(stored.record.timestamp_ms);
            }
            let ctx = Ctx {
                topic: *kind,
                partition: tp.partition,
                offset: stored.offset,
                received_at_ms: stored.record.timestamp_ms,
                now_ms: now,
                partitions: shared.config.log.partitions,
                forgotten_before_ms: self.forgotten_before_ms(),
            };
            let envelope = match codec::decode(&stored.record.value) {
                Ok(envelope) => envelope,
                Err(error) => {
                    self.dead_letter(index, &stored, "decode", error.to_string());
                    continue;
                }
            };
            if let Some(wanted) = self.unmet_prerequisite(&envelope.event, index, stored.offset) {
                // Read again after the prerequisite; nothing of this record is applied.
                self.inputs[index].2 = stored.offset;
                self.catch_up = Some(wanted);
                self.deferred = Some((index, stored.offset));
                break;
            }
            if self.already_applied(&ctx, envelope.source) {
                continue;
            }
            if instrumented {
                P::observe(&envelope.event);
            }
            let key = P::state_key(&envelope.event).map(str::to_owned);
            let (mut state, stored_bytes) = self.load_state(&rows, key.as_deref())?;
            let was_kept = state.as_ref().and_then(P::retention).is_some();
            match P::handle(&mut state, &mut stats, envelope.event, &ctx) {
                Ok(emit) => {
                    if let (Some(key), Some(value)) = (key, state) {
                        if let Some(at_ms) = P::retention(&value).filter(|_| !was_kept) {
                            self.newly_kept.push((at_ms, key.clone()));
                        }
                        task.presence.insert(key.as_str());
                        self.dirty_rows += 1;
                        let row = Row {
                            value,
                            dirty: true,
                            stored: stored_bytes,
                        };
                        rows.insert(key, row);
                    }
                    let source = Source {
                        topic: ctx.topic,
                        partition: ctx.partition,
                        offset: ctx.offset,
                    };
                    outputs.extend(emit.map(|emit| (emit, source)));
                }
                Err(error) => {
                    self.dead_letter(index, &stored, error_class(&error), error.to_string())
                }
            }
        }
        drop((rows, stats, gate));
        self.publish_positions();
        self.uncommitted = true;
        Ok(outputs)
    }

    /// The (input, offset) still to be read before `event` can be applied, if any.
    fn unmet_prerequisite(&self, event: &Event, input: usize, offset: u64) -> Option<(usize, u64)> {
        if self.orphan == Some((input, offset)) {
            return None;
        }
        let (kind, partition, needed) = P::prerequisite(event)?;
        let index = self
            .inputs
            .iter()
            .position(|(k, tp, _)| *k == kind && tp.partition == partition)?;
        (self.inputs[index].2 <= needed).then_some((index, needed))
    }

    /// True for a copy of a record already applied (re-emitted by an upstream
    /// task replaying after a crash); otherwise records it as applied.
    fn already_applied(&mut self, ctx: &Ctx, source: Option<Source>) -> bool {
        let Some(upstream) = source else {
            return false;
        };
        let key = (ctx.topic, ctx.partition, upstream.topic, upstream.partition);
        match self.applied_sources.get(&key) {
            Some(&applied) if upstream.offset <= applied => true,
            _ => {
                self.applied_sources.insert(key, upstream.offset);
                false
            }
        }
    }

    /// The current row for `key` and its stored bytes: cache, else store.
    fn load_state(
        &self,
        rows: &HashMap<String, Row<P::State>>,
        key: Option<&str>,
    ) -> Result<(Option<P::State>, Option<StoredBytes>), RuntimeError> {
        let Some(key) = key else {
            return Ok((None, None));
        };
        if let Some(row) = rows.get(key) {
            return Ok((Some(row.value.clone()), row.stored.clone()));
        }
        Ok(match self.task.load_raw(&self.shared, key)? {
            Some((value, bytes)) => (Some(value), Some(bytes)),
            None => (None, None),
        })
    }

    /// Keeps a record the processor cannot act on for the DLQ and goes on.
    fn dead_letter(&mut self, input: usize, stored: &StoredRecord, class: &str, reason: String) {
        let (kind, tp, _) = &self.inputs[input];
        let key = String::from_utf8_lossy(&stored.record.key);
        // The key says whose record it is: a payment id or an account id.
        let (payment_id, account) = match kind {
            SourceTopic::Inflight => (None, Some(&*key)),
            _ => (Some(&*key), None),
        };
        tracing::warn!(
            processor = P::NAME,
            topic = %tp.topic,
            partition = tp.partition,
            offset = stored.offset,
            payment_id,
            account,
            class,
            %reason,
            "dead-lettered"
        );
        let letter = DeadLetter::new(P::NAME, tp, stored, class, reason);
        self.dead_letters.push(letter);
    }

    /// Waits before calling the log again after it was unavailable or its
    /// device full (or until the processors stop).
    async fn pause_for_log(&self, error: &crate::log::LogError) {
        tracing::debug!(processor = P::NAME, partition = self.task.partition, %error, "log unavailable; retrying");
        tokio::select! {
            () = tokio::time::sleep(LOG_RETRY_PAUSE) => {}
            () = self.shared.processors_stop.cancelled() => {}
        }
    }

    /// Appends outputs and dead letters, grouped per topic-partition in emit
    /// order, and returns once all are durable.
    async fn produce(&mut self, outputs: &[(Emit, Source)]) -> Result<(), RuntimeError> {
        let topics = &self.shared.topics;
        let partitions = self.shared.config.log.partitions;
        let mut groups: BTreeMap<TopicPartition, Vec<Record>> = BTreeMap::new();
        let now = now_ms();
        for (emit, source) in outputs {
            let (emit, source) = (emit.clone(), *source);
            let topic = match emit.topic {
                OutTopic::Incoming => &topics.incoming,
                OutTopic::Inflight => &topics.inflight,
                OutTopic::Complete => &topics.complete,
                OutTopic::Confirmed => &topics.confirmed,
            };
            let tp = TopicPartition::new(topic.clone(), partition_for(&emit.key, partitions));
            let envelope = Envelope {
                source: Some(source),
                event: emit.event,
            };
            // `payment.confirmed` is for outside consumers: public JSON.
            let value = match emit.topic {
                OutTopic::Confirmed => codec::encode_completed_json(&envelope.event),
                _ => None,
            };
            groups.entry(tp).or_default().push(Record {
                key: Bytes::from(emit.key.into_bytes()),
                value: Bytes::from(value.unwrap_or_else(|| codec::encode(&envelope))),
                timestamp_ms: now,
            });
        }
        for letter in self.dead_letters.iter().filter(|l| !l.published) {
            let tp = TopicPartition::new(topics.dlq.clone(), letter.source_partition % partitions);
            groups.entry(tp).or_default().push(letter.to_record(now));
        }
        let log = &self.shared.log;
        let several = groups.len() > 1;
        try_join_all(groups.into_iter().map(|(tp, records)| async move {
            let first = log.append(&tp, records).await?;
            if several {
                // One topic-partition done; the others may still be on their way.
                failpoint::pass(Point::TaskMidProduce);
            }
            Ok::<_, crate::log::LogError>(first)
        }))
        .await?;
        self.dead_letters
            .iter_mut()
            .for_each(|l| l.published = true);
        Ok(())
    }

    /// Writes changed rows, dead letters, offsets and statistics atomically
    /// (in chunks under an undo record when there are many rows).
    fn checkpoint(&mut self) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let writes: Vec<RowWrite> = {
            let rows = self.task.rows.read().expect("rows lock");
            rows.iter()
                .filter(|(_, row)| row.dirty)
                .map(|(key, row)| (key.clone(), encode_row(&row.value), row.stored.clone()))
                .collect()
        };
        let mut last: Vec<(String, Vec<u8>)> = Vec::new();
        for letter in self.dead_letters.drain(..) {
            if self.shared.dlq_admit() {
                last.push((letter.store_key(), encode_row(&letter)));
            } else {
                // Still on the DLQ topic (published with the batch).
                metrics::counter!("kpay_dlq_overflow_total").increment(1);
                tracing::error!(
                    id = %letter.id,
                    limit = self.shared.config.limits.dlq_entries,
                    "dead letter queue full: letter kept only on the DLQ topic"
                );
            }
        }
        let next_offsets: BTreeMap<_, _> = self
            .inputs
            .iter()
            .map(|(kind, tp, next)| ((*kind, tp.partition), *next))
            .collect();
        let partition = self.task.partition;
        let mut store_rows: Vec<RowWrite> = writes
            .iter()
            .map(|(key, bytes, old)| (row_key(P::TABLE, key), bytes.clone(), old.clone()))
            .collect();
        // Index entries of about VALUE_BYTES each: the rows this checkpoint
        // made forgettable, oldest first, each under its oldest row's time and key.
        let mut newly_kept = std::mem::take(&mut self.newly_kept);
        newly_kept.sort_unstable();
        for entry in parts_by_size(&newly_kept, |(_, key)| key.len() + 10) {
            let (at_ms, key) = &entry[0];
            let entry_key = kept_key(P::TABLE, partition, *at_ms, key);
            store_rows.push((entry_key, encode_row(&entry), None));
        }
        last.push((
            checkpoint_key(P::NAME, partition),
            encode_row(&self.checkpoint_record(next_offsets.clone())),
        ));
        let undo = undo_key(P::NAME, self.task.partition);
        failpoint::pass(Point::TaskBeforeCommit);
        self.shared.store.commit(&undo, &store_rows, last)?;
        if failpoint::reached(Point::TaskAfterCommit) {
            // On disk, as sled's own timer or the flusher could have made it.
            let _ = self.shared.store.flush_blocking();
            failpoint::crash(Point::TaskAfterCommit);
        }
        *self.task.committed.lock().expect("committed lock") = next_offsets.clone();
        self.settle_rows(writes);
        if self.shared.config.instrument.enabled {
            metrics::histogram!("kpay_checkpoint_duration_seconds", "processor" => P::NAME)
                .record(started.elapsed().as_secs_f64());
        }
        self.last_commit = Instant::now();
        self.uncommitted = false;
        self.dirty_rows = 0;
        self.forget_expired()
    }

    /// What a checkpoint at `next_offsets` records.
    fn checkpoint_record(&self, next_offsets: Positions) -> Checkpoint<P::Stats> {
        Checkpoint {
            next_offsets,
            applied_sources: self.applied_sources.clone(),
            stats: self.task.stats.read().expect("stats lock").clone(),
            clock_ms: self.clock_ms,
        }
    }

    /// Rows carrying a time before this may be forgotten now.
    fn forgotten_before_ms(&self) -> i64 {
        self.clock_ms.saturating_sub(self.retention_ms)
    }

    /// Forgets the rows of the retention index older than the retention,
    /// right after a checkpoint. Each checkpoint writes its rows as entries
    /// of about `VALUE_BYTES` (oldest first), each keyed by its oldest row,
    /// so the first entry holds the oldest row of all. Each step forgets up
    /// to 128 of its expired rows and rewrites the entry without them, in
    /// one atomic batch.
    /// Which rows go depends only on the clock, so whatever the timing of
    /// checkpoints, a replay of the log to the same positions keeps the same.
    fn forget_expired(&mut self) -> Result<(), RuntimeError> {
        const STEP: usize = MAX_BATCH_ROWS / 2;
        let partition = self.task.partition;
        let index = kept_table(P::TABLE, partition);
        let before = self.forgotten_before_ms().max(0);
        loop {
            let Some((entry, kept)) = self
                .shared
                .store
                .scan::<Vec<(i64, String)>>(&index, None, 1)?
                .pop()
            else {
                return Ok(());
            };
            let expired = kept
                .iter()
                .take(STEP)
                .take_while(|(at_ms, _)| *at_ms < before)
                .count();
            if expired == 0 {
                return Ok(());
            }
            let mut batch = Batch::default();
            batch.remove(format!("{index}/{entry}").as_bytes());
            for (_, key) in &kept[..expired] {
                batch.remove(row_key(P::TABLE, key).as_bytes());
            }
            if let Some((at_ms, key)) = kept.get(expired) {
                let rest = &kept[expired..];
                let entry = kept_key(P::TABLE, partition, *at_ms, key);
                batch.insert(entry.as_bytes(), encode_row(&rest));
            }
            self.shared.store.apply(batch)?;
            let mut rows = self.task.rows.write().expect("rows lock");
            for (_, key) in &kept[..expired] {
                if rows.get(key).is_some_and(|row| !row.dirty) {
                    rows.remove(key);
                }
            }
            drop(rows);
            if self.shared.config.instrument.enabled {
                metrics::counter!("kpay_payments_forgotten_total", "processor" => P::NAME)
                    .increment(expired as u64);
            }
        }
    }

    /// Marks written rows clean and drops rows memory no longer needs; only
    /// after the store has them, so readers always find every row.
    fn settle_rows(&self, writes: Vec<RowWrite>) {
        let limit = self.shared.config.pipeline.cache_rows_per_task;
        let mut rows = self.task.rows.write().expect("rows lock");
        for (key, bytes, _) in writes {
            if let Some(row) = rows.get_mut(&key) {
                row.dirty = false;
                row.stored = Some(StoredBytes::from(bytes));
            }
        }
        rows.retain(|_, row| row.dirty || !P::is_settled(&row.value));
        if rows.len() > limit {
            rows.retain(|_, row| row.dirty);
        }
        if rows.capacity() > 4 * rows.len().max(1024) {
            rows.shrink_to_fit();
        }
    }
}

fn error_class(error: &crate::pipeline::ProcessError) -> &'static str {
    use crate::pipeline::ProcessError;
    match error {
        ProcessError::UnexpectedEvent { .. } => "unexpected_event",
        ProcessError::ImpossibleState(_) => "impossible_state",
        ProcessError::Overflow(_) => "overflow",
        ProcessError::Expired(_) => "expired",
    }
}
