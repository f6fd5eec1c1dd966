//! The log on a Kafka-protocol cluster, through rskafka: one client per
//! partition, explicit offsets (kept by kpay in the state store next to the
//! state, since rskafka has no consumer groups), produce with `acks=all`.
//!
//! Every call has a deadline (`log.kafka.request_timeout_ms`) and rskafka's
//! own retries are bounded by it, so a broker that goes away turns into
//! [`LogError::Unavailable`] within that time: the runtime retries those
//! (tasks) or answers 503 (intake), and readiness reports the outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use async_trait::async_trait;
use bytes::Bytes;
use rskafka::chrono::{TimeZone, Utc};
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::RecordAndOffset;
use rskafka::BackoffConfig;

use super::{Log, LogError, Record, StoredRecord, TopicPartition};
use crate::config::KafkaConfig;
use crate::failpoint::{self, Point};

pub struct KafkaLog {
    client: Client,
    config: KafkaConfig,
    compression: Compression,
    partitions: Mutex<HashMap<TopicPartition, Arc<Partition>>>,
    /// False after a call failed for want of the cluster, true after one succeeded.
    healthy: AtomicBool,
}

/// One partition: its client, and what this process knows of its end.
struct Partition {
    client: PartitionClient,
    /// The high-water mark as last seen: raised by our own appends at once
    /// (so a consumer in this process need not ask the broker) and by fetches.
    high_watermark: watch::Sender<u64>,
    /// When the broker last told us the high-water mark; records written by
    /// other producers show up within `poll_ms` of it.
    checked: Mutex<Instant>,
    /// Records fetched but not read yet, in offset order: one fetch returns
    /// up to `fetch_max_bytes`, more than one read takes.
    ahead: Mutex<std::collections::VecDeque<StoredRecord>>,
}

impl Partition {
    fn saw(&self, high_watermark: u64) {
        self.high_watermark.send_if_modified(|known| {
            let raised = high_watermark > *known;
            if raised {
                *known = high_watermark;
            }
            raised
        });
    }

    fn checked_now(&self) {
        *self.checked.lock().expect("checked lock") = Instant::now();
    }

    fn checked_within(&self, poll: Duration) -> bool {
        self.checked.lock().expect("checked lock").elapsed() < poll
    }
}

fn backoff(deadline: Duration) -> BackoffConfig {
    BackoffConfig {
        init_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
        base: 2.0,
        deadline: Some(deadline),
    }
}

/// A Kafka error as a log error: a missing offset is out of range; the rest
/// is the cluster being unavailable (rskafka already retried within the deadline).
fn log_error(tp: Option<&TopicPartition>, error: KafkaError) -> LogError {
    if let (
        Some(tp),
        KafkaError::ServerError {
            protocol_error: ProtocolError::OffsetOutOfRange,
            ..
        },
    ) = (tp, &error)
    {
        return LogError::OffsetOutOfRange {
            tp: tp.clone(),
            offset: 0,
            log_start: 0,
        };
    }
    let place = tp.map_or_else(String::new, |tp| format!("{tp}: "));
    LogError::Unavailable(format!("{place}{error}"))
}

