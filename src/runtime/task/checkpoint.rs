//! The checkpoint: changed rows (packed in blocks when they are over, or of
//! a packed table), dead letters, input offsets and statistics in one
//! atomic store write, then forgetting what retention lets go.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Positions, TaskLoop};
use crate::failpoint::{self, Point};
use crate::pipeline::Processor;
use crate::runtime::snapshot;
use crate::runtime::RuntimeError;
use crate::store::{
    block_key, checkpoint_key, encode_row, head_key, pack, row_key, undo_key, Batch, Block,
    Checkpoint, RowWrite, StoredBytes,
};

/// A checkpoint's changed rows.
#[derive(Default)]
pub(super) struct Changed {
    /// Rows of their own: (key, new bytes, bytes they replace). A packed
    /// table's new rows are here as their key alone (empty bytes).
    pub(super) own: Vec<RowWrite>,
    /// Rows written packed in blocks: (key, retention time, bytes); a
    /// packed table's rows are kept for good (time 0: retention skips them).
    pub(super) packed: Vec<(String, i64, StoredBytes)>,
    /// Store keys deleted with the checkpoint, with their bytes: rows of
    /// their own that moved into a block, blocks collected.
    pub(super) removed: Vec<(String, StoredBytes)>,
    /// Blocks that hold an older copy of a row now written again.
    pub(super) released: Vec<u64>,
    /// Blocks deleted, with their rows' keys (for the index).
    pub(super) collected: Vec<(u64, Vec<String>)>,
}

impl<P: Processor> TaskLoop<P> {
    /// The cache's dirty rows, encoded and sorted into rows of their own
    /// and rows packed in blocks.
    fn changed_rows(&self) -> Changed {
        let rows = self.task.rows.read().expect("rows lock");
        let mut changed = Changed::default();
        for (key, row) in rows.iter().filter(|(_, row)| row.dirty) {
            let bytes = StoredBytes::from(encode_row(&row.value));
            changed.released.extend(row.block);
            if P::PACKED {
                if row.stored.is_none() && row.block.is_none() {
                    // New: its key, so that listings find it in key order.
                    changed
                        .own
                        .push((key.clone(), StoredBytes::from(&[][..]), None));
                }
                changed.packed.push((key.clone(), 0, bytes));
                continue;
            }
            match P::retention(&row.value) {
                Some(at_ms) => {
                    if let Some(old) = &row.stored {
                        changed.removed.push((row_key(P::TABLE, key), old.clone()));
                    }
                    changed.packed.push((key.clone(), at_ms, bytes));
                }
                None => changed.own.push((key.clone(), bytes, row.stored.clone())),
            }
        }
        changed
    }

