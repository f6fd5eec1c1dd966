//! The embedded log: every topic-partition in one shared write-ahead file set.
//!
//! # Files
//!
//! The directory holds numbered segment files (`00000000000000000001.wal`,
//! `00000000000000000002.wal`, ...), `topics.json` (topic name to partition
//! count) and, once retention has removed something, `log_starts.json` (topic
//! name to the first retained offset of each partition). All topics and
//! partitions share the segments, like a database write-ahead log, so that a
//! single `fdatasync` makes a whole group of appends durable whatever
//! partitions they went to.
//!
//! A segment is a plain sequence of frames, little endian:
//!
//! ```text
//! [body_len u32][crc32 u32 of the body]
//! body = [topic_len u8][topic][partition u32][offset u64][timestamp_ms i64]
//!        [key_len u32][key][value_len u32][value]
//! ```
//!
//! The length field counts the body only, so a frame takes `8 + body_len` bytes.
//!
//! # Group commit
//!
//! Appends go to one writer thread through a queue bounded by a semaphore (so
//! a full queue suspends the producing task instead of blocking a runtime
//! thread). The thread blocks for the first request, then takes whatever else
//! is queued, assigns offsets per partition, encodes all frames into one
//! buffer, writes it with one positioned write and calls `sync_data` once.
//! Only then does it publish: it extends each partition's index and tail
//! cache, moves the high-water mark and answers every producer. While one
//! fsync runs, new appends queue up and ride along in the next one, so the
//! number of fsyncs grows with time, not with the number of appends.
//!
//! Readers never see a record before it is on disk: the high-water mark only
//! moves after `sync_data` returned.
//!
//! # Recovery
//!
//! On open every segment is scanned in order to rebuild the indexes. A torn
//! tail of the last segment (what a crash during a write leaves) is cut off;
//! anything else that does not decode is reported as [`LogError::Corrupt`],
//! because silently skipping it could drop acknowledged records.
//!
//! # A full disk
//!
//! When the device is full (`ENOSPC`, `EDQUOT`, from the write, the sync or
//! the creation of a segment), the writer cuts the active segment back to
//! its last committed byte, syncs that, and answers the group with
//! [`LogError::NoSpace`]: nothing of it was acknowledged, nothing of it can
//! be read back, and the next group is written where it started. The writer
//! stays usable, so appends succeed again once space is freed. Any other IO
//! error (or a cut that fails) stops the writer until restart.
//!
//! # Retention
//!
//! Consumers call `release_before`; closed segments are deleted from the
//! oldest on, as long as every record they hold is released. Deleting only a
//! prefix keeps each partition's retained offsets contiguous, which both the
//! in-memory index and recovery rely on.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, Semaphore};

use super::{is_out_of_space, Log, LogError, Record, StoredRecord, TopicPartition};
use crate::failpoint::{self, Point};

mod config;
mod frame;
mod index;
mod recovery;
mod retention;
mod segment;

pub use config::{EmbeddedLogConfig, MAX_SEGMENT_BYTES};

use frame::{decode_body, encode_frame, frame_bytes, validate_topic_name, FrameError, FrameReader};
use index::{load_registry, write_atomically, Partition, RecordPosition, Registry, TOPICS_FILE};
use recovery::{finish_partitions, scan_segments};
use segment::{create_segment, segment_path, SegmentTable};

/// Target of the tracing events of this log. Every file of this folder
/// gives its events the target they had while the log was one file, so
/// log filters and the error log see the same names as before.
const LOG_TARGET: &str = module_path!();

/// Soft cap on the bytes of one group commit, so a burst of large records
/// cannot make the writer build a buffer of gigabytes.
const MAX_GROUP_BYTES: usize = 64 << 20;
/// Size of the window read at once when serving reads from disk.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// Largest single append, in frame bytes.
const MAX_APPEND_BYTES: u64 = 1 << 30;

/// State shared by the handle, the writer thread and readers.
#[derive(Debug)]
struct Shared {
    /// The settings the log was opened with.
    config: EmbeddedLogConfig,
    /// Topics and partitions.
    registry: RwLock<Registry>,
    /// Serialises `ensure_topic` so `topics.json` is rewritten by one at a time.
    topics_lock: Mutex<()>,
    /// Live segment files.
    segments: Mutex<SegmentTable>,
    /// Serialises retention passes, which do file IO outside the other locks.
    retention_lock: Mutex<()>,
    /// Sum of the live segment sizes, for `Full` and `disk_bytes`.
    retained_bytes: AtomicU64,
    /// Number of `sync_data` calls on segments, to check group commit works.
    sync_count: AtomicU64,
    /// Number of groups refused because the device was full.
    no_space_count: AtomicU64,
    /// `no_space_count` as of the last group committed: while they are
    /// equal, the next refusal starts an episode and is warned about.
    no_space_warned: AtomicU64,
}

/// One append on its way to the writer thread.
struct AppendRequest {
    /// Partition to append to.
    partition: Arc<Partition>,
    /// Records in order.
    records: Vec<Record>,
    /// Receives the first offset, once the records are durable.
    reply: oneshot::Sender<Result<u64, LogError>>,
}