impl KafkaLog {
    /// Connects to the cluster; fails within the request deadline with a
    /// message naming the brokers when none answers.
    pub async fn connect(config: &KafkaConfig) -> Result<Arc<Self>, LogError> {
        let deadline = Duration::from_millis(config.request_timeout_ms);
        let brokers = config.brokers.join(",");
        let build = ClientBuilder::new(config.brokers.clone())
            .client_id("kpay")
            .backoff_config(backoff(deadline))
            .build();
        let client = match tokio::time::timeout(deadline, build).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                return Err(LogError::Unavailable(format!(
                    "cannot reach Kafka at {brokers}: {error}"
                )))
            }
            Err(_) => {
                return Err(LogError::Unavailable(format!(
                    "cannot reach Kafka at {brokers} within {deadline:?}"
                )))
            }
        };
        let compression = match config.compression.as_str() {
            "gzip" => Compression::Gzip,
            "lz4" => Compression::Lz4,
            "snappy" => Compression::Snappy,
            _ => Compression::NoCompression,
        };
        Ok(Arc::new(Self {
            client,
            config: config.clone(),
            compression,
            partitions: Mutex::new(HashMap::new()),
            healthy: AtomicBool::new(true),
        }))
    }

    fn deadline(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// Runs one call with the deadline, recording whether the cluster answered.
    async fn call<T>(
        &self,
        tp: Option<&TopicPartition>,
        what: &str,
        call: impl std::future::Future<Output = Result<T, KafkaError>>,
    ) -> Result<T, LogError> {
        let result = match tokio::time::timeout(self.deadline(), call).await {
            Ok(result) => result.map_err(|error| log_error(tp, error)),
            Err(_) => Err(LogError::Unavailable(format!(
                "{}{what} took longer than {:?}",
                tp.map_or_else(String::new, |tp| format!("{tp}: ")),
                self.deadline()
            ))),
        };
        match &result {
            Ok(_) => self.healthy.store(true, Ordering::Relaxed),
            Err(error) if error.is_transient() => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(%error, "Kafka unavailable");
                }
            }
            Err(_) => {}
        }
        result
    }

    async fn partition(&self, tp: &TopicPartition) -> Result<Arc<Partition>, LogError> {
        if let Some(partition) = self.partitions.lock().expect("partitions lock").get(tp) {
            return Ok(partition.clone());
        }
        let index =
            i32::try_from(tp.partition).map_err(|_| LogError::UnknownPartition(tp.clone()))?;
        let client = self
            .call(
                Some(tp),
                "connecting to the partition leader",
                self.client
                    .partition_client(&tp.topic, index, UnknownTopicHandling::Retry),
            )
            .await?;
        let partition = Arc::new(Partition {
            client,
            high_watermark: watch::Sender::new(0),
            checked: Mutex::new(Instant::now() - Duration::from_secs(3600)),
            ahead: Mutex::new(std::collections::VecDeque::new()),
        });
        let mut partitions = self.partitions.lock().expect("partitions lock");
        Ok(partitions.entry(tp.clone()).or_insert(partition).clone())
    }

    fn poll(&self) -> Duration {
        Duration::from_millis(self.config.poll_ms)
    }

    /// One fetch that answers at once, remembering what it says of the
    /// partition's end: the records from `offset` (up to `max_bytes`) and the
    /// high-water mark.
    async fn fetch(
        &self,
        tp: &TopicPartition,
        partition: &Partition,
        what: &str,
        offset: u64,
        max_bytes: i32,
    ) -> Result<(Vec<RecordAndOffset>, u64), LogError> {
        let (records, high_watermark) = self
            .call(
                Some(tp),
                what,
                empty_when_no_topic(partition.client.fetch_records(
                    offset as i64,
                    1..max_bytes,
                    FETCH_WAIT_MS,
                )),
            )
            .await?;
        partition.checked_now();
        let high_watermark = high_watermark.max(0) as u64;
        partition.saw(high_watermark);
        if let Some(last) = records.last() {
            partition.saw(last.offset.max(0) as u64 + 1);
        }
        Ok((records, high_watermark))
    }

    async fn offset(&self, tp: &TopicPartition, at: OffsetAt) -> Result<u64, LogError> {
        let partition = self.partition(tp).await?;
        let offset = self
            .call(Some(tp), "list offsets", partition.client.get_offset(at))
            .await?;
        Ok(offset.max(0) as u64)
    }
}

/// Longest wait of a fetch that should answer at once (some brokers answer
/// nothing at all to a fetch that may not wait).
const FETCH_WAIT_MS: i32 = 1;

/// Some brokers (Tansu) answer a fetch that finds nothing with no topic at
/// all, which rskafka reports as an invalid response: that is an empty fetch.
async fn empty_when_no_topic(
    fetch: impl std::future::Future<Output = Result<(Vec<RecordAndOffset>, i64), KafkaError>>,
) -> Result<(Vec<RecordAndOffset>, i64), KafkaError> {
    match fetch.await {
        Err(KafkaError::InvalidResponse(message))
            if message.contains("Expected a single topic in response, got 0") =>
        {
            Ok((Vec::new(), 0))
        }
        other => other,
    }
}

#[async_trait]
impl Log for KafkaLog {
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError> {
        let topics = self
            .call(None, "list topics", self.client.list_topics())
            .await?;
        if let Some(existing) = topics.iter().find(|t| t.name == topic) {
            let count = existing.partitions.len() as u32;
            if count != partitions {
                return Err(LogError::Backend(format!(
                    "Kafka topic {topic} has {count} partitions, config asks for {partitions}; \
                     partition counts cannot change, because keys would move to other partitions"
                )));
            }
            return Ok(());
        }
        let controller = self
            .client
            .controller_client()
            .map_err(|e| log_error(None, e))?;
        let timeout_ms = i32::try_from(self.config.request_timeout_ms).unwrap_or(i32::MAX);
        let created = self
            .call(
                None,
                "create topic",
                controller.create_topic(
                    topic,
                    partitions as i32,
                    self.config.replication_factor,
                    timeout_ms,
                ),
            )
            .await;
        match created {
            Ok(()) => {
                tracing::info!(topic, partitions, "Kafka topic created");
                Ok(())
            }
            // Created meanwhile by another instance: check it like an existing one.
            Err(LogError::Unavailable(message)) if message.contains("TopicAlreadyExists") => {
                Box::pin(self.ensure_topic(topic, partitions)).await
            }
            Err(error) => Err(error),
        }
    }

