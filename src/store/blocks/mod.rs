//! Rows packed in blocks, because sled's cost is per key: a checkpoint
//! writes such rows as blocks of about [`BLOCK_BYTES`] instead of one store
//! key each. Two kinds of rows go there:
//! - rows that are over (a payment terminal and completed): they never
//!   change again and only wait for retention;
//! - every version of a packed table's rows (accounts, `Processor::PACKED`):
//!   a changed row goes into a new block, and its older copy is dead.
//!
//! Each block has two keys, written in the checkpoint's atomic batch:
//! - `b/{table}/{partition}/{seq}`: the rows, sorted by key;
//! - `h/{table}/{partition}/{seq}`: its head, each row's key and retention
//!   time (0 for a packed table's rows, which retention never forgets), which is all a start reads
//!   to find the rows again.
//!
//! [`BlockIndex`] holds every head in memory as 32-bit fingerprints with
//! their block (8 bytes per row, in 4,096 buckets): a lookup scans one
//! bucket and reads only the blocks whose fingerprints match, newest first,
//! so the newest copy of a row wins. It counts each block's live rows (those
//! no newer block holds); a checkpoint deletes a block once none is left,
//! and packs the live rows of one that is at most a third live again, so
//! that dead copies take at most twice the room of the live ones. A packed table's
//! blocks stay in memory once read.
//!
//! Retention deletes a block once all its rows are past it, and rewrites a
//! block without its expired rows when only some are, so the store never
//! holds a row retention let go.
//!
//! A block is stored compressed (Snappy): rows of one table repeat most of
//! their bytes (ids with a shared prefix, accounts, principals, lineage), and
//! sled's writes grow with the bytes it is given. A packed table's blocks
//! kept in memory stay compressed too; a lookup decompresses its block.

use serde::{Deserialize, Serialize};

use super::{decode_row, sled_error, Batch, Store, StoreError, StoredBytes};

/// Soft bound on a block's bytes. sled splits a leaf at 17 entries whatever
/// their size and writes a page over 64 KiB as a file of its own, rewritten
/// whole on each change (docs/architecture.md), so blocks stay small enough
/// for a leaf of them to stay under that: 2 KiB blocks cost about 3 µs of
/// CPU and 680 bytes written per row in sled alone, against 20 µs and 900
/// bytes for a row of its own.
pub const BLOCK_BYTES: usize = 2 << 10;

/// What a start reads of a block: its rows' keys and retention times.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub rows: Vec<(String, i64)>,
}

/// One block of rows about to be written.
#[derive(Debug, Clone)]
pub struct Block {
    pub seq: u64,
    pub head: Head,
    /// Encoded rows, sorted by key, as stored (compressed).
    pub bytes: StoredBytes,
}

/// A block's bytes as the store keeps them.
fn compress(plain: &[u8]) -> StoredBytes {
    let stored = snap::raw::Encoder::new().compress_vec(plain);
    StoredBytes::from(stored.expect("Snappy compresses any input into a Vec"))
}

/// A block's plain bytes from what the store keeps under `key`.
pub fn decompress(key: &str, stored: &[u8]) -> Result<StoredBytes, StoreError> {
    let plain = snap::raw::Decoder::new().decompress_vec(stored);
    plain
        .map(StoredBytes::from)
        .map_err(|error| StoreError::Corrupt {
            key: key.to_owned(),
            reason: format!("block not Snappy-compressed: {error}"),
        })
}

/// The store's key prefixes of blocks and of their heads.
pub const BLOCKS: &str = "b";
pub const HEADS: &str = "h";

pub fn block_key(table: &str, partition: u32, seq: u64) -> String {
    format!("{BLOCKS}/{table}/{partition:03}/{seq:016x}")
}

pub fn head_key(table: &str, partition: u32, seq: u64) -> String {
    format!("{HEADS}/{table}/{partition:03}/{seq:016x}")
}

/// The key prefixes of a partition's blocks and heads (for snapshots).
pub fn prefixes(table: &str, partition: u32) -> [String; 2] {
    [
        format!("{BLOCKS}/{table}/{partition:03}/"),
        format!("{HEADS}/{table}/{partition:03}/"),
    ]
}

