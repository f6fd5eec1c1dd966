//! A task's view shared with the rest of the runtime: its cached rows, its
//! statistics, the offsets it has checkpointed and made durable, where it
//! reads, and the presence filter of its keys. The task's loop writes it;
//! the views, the flusher and the ingest sequencers read it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use fastbloom::AtomicBloomFilter;

use super::core::Core;
use super::RuntimeError;
use crate::model::SourceTopic;
use crate::pipeline::Processor;
use crate::store::{
    block_key, decode_row, decompress, find_in_block, row_key, BlockIndex, Checkpoint, StoredBytes,
};

/// A cached state row; `dirty` rows are newer than the store.
pub(super) struct Row<S> {
    pub(super) value: S,
    pub(super) dirty: bool,
    /// The row's bytes in the store (`None`: not stored yet), kept so a
    /// chunked checkpoint can be undone without reading the store again.
    /// For a packed table: its key, once written.
    pub(super) stored: Option<StoredBytes>,
    /// The block holding its stored copy (`None`: none does).
    pub(super) block: Option<u64>,
}

/// A row as read from the store.
pub(super) struct Found<S> {
    pub(super) value: S,
    /// Its bytes as a row of its own (`None`: it is in a block).
    pub(super) stored: Option<StoredBytes>,
    /// The block it is in (`None`: a row of its own).
    pub(super) block: Option<u64>,
}

/// What a task shares with the runtime's views and the flusher.
pub(super) struct TaskView<P: Processor> {
    /// The partition this task owns.
    pub(super) partition: u32,
    /// Rows read or written recently; the store has the rest.
    pub(super) rows: RwLock<HashMap<String, Row<P::State>>>,
    /// Live statistics (checkpointed with the offsets).
    pub(super) stats: RwLock<P::Stats>,
    /// Input offsets of the last checkpoint applied to the store.
    pub(super) committed: Mutex<BTreeMap<(SourceTopic, u32), u64>>,
    /// Input offsets of the last checkpoint the store has flushed to disk;
    /// retention and the ingest dedup index trust only these.
    pub(super) durable: Mutex<BTreeMap<(SourceTopic, u32), u64>>,
    /// Set once the task has read up to the high-water mark seen at start.
    pub(super) caught_up: AtomicBool,
    /// Next offset to read per input, as of the last batch (for lag).
    pub(super) positions: Mutex<BTreeMap<(SourceTopic, u32), u64>>,
    /// Input topics this task does not read for now (a stopped stream);
    /// records wait in the log and show up as lag.
    pub(super) held: Mutex<Vec<SourceTopic>>,
    /// Every key this task has ever stored (with rare false positives): a
    /// miss here skips the store lookup, which most new payment ids would
    /// otherwise pay twice (ingest dedup and admission).
    pub(super) presence: AtomicBloomFilter,
    /// Set once `presence` holds every key stored before the start (filled
    /// in the background, so that a large store does not delay readiness);
    /// until then every lookup asks the store.
    pub(super) presence_filled: AtomicBool,
    /// Where this partition's rows in blocks are (`store/blocks/`): loaded
    /// at start, added to by checkpoints, trimmed by them and by retention.
    pub(super) blocks: RwLock<BlockIndex>,
    /// Why the task is down (failed, waiting to be restarted), until it is
    /// through a batch again.
    pub(super) down: Mutex<Option<String>>,
}

impl<P: Processor> TaskView<P> {
    pub(super) fn new(
        partition: u32,
        checkpoint: &Checkpoint<P::Stats>,
        filter_items: usize,
    ) -> Self {
        Self {
            presence: AtomicBloomFilter::with_false_pos(0.01).expected_items(filter_items.max(1)),
            presence_filled: AtomicBool::new(false),
            partition,
            rows: RwLock::new(HashMap::new()),
            stats: RwLock::new(checkpoint.stats.clone()),
            committed: Mutex::new(checkpoint.next_offsets.clone()),
            durable: Mutex::new(checkpoint.next_offsets.clone()),
            caught_up: AtomicBool::new(false),
            positions: Mutex::new(checkpoint.next_offsets.clone()),
            held: Mutex::new(Vec::new()),
            blocks: RwLock::new(BlockIndex::new(P::PACKED)),
            down: Mutex::new(None),
        }
    }

    /// The freshest value of a row: the task's cache, else the store.
    pub(super) fn get(&self, core: &Core, key: &str) -> Result<Option<P::State>, RuntimeError> {
        if let Some(row) = self.rows.read().expect("rows lock").get(key) {
            return Ok(Some(row.value.clone()));
        }
        self.load(core, key)
    }

