//! Retention: deleting the oldest segments once consumers have released
//! every record in them, and moving each partition's log start past what
//! was deleted. The order of those steps (log starts persisted first,
//! files deleted last) is what lets a crash at any point reopen cleanly, so
//! it is kept in one place.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::index::{write_atomically, LOG_STARTS_FILE};
use super::segment::sync_dir;
use super::{lock, read_lock, Shared, LOG_TARGET};
use crate::log::LogError;

/// A segment chosen for deletion.
struct DoomedSegment {
    /// Segment number.
    number: u64,
    /// Path of the file to delete.
    path: PathBuf,
    /// Highest offset each partition (by id) has in it.
    max_offsets: HashMap<usize, u64>,
}

impl Shared {
    /// Deletes the closed segments at the front whose records are all
    /// released, recording the new log starts first.
    pub(super) fn collect_garbage(&self) -> Result<(), LogError> {
        let _guard = lock(&self.retention_lock);
        let doomed = self.deletable_prefix();
        if doomed.is_empty() {
            return Ok(());
        }
        let new_starts = self.log_starts_after(&doomed);
        self.write_log_starts(&new_starts)?;
        self.advance_log_starts(&new_starts);
        self.drop_segments(&doomed);
        Ok(())
    }

    /// The oldest closed segments that hold only released records. Only a
    /// prefix is taken, so every partition's retained offsets stay contiguous.
    fn deletable_prefix(&self) -> Vec<DoomedSegment> {
        let registry = read_lock(&self.registry);
        let table = lock(&self.segments);
        let mut doomed = Vec::new();
        let mut retained = self.retained_bytes.load(Ordering::Relaxed);
        for (number, info) in &table.segments {
            if *number == table.active || retained < self.config.history_bytes + info.bytes {
                // Kept as history while the log stays within its bound.
                break;
            }
            retained -= info.bytes;
            let all_released = info.max_offsets.iter().all(|(id, max_offset)| {
                registry
                    .by_id
                    .get(*id)
                    .is_some_and(|p| *max_offset < lock(&p.state).released)
            });
            if !all_released {
                break;
            }
            doomed.push(DoomedSegment {
                number: *number,
                path: info.path.clone(),
                max_offsets: info.max_offsets.clone(),
            });
        }
        doomed
    }

    /// Each affected partition's first offset left after the deletion.
    fn log_starts_after(&self, doomed: &[DoomedSegment]) -> HashMap<usize, u64> {
        let mut starts: HashMap<usize, u64> = HashMap::new();
        for segment in doomed {
            for (id, max_offset) in &segment.max_offsets {
                let start = starts.entry(*id).or_insert(0);
                *start = (*start).max(max_offset + 1);
            }
        }
        starts
    }

    /// Persists every partition's log start, so that reopening after the
    /// deletion neither reuses offsets nor mistakes deleted records for lost ones.
    fn write_log_starts(&self, new_starts: &HashMap<usize, u64>) -> Result<(), LogError> {
        let starts: BTreeMap<String, Vec<u64>> = {
            let registry = read_lock(&self.registry);
            registry
                .topics
                .iter()
                .map(|(topic, entry)| {
                    let ids = entry.first_id..entry.first_id + entry.partitions as usize;
                    let starts = registry.by_id[ids]
                        .iter()
                        .map(|p| {
                            let current = lock(&p.state).log_start;
                            new_starts.get(&p.id).map_or(current, |s| current.max(*s))
                        })
                        .collect();
                    (topic.clone(), starts)
                })
                .collect()
        };
        let json = serde_json::to_vec_pretty(&starts)
            .map_err(|e| LogError::Backend(format!("encoding {LOG_STARTS_FILE}: {e}")))?;
        write_atomically(&self.config.dir, LOG_STARTS_FILE, &json)
    }

    /// Moves log starts forward and forgets the index entries below them.
    fn advance_log_starts(&self, new_starts: &HashMap<usize, u64>) {
        let registry = read_lock(&self.registry);
        for (id, new_start) in new_starts {
            let Some(partition) = registry.by_id.get(*id) else {
                continue;
            };
            let mut state = lock(&partition.state);
            if *new_start <= state.log_start {
                continue;
            }
            let dropped = ((new_start - state.log_start) as usize).min(state.positions.len());
            state.positions.drain(..dropped);
            state.log_start = *new_start;
            while state.tail.front().is_some_and(|r| r.offset < *new_start) {
                state.tail.pop_front();
            }
        }
    }