/// FNV-1a of the key, the fingerprint a lookup matches first.
fn fingerprint(key: &str) -> u32 {
    key.bytes().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// Packs `rows` (key, retention time, encoded row) into blocks of about
/// [`BLOCK_BYTES`], taking sequence numbers from `next_seq`. Rows are cut
/// into blocks in time order (so that retention empties whole blocks) and
/// sorted by key within each.
pub fn pack(mut rows: Vec<(String, i64, StoredBytes)>, next_seq: &mut u64) -> Vec<Block> {
    rows.sort_unstable_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    let mut blocks = Vec::new();
    let mut rest = &mut rows[..];
    while !rest.is_empty() {
        let mut bytes = 0;
        let mut take = 0;
        for (key, _, row) in rest.iter() {
            if take > 0 && bytes + key.len() + row.len() > BLOCK_BYTES {
                break;
            }
            bytes += key.len() + row.len() + 4;
            take += 1;
        }
        let (part, after) = rest.split_at_mut(take);
        part.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let seq = *next_seq;
        *next_seq += 1;
        blocks.push(encode_block(seq, part));
        rest = after;
    }
    blocks
}

fn encode_block(seq: u64, rows: &[(String, i64, StoredBytes)]) -> Block {
    let entries: Vec<(&str, &[u8])> = rows.iter().map(|(k, _, r)| (k.as_str(), &r[..])).collect();
    let plain = postcard::to_allocvec(&entries).expect("postcard into a Vec is infallible");
    Block {
        seq,
        head: Head {
            rows: rows.iter().map(|(k, at, _)| (k.clone(), *at)).collect(),
        },
        bytes: compress(&plain),
    }
}

/// A block's rows as stored: (key, encoded row), sorted by key.
fn decode_block<'a>(key: &str, bytes: &'a [u8]) -> Result<Vec<(&'a str, &'a [u8])>, StoreError> {
    decode_row(key, bytes)
}

/// One block as the index knows it.
#[derive(Debug, Clone)]
struct Meta {
    /// Its oldest row's retention time.
    oldest_ms: i64,
    /// Its newest row's retention time.
    newest_ms: i64,
    rows: usize,
    /// Rows whose newest copy is in this block.
    live: usize,
    /// Its bytes, for a packed table's block once read or written.
    bytes: Option<StoredBytes>,
}

impl Meta {
    fn new<K>(rows: &[(K, i64)]) -> Self {
        Self {
            oldest_ms: (rows.iter().map(|(_, at)| *at).min()).unwrap_or(i64::MAX),
            newest_ms: (rows.iter().map(|(_, at)| *at).max()).unwrap_or(i64::MIN),
            rows: rows.len(),
            live: rows.len(),
            bytes: None,
        }
    }
}

/// A head as a start reads it, its keys borrowed from the stored bytes.
#[derive(Deserialize)]
struct HeadRef<'a> {
    #[serde(borrow)]
    rows: Vec<(&'a str, i64)>,
}

/// Fingerprints are spread over 2^12 buckets by their low bits; an entry
/// holds the other 20 bits and the block's sequence number.
const BUCKET_BITS: u32 = 12;
const SEQ_BITS: u32 = 44;

/// The bucket of `key` and its entry for block `seq`.
fn entry(key: &str, seq: u64) -> (usize, u64) {
    let fingerprint = fingerprint(key);
    let bucket = (fingerprint & ((1 << BUCKET_BITS) - 1)) as usize;
    let tag = u64::from(fingerprint >> BUCKET_BITS);
    (bucket, tag << SEQ_BITS | (seq & ((1 << SEQ_BITS) - 1)))
}

/// Where the blocks of one table partition are: each block's times and
/// live rows, and each row's fingerprint with its block (8 bytes per row),
/// so that a lookup scans one bucket (1/4,096 of the rows) whatever the
/// number of blocks.
#[derive(Debug, Default)]
pub struct BlockIndex {
    blocks: std::collections::BTreeMap<u64, Meta>,
    /// Allocated with the first block.
    buckets: Vec<Vec<u64>>,
    /// The sequence number of the next block.
    pub next_seq: u64,
    /// Rows in the blocks.
    rows: usize,
    /// Of a packed table: blocks stay in memory once read or written, and
    /// retention forgets nothing.
    packed: bool,
}

impl BlockIndex {
    /// An empty index; `packed`: of a packed table (blocks kept in memory).
    pub fn new(packed: bool) -> Self {
        Self {
            packed,
            ..Self::default()
        }
    }