    /// Reads a row from the store, unless the presence filter knows it is absent.
    pub(super) fn load(&self, core: &Core, key: &str) -> Result<Option<P::State>, RuntimeError> {
        Ok(self.load_raw(core, key)?.map(|found| found.value))
    }

    /// A stored row, with where it is. A packed table's rows are in blocks
    /// only (their own key holds no row); other rows are in a block once
    /// they are over.
    pub(super) fn load_raw(
        &self,
        core: &Core,
        key: &str,
    ) -> Result<Option<Found<P::State>>, RuntimeError> {
        if self.presence_filled.load(Ordering::Acquire) && !self.presence.contains(key) {
            return Ok(None);
        }
        let row_key = row_key(P::TABLE, key);
        if !P::PACKED {
            if let Some((value, bytes)) = core.store.get_raw(&row_key)? {
                let (stored, block) = (Some(bytes), None);
                return Ok(Some(Found {
                    value,
                    stored,
                    block,
                }));
            }
        }
        let Some((seq, bytes)) = self.find_in_blocks(core, key)? else {
            return Ok(None);
        };
        let value = decode_row(&row_key, &bytes)?;
        let (stored, block) = (None, Some(seq));
        Ok(Some(Found {
            value,
            stored,
            block,
        }))
    }

    /// The newest copy of `key` in this partition's blocks: (block, bytes).
    pub(super) fn find_in_blocks(
        &self,
        core: &Core,
        key: &str,
    ) -> Result<Option<(u64, StoredBytes)>, RuntimeError> {
        let candidates = self.blocks.read().expect("blocks lock").candidates(key);
        for seq in candidates {
            if let Some(row) = self.row_in_block(core, seq, key)? {
                return Ok(Some((seq, row)));
            }
        }
        Ok(None)
    }

    /// Row `key` of block `seq`, read from memory when the block is kept
    /// there (and kept there once read, for a packed table). Kept blocks
    /// stay compressed, as stored: a third of the memory, for a
    /// decompression of about a microsecond per lookup.
    pub(super) fn row_in_block(
        &self,
        core: &Core,
        seq: u64,
        key: &str,
    ) -> Result<Option<StoredBytes>, RuntimeError> {
        let (table, partition) = (P::TABLE, self.partition);
        let block = block_key(table, partition, seq);
        let held = self.blocks.read().expect("blocks lock").bytes(seq);
        if let Some(stored) = held {
            let plain = decompress(&block, &stored)?;
            return Ok(find_in_block((table, partition, seq), &plain, key)?);
        }
        // `None`: deleted since the index was read.
        let Some(stored) = core.store.block_stored(table, partition, seq)? else {
            return Ok(None);
        };
        // Kept only once it reads: a damaged block is read again from the
        // store after a repair, not served from memory.
        let plain = decompress(&block, &stored)?;
        let found = find_in_block((table, partition, seq), &plain, key)?;
        let mut blocks = self.blocks.write().expect("blocks lock");
        blocks.keep_bytes(seq, &stored);
        Ok(found)
    }

    /// Records that `key` exists in the store (called for rows found at start).
    pub(super) fn note_present(&self, key: &str) {
        self.presence.insert(key);
    }

    /// Says the presence filter now holds every key stored before the start.
    pub(super) fn presence_complete(&self) {
        self.presence_filled.store(true, Ordering::Release);
    }

    /// Rows in the cache newer than the store, with keys after `after` (for listings).
    pub(super) fn dirty_rows_after(&self, after: Option<&str>) -> Vec<(String, P::State)> {
        let rows = self.rows.read().expect("rows lock");
        rows.iter()
            .filter(|(key, row)| row.dirty && after.is_none_or(|a| key.as_str() > a))
            .map(|(key, row)| (key.clone(), row.value.clone()))
            .collect()
    }

    /// Stops (`true`) or restarts reading the inputs of kind `topic`.
    pub(super) fn hold(&self, topic: SourceTopic, held: bool) {
        let mut inputs = self.held.lock().expect("held lock");
        inputs.retain(|t| *t != topic);
        if held {
            inputs.push(topic);
        }
    }

    pub(super) fn is_held(&self, topic: SourceTopic) -> bool {
        self.held.lock().expect("held lock").contains(&topic)
    }

    /// Marks the task down, saying why.
    pub(super) fn mark_down(&self, reason: String) {
        *self.down.lock().expect("down lock") = Some(reason);
    }

    /// Marks the task up again after a batch went through.
    pub(super) fn mark_up(&self) {
        self.down.lock().expect("down lock").take();
    }

    pub(super) fn durable_offset(&self, input: (SourceTopic, u32)) -> u64 {
        self.durable
            .lock()
            .expect("durable lock")
            .get(&input)
            .copied()
            .unwrap_or(0)
    }
}
