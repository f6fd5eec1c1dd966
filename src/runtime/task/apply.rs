//! A batch through the processor: decode, skip copies already applied, wait
//! for prerequisites, apply, dead-letter what cannot be applied, and append
//! the outputs (durably) before anything is checkpointed.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use futures::future::try_join_all;

use super::{error_class, TaskLoop, LOG_RETRY_PAUSE};
use crate::failpoint::{self, Point};
use crate::log::{Record, StoredRecord, TopicPartition};
use crate::model::{codec, now_ms, partition_for, Envelope, Event, Source, SourceTopic};
use crate::pipeline::{Ctx, Emit, OutTopic, ProcessError, Processor};
use crate::runtime::core::authenticated;
use crate::runtime::dead_letter::DeadLetter;
use crate::runtime::task_view::Row;
use crate::runtime::RuntimeError;
use crate::store::StoredBytes;

/// A row as [`TaskLoop::load_state`] found it.
pub(super) struct Loaded<S> {
    pub(super) key: Option<String>,
    pub(super) state: Option<S>,
    /// Its bytes as a row of its own in the store (`None`: not stored, or
    /// in a block).
    pub(super) stored: Option<StoredBytes>,
    /// The block holding its stored copy, if any.
    pub(super) block: Option<u64>,
    /// Taken from the cache, with its `dirty` flag; `None`: not cached.
    pub(super) cached: Option<bool>,
}

/// Records to append, per topic-partition, in emit order.
pub(super) type Groups = BTreeMap<TopicPartition, Vec<Record>>;

