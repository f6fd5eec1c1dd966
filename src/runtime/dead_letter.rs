//! A dead letter: a record a processor could not act on at all, as the
//! runtime records it (in the same checkpoint as the offset that skips it,
//! and on the DLQ topic). The operational plane (`ops::dlq`) lists, replays
//! and deletes them.
//!
//! A dead letter is bounded whatever arrived: it keeps at most
//! `limits.dead_letter_value_bytes` of the value (with the whole value's
//! length and SHA-256), [`KEY_BYTES`] of the key and [`REASON_BYTES`] of the
//! reason. A record of any size then makes a letter that fits the DLQ
//! topic's record limit and the store, so no input can stop a task.

use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeTuple, Serializer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::log::{Record, StoredRecord, TopicPartition};
use crate::model::now_ms;

/// Store table of dead letters waiting for an operator.
pub const TABLE: &str = "d";

/// Most bytes of a record's key a dead letter keeps.
pub const KEY_BYTES: usize = 256;

/// Most bytes of the reason a dead letter keeps.
pub const REASON_BYTES: usize = 1_024;

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

/// Every error class a dead letter may have: a record that did not decode,
/// one whose cluster HMAC was missing or wrong, and the processors' errors
/// (`runtime::task::error_class`).
pub const CLASSES: &[&str] = &[
    "decode",
    "unauthenticated",
    "unexpected_event",
    "impossible_state",
    "overflow",
    "expired",
];

/// The processors whose tasks dead-letter records.
pub const PROCESSORS: &[&str] = &["inflight", "account", "confirmed", "control"];

// `remote = "Self"`: the derive writes inherent functions, and the trait
// impls below choose between them and the store's layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(remote = "Self")]
pub struct DeadLetter {
    /// `<topic>:<partition>:<offset>:<processor>`; unique and stable (two
    /// processors read `payment.complete`, each may give up on a record).
    #[schema(example = "payment.incoming:3:1017:inflight")]
    pub id: String,
    /// Error class: `decode`, `unauthenticated`, `unexpected_event`,
    /// `impossible_state`, `overflow`, `expired`.
    #[schema(example = "decode")]
    pub class: String,
    /// What exactly was wrong (at most 1,024 bytes of it).
    pub reason: String,
    /// The processor that gave up on it.
    pub processor: String,
    /// Where the record sits, so it can be found and replayed.
    pub source_topic: String,
    pub source_partition: u32,
    pub source_offset: u64,
    /// The record's key, lossily decoded as UTF-8 (at most its first 256 bytes).
    pub key: String,
    /// When it was dead-lettered, ms since the epoch.
    pub at_ms: i64,
    /// The record's value hex-encoded: all of it, or only its first
    /// `limits.dead_letter_value_bytes` bytes when `truncated`.
    pub value_hex: String,
    /// Length of the whole value in bytes.
    #[schema(example = 900000)]
    pub value_bytes: u64,
    /// SHA-256 of the whole value, hex-encoded.
    pub value_sha256: String,
    /// True when `value_hex` holds only a prefix of the value: a replay
    /// then needs a corrected value.
    pub truncated: bool,
    /// Set once an operator replayed it.
    pub replay: Option<Replay>,
    /// Whether it has been appended to the DLQ topic (not persisted).
    #[serde(skip)]
    #[schema(ignore)]
    pub published: bool,
}

impl DeadLetter {
    /// A dead letter for `stored`, keeping at most `value_bytes` of its value.
    pub fn new(
        processor: &str,
        tp: &TopicPartition,
        stored: &StoredRecord,
        class: &str,
        reason: String,
        value_bytes: usize,
    ) -> Self {
        let value = &stored.record.value;
        let key = &stored.record.key;
        let kept = &value[..value.len().min(value_bytes)];
        Self {
            id: format!(
                "{}:{}:{}:{processor}",
                tp.topic, tp.partition, stored.offset
            ),
            class: class.to_owned(),
            reason: cut(reason, REASON_BYTES),
            processor: processor.to_owned(),
            source_topic: tp.topic.clone(),
            source_partition: tp.partition,
            source_offset: stored.offset,
            key: String::from_utf8_lossy(&key[..key.len().min(KEY_BYTES)]).into_owned(),
            at_ms: now_ms(),
            value_hex: hex(kept),
            value_bytes: value.len() as u64,
            value_sha256: hex(&Sha256::digest(value)),
            truncated: kept.len() < value.len(),
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

/// `text` cut to at most `most` bytes, on a character boundary, marked with `…`.
fn cut(mut text: String, most: usize) -> String {
    if text.len() > most {
        let mut end = most.saturating_sub('…'.len_utf8());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

// JSON (the API, the DLQ topic) has the fields as declared. The store's
// binary rows start with an empty id, which no row of the first layout
// (without `value_bytes`, `value_sha256`, `truncated`) starts with: those
// still decode, so a store written before stays readable.
impl Serialize for DeadLetter {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            return DeadLetter::serialize(self, serializer);
        }
        let mut row = serializer.serialize_tuple(2)?;
        row.serialize_element("")?;
        row.serialize_element(&Current(self))?;
        row.end()
    }
}

impl<'de> Deserialize<'de> for DeadLetter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            return DeadLetter::deserialize(deserializer);
        }
        deserializer.deserialize_tuple(2, RowVisitor)
    }
}

/// The current layout, through the derived functions.
struct Current<'a>(&'a DeadLetter);

impl Serialize for Current<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        DeadLetter::serialize(self.0, serializer)
    }
}

struct CurrentOwned(DeadLetter);

