//! Dead letters: records a processor could not act on at all. Each is kept in
//! the store (in the same atomic checkpoint as the offset that skips it, so it
//! is recorded exactly once) and published to the DLQ topic for other tools.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::log::{Record, StoredRecord, TopicPartition};
use crate::model::now_ms;

/// Store table prefix of dead letters.
pub const TABLE: &str = "d";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// `<topic>:<partition>:<offset>:<processor>`; unique and stable (two
    /// processors read `payment.complete`, each may give up on a record).
    pub id: String,
    /// Error class: `decode`, `unexpected_event`, `impossible_state`, `overflow`.
    pub class: String,
    /// What exactly was wrong.
    pub reason: String,
    /// The processor that gave up on it.
    pub processor: String,
    /// Where the record sits, so it can be found and replayed.
    pub source_topic: String,
    pub source_partition: u32,
    pub source_offset: u64,
    /// The record's key, lossily decoded as UTF-8.
    pub key: String,
    /// When it was dead-lettered.
    pub at_ms: i64,
    /// The record's value as it was, hex-encoded.
    pub value_hex: String,
    /// Whether it has been appended to the DLQ topic (not persisted).
    #[serde(skip)]
    pub published: bool,
}

impl DeadLetter {
    pub fn new(
        processor: &str,
        tp: &TopicPartition,
        stored: &StoredRecord,
        class: &str,
        reason: String,
    ) -> Self {
        Self {
            id: format!(
                "{}:{}:{}:{processor}",
                tp.topic, tp.partition, stored.offset
            ),
            class: class.to_owned(),
            reason,
            processor: processor.to_owned(),
            source_topic: tp.topic.clone(),
            source_partition: tp.partition,
            source_offset: stored.offset,
            key: String::from_utf8_lossy(&stored.record.key).into_owned(),
            at_ms: now_ms(),
            value_hex: stored
                .record
                .value
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            published: false,
        }
    }

    /// Store key; ordered by topic, partition and (zero-padded) offset.
    pub fn store_key(&self) -> String {
        format!(
            "{TABLE}/{}:{:05}:{:020}:{}",
            self.source_topic, self.source_partition, self.source_offset, self.processor
        )
    }

    pub fn to_record(&self, timestamp_ms: i64) -> Record {
        Record {
            key: Bytes::from(self.id.clone().into_bytes()),
            value: Bytes::from(serde_json::to_vec(self).expect("plain struct serializes")),
            timestamp_ms,
        }
    }
}