    /// Reads the heads of `table`'s blocks of `partition`, calling `each`
    /// with every row key (a start fills the presence filter with them).
    /// Every row counts as live: [`dead_copies`] finds out which are not.
    pub fn load(
        store: &Store,
        table: &str,
        partition: u32,
        packed: bool,
        mut each: impl FnMut(&str),
    ) -> Result<Self, StoreError> {
        let mut index = Self::new(packed);
        for item in heads(store, table, partition) {
            let (key, seq, value) = item?;
            let head: HeadRef = decode_row(&key, &value)?;
            head.rows.iter().for_each(|(k, _)| each(k));
            index.add(seq, &head.rows, None);
        }
        Ok(index)
    }

    /// Notes a new block `seq` with its head's rows (and its bytes, just written).
    pub fn add<K: AsRef<str>>(&mut self, seq: u64, rows: &[(K, i64)], bytes: Option<StoredBytes>) {
        debug_assert!(!self.blocks.contains_key(&seq), "block {seq} added twice");
        if self.buckets.is_empty() {
            self.buckets = vec![Vec::new(); 1 << BUCKET_BITS];
        }
        for (key, _) in rows {
            let (bucket, entry) = entry(key.as_ref(), seq);
            self.buckets[bucket].push(entry);
        }
        let mut meta = Meta::new(rows);
        meta.bytes = bytes.filter(|_| self.packed);
        self.blocks.insert(seq, meta);
        self.rows += rows.len();
        self.next_seq = self.next_seq.max(seq + 1);
    }

    /// Notes that `dead` rows of block `seq` have newer copies in other
    /// blocks (a row written again, or found by [`dead_copies`]).
    pub fn release(&mut self, seq: u64, dead: usize) {
        if let Some(meta) = self.blocks.get_mut(&seq) {
            meta.live = meta.live.saturating_sub(dead);
        }
    }

    /// Block `seq`'s bytes as stored (compressed), when kept in memory.
    pub fn bytes(&self, seq: u64) -> Option<StoredBytes> {
        self.blocks.get(&seq).and_then(|meta| meta.bytes.clone())
    }

    /// Keeps block `seq`'s bytes in memory, for a packed table.
    pub fn keep_bytes(&mut self, seq: u64, bytes: &StoredBytes) {
        if let Some(meta) = self.blocks.get_mut(&seq).filter(|_| self.packed) {
            meta.bytes = Some(bytes.clone());
        }
    }

    /// Up to `dead` blocks with no live row and up to `sparse` at most a
    /// third live, oldest first: (block, live rows).
    pub fn to_collect(&self, dead: usize, sparse: usize) -> Vec<(u64, usize)> {
        let (mut dead_left, mut sparse_left) = (dead, sparse);
        let mut chosen = Vec::new();
        for (seq, meta) in &self.blocks {
            if meta.live == 0 && dead_left > 0 {
                dead_left -= 1;
            } else if meta.live > 0 && meta.live * 3 <= meta.rows && sparse_left > 0 {
                sparse_left -= 1;
            } else {
                continue;
            }
            chosen.push((*seq, meta.live));
            if dead_left == 0 && sparse_left == 0 {
                break;
            }
        }
        chosen
    }