impl<'de> Deserialize<'de> for CurrentOwned {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        DeadLetter::deserialize(deserializer).map(CurrentOwned)
    }
}

/// The fields after the id in the first layout, which kept the whole value.
#[derive(Deserialize)]
struct FirstLayout {
    class: String,
    reason: String,
    processor: String,
    source_topic: String,
    source_partition: u32,
    source_offset: u64,
    key: String,
    at_ms: i64,
    value_hex: String,
    replay: Option<Replay>,
}

struct RowVisitor;

impl<'de> Visitor<'de> for RowVisitor {
    type Value = DeadLetter;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a stored dead letter")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<DeadLetter, A::Error> {
        let missing = || de::Error::invalid_length(0, &"a stored dead letter");
        let id: String = seq.next_element()?.ok_or_else(missing)?;
        if id.is_empty() {
            let current: CurrentOwned = seq.next_element()?.ok_or_else(missing)?;
            return Ok(current.0);
        }
        let old: FirstLayout = seq.next_element()?.ok_or_else(missing)?;
        let value = unhex(&old.value_hex).map_err(de::Error::custom)?;
        Ok(DeadLetter {
            id,
            class: old.class,
            reason: old.reason,
            processor: old.processor,
            source_topic: old.source_topic,
            source_partition: old.source_partition,
            source_offset: old.source_offset,
            key: old.key,
            at_ms: old.at_ms,
            value_bytes: value.len() as u64,
            value_sha256: hex(&Sha256::digest(&value)),
            value_hex: old.value_hex,
            truncated: false,
            replay: old.replay,
            published: false,
        })
    }
}

pub(crate) fn suffix(topic: &str, partition: u32, offset: u64, processor: &str) -> String {
    format!("{topic}:{partition:05}:{offset:020}:{processor}")
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex digits; says where a digit is wrong.
pub fn unhex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err("hex value has an odd number of digits".into());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(text.get(i..i + 2).unwrap_or("?"), 16)
                .map_err(|_| format!("hex value has a non-hex digit near position {i}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::codec::MAX_EVENT_BYTES;

    fn letter_for(key: Vec<u8>, value: Vec<u8>, keep: usize) -> DeadLetter {
        let stored = StoredRecord {
            offset: 7,
            record: Record {
                key: Bytes::from(key),
                value: Bytes::from(value),
                timestamp_ms: 1,
            },
        };
        let tp = TopicPartition::new("payment.incoming", 3);
        DeadLetter::new("inflight", &tp, &stored, "decode", "é".repeat(5_000), keep)
    }

    // A record at the log's size limit, all of it key or all of it value, makes a letter far below that limit that still identifies the whole value.
    #[test]
    fn a_letter_is_bounded_whatever_the_record() {
        let whole = vec![b'x'; 1 << 20];
        for (key, value) in [(Vec::new(), whole.clone()), (whole.clone(), b"v".to_vec())] {
            let letter = letter_for(key, value.clone(), MAX_EVENT_BYTES);
            let record = letter.to_record(0);
            assert!(
                record.value.len() < 3 * MAX_EVENT_BYTES,
                "{}",
                record.value.len()
            );
            assert!(letter.key.len() <= KEY_BYTES && letter.reason.len() <= REASON_BYTES);
            assert_eq!(letter.value_bytes, value.len() as u64);
            assert_eq!(letter.value_sha256, hex(&Sha256::digest(&value)));
            assert_eq!(letter.truncated, value.len() > MAX_EVENT_BYTES);
            assert_eq!(
                unhex(&letter.value_hex).unwrap(),
                value[..value.len().min(MAX_EVENT_BYTES)]
            );
        }
        // At the limit the value is kept whole; one byte over, it is not.
        let at = letter_for(Vec::new(), vec![1; 16], 16);
        let over = letter_for(Vec::new(), vec![1; 17], 16);
        assert!(!at.truncated && over.truncated);
        assert_eq!(over.value_hex.len(), 32);
    }

    // Store rows round-trip, and rows of the first layout (whole value, no length or digest) still decode.
    #[test]
    fn rows_of_both_layouts_decode() {
        let letter = letter_for(b"k".to_vec(), vec![9; 40], 16);
        let row = crate::store::encode_row(&letter);
        assert_eq!(postcard::from_bytes::<DeadLetter>(&row).unwrap(), letter);
        let json = serde_json::to_value(&letter).unwrap();
        assert_eq!(json["value_bytes"], 40);
        assert_eq!(json["truncated"], true);
        assert_eq!(serde_json::from_value::<DeadLetter>(json).unwrap(), letter);

        #[derive(Serialize)]
        struct First<'a> {
            id: &'a str,
            class: &'a str,
            reason: &'a str,
            processor: &'a str,
            source_topic: &'a str,
            source_partition: u32,
            source_offset: u64,
            key: &'a str,
            at_ms: i64,
            value_hex: &'a str,
            replay: Option<Replay>,
        }
        let first = First {
            id: "payment.incoming:3:7:inflight",
            class: "decode",
            reason: "empty",
            processor: "inflight",
            source_topic: "payment.incoming",
            source_partition: 3,
            source_offset: 7,
            key: "k",
            at_ms: 5,
            value_hex: "0102",
            replay: None,
        };
        let old: DeadLetter =
            postcard::from_bytes(&postcard::to_allocvec(&first).unwrap()).unwrap();
        assert_eq!(
            (old.id.as_str(), old.value_hex.as_str()),
            (first.id, "0102")
        );
        assert_eq!((old.value_bytes, old.truncated, old.at_ms), (2, false, 5));
        assert_eq!(old.value_sha256, hex(&Sha256::digest([1u8, 2])));
    }
}
