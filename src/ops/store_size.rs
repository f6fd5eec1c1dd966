//! `kpay store-size`: the state store's live data per table against the
//! space it takes on disk, read with the server stopped. The soak drill
//! holds the store to a bound of its live data with it.

use crate::config::Config;
use crate::store::{Store, TableSize};

/// The live data per table and the store's size on disk (bytes).
pub struct StoreSize {
    pub tables: Vec<TableSize>,
    pub disk_bytes: u64,
}

impl StoreSize {
    pub fn live_bytes(&self) -> u64 {
        self.tables.iter().map(|t| t.bytes).sum()
    }
}

/// Opens the store of `config`'s data directory and measures it.
pub fn measure(config: &Config) -> anyhow::Result<StoreSize> {
    let dir = config.data.dir.join("state");
    anyhow::ensure!(
        dir.exists(),
        "no state store in {}",
        config.data.dir.display()
    );
    let store = Store::open(&dir, config.data.state_cache_bytes)?;
    measure_open(&store)
}

/// Measures an open store.
pub fn measure_open(store: &Store) -> anyhow::Result<StoreSize> {
    let tables = store.table_sizes()?;
    let disk_bytes = store.disk_bytes();
    Ok(StoreSize { tables, disk_bytes })
}

/// The table, with a last line a script can read: `live_bytes=… disk_bytes=…`.
pub fn render(size: &StoreSize) -> String {
    let mut out = format!("{:<8} {:>12} {:>14}\n", "table", "rows", "live bytes");
    for table in &size.tables {
        out += &format!(
            "{:<8} {:>12} {:>14}\n",
            table.table, table.rows, table.bytes
        );
    }
    let live = size.live_bytes();
    let ratio = size.disk_bytes as f64 / live.max(1) as f64;
    out += &format!(
        "live {:.1} MiB, on disk {:.1} MiB ({ratio:.1}× the live data)\n",
        live as f64 / 1048576.0,
        size.disk_bytes as f64 / 1048576.0
    );
    out += &format!("live_bytes={live} disk_bytes={}\n", size.disk_bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Rows are counted per table with their key and value bytes; the disk figure is sled's files' size.
    #[test]
    fn counts_rows_and_bytes_per_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.data.dir = dir.path().join("nothing here");
        let error = measure(&config).err().unwrap().to_string();
        assert!(error.contains("no state store"), "{error}");
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        store.put("a/x", &7u8).unwrap();
        store.put("a/yy", &8u8).unwrap();
        store.put("p/z", &"abc").unwrap();
        store.flush_blocking().unwrap();
        let size = measure_open(&store).unwrap();
        let tables: Vec<_> = size
            .tables
            .iter()
            .map(|t| (t.table.as_str(), t.rows, t.bytes))
            .collect();
        assert_eq!(tables, vec![("a", 2, 3 + 1 + 4 + 1), ("p", 1, 3 + 4)]);
        assert_eq!(size.live_bytes(), 16);
        assert!(size.disk_bytes > 0);
        let text = render(&size);
        assert!(
            text.ends_with(&format!("live_bytes=16 disk_bytes={}\n", size.disk_bytes)),
            "{text}"
        );
    }
}