    /// Writes changed rows, dead letters, offsets and statistics atomically
    /// (in chunks under an undo record when there are many rows).
    pub(super) fn checkpoint(&mut self) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let mut changed = self.changed_rows();
        if P::PACKED {
            self.collect_blocks(&mut changed)?;
        }
        let Changed {
            own: writes,
            packed,
            removed,
            released,
            collected,
        } = changed;
        let (mut last, admitted) = self.dead_letter_rows();
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
        let mut next_seq = self.task.blocks.read().expect("blocks lock").next_seq;
        let blocks = pack(packed, &mut next_seq);
        for block in &blocks {
            let (seq, bytes) = (block.seq, block.bytes.clone());
            store_rows.push((block_key(P::TABLE, partition, seq), bytes, None));
            let head = StoredBytes::from(encode_row(&block.head));
            store_rows.push((head_key(P::TABLE, partition, seq), head, None));
        }
        last.push((
            checkpoint_key(P::NAME, partition),
            encode_row(&self.checkpoint_record(next_offsets.clone())),
        ));
        let undo = undo_key(P::NAME, self.task.partition);
        failpoint::pass(Point::TaskBeforeCommit);
        if let Err(error) = self.core.store.commit(&undo, &store_rows, &removed, last) {
            // Not stored: their places are free, and a restart finds them again.
            self.core.dlq_released(admitted);
            return Err(error.into());
        }
        if failpoint::reached(Point::TaskAfterCommit) {
            // On disk, as sled's own timer or the flusher could have made it.
            let _ = self.core.store.flush_blocking();
            failpoint::crash(Point::TaskAfterCommit);
        }
        self.note_blocks(&blocks, &released, &collected);
        self.publish(&next_offsets);
        self.snapshot_if_due()?;
        *self.task.committed.lock().expect("committed lock") = next_offsets.clone();
        self.settle_rows(writes, &blocks);
        if self.core.config.instrument.enabled {
            metrics::histogram!("kpay_checkpoint_duration_seconds", "processor" => P::NAME)
                .record(started.elapsed().as_secs_f64());
        }
        self.last_commit = Instant::now();
        self.uncommitted = false;
        self.dirty_rows = 0;
        self.forget_expired()
    }

    /// The dead letters this checkpoint stores, as rows, and how many of
    /// the queue's places they take.
    fn dead_letter_rows(&mut self) -> (Vec<(String, Vec<u8>)>, u64) {
        let mut rows = Vec::new();
        let mut admitted = 0;
        if !self.owner {
            // The owner keeps the dead letters of what both processed.
            self.dead_letters.clear();
        }
        for letter in self.dead_letters.drain(..) {
            if self.core.dlq_admit() {
                admitted += 1;
                rows.push((letter.store_key(), encode_row(&letter)));
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
        (rows, admitted)
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

    /// Tells the index what the checkpoint did to the blocks: which it
    /// deleted, where the new ones are, and which hold older copies of rows
    /// written again (the rows are still in the cache, so readers find them
    /// meanwhile).
    fn note_blocks(&self, blocks: &[Block], released: &[u64], collected: &[(u64, Vec<String>)]) {
        if blocks.is_empty() && collected.is_empty() {
            return;
        }
        let mut index = self.task.blocks.write().expect("blocks lock");
        for (seq, keys) in collected {
            index.forget(*seq, keys, None);
        }
        for block in blocks {
            index.add(block.seq, &block.head.rows, Some(block.bytes.clone()));
        }
        for seq in released {
            index.release(*seq, 1);
        }
    }

    /// Forgets the settled rows older than the retention, right after a
    /// checkpoint: a block whose rows are all past it is deleted, one with
    /// only some is rewritten without them, up to 64 blocks per atomic batch.
    /// Which rows go depends only on the clock, so whatever the timing of
    /// checkpoints, a replay of the log to the same positions keeps the same.
    pub(super) fn forget_expired(&mut self) -> Result<(), RuntimeError> {
        const STEP: usize = 64;
        let partition = self.task.partition;
        let before = self.forgotten_before_ms().max(0);
        let plan = self
            .task
            .blocks
            .read()
            .expect("blocks lock")
            .to_forget(before);
        for step in plan.chunks(STEP) {
            let mut batch = Batch::default();
            let mut changes = Vec::with_capacity(step.len());
            for &seq in step {
                let store = &self.core.store;
                let (keys, head) =
                    store.forget_settled(&mut batch, P::TABLE, partition, seq, before)?;
                changes.push((seq, keys, head));
            }
            self.core.store.apply(batch)?;
            let mut index = self.task.blocks.write().expect("blocks lock");
            for (seq, keys, head) in &changes {
                index.forget(*seq, keys, head.as_ref());
            }
            drop(index);
            let gone: Vec<&String> = changes.iter().flat_map(|(_, keys, _)| keys).collect();
            let mut rows = self.task.rows.write().expect("rows lock");
            for key in gone.iter().copied() {
                if rows.get(key).is_some_and(|row| !row.dirty) {
                    rows.remove(key);
                }
            }
            drop(rows);
            if self.core.config.instrument.enabled {
                metrics::counter!("kpay_payments_forgotten_total", "processor" => P::NAME)
                    .increment(gone.len() as u64);
            }
        }
        Ok(())
    }

    /// Marks written rows clean and drops rows memory no longer needs; only
    /// after the store has them, so readers always find every row. Rows in
    /// a block now are no rows of their own (but for a packed table's key).
    pub(super) fn settle_rows(&self, writes: Vec<RowWrite>, blocks: &[Block]) {
        let limit = self.core.config.pipeline.cache_rows_per_task;
        let mut rows = self.task.rows.write().expect("rows lock");
        for (key, bytes, _) in writes {
            if let Some(row) = rows.get_mut(&key) {
                row.dirty = false;
                row.stored = Some(bytes);
            }
        }
        for block in blocks {
            for (key, _) in &block.head.rows {
                if let Some(row) = rows.get_mut(key) {
                    row.dirty = false;
                    row.block = Some(block.seq);
                    if !P::PACKED {
                        row.stored = None;
                    }
                }
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