    async fn append(&self, tp: &TopicPartition, records: Vec<Record>) -> Result<u64, LogError> {
        let partition = self.partition(tp).await?;
        let client = &partition.client;
        let mut first = None;
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let chunk: Vec<rskafka::record::Record> = records
                .by_ref()
                .take(self.config.max_batch_records)
                .map(|r| rskafka::record::Record {
                    key: Some(r.key.to_vec()),
                    value: Some(r.value.to_vec()),
                    headers: Default::default(),
                    timestamp: Utc
                        .timestamp_millis_opt(r.timestamp_ms)
                        .single()
                        .unwrap_or_default(),
                })
                .collect();
            let offsets = self
                .call(Some(tp), "produce", client.produce(chunk, self.compression))
                .await?;
            if first.is_none() {
                first = offsets.first().copied();
            }
            if let Some(&last) = offsets.last().filter(|last| **last >= 0) {
                partition.saw(last as u64 + 1);
            }
            if records.peek().is_some() {
                // Part of this append acknowledged, the rest not sent.
                failpoint::pass(Point::KafkaMidAppend);
            }
        }
        Ok(first.map_or(0, |o| o.max(0) as u64))
    }

    async fn read(
        &self,
        tp: &TopicPartition,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let partition = self.partition(tp).await?;
        {
            let mut ahead = partition.ahead.lock().expect("ahead lock");
            while ahead.front().is_some_and(|r| r.offset < offset) {
                ahead.pop_front();
            }
            if ahead.front().is_some_and(|r| r.offset == offset) {
                let take = max_records.min(ahead.len());
                return Ok(ahead.drain(..take).collect());
            }
            ahead.clear();
        }
        if *partition.high_watermark.borrow() <= offset && partition.checked_within(self.poll()) {
            // Nothing new from us, and the broker was asked a moment ago.
            return Ok(Vec::new());
        }
        let fetched = self
            .fetch(tp, &partition, "fetch", offset, self.config.fetch_max_bytes)
            .await;
        let (records, _) = fetched.map_err(|error| match error {
            LogError::OffsetOutOfRange { tp, .. } => LogError::OffsetOutOfRange {
                tp,
                offset,
                log_start: 0,
            },
            other => other,
        })?;
        let mut records: std::collections::VecDeque<StoredRecord> = records
            .into_iter()
            .filter(|r| r.offset >= offset as i64)
            .map(|r| StoredRecord {
                offset: r.offset as u64,
                record: Record {
                    key: Bytes::from(r.record.key.unwrap_or_default()),
                    value: Bytes::from(r.record.value.unwrap_or_default()),
                    timestamp_ms: r.record.timestamp.timestamp_millis(),
                },
            })
            .collect();
        let read = records.drain(..max_records.min(records.len())).collect();
        *partition.ahead.lock().expect("ahead lock") = records;
        Ok(read)
    }

    async fn high_watermark(&self, tp: &TopicPartition) -> Result<u64, LogError> {
        let latest = self.offset(tp, OffsetAt::Latest).await?;
        // Brokers disagree on "latest" (Kafka: the next offset; Tansu: the
        // last one); a fetch there answers with the high-water mark itself.
        let partition = self.partition(tp).await?;
        let (_, high_watermark) = self
            .fetch(tp, &partition, "fetch (high-water mark)", latest, 2)
            .await?;
        partition.saw(latest);
        Ok(high_watermark.max(latest))
    }

    async fn log_start(&self, tp: &TopicPartition) -> Result<u64, LogError> {
        self.offset(tp, OffsetAt::Earliest).await
    }

    async fn wait_for(
        &self,
        tp: &TopicPartition,
        offset: u64,
        timeout: Duration,
    ) -> Result<u64, LogError> {
        let partition = self.partition(tp).await?;
        let mut known = partition.high_watermark.subscribe();
        let started = tokio::time::Instant::now();
        loop {
            let seen = *known.borrow_and_update();
            if seen > offset || started.elapsed() >= timeout {
                return Ok(seen);
            }
            // Our own appends wake us at once; other producers' records are
            // found by asking the broker every `poll_ms` (a short fetch it
            // holds until data arrives, or the poll interval).
            let until = timeout.saturating_sub(started.elapsed());
            let poll = self.poll().min(until);
            tokio::select! {
                _ = known.changed() => continue,
                () = tokio::time::sleep(poll) => {}
            }
            if partition.checked_within(self.poll()) {
                continue;
            }
            self.fetch(tp, &partition, "fetch (wait)", offset, 2)
                .await?;
        }
    }

    async fn release_before(&self, _tp: &TopicPartition, _offset: u64) -> Result<(), LogError> {
        // Retention on Kafka is the cluster's (`retention.ms`/`retention.bytes`).
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        0
    }

    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}
