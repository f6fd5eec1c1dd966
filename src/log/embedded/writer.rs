//! The writer thread and group commit: it takes appends off the queue,
//! gives them offsets, writes a whole group with one write and one
//! `fdatasync`, and only then publishes it (see the module documentation).
//! It also owns what happens when the device is full or a write fails,
//! because only the writer knows the last committed byte of the active
//! segment and can cut back to it.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, RwLock};

use tokio::sync::{oneshot, Semaphore};

use super::frame::{encode_frame, max_frame_bytes};
use super::index::{Partition, RecordPosition};
use super::segment::{create_segment, segment_path};
use super::{io_error, lock, EmbeddedLog, Shared, LOG_TARGET};
use crate::failpoint::{self, Point};
use crate::log::{is_out_of_space, LogError, Record, StoredRecord};

/// Soft cap on the bytes of one group commit, so a burst of large records
/// cannot make the writer build a buffer of gigabytes.
const MAX_GROUP_BYTES: usize = 64 << 20;
/// Largest single append, in frame bytes.
const MAX_APPEND_BYTES: u64 = 1 << 30;

/// One append on its way to the writer thread.
pub(super) struct AppendRequest {
    /// Partition to append to.
    pub(super) partition: Arc<Partition>,
    /// Records in order.
    pub(super) records: Vec<Record>,
    /// Receives the first offset, once the records are durable.
    pub(super) reply: oneshot::Sender<Result<u64, LogError>>,
}

impl EmbeddedLog {
    /// Spawns the writer thread over recovered state.
    pub(super) fn start(shared: Arc<Shared>) -> Result<Arc<EmbeddedLog>, LogError> {
        let (active, file, active_bytes) = {
            let table = lock(&shared.segments);
            match table.segments.get(&table.active) {
                Some(info) => (table.active, Arc::clone(&info.file), info.bytes),
                None => return Err(LogError::Backend("no active segment after recovery".into())),
            }
        };
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            shared: Arc::clone(&shared),
            receiver,
            active,
            active_file: file,
            active_bytes,
            buf: Vec::new(),
            failure: None,
        };
        let handle = std::thread::Builder::new()
            .name("kpay-log-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| io_error("spawning the log writer thread", e))?;
        Ok(Arc::new(EmbeddedLog {
            queue_slots: Semaphore::new(shared.config.queue_depth),
            shared,
            sender: RwLock::new(Some(sender)),
            writer: Mutex::new(Some(handle)),
        }))
    }
}

/// An append accepted into the current group, waiting for the fsync.
struct Accepted {
    /// The append itself.
    request: AppendRequest,
    /// Offset given to its first record.
    first_offset: u64,
    /// Byte position of each record's frame in the active segment.
    positions: Vec<u64>,
}

/// The writer thread: sole owner of offsets and of the active segment.
struct Writer {
    /// State shared with the handle and readers.
    shared: Arc<Shared>,
    /// Incoming appends.
    receiver: mpsc::Receiver<AppendRequest>,
    /// Number of the active segment.
    active: u64,
    /// Handle of the active segment.
    active_file: Arc<File>,
    /// Bytes written to the active segment.
    active_bytes: u64,
    /// Encoding buffer, reused across groups.
    buf: Vec<u8>,
    /// Set after an IO error; from then on every append fails, because
    /// after a failed fsync nobody knows what is on disk.
    failure: Option<String>,
}

