//! The checkpoint: changed rows, dead letters, input offsets and statistics
//! in one atomic store write, then forgetting what retention lets go.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Positions, TaskLoop};
use crate::failpoint::{self, Point};
use crate::pipeline::Processor;
use crate::runtime::snapshot;
use crate::runtime::RuntimeError;
use crate::store::{
    checkpoint_key, encode_row, kept_key, kept_table, parts_by_size, row_key, undo_key, Batch,
    Checkpoint, RowWrite, StoredBytes, MAX_BATCH_ROWS,
};

impl<P: Processor> TaskLoop<P> {
    /// Writes changed rows, dead letters, offsets and statistics atomically
    /// (in chunks under an undo record when there are many rows).
    pub(super) fn checkpoint(&mut self) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let writes: Vec<RowWrite> = {
            let rows = self.task.rows.read().expect("rows lock");
            rows.iter()
                .filter(|(_, row)| row.dirty)
                .map(|(key, row)| {
                    let bytes = StoredBytes::from(encode_row(&row.value));
                    (key.clone(), bytes, row.stored.clone())
                })
                .collect()
        };
        let mut last: Vec<(String, Vec<u8>)> = Vec::new();
        let mut admitted = 0;
        if !self.owner {
            // The owner keeps the dead letters of what both processed.
            self.dead_letters.clear();
        }
        for letter in self.dead_letters.drain(..) {
            if self.core.dlq_admit() {
                admitted += 1;
                last.push((letter.store_key(), encode_row(&letter)));
            } else {
                // Still on the DLQ topic (published with the batch).
                metrics::counter!("kpay_dlq_overflow_total").increment(1);
                tracing::error!(
                    id = %letter.id,
                    limit = self.core.config.limits.dlq_entries,
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
            store_rows.push((entry_key, encode_row(&entry).into(), None));
        }
        last.push((
            checkpoint_key(P::NAME, partition),
            encode_row(&self.checkpoint_record(next_offsets.clone())),
        ));
        let undo = undo_key(P::NAME, self.task.partition);
        failpoint::pass(Point::TaskBeforeCommit);
        if let Err(error) = self.core.store.commit(&undo, &store_rows, last) {
            // Not stored: their places are free, and a restart finds them again.
            self.core.dlq_released(admitted);
            return Err(error.into());
        }
        if failpoint::reached(Point::TaskAfterCommit) {
            // On disk, as sled's own timer or the flusher could have made it.
            let _ = self.core.store.flush_blocking();
            failpoint::crash(Point::TaskAfterCommit);
        }
        self.publish(&next_offsets);
        self.snapshot_if_due()?;
        *self.task.committed.lock().expect("committed lock") = next_offsets.clone();
        self.settle_rows(writes);
        if self.core.config.instrument.enabled {
            metrics::histogram!("kpay_checkpoint_duration_seconds", "processor" => P::NAME)
                .record(started.elapsed().as_secs_f64());
        }
        self.last_commit = Instant::now();
        self.uncommitted = false;
        self.dirty_rows = 0;
        self.forget_expired()
    }

    /// On a cluster, an owner tells the followers where it checkpointed
    /// (when it moved since the last time).
    fn publish(&mut self, next_offsets: &Positions) {
        let board = self.core.board();
        if self.owner && board.is_on() && self.last_published.as_ref() != Some(next_offsets) {
            board.publish(P::NAME, self.task.partition, next_offsets);
            self.last_published = Some(next_offsets.clone());
        }
    }

    /// On a cluster, an owner takes a snapshot of its partition's state
    /// right after a checkpoint, once per `cluster.snapshot_interval_ms`.
    fn snapshot_if_due(&mut self) -> Result<(), RuntimeError> {
        let Some(snapshots) = self.core.snapshots.get().filter(|_| self.owner) else {
            return Ok(());
        };
        let interval = Duration::from_millis(self.core.config.cluster.snapshot_interval_ms);
        if self.last_snapshot.is_some_and(|at| at.elapsed() < interval) {
            return Ok(());
        }
        let partitions = self.core.config.log.partitions;
        let taken = snapshot::take::<P>(&self.core.store, self.task.partition, partitions)?;
        if snapshots.offer(taken) {
            self.last_snapshot = Some(Instant::now());
        }
        Ok(())
    }

    /// What a checkpoint at `next_offsets` records.
    pub(super) fn checkpoint_record(&self, next_offsets: Positions) -> Checkpoint<P::Stats> {
        Checkpoint {
            next_offsets,
            applied_sources: self.applied_sources.clone(),
            stats: self.task.stats.read().expect("stats lock").clone(),
            clock_ms: self.clock_ms,
        }
    }

    /// Rows carrying a time before this may be forgotten now.
    pub(super) fn forgotten_before_ms(&self) -> i64 {
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
    pub(super) fn forget_expired(&mut self) -> Result<(), RuntimeError> {
        const STEP: usize = MAX_BATCH_ROWS / 2;
        let partition = self.task.partition;
        let index = kept_table(P::TABLE, partition);
        let before = self.forgotten_before_ms().max(0);
        loop {
            let Some((entry, kept)) = self
                .core
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
            self.core.store.apply(batch)?;
            let mut rows = self.task.rows.write().expect("rows lock");
            for (_, key) in &kept[..expired] {
                if rows.get(key).is_some_and(|row| !row.dirty) {
                    rows.remove(key);
                }
            }
            drop(rows);
            if self.core.config.instrument.enabled {
                metrics::counter!("kpay_payments_forgotten_total", "processor" => P::NAME)
                    .increment(expired as u64);
            }
        }
    }

    /// Marks written rows clean and drops rows memory no longer needs; only
    /// after the store has them, so readers always find every row.
    pub(super) fn settle_rows(&self, writes: Vec<RowWrite>) {
        let limit = self.core.config.pipeline.cache_rows_per_task;
        let mut rows = self.task.rows.write().expect("rows lock");
        for (key, bytes, _) in writes {
            if let Some(row) = rows.get_mut(&key) {
                row.dirty = false;
                row.stored = Some(bytes);
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
