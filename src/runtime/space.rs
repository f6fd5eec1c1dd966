//! Free space on the device holding the data directory.
//!
//! Intake is refused (507) while free space is below `data.min_free_bytes`,
//! so that the payments already accepted can still be processed (their
//! records in the log, their rows in the store) and the state store never
//! meets a full device: sled refuses every write after an IO error until it
//! is reopened. The check is a `statvfs` call per ingest group, so intake
//! resumes by itself as soon as space is freed.
//!
//! The log's own handling of a full device (a write cut back, nothing
//! acknowledged) covers what the check cannot: space taken by another
//! process between the check and the write.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The free-space check of one data directory.
#[derive(Debug)]
pub struct SpaceGuard {
    /// The directory whose device is checked.
    dir: PathBuf,
    /// Intake stops below this many free bytes; 0 turns the check off.
    min_free_bytes: u64,
    /// The last time a write met a full device, and what it said; cleared
    /// by the next write that succeeds.
    last_refusal: Mutex<Option<String>>,
}

impl SpaceGuard {
    pub fn new(dir: &Path, min_free_bytes: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            min_free_bytes,
            last_refusal: Mutex::new(None),
        }
    }

    /// Bytes an unprivileged writer may still use on the data directory's
    /// device, or `None` when the system cannot say.
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.dir)
    }

    /// Why new work must be refused for want of space, if it must: free
    /// space below the configured floor, or the last write met a full device.
    pub fn shortage(&self) -> Option<String> {
        if let Some(reason) = self.below_floor() {
            return Some(reason);
        }
        self.last_refusal.lock().expect("space lock").clone()
    }

    /// Why new work must be refused because free space is below the floor.
    pub fn below_floor(&self) -> Option<String> {
        if self.min_free_bytes == 0 {
            return None;
        }
        let free = self.free_bytes()?;
        (free < self.min_free_bytes).then(|| {
            format!(
                "insufficient storage: {free} bytes free on the device holding {}, below \
                 data.min_free_bytes ({}); new work is refused so that what was accepted \
                 can finish; free space on that device and retry",
                self.dir.display(),
                self.min_free_bytes
            )
        })
    }

    /// Notes that a write met a full device (`reason` says where).
    pub fn note_refusal(&self, reason: String) {
        *self.last_refusal.lock().expect("space lock") = Some(reason);
    }

    /// Notes that a write succeeded: the device has room again.
    pub fn note_success(&self) {
        let mut last = self.last_refusal.lock().expect("space lock");
        if last.take().is_some() {
            tracing::info!(dir = %self.dir.display(), "space available again: writes resumed");
        }
    }
}

/// `statvfs(dir)`: blocks available to unprivileged users times the fragment size.
fn free_bytes(dir: &Path) -> Option<u64> {
    fs2::available_space(dir).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // The check reads the real device: a floor of 1 byte holds, one above the device's size does not.
    #[test]
    fn floor_is_checked_against_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).expect("statvfs works on a temp dir");
        assert!(free > 0);
        assert_eq!(SpaceGuard::new(dir.path(), 0).shortage(), None);
        assert_eq!(SpaceGuard::new(dir.path(), 1).shortage(), None);
        let guard = SpaceGuard::new(dir.path(), u64::MAX);
        let reason = guard.shortage().expect("below an impossible floor");
        assert!(
            reason.contains("insufficient storage")
                && reason.contains(&dir.path().display().to_string()),
            "{reason}"
        );
        let guard = SpaceGuard::new(dir.path(), 1);
        guard.note_refusal("no space left at x".into());
        assert_eq!(guard.shortage().as_deref(), Some("no space left at x"));
        guard.note_success();
        assert_eq!(guard.shortage(), None);
    }
}
