//! Settings of the embedded log and the checks made on them before it
//! opens. They live apart from the log because the application's own
//! configuration and the tests build and adjust them without opening one.

use std::path::PathBuf;

use tokio::sync::Semaphore;

use super::frame::MAX_BODY_FIXED_BYTES;
use super::LOG_TARGET;
use crate::log::LogError;

/// Largest `segment_bytes`: the limit `config` checks `log.segment_bytes`
/// against, so that the two can never disagree.
pub use crate::config::MAX_SEGMENT_BYTES;

/// Settings of an [`EmbeddedLog`](super::EmbeddedLog).
#[derive(Debug, Clone)]
pub struct EmbeddedLogConfig {
    /// Directory holding the segment files (created if missing).
    pub dir: PathBuf,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Appends fail with LogError::Full beyond this many retained bytes.
    pub max_retained_bytes: u64,
    /// Released segments are kept while the log is no larger than this.
    pub history_bytes: u64,
    /// Largest single record (key+value) accepted.
    pub max_record_bytes: usize,
    /// Most records the writer thread takes into one group commit.
    pub max_group_records: usize,
    /// Recent records kept in memory per partition so consumers at the tail never touch disk.
    pub tail_cache_records: usize,
    /// Bound of the queue of appends waiting for the writer.
    pub queue_depth: usize,
}

impl Default for EmbeddedLogConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data/log"),
            segment_bytes: 64 << 20,
            max_retained_bytes: 8 << 30,
            history_bytes: 0,
            max_record_bytes: 1 << 20,
            max_group_records: 65_536,
            tail_cache_records: 8192,
            queue_depth: 4096,
        }
    }
}

impl EmbeddedLogConfig {
    /// The defaults with another directory.
    pub fn with_dir(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ..Self::default()
        }
    }

    /// Largest frame body a record within the limits can produce.
    pub(super) fn max_body_bytes(&self) -> usize {
        MAX_BODY_FIXED_BYTES + self.max_record_bytes
    }

    /// Rejects settings the log cannot work with.
    pub(super) fn validate(&self) -> Result<(), LogError> {
        let problem = if self.segment_bytes == 0 || self.segment_bytes > MAX_SEGMENT_BYTES {
            Some("segment_bytes must be above 0 and at most 1 GiB")
        } else if self.max_group_records == 0 {
            Some("max_group_records must be above 0")
        } else if self.queue_depth == 0 || self.queue_depth > Semaphore::MAX_PERMITS {
            Some("queue_depth must be above 0 and below 2^61")
        } else if self.max_body_bytes() > u32::MAX as usize {
            Some("max_record_bytes must leave room for the frame header within 4 GiB")
        } else {
            None
        };
        if self.segment_bytes >= self.max_retained_bytes {
            // The active segment is never deleted, so a log that fills up
            // inside it could not free space by retention.
            tracing::warn!(
                target: LOG_TARGET,
                segment_bytes = self.segment_bytes,
                max_retained_bytes = self.max_retained_bytes,
                "segment_bytes is not below max_retained_bytes; retention cannot free space"
            );
        }
        match problem {
            Some(reason) => Err(LogError::Backend(format!(
                "invalid embedded log config: {reason}"
            ))),
            None => Ok(()),
        }
    }
}
