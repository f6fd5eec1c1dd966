//! The segment files: their names, the table of live segments with what
//! each one holds, and creating and listing them. Recovery, the writer and
//! retention all change the set of segments, so the rules for naming and
//! creating them durably are kept here once.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{corrupt, io_error};
use crate::log::LogError;

/// Extension of segment files.
pub(super) const SEGMENT_EXTENSION: &str = "wal";

/// What the log knows about one segment file.
#[derive(Debug)]
pub(super) struct SegmentInfo {
    /// Path, for error messages and deletion.
    pub(super) path: PathBuf,
    /// Shared handle for positioned reads (and the writer's positioned writes).
    pub(super) file: Arc<File>,
    /// Bytes of valid frames; reads never go past it.
    pub(super) bytes: u64,
    /// Highest offset each partition (by id) has in this segment, for retention.
    pub(super) max_offsets: HashMap<usize, u64>,
}

/// The live segments, oldest first.
#[derive(Debug, Default)]
pub(super) struct SegmentTable {
    /// Segment number to its description.
    pub(super) segments: BTreeMap<u64, SegmentInfo>,
    /// Number of the segment being appended to; never deleted.
    pub(super) active: u64,
}

/// Path of segment file `number`. The number is padded to the 20 digits of
/// the largest `u64`, so that the names sort like the numbers.
pub(super) fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.{SEGMENT_EXTENSION}"))
}

/// Makes file creations, renames and deletions in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Numbers of the segment files in `dir`, ascending and without gaps.
pub(super) fn list_segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    let context = || format!("listing {}", dir.display());
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error(context(), e))? {
        let path = entry.map_err(|e| io_error(context(), e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_EXTENSION) {
            continue;
        }
        let number = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok());
        match number {
            Some(number) => numbers.push(number),
            None => return Err(corrupt(&path, "segment file name is not a number")),
        }
    }
    numbers.sort_unstable();
    for pair in numbers.windows(2) {
        if pair[1] != pair[0] + 1 {
            let missing = segment_path(dir, pair[0] + 1);
            return Err(corrupt(
                &missing,
                "segment file is missing between two others; restore it from a backup",
            ));
        }
    }
    Ok(numbers)
}

/// Creates an empty segment file and makes its directory entry durable.
pub(super) fn create_segment(dir: &Path, number: u64) -> Result<SegmentInfo, LogError> {
    let path = segment_path(dir, number);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_error(format!("creating {}", path.display()), e))?;
    if let Err(e) = sync_dir(dir) {
        // Not in the table yet: remove it, so that the next try can create it.
        let _ = fs::remove_file(&path);
        return Err(io_error(format!("syncing {}", dir.display()), e));
    }
    Ok(SegmentInfo {
        path,
        file: Arc::new(file),
        bytes: 0,
        max_offsets: HashMap::new(),
    })
}