impl<P: Processor> TaskLoop<P> {
    /// Applies a batch to the state; returns the records to append.
    pub(super) fn apply(
        &mut self,
        batch: Vec<(usize, StoredRecord)>,
    ) -> Result<Vec<(Emit, Source)>, RuntimeError> {
        // Guards borrow local handles, so the loop may call `&mut self` helpers.
        let (core, task) = (self.core.clone(), self.task.clone());
        let gate = core.apply_gate.read().expect("apply gate");
        let mut outputs = Vec::with_capacity(batch.len());
        let mut rows = task.rows.write().expect("rows lock");
        let mut stats = task.stats.write().expect("stats lock");
        let now = now_ms();
        let count = batch.len() as u64;
        let instrumented = core.config.instrument.enabled;
        if instrumented {
            metrics::histogram!("kpay_task_batch_records", "processor" => P::NAME)
                .record(count as f64);
        }
        for (index, stored) in batch {
            let ctx = self.advance(index, &stored, now);
            let envelope = match self.decode(ctx.topic, &stored.record) {
                Ok(envelope) => envelope,
                Err((class, reason)) => {
                    self.dead_letter(index, &stored, class, reason);
                    continue;
                }
            };
            let submitted_by = envelope.submitted_by.as_ref();
            let ctx = Ctx {
                submitted_by,
                ..ctx
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
            if instrumented && P::OBSERVED {
                core.observer.observe(&envelope.event);
            }
            match self.handle(&mut rows, &mut stats, envelope.event, &ctx)? {
                Ok(emit) => {
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

    /// Runs the processor on `event` with its row (taken from the cache or
    /// read from the store) and keeps the changed row, dirty; on the
    /// processor's error the row goes back as it was.
    fn handle(
        &mut self,
        rows: &mut HashMap<String, Row<P::State>>,
        stats: &mut P::Stats,
        event: Event,
        ctx: &Ctx,
    ) -> Result<Result<Option<Emit>, ProcessError>, RuntimeError> {
        let Loaded {
            key,
            mut state,
            stored,
            block,
            cached,
        } = self.load_state(rows, P::state_key(&event))?;
        let handled = P::handle(&mut state, stats, event, ctx);
        match (key, state) {
            // Unchanged (the processor's contract on error): back as it was.
            (Some(key), Some(value)) if handled.is_err() => {
                if let Some(dirty) = cached {
                    rows.insert(
                        key,
                        Row {
                            value,
                            dirty,
                            stored,
                            block,
                        },
                    );
                }
            }
            // Processors create and change rows, never delete them.
            (Some(key), Some(value)) => {
                let new = cached.is_none() && stored.is_none() && block.is_none();
                let row = Row {
                    value,
                    dirty: true,
                    stored,
                    block,
                };
                self.keep_row(rows, key, row, new);
            }
            _ => {}
        }
        Ok(handled)
    }

    /// The record's event. On an authenticated topic with a cluster secret
    /// the HMAC tag is checked (and stripped) first: a record without a
    /// valid one is dead-lettered as `unauthenticated` before anything of
    /// it is believed, its source included. Err: (class, reason).
    fn decode(
        &self,
        kind: SourceTopic,
        record: &Record,
    ) -> Result<Envelope, (&'static str, String)> {
        let mut value = &record.value[..];
        if let Some(sealer) = (self.core.sealer.as_ref()).filter(|_| authenticated(kind, value)) {
            value = sealer
                .open(&record.key, value)
                .map_err(|error| ("unauthenticated", error.to_string()))?;
        }
        let mut envelope = codec::decode(value).map_err(|error| ("decode", error.to_string()))?;
        self.core.check_attribution(&mut envelope);
        Ok(envelope)
    }

    /// Moves input `index` past `stored` (and the retention clock with it)
    /// and says where the record sits.
    fn advance(&mut self, index: usize, stored: &StoredRecord, now: i64) -> Ctx<'static> {
        let (kind, tp, next) = &mut self.inputs[index];
        debug_assert!(stored.offset >= *next, "offsets only move forward");
        *next = stored.offset + 1;
        if *kind == SourceTopic::Incoming {
            self.clock_ms = self.clock_ms.max(stored.record.timestamp_ms);
        }
        Ctx {
            topic: *kind,
            partition: tp.partition,
            offset: stored.offset,
            received_at_ms: stored.record.timestamp_ms,
            now_ms: now,
            partitions: self.core.config.log.partitions,
            forgotten_before_ms: self.forgotten_before_ms(),
            max_amount_cents: self.core.config.limits.max_amount_cents,
            submitted_by: None,
        }
    }

    /// Keeps a row the processor changed, dirty until the next checkpoint.
    fn keep_row(
        &mut self,
        rows: &mut HashMap<String, Row<P::State>>,
        key: String,
        row: Row<P::State>,
        new: bool,
    ) {
        if new {
            self.task.presence.insert(key.as_str());
        }
        self.dirty_rows += 1;
        rows.insert(key, row);
    }

    /// The (input, offset) still to be read before `event` can be applied, if any.
    pub(super) fn unmet_prerequisite(
        &self,
        event: &Event,
        input: usize,
        offset: u64,
    ) -> Option<(usize, u64)> {
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
    pub(super) fn already_applied(&mut self, ctx: &Ctx, source: Option<Source>) -> bool {
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

    /// The current row for `key` and its stored bytes: taken out of the
    /// cache (the caller puts it back), else read from the store.
    pub(super) fn load_state(
        &self,
        rows: &mut HashMap<String, Row<P::State>>,
        key: Option<&str>,
    ) -> Result<Loaded<P::State>, RuntimeError> {
        let Some(key) = key else {
            return Ok(Loaded {
                key: None,
                state: None,
                stored: None,
                block: None,
                cached: None,
            });
        };
        if let Some((key, row)) = rows.remove_entry(key) {
            return Ok(Loaded {
                key: Some(key),
                state: Some(row.value),
                stored: row.stored,
                block: row.block,
                cached: Some(row.dirty),
            });
        }
        let found = self.task.load_raw(&self.core, key)?;
        let (state, stored, block) = match found {
            Some(found) => (Some(found.value), found.stored, found.block),
            None => (None, None, None),
        };
        Ok(Loaded {
            key: Some(key.to_owned()),
            state,
            stored,
            block,
            cached: None,
        })
    }

    /// Keeps a record the processor cannot act on for the DLQ and goes on.
    pub(super) fn dead_letter(
        &mut self,
        input: usize,
        stored: &StoredRecord,
        class: &str,
        reason: String,
    ) {
        let (kind, tp, _) = &self.inputs[input];
        let keep = self.core.config.limits.dead_letter_value_bytes;
        let letter = DeadLetter::new(P::NAME, tp, stored, class, reason, keep);
        // The key says whose record it is: a payment id or an account id
        // (the letter's, which is bounded however long the record's was).
        let key = letter.key.as_str();
        let (payment_id, account) = match kind {
            SourceTopic::Inflight => (None, Some(key)),
            _ => (Some(key), None),
        };
        tracing::warn!(
            processor = P::NAME,
            topic = %tp.topic,
            partition = tp.partition,
            offset = stored.offset,
            payment_id,
            account,
            class,
            reason = %letter.reason,
            value_bytes = letter.value_bytes,
            "dead-lettered"
        );
        self.dead_letters.push(letter);
    }

    /// Waits before calling the log again after it was unavailable or its
    /// device full (or until the processors stop).
    pub(super) async fn pause_for_log(&self, error: &crate::log::LogError) {
        tracing::debug!(processor = P::NAME, partition = self.task.partition, %error, "log unavailable; retrying");
        tokio::select! {
            () = tokio::time::sleep(LOG_RETRY_PAUSE) => {}
            () = self.core.processors_stop.cancelled() => {}
        }
    }

    /// Encodes a batch's outputs into records, grouped per topic-partition
    /// in emit order (once: a retried append sends the same records).
    pub(super) fn encode_outputs(&self, outputs: Vec<(Emit, Source)>) -> Groups {
        let core = &self.core;
        let topics = &core.config.topics;
        let partitions = core.config.log.partitions;
        let mut groups = Groups::new();
        let now = now_ms();
        for (emit, source) in outputs {
            let topic = match emit.topic {
                OutTopic::Incoming => &topics.incoming,
                OutTopic::Inflight | OutTopic::EveryInflight => &topics.inflight,
                OutTopic::Complete => &topics.complete,
                OutTopic::Confirmed => &topics.confirmed,
            };
            let kind = match emit.topic {
                // `payment.confirmed` is for outside consumers: public JSON.
                OutTopic::Confirmed => None,
                OutTopic::Incoming => Some(SourceTopic::Incoming),
                OutTopic::Inflight | OutTopic::EveryInflight => Some(SourceTopic::Inflight),
                OutTopic::Complete => Some(SourceTopic::Complete),
            };
            let target = partition_for(&emit.key, partitions);
            let every = emit.topic == OutTopic::EveryInflight;
            let envelope = Envelope::new(Some(source), emit.event);
            let value = match kind {
                Some(kind) => core.seal(kind, emit.key.as_bytes(), codec::encode(&envelope)),
                None => codec::encode_completed_json(&envelope.event)
                    .unwrap_or_else(|| codec::encode(&envelope)),
            };
            let record = Record {
                key: Bytes::from(emit.key.into_bytes()),
                value: Bytes::from(value),
                timestamp_ms: now,
            };
            if every {
                // One copy per partition (the rules' broadcast); the bytes are shared.
                for partition in 0..partitions {
                    let tp = TopicPartition::new(topic.clone(), partition);
                    groups.entry(tp).or_default().push(record.clone());
                }
            } else {
                let tp = TopicPartition::new(topic.clone(), target);
                groups.entry(tp).or_default().push(record);
            }
        }
        groups
    }

    /// Appends encoded outputs and the dead letters not yet published, and
    /// returns once all are durable.
    pub(super) async fn produce(&mut self, outputs: &Groups) -> Result<(), RuntimeError> {
        let core = self.core.clone();
        let topics = &core.config.topics;
        let partitions = core.config.log.partitions;
        // Records share their bytes: the copy is cheap.
        let mut groups = outputs.clone();
        let now = now_ms();
        for letter in self.dead_letters.iter().filter(|l| !l.published) {
            let tp = TopicPartition::new(topics.dlq.clone(), letter.source_partition % partitions);
            groups.entry(tp).or_default().push(letter.to_record(now));
        }
        let log = &self.core.log;
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
}
