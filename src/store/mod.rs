//! State tables in sled: one tree, rows under table prefixes, so that a task's
//! state changes, its input offsets and its dead letters commit in one atomic
//! `apply_batch`.
//!
//! Keys:
//! - `a/<account id>` accounts: the key alone, their rows are in blocks;
//! - `p/<payment id>` payments in flight;
//! - `b/<table>/<partition>/<seq>` and `h/…` blocks of rows and their heads
//!   (`blocks/`): every account version, payments that are over;
//! - `t/<processor>/<partition>` task checkpoints, `u/<processor>/<partition>`
//!   the undo record of an interrupted checkpoint;
//! - `d/<source>/<partition>/<offset>` dead letters, `m/<name>` metadata.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::failpoint::{self, Point};
use crate::model::SourceTopic;
mod blocks;
mod raw;
pub use blocks::{
    block_entries, block_key, dead_copies, decompress, find_in_block, head_key, pack,
    plain_entries, prefixes as block_prefixes, Block, BlockIndex, Head,
};
pub use raw::{RawRow, TableSize};

/// Errors of the state store, with the key or step they concern.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("state store: {context}: {source}")]
    Sled {
        context: String,
        #[source]
        source: sled::Error,
    },
    #[error("state store row {key} does not decode: {reason}")]
    Corrupt { key: String, reason: String },
    /// The store cannot be used as it is (format, lock); the text says why.
    #[error("{0}")]
    Format(String),
}

impl StoreError {
    /// Whether sled failed because the device is full.
    pub fn is_no_space(&self) -> bool {
        match self {
            Self::Sled {
                source: sled::Error::Io(io),
                ..
            } => crate::log::is_out_of_space(io),
            _ => false,
        }
    }
}

/// Layout version of rows and log records; bumped when either changes.
pub const FORMAT: u32 = 10;
const FORMAT_KEY: &str = "m/format";

fn sled_error(context: impl Into<String>) -> impl FnOnce(sled::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Sled { context, source }
}

/// (input kind, input partition, upstream kind, upstream partition).
pub type AppliedKey = (SourceTopic, u32, SourceTopic, u32);

/// What a task commits together: where it is in each input, the highest
/// source offset applied per upstream partition (to skip replayed copies), and
/// its statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint<S> {
    /// Next offset to read, per input (topic kind, partition).
    pub next_offsets: BTreeMap<(SourceTopic, u32), u64>,
    /// Highest source offset applied, per input (topic kind, partition) and
    /// upstream (topic kind, partition): an upstream's outputs are in order
    /// within one input partition, not across partitions.
    pub applied_sources: BTreeMap<AppliedKey, u64>,
    /// The processor's per-partition statistics at this point.
    pub stats: S,
    /// The newest append time of a `payment.incoming` record read (the
    /// retention's clock; 0 before the first).
    pub clock_ms: i64,
}

/// The sled database holding every state table.
#[derive(Clone)]
pub struct Store {
    /// Kept for `flush` and size; every row lives in its default tree.
    db: sled::Db,
    /// Rows per sled batch in a chunked commit (1..=MAX_BATCH_ROWS).
    batch_rows: usize,
}

/// Rows to write atomically.
pub type Batch = sled::Batch;

/// Bytes of a row as stored (shared, cheap to clone).
pub type StoredBytes = sled::IVec;

/// Default and upper bound of rows in one sled batch. sled's memory grew to
/// gigabytes under atomic batches of 1,000+ random keys (1M keys: 500-row
/// batches 156 MB, 1,000-row 1.0 GB, 4,000-row 2.6 GB, measured), so a larger
/// checkpoint is written in chunks under an undo record (see [`Store::commit`]).
pub const MAX_BATCH_ROWS: usize = crate::config::MAX_STORE_BATCH_ROWS;

/// One row of a checkpoint: key, new bytes, bytes it replaces (`None`: new
/// row). The bytes are shared: the batch and the task's cache hold one copy.
pub type RowWrite = (String, StoredBytes, Option<StoredBytes>);

/// Rows a checkpoint in progress is replacing, with their previous bytes.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Undo {
    rows: Vec<(String, Option<Vec<u8>>)>,
}

