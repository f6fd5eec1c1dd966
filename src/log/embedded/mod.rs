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
//! body = [format u8 = 0][topic id u32][partition varint][offset varint]
//!        [timestamp_ms zigzag varint][key_len varint][key][value]
//! ```
//!
//! The length field counts the body only, so a frame takes `8 + body_len` bytes;
//! the value runs to the end of the body. The topic id is the FNV-1a hash of
//! the topic's name (a topic whose id another topic has is refused), and
//! varints are 7 bits a byte, low first. A frame of the first format began
//! with the length of the topic's name instead, never 0, so a log written
//! by an earlier build is refused at open with the reason.
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
//!
//! # Where the code is
//!
//! This file holds the handle, [`EmbeddedLog`], and its [`Log`]
//! implementation. `config` has the settings, `frame` the format above,
//! `index` the partitions and the two JSON files, `segment` the segment
//! files, `recovery` the scan on open, `read` the read path, `writer` group
//! commit and the full disk, and `retention` the deletion of released
//! segments. Each file's tests sit beside its code; `tests` tests the log as
//! a whole.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, Semaphore};

use super::{is_out_of_space, Log, LogError, Record, StoredRecord, TopicPartition};

mod config;
mod frame;
mod index;
mod read;
mod recovery;
mod retention;
mod segment;
mod writer;

pub use config::{EmbeddedLogConfig, MAX_SEGMENT_BYTES};

use frame::{max_frame_bytes, validate_topic_name};
use index::{load_registry, write_atomically, Partition, Registry, TOPICS_FILE};
use recovery::{finish_partitions, scan_segments};
use segment::{create_segment, SegmentTable};
use writer::AppendRequest;

/// Target of the tracing events of this log. Log filters select events by
/// target and the error log records it, so every file of this folder gives
/// its events this module's target, the one they had while the log was a
/// single file.
const LOG_TARGET: &str = module_path!();

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
    fn check_append(&self, records: &[Record]) -> Result<(), LogError> {
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
            total_bytes += max_frame_bytes(record) as u64;
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
            registry.check_id(topic)?;
            registry.topic_counts()
        };
        counts.insert(topic.to_owned(), partitions);
        let json = serde_json::to_vec_pretty(&counts)
            .map_err(|e| LogError::Backend(format!("encoding {TOPICS_FILE}: {e}")))?;
        write_atomically(&self.shared.config.dir, TOPICS_FILE, &json)?;
        write_lock(&self.shared.registry).add_topic(topic, partitions, None)?;
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
        self.check_append(&records)?;
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
