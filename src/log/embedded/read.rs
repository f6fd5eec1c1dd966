//! The read path: a read is served from the partition index, from the tail
//! cache for the newest records and from positioned reads of the segment
//! files for older ones. Only durable records are ever in the index, so a
//! read never waits for the writer; keeping this path apart from the writer
//! makes that easy to check.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::frame::{decode_body, FrameError, FrameReader};
use super::index::{Partition, RecordPosition};
use super::{corrupt, io_error, lock, EmbeddedLog};
use crate::log::{LogError, StoredRecord, TopicPartition};

/// Size of the window read at once when serving reads from disk.
const READ_CHUNK_BYTES: usize = 64 << 10;

impl EmbeddedLog {
    /// Serves a read from the index, the tail cache and the segment files.
    pub(super) fn read_records(
        &self,
        tp: &TopicPartition,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let partition = self.partition(tp)?;
        let (positions, cached) = {
            let state = lock(&partition.state);
            if offset < state.log_start {
                return Err(LogError::OffsetOutOfRange {
                    tp: tp.clone(),
                    offset,
                    log_start: state.log_start,
                });
            }
            if offset >= state.high_watermark || max_records == 0 {
                return Ok(Vec::new());
            }
            let available = state.high_watermark - offset;
            let end = offset + available.min(max_records as u64);
            let cache_start = state
                .tail
                .front()
                .map_or(state.high_watermark, |r| r.offset);
            let disk_end = end.min(cache_start.max(offset));
            let first_index = (offset - state.log_start) as usize;
            let disk_count = (disk_end - offset) as usize;
            let positions: Vec<RecordPosition> = state
                .positions
                .range(first_index..first_index + disk_count)
                .copied()
                .collect();
            let cache_from = disk_end.saturating_sub(cache_start) as usize;
            let cached: Vec<StoredRecord> = state
                .tail
                .range(cache_from..)
                .take((end - disk_end) as usize)
                .cloned()
                .collect();
            (positions, cached)
        };
        let mut records = self.read_from_disk(&partition, offset, &positions)?;
        records.extend(cached);
        Ok(records)
    }

    /// Reads the frames at `positions`, which hold offsets from `offset` on.
    fn read_from_disk(
        &self,
        partition: &Partition,
        offset: u64,
        positions: &[RecordPosition],
    ) -> Result<Vec<StoredRecord>, LogError> {
        let mut records = Vec::with_capacity(positions.len());
        let mut next = 0;
        while next < positions.len() {
            let segment = positions[next].segment;
            let run = positions[next..]
                .iter()
                .take_while(|p| p.segment == segment)
                .count();
            let Some((path, file, bytes)) = self.segment_handle(u64::from(segment)) else {
                // Retention deleted the segment after the index was read.
                let log_start = lock(&partition.state).log_start;
                return Err(LogError::OffsetOutOfRange {
                    tp: partition.tp.clone(),
                    offset,
                    log_start,
                });
            };
            let max_body_bytes = self.shared.config.max_body_bytes();
            let mut reader = FrameReader::new(&file, bytes, max_body_bytes, READ_CHUNK_BYTES);
            for (index, position) in positions[next..next + run].iter().enumerate() {
                let expected = offset + (next + index) as u64;
                records.push(read_one(
                    &mut reader,
                    &path,
                    u64::from(position.pos),
                    partition,
                    expected,
                )?);
            }
            next += run;
        }
        Ok(records)
    }

    /// Path, handle and valid length of segment `number`, unless retention
    /// deleted it. They are copied out so that the disk read does not hold
    /// the lock of the segment table.
    fn segment_handle(&self, number: u64) -> Option<(PathBuf, Arc<File>, u64)> {
        let table = lock(&self.shared.segments);
        let info = table.segments.get(&number)?;
        Some((info.path.clone(), Arc::clone(&info.file), info.bytes))
    }
}

/// Reads and checks the frame of one expected record.
fn read_one(
    reader: &mut FrameReader<'_>,
    path: &Path,
    pos: u64,
    partition: &Partition,
    expected_offset: u64,
) -> Result<StoredRecord, LogError> {
    let (body, _) = reader.frame_at(pos).map_err(|e| match e {
        FrameError::Io(source) => {
            io_error(format!("reading {} at byte {pos}", path.display()), source)
        }
        other => corrupt(path, format!("frame at byte {pos}: {other}")),
    })?;
    let frame =
        decode_body(body).map_err(|e| corrupt(path, format!("frame at byte {pos}: {e}")))?;
    let tp = &partition.tp;
    if frame.topic_id != partition.topic_id
        || frame.partition != tp.partition
        || frame.offset != expected_offset
    {
        return Err(corrupt(
            path,
            format!(
                "frame at byte {pos} holds topic id {:08x} partition {} offset {}, the index \
                 expected {tp} (topic id {:08x}) offset {expected_offset}",
                frame.topic_id, frame.partition, frame.offset, partition.topic_id
            ),
        ));
    }
    Ok(frame.to_stored())
}

#[cfg(test)]
mod tests {
    use crate::log::embedded::test_support::{records, values};
    use crate::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
    use crate::log::{Log, TopicPartition};

    // Records older than the tail cache come back from disk equal to what was appended.
    #[tokio::test]
    async fn disk_reads_equal_cache_reads() {
        for cache_records in [0, 2] {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = EmbeddedLogConfig {
                tail_cache_records: cache_records,
                segment_bytes: 500,
                ..EmbeddedLogConfig::with_dir(dir.path())
            };
            let log = EmbeddedLog::open(config).expect("open");
            log.ensure_topic("c", 2).await.expect("topic");
            let tp = TopicPartition::new("c", 0);
            let mut all = Vec::new();
            for round in 0..10 {
                let batch = records(&format!("{round}"), 5);
                log.append(&tp, batch.clone()).await.expect("append");
                log.append(&TopicPartition::new("c", 1), records("other", 2))
                    .await
                    .expect("append");
                all.extend(batch);
            }
            let mixed = log.read(&tp, 0, 100).await.expect("read");
            assert_eq!(values(&mixed), all);
            for (offset, appended) in all.iter().enumerate() {
                let one = log.read(&tp, offset as u64, 1).await.expect("read");
                assert_eq!(one[0].offset, offset as u64);
                assert_eq!(&one[0].record, appended);
            }
            let tail = log.read(&tp, 48, 10).await.expect("read tail");
            assert_eq!(values(&tail), all[48..].to_vec());
            let across = log.read(&tp, 45, 4).await.expect("read across");
            assert_eq!(values(&across), all[45..49].to_vec());
        }
    }
}
