//! Recovery: rebuilding the index from the segment files when the log
//! opens, and cutting off the torn tail a crash during a write leaves. It
//! decides what counts as a torn write and what as corruption (see the
//! module documentation), which is what keeps acknowledged records from
//! being dropped silently, so those rules are kept together here.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

use super::frame::{decode_body, FrameError, FrameReader, FrameView};
use super::index::{RecordPosition, Registry, TOPICS_FILE};
use super::segment::{list_segments, segment_path, SegmentInfo, SegmentTable};
use super::{corrupt, io_error, lock, EmbeddedLogConfig, LOG_TARGET};
use crate::log::LogError;

/// Size of the window read at once when scanning a segment on open.
const RECOVERY_CHUNK_BYTES: usize = 1 << 20;

/// After recovery, marks everything below each log start as released and
/// publishes the high-water marks.
pub(super) fn finish_partitions(registry: &Registry) {
    for partition in &registry.by_id {
        let mut state = lock(&partition.state);
        state.released = state.log_start;
        partition.hwm.send_replace(state.high_watermark);
    }
}

/// Scans every segment of `config.dir`, oldest first, into the partitions
/// of `registry`, and returns the table of the segments found.
pub(super) fn scan_segments(
    config: &EmbeddedLogConfig,
    registry: &Registry,
) -> Result<SegmentTable, LogError> {
    let mut recovery = Recovery {
        config,
        registry,
        seen: vec![false; registry.by_id.len()],
        table: SegmentTable::default(),
    };
    let numbers = list_segments(&config.dir)?;
    for (index, number) in numbers.iter().enumerate() {
        recovery.scan_segment(*number, index + 1 == numbers.len())?;
    }
    Ok(recovery.table)
}

/// Rebuilds indexes from the segment files on open.
struct Recovery<'a> {
    /// Settings, for the frame size limit and the tail cache size.
    config: &'a EmbeddedLogConfig,
    /// Partitions whose states are rebuilt.
    registry: &'a Registry,
    /// Whether a record of each partition (by id) has been seen yet.
    seen: Vec<bool>,
    /// Segments scanned so far.
    table: SegmentTable,
}

impl Recovery<'_> {
    /// Scans one segment, adding its records to the partitions.
    fn scan_segment(&mut self, number: u64, is_last: bool) -> Result<(), LogError> {
        let path = segment_path(&self.config.dir, number);
        let context = || format!("opening {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(context(), e))?;
        let file_len = file.metadata().map_err(|e| io_error(context(), e))?.len();
        let mut info = SegmentInfo {
            path: path.clone(),
            file: Arc::new(file),
            bytes: file_len,
            max_offsets: HashMap::new(),
        };
        let file = Arc::clone(&info.file);
        let max_body_bytes = self.config.max_body_bytes();
        let mut reader = FrameReader::new(&file, file_len, max_body_bytes, RECOVERY_CHUNK_BYTES);
        let mut pos = 0;
        while pos < file_len {
            match reader.frame_at(pos) {
                Ok((body, next_pos)) => {
                    let frame = decode_body(body).map_err(|e| {
                        let reason = format!(
                            "frame at byte {pos} has a valid checksum but does not decode ({e})"
                        );
                        corrupt(&path, reason)
                    })?;
                    self.add_frame(number, &path, pos, &frame, &mut info)?;
                    pos = next_pos;
                }
                Err(FrameError::Io(e)) => {
                    return Err(io_error(
                        format!("reading {} at byte {pos}", path.display()),
                        e,
                    ))
                }
                Err(error) if !is_last => {
                    let reason = format!(
                        "bad frame at byte {pos} ({error}) in a segment that is not the last \
                         one, so it is not a torn write; restore this file from a backup or \
                         move the log directory aside"
                    );
                    return Err(corrupt(&path, reason));
                }
                Err(error) => {
                    cut_torn_tail(&mut reader, &info, pos, &error)?;
                    info.bytes = pos;
                    break;
                }
            }
        }
        self.table.active = number;
        self.table.segments.insert(number, info);
        Ok(())
    }

    /// Adds one recovered record to its partition, checking offsets are dense.
    fn add_frame(
        &mut self,
        number: u64,
        path: &Path,
        pos: u64,
        frame: &FrameView<'_>,
        info: &mut SegmentInfo,
    ) -> Result<(), LogError> {
        let Some(partition) = self.registry.lookup_id(frame.topic_id, frame.partition) else {
            let reason = format!(
                "record at byte {pos} belongs to partition {} of the topic with id {:08x}, \
                 which {TOPICS_FILE} does not list; restore {TOPICS_FILE} from a backup",
                frame.partition, frame.topic_id
            );
            return Err(corrupt(path, reason));
        };
        let mut state = lock(&partition.state);
        if self.seen[partition.id] {
            if frame.offset != state.high_watermark {
                let reason = format!(
                    "record at byte {pos} of {} has offset {} where {} was expected; offsets \
                     must be dense, so records are missing or duplicated",
                    partition.tp, frame.offset, state.high_watermark
                );
                return Err(corrupt(path, reason));
            }
        } else {
            // Retention records the log start before it deletes segments, so
            // the first surviving record may be older (deletion was cut
            // short) but never newer than it.
            if frame.offset > state.log_start {
                let reason = format!(
                    "first retained record of {} has offset {} but the log start is {}; the \
                     records in between are missing",
                    partition.tp, frame.offset, state.log_start
                );
                return Err(corrupt(path, reason));
            }
            self.seen[partition.id] = true;
            state.log_start = frame.offset;
        }
        let Some(high_watermark) = frame.offset.checked_add(1) else {
            return Err(corrupt(
                path,
                format!("record at byte {pos} has offset u64::MAX"),
            ));
        };
        state.high_watermark = high_watermark;
        let Some(position) = RecordPosition::new(number, pos) else {
            return Err(corrupt(
                path,
                format!("record at byte {pos} lies beyond 4 GiB; segments are smaller"),
            ));
        };
        state.positions.push_back(position);
        if self.config.tail_cache_records > 0 {
            if state.tail.len() == self.config.tail_cache_records {
                state.tail.pop_front();
            }
            state.tail.push_back(frame.to_stored());
        }
        info.max_offsets.insert(partition.id, frame.offset);
        Ok(())
    }
}

