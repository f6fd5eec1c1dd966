//! Collecting a packed table's blocks: every version of its rows goes into
//! a new block, so older copies die in the blocks behind. A checkpoint
//! deletes blocks with no live row left and packs again the live rows of
//! blocks at most a third live, so dead copies never take more than twice
//! the room of the live rows (`store/blocks/`). A third, not a half: packing
//! again at half live wrote 30 % more per payment with a million accounts.

use super::checkpoint::Changed;
use super::TaskLoop;
use crate::pipeline::Processor;
use crate::runtime::RuntimeError;
use crate::store::{block_entries, block_key, decode_row, head_key, Head};

/// Blocks with no live row deleted per checkpoint, at most.
const DEAD_PER_CHECKPOINT: usize = 256;

impl<P: Processor> TaskLoop<P> {
    /// Adds to `changed` the blocks this checkpoint deletes and the live
    /// rows it packs again. Sparse blocks are taken twice as fast as the
    /// checkpoint writes new ones (each frees at least two thirds of a
    /// block), so collection keeps up with any rate of change.
    pub(super) fn collect_blocks(&self, changed: &mut Changed) -> Result<(), RuntimeError> {
        let new_blocks = changed.packed.len().div_ceil(16);
        let plan = (self.task.blocks.read().expect("blocks lock"))
            .to_collect(DEAD_PER_CHECKPOINT, 2 * new_blocks + 2);
        let (store, partition) = (&self.core.store, self.task.partition);
        for (seq, live) in plan {
            let (block, head_at) = (
                block_key(P::TABLE, partition, seq),
                head_key(P::TABLE, partition, seq),
            );
            let held = self.task.blocks.read().expect("blocks lock").bytes(seq);
            let stored = match held {
                Some(stored) => Some(stored),
                None => store.block_stored(P::TABLE, partition, seq)?,
            };
            let (Some(stored), Some(head_bytes)) = (stored, store.raw_get(&head_at)?) else {
                continue;
            };
            let head: Head = decode_row(&head_at, &head_bytes)?;
            if live > 0 {
                for (key, row) in block_entries(&block, &stored)? {
                    if self.is_newest_copy(&key, seq)? {
                        // A packed table's rows carry time 0 (kept for good).
                        changed.packed.push((key, 0, row));
                    }
                }
            }
            changed.removed.push((block, stored));
            changed.removed.push((head_at, head_bytes.into()));
            let keys = head.rows.into_iter().map(|(key, _)| key).collect();
            changed.collected.push((seq, keys));
        }
        Ok(())
    }

    /// Whether block `seq` holds the newest stored copy of `key`, and no
    /// newer one is about to be written.
    fn is_newest_copy(&self, key: &str, seq: u64) -> Result<bool, RuntimeError> {
        if let Some(row) = self.task.rows.read().expect("rows lock").get(key) {
            return Ok(!row.dirty && row.block == Some(seq));
        }
        let candidates = self
            .task
            .blocks
            .read()
            .expect("blocks lock")
            .candidates(key);
        for newer in candidates.into_iter().filter(|newer| *newer > seq) {
            if self.task.row_in_block(&self.core, newer, key)?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