    /// Notes that block `seq` lost the rows `gone`; `head` is what it
    /// holds now (`None`: it was deleted).
    pub fn forget(&mut self, seq: u64, gone: &[String], head: Option<&Head>) {
        for key in gone {
            let (bucket, entry) = entry(key, seq);
            let entries = &mut self.buckets[bucket];
            if let Some(at) = entries.iter().position(|e| *e == entry) {
                entries.swap_remove(at);
            }
        }
        self.rows -= self.blocks.get(&seq).map_or(0, |m| m.rows);
        match head {
            Some(head) => {
                self.blocks.insert(seq, Meta::new(&head.rows));
                self.rows += head.rows.len();
            }
            None => {
                self.blocks.remove(&seq);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Blocks and rows held.
    pub fn len(&self) -> (usize, usize) {
        (self.blocks.len(), self.rows)
    }

    /// The blocks that may hold `key`, newest first.
    pub fn candidates(&self, key: &str) -> Vec<u64> {
        if self.buckets.is_empty() {
            return Vec::new();
        }
        let (bucket, wanted) = entry(key, 0);
        let mut seqs: Vec<u64> = (self.buckets[bucket].iter())
            .filter(|e| *e >> SEQ_BITS == wanted >> SEQ_BITS)
            .map(|e| e & ((1 << SEQ_BITS) - 1))
            .collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        seqs.dedup();
        seqs
    }

    /// The blocks that may hold rows with retention times in `since_ms..=until_ms`:
    /// (newest row's time, block).
    pub fn overlapping(&self, since_ms: i64, until_ms: i64) -> Vec<(i64, u64)> {
        (self.blocks.iter())
            .filter(|(_, m)| m.oldest_ms <= until_ms && m.newest_ms >= since_ms)
            .map(|(seq, m)| (m.newest_ms, *seq))
            .collect()
    }

    /// The blocks holding rows older than `before_ms` (none of a packed table).
    pub fn to_forget(&self, before_ms: i64) -> Vec<u64> {
        if self.packed {
            return Vec::new();
        }
        (self.blocks.iter())
            .filter(|(_, m)| m.oldest_ms < before_ms)
            .map(|(seq, _)| *seq)
            .collect()
    }
}

/// The heads of `table`'s blocks of `partition`, in block order: (store
/// key, block, bytes).
fn heads<'a>(
    store: &'a Store,
    table: &str,
    partition: u32,
) -> impl Iterator<Item = Result<(String, u64, StoredBytes), StoreError>> + 'a {
    let prefix = prefixes(table, partition)[1].clone();
    store.db.scan_prefix(prefix.as_bytes()).map(move |item| {
        let (key, value) = item.map_err(sled_error(format!("scan {prefix}")))?;
        let key = String::from_utf8_lossy(&key).into_owned();
        let seq =
            u64::from_str_radix(&key[prefix.len()..], 16).map_err(|error| StoreError::Corrupt {
                key: key.clone(),
                reason: error.to_string(),
            })?;
        Ok((key, seq, value))
    })
}

/// Per block of `table`'s `partition` below `below` (those a start found):
/// how many of its rows have a newer copy in a later block below `below`.
/// A start counts every row live and runs this in the background: a block
/// made or collected since only makes a count too high, never too low.
pub fn dead_copies(
    store: &Store,
    table: &str,
    partition: u32,
    below: u64,
) -> Result<Vec<(u64, usize)>, StoreError> {
    let mut newest: std::collections::HashMap<String, u64> = Default::default();
    let mut dead: std::collections::BTreeMap<u64, usize> = Default::default();
    for item in heads(store, table, partition) {
        let (key, seq, value) = item?;
        if seq >= below {
            break;
        }
        let head: Head = decode_row(&key, &value)?;
        for (k, _) in head.rows {
            if let Some(older) = newest.insert(k, seq) {
                *dead.entry(older).or_default() += 1;
            }
        }
    }
    Ok(dead.into_iter().collect())
}

/// The encoded row `key` in block `seq` of `table`'s `partition`, stored
/// as `bytes` (the block's store key is only made for an error).
pub fn find_in_block(
    (table, partition, seq): (&str, u32, u64),
    bytes: &[u8],
    key: &str,
) -> Result<Option<StoredBytes>, StoreError> {
    let rows: Vec<(&str, &[u8])> =
        postcard::from_bytes(bytes).map_err(|error| StoreError::Corrupt {
            key: block_key(table, partition, seq),
            reason: error.to_string(),
        })?;
    Ok(rows
        .binary_search_by(|(k, _)| (*k).cmp(key))
        .ok()
        .map(|at| StoredBytes::from(rows[at].1)))
}

/// Every row of the block stored as `stored` under `block`: (key, encoded row).
pub fn block_entries(block: &str, stored: &[u8]) -> Result<Vec<(String, StoredBytes)>, StoreError> {
    plain_entries(block, &decompress(block, stored)?)
}

/// Every row of block `block` from its plain bytes: (key, encoded row).
pub fn plain_entries(block: &str, bytes: &[u8]) -> Result<Vec<(String, StoredBytes)>, StoreError> {
    let rows = decode_block(block, bytes)?;
    Ok(rows
        .into_iter()
        .map(|(k, row)| (k.to_owned(), StoredBytes::from(row)))
        .collect())
}

impl Store {
    /// Block `seq`'s bytes as stored, compressed (`None`: deleted since the
    /// index was read).
    pub fn block_stored(
        &self,
        table: &str,
        partition: u32,
        seq: u64,
    ) -> Result<Option<StoredBytes>, StoreError> {
        let block = block_key(table, partition, seq);
        (self.db.get(&block)).map_err(sled_error(format!("get {block}")))
    }