/// Truncates a torn tail at `pos` of the last segment, unless valid data
/// follows the bad frame, which a torn write cannot produce.
fn cut_torn_tail(
    reader: &mut FrameReader<'_>,
    info: &SegmentInfo,
    pos: u64,
    error: &FrameError,
) -> Result<(), LogError> {
    if let FrameError::TooLarge(_) = error {
        // A torn write leaves missing or zeroed bytes, not a long length
        // that still fits in the file; cutting here could drop good records.
        return Err(corrupt(&info.path, format!("frame at byte {pos}: {error}")));
    }
    if let FrameError::BadCrc { next_pos } = error {
        if *next_pos < reader.file_len && reader.frame_at(*next_pos).is_ok() {
            let reason = format!(
                "bad frame at byte {pos} ({error}) is followed by a valid frame at byte \
                 {next_pos}, so this is not a torn write; restore the file from a backup or, \
                 if losing every record from byte {pos} on is acceptable, truncate the file \
                 to {pos} bytes"
            );
            return Err(corrupt(&info.path, reason));
        }
    }
    let context = || format!("truncating the torn tail of {}", info.path.display());
    info.file.set_len(pos).map_err(|e| io_error(context(), e))?;
    info.file.sync_data().map_err(|e| io_error(context(), e))?;
    if matches!(error, FrameError::BadCrc { next_pos } if *next_pos == reader.file_len) {
        // All its bytes were there: a write torn inside the frame, or damage
        // to a frame that was synced. A state that read it refuses to start
        // (it is ahead of the log); otherwise it was never acknowledged or is lost.
        tracing::error!(
            target: LOG_TARGET,
            path = %info.path.display(),
            valid_bytes = pos,
            dropped_bytes = reader.file_len - pos,
            reason = %error,
            "cut the last log frame: complete in length but failing its checksum (a torn \
             write, or damage to a synced frame whose record is then lost)"
        );
        return Ok(());
    }
    tracing::warn!(
        target: LOG_TARGET,
        path = %info.path.display(),
        valid_bytes = pos,
        dropped_bytes = reader.file_len - pos,
        reason = %error,
        "cut a torn tail off the last log segment (records never acknowledged)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};

    use super::*;
    use crate::log::embedded::frame::{encode_frame, topic_id};
    use crate::log::embedded::test_support::{
        flip_byte, read_all, records, segment_files, small_segments, values,
    };
    use crate::log::embedded::EmbeddedLog;
    use crate::log::{Log, Record, TopicPartition};

    /// Appends `count` single-record batches to `t/0` and closes the log.
    async fn write_and_close(config: &EmbeddedLogConfig, count: usize) -> Vec<Record> {
        let log = EmbeddedLog::open(config.clone()).expect("open");
        log.ensure_topic("t", 1).await.expect("topic");
        let all = records("r", count);
        for record in &all {
            log.append(&TopicPartition::new("t", 0), vec![record.clone()])
                .await
                .expect("append");
        }
        log.close();
        all
    }

    /// Reopens after damage and checks the last record is gone and appends go on.
    async fn check_last_record_dropped(config: &EmbeddedLogConfig, all: &[Record]) {
        let log = EmbeddedLog::open(config.clone()).expect("reopen after a torn tail");
        let tp = TopicPartition::new("t", 0);
        let kept = all.len() - 1;
        assert_eq!(log.high_watermark(&tp).await.expect("hwm"), kept as u64);
        assert_eq!(values(&read_all(&log, &tp).await), all[..kept].to_vec());
        let next = log.append(&tp, records("new", 1)).await.expect("append");
        assert_eq!(next, kept as u64);
        log.close();
        let log = EmbeddedLog::open(config.clone()).expect("reopen again");
        assert_eq!(
            log.read(&tp, next, 1).await.expect("read")[0].record,
            records("new", 1)[0]
        );
    }

    // A torn last frame (cut short or with a flipped byte) is dropped on reopen, nothing else.
    #[tokio::test]
    async fn torn_tail_is_truncated() {
        let mut last_frame = Vec::new();
        encode_frame(&mut last_frame, topic_id("t"), 0, 9, &records("r", 10)[9]);
        let last_frame_bytes = last_frame.len() as u64;
        for damage in ["cut", "flip"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = EmbeddedLogConfig::with_dir(dir.path());
            let all = write_and_close(&config, 10).await;
            let last = segment_files(dir.path()).pop().expect("a segment");
            let len = fs::metadata(&last).expect("metadata").len();
            match damage {
                "cut" => {
                    let file = OpenOptions::new().write(true).open(&last).expect("open");
                    file.set_len(len - last_frame_bytes / 2).expect("truncate");
                }
                _ => flip_byte(&last, len - 3),
            }
            check_last_record_dropped(&config, &all).await;
        }
    }

    // A bad frame in the last segment with valid frames after it is corruption, not a torn tail.
    #[tokio::test]
    async fn damage_before_valid_frames_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = EmbeddedLogConfig::with_dir(dir.path());
        write_and_close(&config, 10).await;
        let last = segment_files(dir.path()).pop().expect("a segment");
        flip_byte(&last, 20);
        let error = EmbeddedLog::open(config).expect_err("must refuse to open");
        assert!(matches!(error, LogError::Corrupt { .. }), "{error}");
        assert!(
            error.to_string().contains("followed by a valid frame"),
            "{error}"
        );
    }

    // Damage in a segment other than the last one refuses to open, naming the file.
    #[tokio::test]
    async fn corruption_in_an_older_segment_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_segments(dir.path(), 120);
        write_and_close(&config, 20).await;
        let files = segment_files(dir.path());
        assert!(
            files.len() >= 3,
            "expected several segments, got {}",
            files.len()
        );
        flip_byte(&files[0], 30);
        let error = EmbeddedLog::open(config).expect_err("must refuse to open");
        match &error {
            LogError::Corrupt { path, .. } => {
                assert!(path.ends_with("00000000000000000001.wal"), "{error}")
            }
            other => panic!("expected Corrupt, got {other}"),
        }
    }

    // A record of an unknown topic on disk (topics.json lost) refuses to open.
    #[tokio::test]
    async fn records_of_unknown_topics_are_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = EmbeddedLogConfig::with_dir(dir.path());
        write_and_close(&config, 3).await;
        fs::write(dir.path().join(TOPICS_FILE), b"{}").expect("rewrite topics");
        let error = EmbeddedLog::open(config).expect_err("must refuse to open");
        assert!(error.to_string().contains("does not list"), "{error}");
    }
}

