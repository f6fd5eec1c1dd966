//! A dead letter: a record a processor could not act on at all, as the
//! runtime records it (in the same checkpoint as the offset that skips it,
//! and on the DLQ topic). The operational plane (`ops::dlq`) lists, replays
//! and deletes them.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::log::{Record, StoredRecord, TopicPartition};
use crate::model::now_ms;

/// Store table of dead letters waiting for an operator.
pub const TABLE: &str = "d";

/// A replay of a dead letter: reserved (durably) before the append, settled
/// with the offset it landed at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Replay {
    /// The replay's sequence number, its source offset downstream.
    pub seq: u64,
    /// Where it was appended.
    pub topic: String,
    pub partition: u32,
    /// The partition's end when the replay was reserved; it lands at or after.
    pub from_offset: u64,
    /// Offset it landed at; `None` while a crash leaves it in doubt.
    pub offset: Option<u64>,
    /// When it was replayed, ms since the epoch.
    pub at_ms: i64,
    /// Who replayed it.
    pub principal: String,
    /// Whether the operator sent a corrected value.
    pub corrected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DeadLetter {
    /// `<topic>:<partition>:<offset>:<processor>`; unique and stable (two
    /// processors read `payment.complete`, each may give up on a record).
    #[schema(example = "payment.incoming:3:1017:inflight")]
    pub id: String,
    /// Error class: `decode`, `unexpected_event`, `impossible_state`, `overflow`, `expired`.
    #[schema(example = "decode")]
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
    /// When it was dead-lettered, ms since the epoch.
    pub at_ms: i64,
    /// The record's value as it was, hex-encoded.
    pub value_hex: String,
    /// Set once an operator replayed it.
    pub replay: Option<Replay>,
    /// Whether it has been appended to the DLQ topic (not persisted).
    #[serde(skip)]
    #[schema(ignore)]
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
            value_hex: hex(&stored.record.value),
            replay: None,
            published: false,
        }
    }

    /// Store key (in the waiting table); ordered by topic, partition and
    /// (zero-padded) offset.
    pub fn store_key(&self) -> String {
        format!("{TABLE}/{}", self.suffix())
    }

    fn suffix(&self) -> String {
        suffix(
            &self.source_topic,
            self.source_partition,
            self.source_offset,
            &self.processor,
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

pub(crate) fn suffix(topic: &str, partition: u32, offset: u64, processor: &str) -> String {
    format!("{topic}:{partition:05}:{offset:020}:{processor}")
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