pub fn undo_key(processor: &str, partition: u32) -> String {
    format!("u/{processor}/{partition}")
}

/// sled segment size (its default is 512 KiB). With 1,000-row random-key
/// batches, 256 KiB segments held 150 MB for 1M keys against 195 MB (measured).
const SEGMENT_BYTES: usize = 256 << 10;

pub fn row_key(table: &str, key: &str) -> String {
    format!("{table}/{key}")
}

pub fn checkpoint_key(processor: &str, partition: u32) -> String {
    format!("t/{processor}/{partition}")
}

pub fn encode_row<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("postcard into a Vec is infallible")
}

/// Decodes the stored bytes of the row under `key` (named in the error).
pub fn decode_row<'a, T: Deserialize<'a>>(key: &str, bytes: &'a [u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|error| StoreError::Corrupt {
        key: key.to_owned(),
        reason: error.to_string(),
    })
}

impl Store {
    /// Opens (or creates) the store under `dir`; `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .segment_size(SEGMENT_BYTES)
            .flush_every_ms(Some(1_000))
            .open()
            .map_err(|error| match &error {
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("could not acquire lock") =>
                {
                    StoreError::Format(format!(
                        "{} is in use by another kpay process: stop it first \
                         (one process per data directory)",
                        dir.display()
                    ))
                }
                _ => sled_error(format!("open {}", dir.display()))(error),
            })?;
        Ok(Self {
            db,
            batch_rows: MAX_BATCH_ROWS,
        })
    }

    /// Sets the rows per batch of chunked commits (clamped to 1..=MAX_BATCH_ROWS).
    pub fn with_batch_rows(mut self, rows: usize) -> Self {
        self.batch_rows = rows.clamp(1, MAX_BATCH_ROWS);
        self
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let Some(bytes) = self.db.get(key).map_err(sled_error(format!("get {key}")))? else {
            return Ok(None);
        };
        decode_row(key, &bytes).map(Some)
    }

    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.db
            .insert(key, encode_row(value))
            .map_err(sled_error(format!("put {key}")))?;
        Ok(())
    }

    /// Rows of `table` with keys after `after`, in key order, at most `limit`.
    pub fn scan<T: DeserializeOwned>(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let mut rows = Vec::new();
        for (id, value) in self.stored_after(table, after, limit)? {
            let row = decode_row(&row_key(table, &id), &value)?;
            rows.push((id, row));
        }
        Ok(rows)
    }

    /// Rows of `table` with keys after `after`, in key order, at most
    /// `limit`, as stored: (key without the prefix, bytes).
    fn stored_after(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, StoredBytes)>, StoreError> {
        let prefix = format!("{table}/");
        let start = match after {
            // The byte 0x00 sorts right after the key itself.
            Some(after) => format!("{prefix}{after}\u{0}"),
            None => prefix.clone(),
        };
        let mut rows = Vec::new();
        for item in self.db.range(start.as_bytes()..).take(limit) {
            let (key, value) = item.map_err(sled_error(format!("scan {table}")))?;
            let Some(id) = key.strip_prefix(prefix.as_bytes()) else {
                break;
            };
            rows.push((String::from_utf8_lossy(id).into_owned(), value));
        }
        Ok(rows)
    }

    /// Rows of `table` with keys below `before` (all if `None`), newest first,
    /// decoded lazily so that a filtered reader stops once it has a page.
    pub fn rows_before<T: DeserializeOwned>(
        &self,
        table: &str,
        before: Option<&str>,
    ) -> impl Iterator<Item = Result<T, StoreError>> + '_ {
        let prefix = format!("{table}/");
        let end = before.map_or_else(|| format!("{table}0"), |b| format!("{prefix}{b}"));
        let rows = self.db.range(prefix.clone().into_bytes()..end.into_bytes());
        rows.rev().map(move |item| {
            let (key, value) = item.map_err(|e| sled_error(format!("scan {prefix}"))(e))?;
            decode_row(&String::from_utf8_lossy(&key), &value)
        })
    }

    /// Rows in `table` (a scan: meant for small tables such as dead letters).
    pub fn count(&self, table: &str) -> u64 {
        self.db.scan_prefix(format!("{table}/").as_bytes()).count() as u64
    }

    /// Every row of `table` in key order (keys without the prefix), decoded lazily.
    pub fn entries<T: DeserializeOwned>(
        &self,
        table: &str,
    ) -> impl Iterator<Item = Result<(String, T), StoreError>> + '_ {
        let prefix = format!("{table}/");
        self.db.scan_prefix(prefix.as_bytes()).map(move |item| {
            let (key, value) = item.map_err(sled_error(format!("scan {prefix}")))?;
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            let row = decode_row(&format!("{prefix}{id}"), &value)?;
            Ok((id, row))
        })
    }

    /// Replaces the rows of `table` with those of the same table in `other`.
    pub fn replace_table_from(&self, other: &Store, table: &str) -> Result<(), StoreError> {
        let prefix = format!("{table}/");
        let mut batch = Batch::default();
        let mut rows = 0;
        for item in self.db.scan_prefix(prefix.as_bytes()) {
            let (key, _) = item.map_err(sled_error(format!("scan {table}")))?;
            batch.remove(key);
            rows += 1;
            if rows % MAX_BATCH_ROWS == 0 {
                self.apply(std::mem::take(&mut batch))?;
            }
        }
        for item in other.db.scan_prefix(prefix.as_bytes()) {
            let (key, value) = item.map_err(sled_error(format!("scan {table}")))?;
            batch.insert(key, value);
            rows += 1;
            if rows % MAX_BATCH_ROWS == 0 {
                self.apply(std::mem::take(&mut batch))?;
            }
        }
        self.apply(batch)
    }

    /// The stored bytes of a row and its decoded value.
    pub fn get_raw<T: DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<(T, StoredBytes)>, StoreError> {
        let Some(bytes) = self.db.get(key).map_err(sled_error(format!("get {key}")))? else {
            return Ok(None);
        };
        let value = decode_row(key, &bytes)?;
        Ok(Some((value, bytes)))
    }

    /// Writes `rows` and `last` so that after a crash either all of them or
    /// none are seen. Up to [`MAX_BATCH_ROWS`] rows go in one atomic batch.
    /// Beyond that, an undo record holding the rows' previous bytes is
    /// written first, the rows follow in chunks, and the final chunk carries
    /// `last` and deletes the undo record; [`Store::roll_back_partial`] puts
    /// the previous bytes back if a crash fell in between.
    /// `removed` rows (key, bytes) are deleted with `last`.
    pub fn commit(
        &self,
        undo_key: &str,
        rows: &[RowWrite],
        removed: &[(String, StoredBytes)],
        last: Vec<(String, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let chunks: Vec<&[RowWrite]> = rows.chunks(self.batch_rows).collect();
        if chunks.len() > 1 {
            let undo = Undo {
                rows: (rows.iter())
                    .map(|(key, _, old)| (key.clone(), old.as_ref().map(|b| b.to_vec())))
                    .chain((removed.iter()).map(|(key, old)| (key.clone(), Some(old.to_vec()))))
                    .collect(),
            };
            self.put(undo_key, &undo)?;
        }
        let (final_chunk, earlier) = chunks
            .split_last()
            .map_or((&[][..], &[][..]), |(f, e)| (*f, e));
        for chunk in earlier {
            let mut batch = Batch::default();
            for (key, bytes, _) in *chunk {
                batch.insert(key.as_bytes(), bytes.clone());
            }
            self.apply(batch)?;
            if failpoint::reached(Point::StoreMidCommit) {
                // The undo record and this chunk on disk, the rest not.
                let _ = self.flush_blocking();
                failpoint::crash(Point::StoreMidCommit);
            }
        }
        let mut batch = Batch::default();
        for (key, bytes, _) in final_chunk {
            batch.insert(key.as_bytes(), bytes.clone());
        }
        for (key, _) in removed {
            batch.remove(key.as_bytes());
        }
        for (key, bytes) in last {
            batch.insert(key.as_bytes(), bytes);
        }
        if chunks.len() > 1 {
            batch.remove(undo_key.as_bytes());
        }
        self.apply(batch)
    }

    /// Restores the rows of every checkpoint a crash interrupted; returns
    /// how many rows were put back. Idempotent: it can itself be interrupted.
    pub fn roll_back_partial(&self) -> Result<usize, StoreError> {
        let undo_keys = self.db.scan_prefix(b"u/").keys();
        let undo_keys: Vec<_> = undo_keys
            .collect::<Result<_, _>>()
            .map_err(sled_error("scan undo"))?;
        (undo_keys.iter())
            .map(|key| self.roll_back(&String::from_utf8_lossy(key)))
            .sum()
    }

    /// Restores the rows of the one interrupted checkpoint under `undo_key`
    /// (a task restarted in this process); 0 when there is none.
    pub fn roll_back(&self, undo_key: &str) -> Result<usize, StoreError> {
        let Some(undo) = self.get::<Undo>(undo_key)? else {
            return Ok(0);
        };
        let chunks: Vec<_> = undo.rows.chunks(self.batch_rows).collect();
        for (index, chunk) in chunks.iter().enumerate() {
            let mut batch = Batch::default();
            for (key, old) in *chunk {
                match old {
                    Some(bytes) => batch.insert(key.as_bytes(), bytes.as_slice()),
                    None => batch.remove(key.as_bytes()),
                }
            }
            if index + 1 == chunks.len() {
                batch.remove(undo_key.as_bytes());
            }
            self.apply(batch)?;
        }
        Ok(undo.rows.len())
    }

    /// Checks that the rows were written in this build's [`FORMAT`] (stamping
    /// a new store with it); rows in another format would not decode.
    pub fn check_format(&self) -> Result<(), StoreError> {
        match self.get::<u32>(FORMAT_KEY)? {
            Some(FORMAT) => Ok(()),
            found => {
                let written = found.map_or_else(|| "1".to_owned(), |v| v.to_string());
                if found.is_none() && self.db.scan_prefix(b"t/").next().is_none() {
                    return self.put(FORMAT_KEY, &FORMAT);
                }
                Err(StoreError::Format(format!(
                    "the state store holds format {written} data; this build reads format \
                     {FORMAT}: start with an empty data directory (or run the kpay that wrote it)"
                )))
            }
        }
    }

    pub fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.db
            .apply_batch(batch)
            .map_err(sled_error("apply batch"))
    }

    /// Makes everything applied so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await.map_err(sled_error("flush"))?;
        Ok(())
    }

    /// Makes everything applied so far durable, blocking the calling thread.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(sled_error("flush"))?;
        Ok(())
    }

    /// Bytes sled uses on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, tag: &str, old: &Store) -> Vec<RowWrite> {
        (0..n)
            .map(|i| {
                let key = row_key("a", &format!("{i:05}"));
                let before = old.db.get(&key).unwrap();
                (key, encode_row(&format!("{tag}{i}")).into(), before)
            })
            .collect()
    }

    // A checkpoint larger than one batch that is cut off before its final chunk is rolled back to the previous rows exactly.
    #[test]
    fn interrupted_chunked_commit_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let first = rows(300, "old", &store);
        store
            .commit(
                "u/t/0",
                &first,
                &[],
                vec![("t/t/0".into(), encode_row(&1u32))],
            )
            .unwrap();
        assert!(
            store.get::<Undo>("u/t/0").unwrap().is_none(),
            "undo left behind"
        );
        // Simulate a crash after the undo record and the first chunk of a second checkpoint.
        let mut second = rows(300, "new", &store);
        second.extend((300..600).map(|i| {
            let key = row_key("a", &format!("{i:05}"));
            (key, encode_row(&"fresh").into(), None)
        }));
        let undo = Undo {
            rows: second
                .iter()
                .map(|(k, _, old)| (k.clone(), old.as_ref().map(|b| b.to_vec())))
                .collect(),
        };
        store.put("u/t/0", &undo).unwrap();
        let mut batch = Batch::default();
        for (key, bytes, _) in &second[..MAX_BATCH_ROWS] {
            batch.insert(key.as_bytes(), bytes.clone());
        }
        store.apply(batch).unwrap();
        for (key, bytes, _) in &second[500..] {
            store.db.insert(key.as_bytes(), bytes.clone()).unwrap();
        }
        assert_eq!(store.roll_back_partial().unwrap(), 600);
        let all: Vec<(String, String)> = store.scan("a", None, 1_000).unwrap();
        assert_eq!(
            all.len(),
            300,
            "rows new in the failed checkpoint must vanish"
        );
        assert!(all
            .iter()
            .enumerate()
            .all(|(i, (_, v))| *v == format!("old{i}")));
        assert_eq!(store.get::<u32>("t/t/0").unwrap(), Some(1));
        assert_eq!(
            store.roll_back_partial().unwrap(),
            0,
            "rollback is done once"
        );
    }

    // Rows named as removed go with the commit's last batch, in a chunked commit too, and come back on a rollback.
    #[test]
    fn removed_rows_go_with_the_commit_and_return_on_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        store
            .commit("u/t/0", &rows(3, "v", &store), &[], vec![])
            .unwrap();
        let old = store.db.get(row_key("a", "00001")).unwrap().unwrap();
        let removed = vec![(row_key("a", "00001"), old.clone())];
        let many = rows(MAX_BATCH_ROWS + 10, "w", &store);
        store.commit("u/t/0", &many[..2], &removed, vec![]).unwrap();
        assert_eq!(store.get::<String>("a/00001").unwrap(), None);
        assert_eq!(
            store.get::<String>("a/00000").unwrap().as_deref(),
            Some("w0")
        );
        // A chunked commit cut off after its first chunk puts the removed row back.
        let many = rows(MAX_BATCH_ROWS + 10, "x", &store);
        let undo = Undo {
            rows: (many.iter())
                .map(|(k, _, old)| (k.clone(), old.as_ref().map(|b| b.to_vec())))
                .chain(std::iter::once((row_key("a", "00001"), Some(old.to_vec()))))
                .collect(),
        };
        store.put("u/t/0", &undo).unwrap();
        store.db.remove(row_key("a", "00001")).unwrap();
        store.roll_back_partial().unwrap();
        assert_eq!(
            store.get::<String>("a/00001").unwrap().as_deref(),
            Some("v1")
        );
    }

    // Rows round-trip, scans page by key and stop at the table's end, batches apply together.
    #[test]
    fn rows_scan_and_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let mut batch = Batch::default();
        for id in ["b", "a", "c"] {
            batch.insert(row_key("a", id).as_bytes(), encode_row(&id.to_uppercase()));
        }
        batch.insert(b"b/zz".as_slice(), encode_row(&"other table"));
        store.apply(batch).unwrap();
        let page: Vec<(String, String)> = store.scan("a", None, 2).unwrap();
        assert_eq!(
            page,
            vec![("a".into(), "A".into()), ("b".into(), "B".into())]
        );
        let rest: Vec<(String, String)> = store.scan("a", Some("b"), 10).unwrap();
        assert_eq!(rest, vec![("c".into(), "C".into())]);
        assert_eq!(store.get::<String>("a/c").unwrap().as_deref(), Some("C"));
        assert_eq!(store.get::<String>("a/x").unwrap(), None);
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;

    // A new store is stamped with this build's format; a store with rows and no stamp (or another one) is refused by name.
    #[test]
    fn format_is_stamped_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("new"), 1 << 20).unwrap();
        store.check_format().unwrap();
        assert_eq!(store.get::<u32>(FORMAT_KEY).unwrap(), Some(FORMAT));
        store.check_format().unwrap();

        let old = Store::open(&dir.path().join("old"), 1 << 20).unwrap();
        old.put(&checkpoint_key("inflight", 0), &0u32).unwrap();
        let error = old.check_format().unwrap_err().to_string();
        assert!(
            error.contains("format 1") && error.contains("empty data directory"),
            "{error}"
        );
        old.put(FORMAT_KEY, &(FORMAT + 1)).unwrap();
        assert!(old.check_format().is_err());
    }
}