/// The embedded, durable log; see the module documentation.
#[derive(Debug)]
pub struct EmbeddedLog {
    /// State shared with the writer thread.
    shared: Arc<Shared>,
    /// Channel to the writer; `None` once closed.
    sender: RwLock<Option<mpsc::Sender<AppendRequest>>>,
    /// Bounds the appends in flight (the writer's queue); closed on close.
    queue_slots: Semaphore,
    /// The writer thread, joined on close.
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Locks a mutex; a panic elsewhere does not make the data unusable here,
/// since every critical section leaves its data consistent before any call
/// that could panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read_lock<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write_lock<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// An IO error as a log error: [`LogError::NoSpace`] when the device is
/// full (the caller has undone what the write left), else [`LogError::Io`].
fn io_error(context: impl Into<String>, source: io::Error) -> LogError {
    if is_out_of_space(&source) {
        return LogError::NoSpace {
            path: context.into(),
            detail: source.to_string(),
        };
    }
    LogError::Io {
        context: context.into(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> LogError {
    LogError::Corrupt {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl EmbeddedLog {
    /// Opens (or creates) the log in `config.dir`, recovers it and starts the
    /// writer thread.
    pub fn open(config: EmbeddedLogConfig) -> Result<Arc<EmbeddedLog>, LogError> {
        config.validate()?;
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
        let registry = load_registry(&dir)?;
        let mut table = scan_segments(&config, &registry)?;
        if table.segments.is_empty() {
            let info = create_segment(&dir, 1)?;
            table.segments.insert(1, info);
            table.active = 1;
        }
        finish_partitions(&registry);
        let retained_bytes = table.segments.values().map(|info| info.bytes).sum();
        tracing::info!(
            dir = %dir.display(),
            segments = table.segments.len(),
            partitions = registry.by_id.len(),
            retained_bytes,
            "embedded log opened"
        );
        let shared = Arc::new(Shared {
            registry: RwLock::new(registry),
            topics_lock: Mutex::new(()),
            segments: Mutex::new(table),
            retention_lock: Mutex::new(()),
            retained_bytes: AtomicU64::new(retained_bytes),
            sync_count: AtomicU64::new(0),
            no_space_count: AtomicU64::new(0),
            no_space_warned: AtomicU64::new(0),
            config,
        });
        Self::start(shared)
    }

    /// Spawns the writer thread over recovered state.
    fn start(shared: Arc<Shared>) -> Result<Arc<EmbeddedLog>, LogError> {
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

    /// Stops the writer thread once it has committed everything queued; later
    /// appends return [`LogError::Closed`]. Reads keep working.
    pub fn close(&self) {
        self.queue_slots.close();
        // Dropping the only sender lets the writer drain the queue and stop.
        drop(write_lock(&self.sender).take());
        if let Some(handle) = lock(&self.writer).take() {
            if handle.join().is_err() {
                tracing::error!("the log writer thread panicked");
            }
        }
    }

    /// Number of `fdatasync` calls on segment files since open; with group
    /// commit it stays far below the number of appends.
    pub fn sync_count(&self) -> u64 {
        self.shared.sync_count.load(Ordering::Relaxed)
    }

    /// Number of group commits refused because the device was full.
    pub fn no_space_count(&self) -> u64 {
        self.shared.no_space_count.load(Ordering::Relaxed)
    }

    fn partition(&self, tp: &TopicPartition) -> Result<Arc<Partition>, LogError> {
        read_lock(&self.shared.registry)
            .lookup(&tp.topic, tp.partition)
            .cloned()
            .ok_or_else(|| LogError::UnknownPartition(tp.clone()))
    }

    /// Checks sizes and space before an append is queued.
    fn check_append(&self, tp: &TopicPartition, records: &[Record]) -> Result<(), LogError> {
        let limit_bytes = self.shared.config.max_record_bytes;
        let mut total_bytes: u64 = 0;
        for record in records {
            let size_bytes = record.key.len() + record.value.len();
            if size_bytes > limit_bytes {
                return Err(LogError::RecordTooLarge {
                    size_bytes,
                    limit_bytes,
                });
            }
            total_bytes += frame_bytes(&tp.topic, record) as u64;
        }
        let used_bytes = self.shared.retained_bytes.load(Ordering::Relaxed);
        let limit_bytes = self.shared.config.max_retained_bytes;
        if used_bytes.saturating_add(total_bytes) > limit_bytes {
            return Err(LogError::Full {
                used_bytes,
                limit_bytes,
            });
        }
        Ok(())
    }

    /// Hands an append to the writer and waits for its group commit.
    async fn submit(
        &self,
        partition: Arc<Partition>,
        records: Vec<Record>,
    ) -> Result<u64, LogError> {
        // The permit is held until the writer answered; that bounds the queue.
        let _permit = self
            .queue_slots
            .acquire()
            .await
            .map_err(|_| LogError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            partition,
            records,
            reply,
        };
        {
            let sender = read_lock(&self.sender);
            let sender = sender.as_ref().ok_or(LogError::Closed)?;
            sender.send(request).map_err(|_| LogError::Closed)?;
        }
        answer.await.map_err(|_| LogError::Closed)?
    }

    /// Serves a read from the index, the tail cache and the segment files.
    fn read_records(
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
                    &partition.tp,
                    expected,
                )?);
            }
            next += run;
        }
        Ok(records)
    }

    fn segment_handle(&self, number: u64) -> Option<(PathBuf, Arc<File>, u64)> {
        let table = lock(&self.shared.segments);
        let info = table.segments.get(&number)?;
        Some((info.path.clone(), Arc::clone(&info.file), info.bytes))
    }

    /// Registers a topic, persisting the topic list first.
    fn ensure_topic_sync(&self, topic: &str, partitions: u32) -> Result<(), LogError> {
        validate_topic_name(topic)?;
        if partitions == 0 {
            return Err(LogError::Backend(format!(
                "topic {topic} needs at least one partition"
            )));
        }
        let _guard = lock(&self.shared.topics_lock);
        let mut counts = {
            let registry = read_lock(&self.shared.registry);
            if let Some(entry) = registry.topics.get(topic) {
                return check_partition_count(topic, entry.partitions, partitions);
            }
            registry.topic_counts()
        };
        counts.insert(topic.to_owned(), partitions);
        let json = serde_json::to_vec_pretty(&counts)
            .map_err(|e| LogError::Backend(format!("encoding {TOPICS_FILE}: {e}")))?;
        write_atomically(&self.shared.config.dir, TOPICS_FILE, &json)?;
        write_lock(&self.shared.registry).add_topic(topic, partitions, None);
        tracing::info!(topic, partitions, "topic created");
        Ok(())
    }

    /// Records a release and deletes what it made deletable.
    fn release_sync(&self, tp: &TopicPartition, offset: u64) -> Result<(), LogError> {
        let partition = self.partition(tp)?;
        {
            let mut state = lock(&partition.state);
            // Releasing past the high-water mark would release records not
            // written yet, so it is capped; a smaller value than before is a no-op.
            let target = offset.min(state.high_watermark);
            if target <= state.released {
                return Ok(());
            }
            state.released = target;
        }
        self.shared.collect_garbage()
    }
}

fn check_partition_count(topic: &str, existing: u32, wanted: u32) -> Result<(), LogError> {
    if existing == wanted {
        return Ok(());
    }
    Err(LogError::Backend(format!(
        "topic {topic} has {existing} partitions, config asks for {wanted}; \
         partition counts cannot change, because keys would move to other partitions"
    )))
}

/// Reads and checks the frame of one expected record.
fn read_one(
    reader: &mut FrameReader<'_>,
    path: &Path,
    pos: u64,
    tp: &TopicPartition,
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
    if frame.topic != tp.topic || frame.partition != tp.partition || frame.offset != expected_offset
    {
        return Err(corrupt(
            path,
            format!(
                "frame at byte {pos} holds {}/{} offset {}, the index expected {tp} offset \
                 {expected_offset}",
                frame.topic, frame.partition, frame.offset
            ),
        ));
    }
    Ok(frame.to_stored())
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
        tracing::debug!("log writer stopped");
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
        tracing::debug!(segment = number, "rolled to a new log segment");
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
                .map(|r| frame_bytes(&tp.topic, r) as u64)
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
                encode_frame(&mut self.buf, tp, first_offset + index as u64, record);
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

impl Drop for EmbeddedLog {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait]
impl Log for EmbeddedLog {
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError> {
        self.ensure_topic_sync(topic, partitions)
    }

    async fn append(&self, tp: &TopicPartition, records: Vec<Record>) -> Result<u64, LogError> {
        let partition = self.partition(tp)?;
        if records.is_empty() {
            let high_watermark = lock(&partition.state).high_watermark;
            return Ok(high_watermark);
        }
        self.check_append(tp, &records)?;
        self.submit(partition, records).await
    }

    async fn read(
        &self,
        tp: &TopicPartition,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        self.read_records(tp, offset, max_records)
    }

    async fn high_watermark(&self, tp: &TopicPartition) -> Result<u64, LogError> {
        let partition = self.partition(tp)?;
        let high_watermark = lock(&partition.state).high_watermark;
        Ok(high_watermark)
    }

    async fn log_start(&self, tp: &TopicPartition) -> Result<u64, LogError> {
        let partition = self.partition(tp)?;
        let log_start = lock(&partition.state).log_start;
        Ok(log_start)
    }

    async fn wait_for(
        &self,
        tp: &TopicPartition,
        offset: u64,
        timeout: Duration,
    ) -> Result<u64, LogError> {
        let partition = self.partition(tp)?;
        let mut receiver = partition.hwm.subscribe();
        // The watch holds the latest high-water mark, so a mark published
        // between subscribing and waiting is not missed.
        let _ = tokio::time::timeout(timeout, receiver.wait_for(|hwm| *hwm > offset)).await;
        let high_watermark = *partition.hwm.borrow();
        Ok(high_watermark)
    }

    async fn release_before(&self, tp: &TopicPartition, offset: u64) -> Result<(), LogError> {
        self.release_sync(tp, offset)
    }

    fn disk_bytes(&self) -> u64 {
        self.shared.retained_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
