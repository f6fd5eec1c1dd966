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
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rskafka::chrono::{TimeZone, Utc};
use rskafka::client::error::{Error as KafkaError, ProtocolError};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::BackoffConfig;

use super::{Log, LogError, Record, StoredRecord, TopicPartition};
use crate::config::KafkaConfig;

pub struct KafkaLog {
    client: Client,
    config: KafkaConfig,
    compression: Compression,
    partitions: Mutex<HashMap<TopicPartition, Arc<PartitionClient>>>,
    /// False after a call failed for want of the cluster, true after one succeeded.
    healthy: AtomicBool,
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

    async fn partition(&self, tp: &TopicPartition) -> Result<Arc<PartitionClient>, LogError> {
        if let Some(client) = self.partitions.lock().expect("partitions lock").get(tp) {
            return Ok(client.clone());
        }
        let partition =
            i32::try_from(tp.partition).map_err(|_| LogError::UnknownPartition(tp.clone()))?;
        let client = self
            .call(
                Some(tp),
                "connecting to the partition leader",
                self.client
                    .partition_client(&tp.topic, partition, UnknownTopicHandling::Retry),
            )
            .await?;
        let client = Arc::new(client);
        self.partitions
            .lock()
            .expect("partitions lock")
            .insert(tp.clone(), client.clone());
        Ok(client)
    }

    async fn offset(&self, tp: &TopicPartition, at: OffsetAt) -> Result<u64, LogError> {
        let client = self.partition(tp).await?;
        let offset = self
            .call(Some(tp), "list offsets", client.get_offset(at))
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
    fetch: impl std::future::Future<
        Output = Result<(Vec<rskafka::record::RecordAndOffset>, i64), KafkaError>,
    >,
) -> Result<(Vec<rskafka::record::RecordAndOffset>, i64), KafkaError> {
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
        let client = self.partition(tp).await?;
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
        }
        Ok(first.map_or(0, |o| o.max(0) as u64))
    }

    async fn read(
        &self,
        tp: &TopicPartition,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let client = self.partition(tp).await?;
        let range = 1..self.config.fetch_max_bytes;
        let fetched = self
            .call(
                Some(tp),
                "fetch",
                empty_when_no_topic(client.fetch_records(offset as i64, range, FETCH_WAIT_MS)),
            )
            .await;
        let (records, _high_watermark) = fetched.map_err(|error| match error {
            LogError::OffsetOutOfRange { tp, .. } => LogError::OffsetOutOfRange {
                tp,
                offset,
                log_start: 0,
            },
            other => other,
        })?;
        Ok(records
            .into_iter()
            .filter(|r| r.offset >= offset as i64)
            .take(max_records)
            .map(|r| StoredRecord {
                offset: r.offset as u64,
                record: Record {
                    key: Bytes::from(r.record.key.unwrap_or_default()),
                    value: Bytes::from(r.record.value.unwrap_or_default()),
                    timestamp_ms: r.record.timestamp.timestamp_millis(),
                },
            })
            .collect())
    }

    async fn high_watermark(&self, tp: &TopicPartition) -> Result<u64, LogError> {
        let latest = self.offset(tp, OffsetAt::Latest).await?;
        // Brokers disagree on "latest" (Kafka: the next offset; Tansu: the
        // last one); a fetch there answers with the high-water mark itself.
        let client = self.partition(tp).await?;
        let fetched = self
            .call(
                Some(tp),
                "fetch (high-water mark)",
                empty_when_no_topic(client.fetch_records(latest as i64, 1..2, FETCH_WAIT_MS)),
            )
            .await?;
        Ok((fetched.1.max(0) as u64).max(latest))
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
        let client = self.partition(tp).await?;
        let started = tokio::time::Instant::now();
        // Short fetches that the broker holds until data arrives or the poll
        // interval passes (some brokers hold them the whole time even when
        // data arrives, so one long wait would add it to every hop).
        let poll = Duration::from_millis(self.config.poll_ms);
        loop {
            let wait = poll.min(timeout.saturating_sub(started.elapsed()));
            let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX).max(1);
            let (records, high_watermark) = self
                .call(
                    Some(tp),
                    "fetch (wait)",
                    empty_when_no_topic(client.fetch_records(offset as i64, 1..2, wait_ms)),
                )
                .await?;
            let high_watermark = high_watermark.max(0) as u64;
            if !records.is_empty() || high_watermark > offset || started.elapsed() >= timeout {
                return Ok(high_watermark.max(offset + u64::from(!records.is_empty())));
            }
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
