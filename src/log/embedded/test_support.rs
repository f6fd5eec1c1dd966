//! Helpers shared by the embedded log's tests: records whose values make
//! mix-ups visible, reading a partition back whole, and looking at or
//! damaging the segment files. They live apart from any one concern because
//! the tests of several concerns use them.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::segment::SEGMENT_EXTENSION;
use super::{EmbeddedLog, EmbeddedLogConfig};
use crate::log::{Log, Record, StoredRecord, TopicPartition};

/// A log under `dir` with small segments, so that a few records fill several.
pub(super) fn small_segments(dir: &Path, segment_bytes: u64) -> EmbeddedLogConfig {
    EmbeddedLogConfig {
        segment_bytes,
        ..EmbeddedLogConfig::with_dir(dir)
    }
}

/// One record with the given key, value and timestamp.
pub(super) fn record(key: &str, value: &str, timestamp_ms: i64) -> Record {
    Record {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        timestamp_ms,
    }
}

/// Records with values unique to `tag`, so mix-ups show.
pub(super) fn records(tag: &str, count: usize) -> Vec<Record> {
    (0..count)
        .map(|i| record(&format!("k{i}"), &format!("{tag}-{i}"), i as i64))
        .collect()
}

/// The segment files in `dir`, oldest first.
pub(super) fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(SEGMENT_EXTENSION))
        .collect();
    files.sort();
    files
}

/// Every retained record of `tp`, from its log start on.
pub(super) async fn read_all(log: &EmbeddedLog, tp: &TopicPartition) -> Vec<StoredRecord> {
    let start = log.log_start(tp).await.expect("log start");
    log.read(tp, start, usize::MAX).await.expect("read")
}

/// The records without their offsets, to compare with what was appended.
pub(super) fn values(stored: &[StoredRecord]) -> Vec<Record> {
    stored.iter().map(|s| s.record.clone()).collect()
}

/// Damages one byte of a file in place, as a bad disk would.
pub(super) fn flip_byte(path: &Path, pos: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, pos).expect("read byte");
    byte[0] ^= 0x5a;
    file.write_all_at(&byte, pos).expect("write byte");
}
