//! A task partition's rows as stored bytes, for snapshots: read them out
//! of one store and write them into another, without decoding them.

use super::{sled_error, Batch, Store, StoreError, MAX_BATCH_ROWS};

/// A stored row: its key and its bytes.
pub type RawRow = (Vec<u8>, Vec<u8>);

/// Rows and bytes (keys and values) of one table, by its key prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableSize {
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
}

impl Store {
    /// The live data per table (the key up to its first `/`), in key order:
    /// what the store would hold with no overhead at all. A full scan.
    pub fn table_sizes(&self) -> Result<Vec<TableSize>, StoreError> {
        let mut sizes: Vec<TableSize> = Vec::new();
        for item in self.db.iter() {
            let (key, value) = item.map_err(sled_error("scan"))?;
            let table = key.split(|b| *b == b'/').next().unwrap_or_default();
            if sizes
                .last()
                .is_none_or(|last| last.table.as_bytes() != table)
            {
                sizes.push(TableSize {
                    table: String::from_utf8_lossy(table).into_owned(),
                    ..TableSize::default()
                });
            }
            let last = sizes.last_mut().expect("pushed above");
            last.rows += 1;
            last.bytes += (key.len() + value.len()) as u64;
        }
        Ok(sizes)
    }

    /// Every row whose key starts with `prefix` and that `keep` admits (by
    /// the key after the prefix), in key order.
    pub fn raw_rows(
        &self,
        prefix: &str,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<RawRow>, StoreError> {
        let mut rows = Vec::new();
        for item in self.db.scan_prefix(prefix.as_bytes()) {
            let (key, value) = item.map_err(sled_error(format!("scan {prefix}")))?;
            if keep(&String::from_utf8_lossy(&key[prefix.len()..])) {
                rows.push((key.to_vec(), value.to_vec()));
            }
        }
        Ok(rows)
    }

    /// Keys of `table` after `after`, in key order, at most `limit`.
    pub fn scan_keys(
        &self,
        table: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let stored = self.stored_after(table, after, limit)?;
        Ok(stored.into_iter().map(|(id, _)| id).collect())
    }

    /// Calls `f` with every key of `table` (without the prefix), until it
    /// answers `false`.
    pub fn for_each_key(
        &self,
        table: &str,
        mut f: impl FnMut(&str) -> bool,
    ) -> Result<(), StoreError> {
        let prefix = format!("{table}/");
        for item in self.db.scan_prefix(prefix.as_bytes()) {
            let (key, _) = item.map_err(sled_error(format!("scan {table}")))?;
            if !f(&String::from_utf8_lossy(&key[prefix.len()..])) {
                break;
            }
        }
        Ok(())
    }

    /// The stored bytes of `key`.
    pub fn raw_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self.db.get(key).map_err(sled_error(format!("get {key}")))?;
        Ok(value.map(|bytes| bytes.to_vec()))
    }

    /// Whether `key` holds a row.
    pub fn contains(&self, key: &str) -> Result<bool, StoreError> {
        self.db
            .contains_key(key)
            .map_err(sled_error(format!("get {key}")))
    }

    /// Writes `rows` as they are, in batches of at most [`MAX_BATCH_ROWS`].
    pub fn put_raw(&self, rows: &[RawRow]) -> Result<(), StoreError> {
        for chunk in rows.chunks(MAX_BATCH_ROWS) {
            let mut batch = Batch::default();
            for (key, value) in chunk {
                batch.insert(key.as_slice(), value.as_slice());
            }
            self.apply(batch)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Rows read out by prefix and filter come back byte for byte in another store.
    #[test]
    fn rows_move_between_stores_unchanged() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let from = Store::open(one.path(), 1 << 20).unwrap();
        from.put("a/x1", &1u32).unwrap();
        from.put("a/y2", &2u32).unwrap();
        from.put("b/x3", &3u32).unwrap();
        let rows = from.raw_rows("a/", |key| key.starts_with('x')).unwrap();
        assert_eq!(rows.len(), 1);
        let to = Store::open(two.path(), 1 << 20).unwrap();
        to.put_raw(&rows).unwrap();
        assert_eq!(to.get::<u32>("a/x1").unwrap(), Some(1));
        assert!(!to.contains("a/y2").unwrap() && to.contains("a/x1").unwrap());
        assert_eq!(to.raw_get("a/x1").unwrap(), from.raw_get("a/x1").unwrap());
    }
}