impl Writer {
    fn run(mut self) {
        let mut carried: Option<AppendRequest> = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => match self.receiver.recv() {
                    Ok(request) => request,
                    // Every sender is gone and the queue is drained: closed.
                    Err(mpsc::RecvError) => break,
                },
            };
            let group = self.collect_group(first, &mut carried);
            self.commit_group(group);
        }
        tracing::debug!(target: LOG_TARGET, "log writer stopped");
    }

    /// Takes what is queued behind `first`, up to the group limits; a request
    /// that does not fit is carried into the next group.
    fn collect_group(
        &mut self,
        first: AppendRequest,
        carried: &mut Option<AppendRequest>,
    ) -> Vec<AppendRequest> {
        let max_records = self.shared.config.max_group_records;
        let mut records = first.records.len();
        let mut bytes = first
            .records
            .iter()
            .map(|r| r.key.len() + r.value.len())
            .sum::<usize>();
        let mut group = vec![first];
        while records < max_records && bytes < MAX_GROUP_BYTES {
            let Ok(request) = self.receiver.try_recv() else {
                break;
            };
            let request_bytes: usize = request
                .records
                .iter()
                .map(|r| r.key.len() + r.value.len())
                .sum();
            if records + request.records.len() > max_records
                || bytes + request_bytes > MAX_GROUP_BYTES
            {
                *carried = Some(request);
                break;
            }
            records += request.records.len();
            bytes += request_bytes;
            group.push(request);
        }
        group
    }

    /// Writes, syncs and publishes one group.
    fn commit_group(&mut self, group: Vec<AppendRequest>) {
        if let Some(failure) = &self.failure {
            for request in group {
                let message = format!(
                    "the log writer stopped after an IO error ({failure}); restart the process \
                     to recover"
                );
                let _ = request.reply.send(Err(LogError::Backend(message)));
            }
            return;
        }
        if let Err((context, error)) = self.roll_if_full() {
            if is_out_of_space(&error) {
                // Nothing was written: the next group tries to roll again.
                self.refuse_for_space(group, &context, &error);
            } else {
                self.fail(group, context, error);
            }
            return;
        }
        let accepted = self.encode_group(group);
        if accepted.is_empty() {
            return;
        }
        let frames: usize = accepted.iter().map(|a| a.positions.len()).sum();
        if frames > 1 && failpoint::reached(Point::LogMidWrite) {
            self.write_torn(&accepted);
        }
        if let Err((context, error)) = self.write_and_sync() {
            let requests = accepted.into_iter().map(|a| a.request).collect();
            if is_out_of_space(&error) {
                self.undo_for_space(requests, context, error);
            } else {
                self.fail(requests, context, error);
            }
            return;
        }
        self.record_segment_usage(&accepted);
        let refused = self.shared.no_space_count.load(Ordering::Relaxed);
        if self.shared.no_space_warned.swap(refused, Ordering::Relaxed) != refused {
            tracing::info!(
                target: LOG_TARGET,
                refused_groups = refused,
                "space found again: log appends resumed"
            );
        }
        for entry in accepted {
            self.publish(entry);
        }
        // A buffer grown by a burst of large records is not kept forever.
        if self.buf.capacity() > 2 * MAX_GROUP_BYTES {
            self.buf = Vec::new();
        }
    }

    /// Starts a new segment once the active one has passed `segment_bytes`.
    /// The old one needs no extra sync: every group ended with `sync_data`.
    fn roll_if_full(&mut self) -> Result<(), (String, io::Error)> {
        if self.active_bytes < self.shared.config.segment_bytes {
            return Ok(());
        }
        let number = self.active + 1;
        let info = create_segment(&self.shared.config.dir, number).map_err(|e| match e {
            LogError::Io { context, source } => (context, source),
            LogError::NoSpace { path, detail } => {
                (path, io::Error::new(io::ErrorKind::StorageFull, detail))
            }
            other => (
                format!("creating segment {number}"),
                io::Error::other(other.to_string()),
            ),
        })?;
        self.active_file = Arc::clone(&info.file);
        self.active = number;
        self.active_bytes = 0;
        let mut table = lock(&self.shared.segments);
        table.segments.insert(number, info);
        table.active = number;
        tracing::debug!(target: LOG_TARGET, segment = number, "rolled to a new log segment");
        Ok(())
    }

    /// Assigns offsets and encodes the frames of every request that fits in
    /// the retention limit; the others are answered with `Full` right away.
    fn encode_group(&mut self, group: Vec<AppendRequest>) -> Vec<Accepted> {
        let retained_bytes = self.shared.retained_bytes.load(Ordering::Relaxed);
        let limit_bytes = self.shared.config.max_retained_bytes;
        let mut next_offsets: HashMap<usize, u64> = HashMap::new();
        let mut accepted = Vec::with_capacity(group.len());
        self.buf.clear();
        for request in group {
            let tp = &request.partition.tp;
            let request_bytes: u64 = request
                .records
                .iter()
                .map(|r| max_frame_bytes(r) as u64)
                .sum();
            if request_bytes > MAX_APPEND_BYTES {
                let _ = request.reply.send(Err(LogError::RecordTooLarge {
                    size_bytes: request_bytes as usize,
                    limit_bytes: MAX_APPEND_BYTES as usize,
                }));
                continue;
            }
            let used_bytes = retained_bytes + self.buf.len() as u64;
            if used_bytes + request_bytes > limit_bytes {
                let _ = request.reply.send(Err(LogError::Full {
                    used_bytes,
                    limit_bytes,
                }));
                continue;
            }
            let next = next_offsets
                .entry(request.partition.id)
                .or_insert_with(|| lock(&request.partition.state).high_watermark);
            let first_offset = *next;
            let mut positions = Vec::with_capacity(request.records.len());
            for (index, record) in request.records.iter().enumerate() {
                positions.push(self.active_bytes + self.buf.len() as u64);
                let offset = first_offset + index as u64;
                let partition = &request.partition;
                encode_frame(
                    &mut self.buf,
                    partition.topic_id,
                    tp.partition,
                    offset,
                    record,
                );
            }
            *next += request.records.len() as u64;
            accepted.push(Accepted {
                request,
                first_offset,
                positions,
            });
        }
        accepted
    }

    /// The group commit proper: one write and one `fdatasync`.
    fn write_and_sync(&mut self) -> Result<(), (String, io::Error)> {
        let context = || format!("writing segment {}", self.active);
        self.active_file
            .write_all_at(&self.buf, self.active_bytes)
            .map_err(|e| (context(), e))?;
        self.active_file.sync_data().map_err(|e| (context(), e))?;
        self.shared.sync_count.fetch_add(1, Ordering::Relaxed);
        self.active_bytes += self.buf.len() as u64;
        self.shared
            .retained_bytes
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// For the `log.mid_write` drill: writes the group up to the middle of
    /// its last frame, without syncing, and aborts the process.
    fn write_torn(&self, accepted: &[Accepted]) -> ! {
        let last_start = accepted
            .iter()
            .flat_map(|a| a.positions.last())
            .max()
            .map_or(0, |pos| (pos - self.active_bytes) as usize);
        let cut = last_start + (self.buf.len() - last_start) / 2;
        let _ = self
            .active_file
            .write_all_at(&self.buf[..cut], self.active_bytes);
        failpoint::crash(Point::LogMidWrite)
    }

    /// Updates the active segment's size and per-partition highest offsets.
    fn record_segment_usage(&self, accepted: &[Accepted]) {
        let mut table = lock(&self.shared.segments);
        let Some(info) = table.segments.get_mut(&self.active) else {
            return;
        };
        info.bytes = self.active_bytes;
        for entry in accepted {
            let last_offset = entry.first_offset + entry.positions.len() as u64 - 1;
            let max_offset = info
                .max_offsets
                .entry(entry.request.partition.id)
                .or_insert(last_offset);
            *max_offset = (*max_offset).max(last_offset);
        }
    }

    /// Makes one durable append visible and answers its producer.
    fn publish(&self, entry: Accepted) {
        let Accepted {
            request,
            first_offset,
            positions,
        } = entry;
        let partition = request.partition;
        let count = request.records.len();
        let high_watermark = first_offset + count as u64;
        let cache_records = self.shared.config.tail_cache_records;
        {
            let mut state = lock(&partition.state);
            let segment = self.active;
            state.positions.extend(positions.into_iter().map(|pos| {
                RecordPosition::new(segment, pos)
                    .expect("segment numbers and sizes stay below 4 billion and 4 GiB")
            }));
            // Records that would be evicted at once are not cached at all.
            let skip = count.saturating_sub(cache_records);
            let records = request.records.into_iter().enumerate().skip(skip);
            state
                .tail
                .extend(records.map(|(index, record)| StoredRecord {
                    offset: first_offset + index as u64,
                    record,
                }));
            let excess = state.tail.len().saturating_sub(cache_records);
            state.tail.drain(..excess);
            state.high_watermark = high_watermark;
        }
        partition.hwm.send_replace(high_watermark);
        let _ = request.reply.send(Ok(first_offset));
    }

    /// Undoes a group the device had no space for and refuses it, leaving
    /// the writer usable: the segment is cut back to its last committed
    /// byte and the cut synced, so no part of the group can be read back,
    /// now or after a restart, and the next group is written where this one
    /// started. Every earlier group was synced before this one began, so
    /// what stays in the file is what was acknowledged. If the cut itself
    /// fails, nobody knows what the file holds: the writer stops as for any
    /// other IO error.
    fn undo_for_space(&mut self, requests: Vec<AppendRequest>, context: String, error: io::Error) {
        let cut = self
            .active_file
            .set_len(self.active_bytes)
            .and_then(|()| self.active_file.sync_data());
        match cut {
            Ok(()) => self.refuse_for_space(requests, &context, &error),
            Err(cut_error) => {
                let context =
                    format!("{context}, then cutting the segment back failed ({cut_error})");
                self.fail(requests, context, error);
            }
        }
    }

    /// Answers every request of a group with [`LogError::NoSpace`].
    fn refuse_for_space(&self, requests: Vec<AppendRequest>, context: &str, error: &io::Error) {
        let path = segment_path(&self.shared.config.dir, self.active);
        // Warned once per episode: producers retry, and each warning is itself
        // appended to the error log topic.
        if self.shared.no_space_count.fetch_add(1, Ordering::Relaxed)
            == self.shared.no_space_warned.load(Ordering::Relaxed)
        {
            tracing::warn!(
                target: LOG_TARGET,
                path = %path.display(),
                context,
                error = %error,
                appends = requests.len(),
                "no space left for the log: appends refused, nothing of them kept, until space is freed"
            );
        }
        for request in requests {
            let _ = request.reply.send(Err(LogError::NoSpace {
                path: path.display().to_string(),
                detail: error.to_string(),
            }));
        }
    }

    /// Fails a group after an IO error and stops accepting appends.
    fn fail(&mut self, requests: Vec<AppendRequest>, context: String, error: io::Error) {
        tracing::error!(
            target: LOG_TARGET,
            context = %context,
            error = %error,
            "log writer failed; appends are refused until restart"
        );
        // Best effort: cut partial frames so a restart does not see records
        // whose producers were told they failed.
        let _ = self.active_file.set_len(self.active_bytes);
        for request in requests {
            let source = io::Error::new(error.kind(), error.to_string());
            let _ = request.reply.send(Err(LogError::Io {
                context: context.clone(),
                source,
            }));
        }
        self.failure = Some(format!("{context}: {error}"));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Instant;

    use bytes::Bytes;

    use crate::log::embedded::test_support::{read_all, records, values};
    use crate::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
    use crate::log::{Log, Record, TopicPartition};

    // Concurrent appends get distinct, consecutive offset ranges and share fsyncs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_group_committed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EmbeddedLog::open(EmbeddedLogConfig::with_dir(dir.path())).expect("open");
        log.ensure_topic("t", 8).await.expect("topic");
        let (tasks, appends_per_task, batch) = (32u32, 20u32, 3usize);
        let mut handles = Vec::new();
        for task in 0..tasks {
            let log = Arc::clone(&log);
            handles.push(tokio::spawn(async move {
                let tp = TopicPartition::new("t", task % 8);
                let mut done = Vec::new();
                for append in 0..appends_per_task {
                    let batch = records(&format!("{task}-{append}"), batch);
                    let first = log.append(&tp, batch.clone()).await.expect("append");
                    done.push((tp.clone(), first, batch));
                }
                done
            }));
        }
        let mut by_partition: BTreeMap<TopicPartition, Vec<(u64, Vec<Record>)>> = BTreeMap::new();
        for handle in handles {
            for (tp, first, batch) in handle.await.expect("task") {
                by_partition.entry(tp).or_default().push((first, batch));
            }
        }
        for (tp, mut ranges) in by_partition {
            ranges.sort_by_key(|(first, _)| *first);
            let mut next = 0;
            let mut expected = Vec::new();
            for (first, batch) in ranges {
                assert_eq!(
                    first, next,
                    "ranges of {tp} must tile without gaps or overlaps"
                );
                next += batch.len() as u64;
                expected.extend(batch);
            }
            assert_eq!(log.high_watermark(&tp).await.expect("hwm"), next);
            assert_eq!(values(&read_all(&log, &tp).await), expected);
        }
        let appends = u64::from(tasks * appends_per_task);
        let syncs = log.sync_count();
        println!("{appends} appends took {syncs} fsyncs");
        assert!(syncs * 4 <= appends, "{syncs} fsyncs for {appends} appends");
    }

    // Throughput: 1,000,000 records of 128 bytes from 8 tasks in batches of 500.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark; run with --release -- --ignored --nocapture"]
    async fn bench_append_throughput() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EmbeddedLog::open(EmbeddedLogConfig::with_dir(dir.path())).expect("open");
        log.ensure_topic("bench", 8).await.expect("topic");
        let (tasks, batches_per_task, batch_records) = (8u32, 250usize, 500usize);
        let started = Instant::now();
        let mut handles = Vec::new();
        for task in 0..tasks {
            let log = Arc::clone(&log);
            handles.push(tokio::spawn(async move {
                let tp = TopicPartition::new("bench", task);
                for batch in 0..batches_per_task {
                    let records: Vec<Record> = (0..batch_records)
                        .map(|i| Record {
                            key: Bytes::from(format!("{task:04}-{batch:06}-{i:04}")),
                            value: Bytes::from(vec![(i % 251) as u8; 128 - 16]),
                            timestamp_ms: i as i64,
                        })
                        .collect();
                    log.append(&tp, records).await.expect("append");
                }
            }));
        }
        for handle in handles {
            handle.await.expect("task");
        }
        let elapsed = started.elapsed();
        let total = u64::from(tasks) * (batches_per_task * batch_records) as u64;
        println!(
            "{total} records in {elapsed:?}: {:.0} records/s, {} fsyncs, {} MiB on disk",
            total as f64 / elapsed.as_secs_f64(),
            log.sync_count(),
            log.disk_bytes() >> 20
        );
        let tp = TopicPartition::new("bench", 3);
        let tail = log.read(&tp, 124_999, 10).await.expect("read");
        assert_eq!(tail.len(), 1);
        let started = Instant::now();
        let mut offset = 0;
        while offset < 125_000 {
            offset += log.read(&tp, offset, 1000).await.expect("read").len() as u64;
        }
        println!(
            "read 125000 records of one partition from disk in {:?}",
            started.elapsed()
        );
    }
}