    /// Block `seq`'s plain bytes (`None`: deleted since the index was read).
    pub fn block_bytes(
        &self,
        table: &str,
        partition: u32,
        seq: u64,
    ) -> Result<Option<StoredBytes>, StoreError> {
        let stored = self.block_stored(table, partition, seq)?;
        let block = block_key(table, partition, seq);
        stored.map(|stored| decompress(&block, &stored)).transpose()
    }

    /// Adds to `batch` what retention does to block `seq`: deleted when
    /// every row is older than `before_ms`, else rewritten with the rest.
    /// Returns the keys of the rows dropped and the block's new head (`None`: deleted).
    pub fn forget_settled(
        &self,
        batch: &mut Batch,
        table: &str,
        partition: u32,
        seq: u64,
        before_ms: i64,
    ) -> Result<(Vec<String>, Option<Head>), StoreError> {
        let (block, head_at) = (
            block_key(table, partition, seq),
            head_key(table, partition, seq),
        );
        let head: Head = self.get(&head_at)?.unwrap_or_default();
        let (gone, kept): (Vec<_>, Vec<_>) =
            head.rows.into_iter().partition(|(_, at)| *at < before_ms);
        let gone: Vec<String> = gone.into_iter().map(|(k, _)| k).collect();
        if kept.is_empty() {
            batch.remove(block.as_bytes());
            batch.remove(head_at.as_bytes());
            return Ok((gone, None));
        }
        let bytes = self.block_bytes(table, partition, seq)?.unwrap_or_default();
        let rows = decode_block(&block, &bytes)?;
        let keep: std::collections::HashSet<&str> = kept.iter().map(|(k, _)| k.as_str()).collect();
        let rest: Vec<(&str, &[u8])> = rows.into_iter().filter(|(k, _)| keep.contains(k)).collect();
        let head = Head { rows: kept };
        let plain = postcard::to_allocvec(&rest).expect("postcard into a Vec is infallible");
        batch.insert(block.as_bytes(), compress(&plain));
        batch.insert(
            head_at.as_bytes(),
            postcard::to_allocvec(&head).expect("postcard into a Vec is infallible"),
        );
        Ok((gone, Some(head)))
    }

    /// Every settled row of `table` (all partitions): (key, encoded row),
    /// the newest block's copy where a key is in several.
    pub fn block_rows(
        &self,
        table: &str,
    ) -> Result<std::collections::BTreeMap<String, StoredBytes>, StoreError> {
        let prefix = format!("{BLOCKS}/{table}/");
        let mut blocks = Vec::new();
        for item in self.db.scan_prefix(prefix.as_bytes()) {
            let (key, value) = item.map_err(sled_error(format!("scan {prefix}")))?;
            let key = String::from_utf8_lossy(&key).into_owned();
            let seq = key.rsplit('/').next().unwrap_or_default().to_owned();
            blocks.push((seq, key, value));
        }
        // Oldest first (per partition the sequence rises), so newer copies win.
        blocks.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rows = std::collections::BTreeMap::new();
        for (_, key, value) in &blocks {
            for (k, row) in block_entries(key, value)? {
                rows.insert(k, row);
            }
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod prefix_tests {
    use super::*;

    // Blocks and heads have prefixes of their own: a table of another name
    // (the audit trail's submissions are `s/`) would carry them over or trim them.
    #[test]
    fn block_prefixes_are_no_other_tables() {
        let others = [
            "a",
            "p",
            "t",
            "u",
            "m",
            crate::runtime::dead_letter::TABLE,
            crate::ops::audit::TABLE,
            crate::ops::audit::SUBMISSIONS,
            crate::ops::dlq::REPLAYED,
            crate::ops::logs::TABLE,
        ];
        for prefix in [BLOCKS, HEADS] {
            assert!(!others.contains(&prefix), "{prefix} is taken");
        }
        assert_ne!(BLOCKS, HEADS);
    }
}