    /// Forgets and deletes the segment files.
    fn drop_segments(&self, doomed: &[DoomedSegment]) {
        {
            let mut table = lock(&self.segments);
            for segment in doomed {
                if let Some(info) = table.segments.remove(&segment.number) {
                    self.retained_bytes.fetch_sub(info.bytes, Ordering::Relaxed);
                }
            }
        }
        for segment in doomed {
            // A file left behind is harmless: log_starts.json already says its
            // records are gone, and the next open takes it back in.
            match fs::remove_file(&segment.path) {
                Ok(()) => tracing::debug!(
                    target: LOG_TARGET,
                    path = %segment.path.display(),
                    "deleted log segment"
                ),
                Err(e) => tracing::warn!(
                    target: LOG_TARGET,
                    path = %segment.path.display(),
                    error = %e,
                    "could not delete log segment"
                ),
            }
        }
        if let Err(e) = sync_dir(&self.config.dir) {
            tracing::warn!(
                target: LOG_TARGET,
                error = %e,
                "could not sync the log directory after deleting segments"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::log::embedded::test_support::{records, segment_files, small_segments};
    use crate::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
    use crate::log::{Log, LogError, TopicPartition};

    /// Topic `r`: partition 2 gets 3 records at the start, partitions 0 and 1
    /// get 60 each, interleaved so that every segment holds both.
    async fn fill_for_retention(log: &EmbeddedLog) -> Vec<TopicPartition> {
        log.ensure_topic("r", 3).await.expect("topic");
        let tps: Vec<TopicPartition> = (0..3).map(|p| TopicPartition::new("r", p)).collect();
        log.append(&tps[2], records("early", 3))
            .await
            .expect("append");
        for round in 0..30 {
            for tp in &tps[..2] {
                log.append(tp, records(&format!("{round}"), 2))
                    .await
                    .expect("append");
            }
        }
        tps
    }

    // With a history bound, released segments stay until the log outgrows it, then only the oldest go.
    #[tokio::test]
    async fn history_keeps_released_segments_within_its_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = EmbeddedLogConfig {
            segment_bytes: 400,
            history_bytes: 1 << 20,
            ..EmbeddedLogConfig::with_dir(dir.path())
        };
        let log = EmbeddedLog::open(config).expect("open");
        let tps = fill_for_retention(&log).await;
        let files_before = segment_files(dir.path()).len();
        for tp in &tps {
            let hwm = log.high_watermark(tp).await.expect("hwm");
            log.release_before(tp, hwm).await.expect("release");
        }
        assert_eq!(
            segment_files(dir.path()).len(),
            files_before,
            "all kept as history"
        );
        assert_eq!(log.log_start(&tps[0]).await.expect("start"), 0);
        drop(log);

        let bound = 1_000;
        let config = EmbeddedLogConfig {
            segment_bytes: 400,
            history_bytes: bound,
            ..EmbeddedLogConfig::with_dir(dir.path())
        };
        let log = EmbeddedLog::open(config).expect("reopen");
        let bytes_before = log.disk_bytes();
        for tp in &tps {
            let hwm = log.high_watermark(tp).await.expect("hwm");
            log.release_before(tp, hwm).await.expect("release");
        }
        let kept = log.disk_bytes();
        assert!(
            kept < bytes_before && kept >= bound,
            "{kept} of {bytes_before}"
        );
        assert!(log.log_start(&tps[0]).await.expect("start") > 0);
    }

    // Released segments are deleted, log starts move and survive reopen; unreleased data stays.
    #[tokio::test]
    async fn retention_deletes_released_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_segments(dir.path(), 400);
        let log = EmbeddedLog::open(config.clone()).expect("open");
        let tps = fill_for_retention(&log).await;
        let files_before = segment_files(dir.path()).len();
        let bytes_before = log.disk_bytes();
        assert!(
            files_before >= 5,
            "expected several segments, got {files_before}"
        );
        for tp in [&tps[0], &tps[2]] {
            let hwm = log.high_watermark(tp).await.expect("hwm");
            log.release_before(tp, hwm).await.expect("release");
        }
        assert_eq!(
            segment_files(dir.path()).len(),
            files_before,
            "partition 1 keeps them alive"
        );
        log.release_before(&tps[1], 50).await.expect("release");
        log.release_before(&tps[1], 10)
            .await
            .expect("smaller release is a no-op");
        let files_after = segment_files(dir.path()).len();
        assert!(
            files_after < files_before,
            "{files_after} files left of {files_before}"
        );
        assert!(log.disk_bytes() < bytes_before);
        let start = log.log_start(&tps[1]).await.expect("start");
        assert!(start > 0 && start <= 50, "log start {start}");
        let below = log.read(&tps[1], start - 1, 1).await;
        assert!(
            matches!(below, Err(LogError::OffsetOutOfRange { .. })),
            "{below:?}"
        );
        let rest = log.read(&tps[1], start, 100).await.expect("read");
        assert_eq!(rest.len() as u64, 60 - start);
        assert_eq!(log.log_start(&tps[2]).await.expect("start"), 3);
        log.close();
        drop(log);
        let log = EmbeddedLog::open(config).expect("reopen");
        assert_eq!(log.log_start(&tps[1]).await.expect("start"), start);
        assert_eq!(
            log.high_watermark(&tps[2]).await.expect("hwm"),
            3,
            "no offset reuse"
        );
        assert_eq!(
            log.append(&tps[2], records("late", 1))
                .await
                .expect("append"),
            3
        );
    }
}
