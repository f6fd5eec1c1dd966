//! The log: partitioned, ordered, durable topics.
//!
//! A [`Log`] is what Kafka is to Kafka Streams: topic-partitions addressed by
//! explicit offsets, with no consumer groups (offsets are kept by each task next
//! to its state, see `store`). Two backends implement it: [`embedded::EmbeddedLog`]
//! (the default, one write-ahead file set under the data directory) and Kafka.

pub mod embedded;
pub mod kafka;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// One topic-partition, the unit of ordering and of parallelism.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name, e.g. `payment.incoming`.
    pub topic: String,
    /// Partition index, `0..partitions`.
    pub partition: u32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: u32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// A record as a producer hands it to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Partitioning key (payment id or account id); kept for consumers and tools.
    pub key: Bytes,
    /// Encoded event (see `model::codec`).
    pub value: Bytes,
    /// Producer's wall-clock time in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
}

/// A record as a consumer reads it back, with the offset the log gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Position in its topic-partition; dense and strictly increasing.
    pub offset: u64,
    /// The record as appended.
    pub record: Record,
}

/// Errors of the log layer; each carries the topic-partition it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    #[error("unknown topic-partition {0}")]
    UnknownPartition(TopicPartition),
    #[error("offset {offset} of {tp} is below the log start {log_start} (removed by retention)")]
    OffsetOutOfRange {
        tp: TopicPartition,
        offset: u64,
        log_start: u64,
    },
    #[error("log is full: {used_bytes} bytes retained, limit {limit_bytes}")]
    Full { used_bytes: u64, limit_bytes: u64 },
    #[error("record of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    RecordTooLarge {
        size_bytes: usize,
        limit_bytes: usize,
    },
    #[error("log is closed")]
    Closed,
    #[error(
        "corrupt log at {path}: {reason}. kpay does not drop acknowledged records by itself: \
         restore the data directory from a backup, or, accepting the loss of the records \
         from that point on, truncate the file there"
    )]
    Corrupt { path: String, reason: String },
    #[error("log io error at {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("log backend error: {0}")]
    Backend(String),
    /// The cluster cannot be reached or answered with a retriable error;
    /// the same call may succeed later.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// The device holding the log is full. The failed write was cut back, so
    /// nothing of it is acknowledged or read back; the same call succeeds
    /// once space is freed.
    #[error(
        "no space left on the device holding the log at {path} ({detail}); nothing of this \
         append was kept; free space on that device and retry"
    )]
    NoSpace { path: String, detail: String },
}

impl LogError {
    /// Whether retrying the same call later may succeed (the broker is
    /// away, or the disk is full).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::NoSpace { .. })
    }

    /// Whether the device holding the log is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::NoSpace { .. })
    }
}

/// Whether an IO error says the device (or the user's quota) is full.
pub fn is_out_of_space(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::StorageFull
        || error.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// A partitioned, durable, ordered log of records.
///
/// Shaped after what rskafka offers (one client per partition, explicit
/// offsets, no groups) so that Kafka and the embedded log are interchangeable.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Creates the topic with `partitions` partitions if it does not exist yet.
    /// Fails if it exists with a different partition count.
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError>;

    /// Appends `records` in order to one partition and returns the offset of the
    /// first; it returns only once every record is durable (group-committed).
    async fn append(&self, tp: &TopicPartition, records: Vec<Record>) -> Result<u64, LogError>;

    /// Reads up to `max_records` durable records starting at `offset`.
    /// Returns an empty vector at the high-water mark.
    async fn read(
        &self,
        tp: &TopicPartition,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError>;

    /// The offset the next durable record will get (Kafka's high-water mark).
    async fn high_watermark(&self, tp: &TopicPartition) -> Result<u64, LogError>;

    /// The first offset still retained.
    async fn log_start(&self, tp: &TopicPartition) -> Result<u64, LogError>;

    /// Waits until the high-water mark is above `offset` or `timeout` passes;
    /// returns the high-water mark seen.
    async fn wait_for(
        &self,
        tp: &TopicPartition,
        offset: u64,
        timeout: Duration,
    ) -> Result<u64, LogError>;

    /// Tells the log every consumer is done with records below `offset`, so it
    /// may drop them (retention). Backends may keep more than asked.
    async fn release_before(&self, tp: &TopicPartition, offset: u64) -> Result<(), LogError>;

    /// Bytes the log keeps on disk (for metrics and the benchmark).
    fn disk_bytes(&self) -> u64;

    /// Whether the last call to the backend succeeded (readiness).
    fn healthy(&self) -> bool {
        true
    }
}

/// How long [`read_range`] waits for records the high-water mark promised
/// before it gives up with [`LogError::Unavailable`].
const RANGE_WAIT: Duration = Duration::from_secs(5);

/// Every record of `tp` in `[from, end)`, where `end` is at most a high-water
/// mark seen. A read that comes back empty before `end` (a backend may
/// answer from what it last saw) waits for the records and reads again.
pub async fn read_range(
    log: &dyn Log,
    tp: &TopicPartition,
    from: u64,
    end: u64,
) -> Result<Vec<StoredRecord>, LogError> {
    let mut records = Vec::new();
    read_range_with(log, tp, from, end, |read| {
        records.extend(read);
        true
    })
    .await?;
    Ok(records)
}

/// Like [`read_range`], handing the records to `each` as they are read
/// (in order, at most 4,096 at a time) until it answers `false`.
pub async fn read_range_with(
    log: &dyn Log,
    tp: &TopicPartition,
    from: u64,
    end: u64,
    mut each: impl FnMut(Vec<StoredRecord>) -> bool,
) -> Result<(), LogError> {
    let mut at = from;
    let started = tokio::time::Instant::now();
    while at < end {
        let mut read = log.read(tp, at, (end - at).min(4_096) as usize).await?;
        let Some(last) = read.last() else {
            if started.elapsed() >= RANGE_WAIT {
                return Err(LogError::Unavailable(format!(
                    "{tp} reads nothing at {at} though its high-water mark was {end}"
                )));
            }
            log.wait_for(tp, at, Duration::from_millis(50)).await?;
            continue;
        };
        at = last.offset + 1;
        read.retain(|r| r.offset < end);
        if !each(read) {
            break;
        }
    }
    Ok(())
}