#[cfg(test)]
mod decoder_fuzz {
    //! Bytes on disk come from outside the process: whatever a segment holds,
    //! opening the log gives a log or an error, never a panic, and never an
    //! allocation sized by a corrupt length field.
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::log::embedded::EmbeddedLog;
    use crate::log::{Log, Record, TopicPartition};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        // A segment of arbitrary bytes (also after valid frames) opens or is refused by name.
        #[test]
        fn arbitrary_segment_bytes_never_panic(
            junk in proptest::collection::vec(any::<u8>(), 0..2048),
            valid_first in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let config = EmbeddedLogConfig::with_dir(dir.path());
            if valid_first {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async {
                    let log = EmbeddedLog::open(config.clone()).unwrap();
                    log.ensure_topic("t", 2).await.unwrap();
                    let record = Record {
                        key: Bytes::from_static(b"k"),
                        value: Bytes::from_static(b"v"),
                        timestamp_ms: 1,
                    };
                    log.append(&TopicPartition::new("t", 1), vec![record]).await.unwrap();
                    log.close();
                });
            }
            let path = segment_path(dir.path(), 1);
            let mut bytes = std::fs::read(&path).unwrap_or_default();
            bytes.extend_from_slice(&junk);
            std::fs::write(&path, &bytes).unwrap();
            match EmbeddedLog::open(config) {
                Ok(log) => log.close(),
                Err(error) => prop_assert!(!error.to_string().is_empty()),
            }
        }
    }
}
