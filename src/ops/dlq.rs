//! Dead letters: records a processor could not act on at all (bytes that do
//! not decode, an event on the wrong topic, an impossible transition, an
//! overflow). Each is kept in the store, in the same atomic checkpoint as the
//! offset that skips it, so it is recorded exactly once, and published to the
//! DLQ topic for other tools. Business refusals are never dead letters.
//!
//! An operator lists, inspects, replays (as stored or corrected) and deletes
//! them. A replay appends the event to its source topic, on the partition its
//! key belongs to, under a replay source `(Replay, 0, seq)` with `seq` from a
//! counter in the store: consumers skip a copy like any replayed record, and
//! a replay a crash left in doubt is settled by finding `seq` in the log.
//! Waiting letters live under `d/`, replayed ones move to `r/`.

use bytes::Bytes;

use crate::failpoint::{self, Point};
use crate::log::{Record, TopicPartition};
use crate::model::{codec, now_ms, partition_for, Envelope, Event, Source, SourceTopic};
use crate::pipeline::{account::Accounts, inflight::Inflight, Processor};
use crate::runtime::dead_letter::suffix;
pub use crate::runtime::dead_letter::{hex, unhex, DeadLetter, Replay, TABLE};
use crate::runtime::{Runtime, RuntimeError};
use crate::store::{encode_row, Batch, StoreError};

/// Store table of dead letters that were replayed (kept for idempotency).
pub const REPLAYED: &str = "r";
/// The last replay sequence number handed out.
const REPLAY_SEQ_KEY: &str = "m/replay_seq";
/// Most records searched to settle a replay a crash left in doubt.
const MAX_DOUBT_SCAN: u64 = 10_000_000;

/// Why an operation on the DLQ failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DlqError {
    #[error("{0}")]
    BadId(String),
    #[error("dead letter {0} not found")]
    NotFound(String),
    /// The request is understood but cannot be carried out as asked.
    #[error("{0}")]
    Unprocessable(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl From<StoreError> for DlqError {
    fn from(error: StoreError) -> Self {
        Self::Runtime(error.into())
    }
}

impl From<crate::log::LogError> for DlqError {
    fn from(error: crate::log::LogError) -> Self {
        Self::Runtime(error.into())
    }
}

/// The store key suffix of a dead letter id, `<topic>:<partition>:<offset>:<processor>`.
fn parse_id(id: &str) -> Result<String, DlqError> {
    let bad = || {
        DlqError::BadId(format!(
            "dead letter id {id:?} is not <topic>:<partition>:<offset>:<processor>"
        ))
    };
    let mut parts = id.rsplitn(4, ':');
    let processor = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
    let offset: u64 = parts.next().and_then(|o| o.parse().ok()).ok_or_else(bad)?;
    let partition: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let topic = parts.next().filter(|t| !t.is_empty()).ok_or_else(bad)?;
    Ok(suffix(topic, partition, offset, processor))
}

/// Which dead letters a listing wants.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Replayed ones instead of waiting ones.
    pub replayed: bool,
    /// Only this error class.
    pub class: Option<String>,
    /// Only this source topic.
    pub topic: Option<String>,
    /// Only this processor.
    pub processor: Option<String>,
}

impl Filter {
    fn wants(&self, letter: &DeadLetter) -> bool {
        self.class.as_ref().is_none_or(|c| *c == letter.class)
            && self
                .topic
                .as_ref()
                .is_none_or(|t| *t == letter.source_topic)
            && (self.processor.as_ref()).is_none_or(|p| *p == letter.processor)
    }
}

/// A page of dead letters in (topic, partition, offset) order after the id
/// `after`, and the id to continue from when there may be more.
pub fn list(
    runtime: &Runtime,
    filter: &Filter,
    after: Option<&str>,
    limit: usize,
) -> Result<(Vec<DeadLetter>, Option<String>), DlqError> {
    let table = if filter.replayed { REPLAYED } else { TABLE };
    let mut cursor = after.map(parse_id).transpose()?;
    let mut items = Vec::new();
    loop {
        let rows: Vec<(String, DeadLetter)> =
            runtime.store().scan(table, cursor.as_deref(), 256)?;
        let exhausted = rows.len() < 256;
        for (key, letter) in rows {
            cursor = Some(key);
            if filter.wants(&letter) {
                items.push(letter);
                if items.len() == limit {
                    let next = items.last().map(|l| l.id.clone());
                    return Ok((items, next));
                }
            }
        }
        if exhausted {
            return Ok((items, None));
        }
    }
}

/// A dead letter, waiting or replayed.
pub fn find(runtime: &Runtime, id: &str) -> Result<Option<DeadLetter>, DlqError> {
    let suffix = parse_id(id)?;
    for table in [TABLE, REPLAYED] {
        if let Some(letter) = runtime.store().get(&format!("{table}/{suffix}"))? {
            return Ok(Some(letter));
        }
    }
    Ok(None)
}

/// Dead letters waiting for an operator.
pub fn waiting(runtime: &Runtime) -> u64 {
    runtime.store().count(TABLE)
}

/// Deletes a dead letter (waiting or replayed).
pub async fn delete(runtime: &Runtime, id: &str) -> Result<(), DlqError> {
    let suffix = parse_id(id)?;
    let _guard = runtime.dlq_lock().lock().await;
    for table in [TABLE, REPLAYED] {
        let key = format!("{table}/{suffix}");
        if runtime.store().get::<DeadLetter>(&key)?.is_some() {
            let mut batch = Batch::default();
            batch.remove(key.as_bytes());
            runtime.store().apply(batch)?;
            runtime.store().flush().await?;
            if table == TABLE {
                runtime.dlq_released(1);
            }
            tracing::info!(id, "dead letter deleted");
            return Ok(());
        }
    }
    Err(DlqError::NotFound(id.to_owned()))
}

/// What a replay did.
#[derive(Debug)]
pub struct Replayed {
    /// The letter, now carrying its replay.
    pub letter: DeadLetter,
    /// True when it had been replayed before and nothing new was appended.
    pub already: bool,
}

/// Replays a dead letter to its source topic: its stored value, or
/// `correction` in its place. Idempotent: once replayed, a replay answers
/// with the first one's result and appends nothing.
pub async fn replay(
    runtime: &Runtime,
    id: &str,
    correction: Option<Vec<u8>>,
    principal: &str,
) -> Result<Replayed, DlqError> {
    let suffix = parse_id(id)?;
    let _guard = runtime.dlq_lock().lock().await;
    let waiting_key = format!("{TABLE}/{suffix}");
    let Some(mut letter) = runtime.store().get::<DeadLetter>(&waiting_key)? else {
        return match runtime.store().get(&format!("{REPLAYED}/{suffix}"))? {
            Some(letter) => Ok(Replayed {
                letter,
                already: true,
            }),
            None => Err(DlqError::NotFound(id.to_owned())),
        };
    };
    if let Some(pending) = letter.replay.clone() {
        // Reserved, then a crash: it landed or it did not.
        if let Some(offset) = find_in_log(runtime, &pending).await? {
            tracing::warn!(id, offset, "replay in doubt found in the log");
            return settle(runtime, &suffix, letter, pending, offset).await;
        }
    }
    let corrected = correction.is_some();
    let (envelope, key, partition, kind) = route(runtime, &letter, correction)?;
    let tp = TopicPartition::new(letter.source_topic.clone(), partition);
    let seq = runtime.store().get::<u64>(REPLAY_SEQ_KEY)?.unwrap_or(0) + 1;
    let pending = Replay {
        seq,
        topic: tp.topic.clone(),
        partition,
        from_offset: runtime.log().high_watermark(&tp).await?,
        offset: None,
        at_ms: now_ms(),
        principal: principal.to_owned(),
        corrected,
    };
    letter.replay = Some(pending.clone());
    let mut batch = Batch::default();
    batch.insert(waiting_key.as_bytes(), encode_row(&letter));
    batch.insert(REPLAY_SEQ_KEY.as_bytes(), encode_row(&seq));
    runtime.store().apply(batch)?;
    // Durable before the append: a crash after it is settled by `seq`.
    runtime.store().flush().await?;
    failpoint::pass(Point::DlqAfterReserve);
    let replay = Source {
        topic: SourceTopic::Replay,
        partition: 0,
        offset: seq,
    };
    let wrapped = Envelope::new(Some(replay), envelope.event);
    // The operator's decision vouches for the record: it is signed like
    // kpay's own (a tag the stored value carried was dropped by decoding).
    let value = runtime.signed(kind, key.as_bytes(), codec::encode(&wrapped));
    let record = Record {
        key: Bytes::from(key.into_bytes()),
        value: Bytes::from(value),
        timestamp_ms: now_ms(),
    };
    let offset = runtime.log().append(&tp, vec![record]).await?;
    failpoint::pass(Point::DlqAfterAppend);
    tracing::info!(id, %tp, offset, seq, corrected, principal, "dead letter replayed");
    settle(runtime, &suffix, letter, pending, offset).await
}

/// What a replay appends and where: the stored (or corrected) value
/// decoded, its routing key, the partition that key belongs to and the
/// kind of input it goes to.
fn route(
    runtime: &Runtime,
    letter: &DeadLetter,
    correction: Option<Vec<u8>>,
) -> Result<(Envelope, String, u32, SourceTopic), DlqError> {
    let corrected = correction.is_some();
    let bytes = match correction {
        Some(bytes) => bytes,
        // Only a prefix was kept: replaying it would append another record.
        None if letter.truncated => {
            return Err(DlqError::Unprocessable(format!(
                "dead letter {} keeps only the first {} of the record's {} bytes (sha256 {}): \
                 the stored prefix is not the whole record; replay it with a corrected value",
                letter.id,
                letter.value_hex.len() / 2,
                letter.value_bytes,
                letter.value_sha256
            )))
        }
        None => unhex(&letter.value_hex).map_err(DlqError::Unprocessable)?,
    };
    let envelope = codec::decode(&bytes).map_err(|error| {
        let which = if corrected { "corrected" } else { "stored" };
        DlqError::Unprocessable(format!(
            "the {which} value does not decode ({error}); replay it with a corrected value"
        ))
    })?;
    let kind = input_kind(runtime, &letter.source_topic).ok_or_else(|| {
        DlqError::Unprocessable(format!(
            "{} is not an input topic of the pipeline",
            letter.source_topic
        ))
    })?;
    let key = route_key(kind, &envelope.event).ok_or_else(|| {
        DlqError::Unprocessable(format!(
            "a {} event does not belong on {}; correct the value",
            envelope.event.kind(),
            letter.source_topic
        ))
    })?;
    let partition = match kind {
        SourceTopic::Control => 0,
        _ => partition_for(&key, runtime.config().log.partitions),
    };
    Ok((envelope, key, partition, kind))
}

/// Moves a replayed letter to the replayed table, oldest dropped beyond the bound.
async fn settle(
    runtime: &Runtime,
    suffix: &str,
    mut letter: DeadLetter,
    mut replay: Replay,
    offset: u64,
) -> Result<Replayed, DlqError> {
    replay.offset = Some(offset);
    letter.replay = Some(replay);
    let mut batch = Batch::default();
    batch.remove(format!("{TABLE}/{suffix}").as_bytes());
    batch.insert(
        format!("{REPLAYED}/{suffix}").as_bytes(),
        encode_row(&letter),
    );
    let replayed: Vec<(String, DeadLetter)> = runtime.store().scan(REPLAYED, None, usize::MAX)?;
    let bound = runtime.config().limits.dlq_entries.max(1);
    if replayed.len() >= bound {
        let mut by_age: Vec<_> = replayed
            .iter()
            .map(|(key, l)| (l.replay.as_ref().map_or(0, |r| r.seq), key))
            .collect();
        by_age.sort();
        for (_, key) in by_age.iter().take(replayed.len() + 1 - bound) {
            batch.remove(format!("{REPLAYED}/{key}").as_bytes());
        }
    }
    runtime.store().apply(batch)?;
    runtime.store().flush().await?;
    runtime.dlq_released(1);
    Ok(Replayed {
        letter,
        already: false,
    })
}

/// The offset a reserved replay landed at, if it did.
async fn find_in_log(runtime: &Runtime, replay: &Replay) -> Result<Option<u64>, DlqError> {
    let tp = TopicPartition::new(replay.topic.clone(), replay.partition);
    let next = replay.from_offset.max(runtime.log().log_start(&tp).await?);
    let end = runtime.log().high_watermark(&tp).await?;
    if end.saturating_sub(next) > MAX_DOUBT_SCAN {
        return Err(DlqError::Unprocessable(format!(
            "a replay of this letter was interrupted and more than {MAX_DOUBT_SCAN} records \
             of {tp} would have to be searched to tell whether it landed; check offsets \
             {next}.. for replay source {} before deleting or replaying it",
            replay.seq
        )));
    }
    let wanted = Source {
        topic: SourceTopic::Replay,
        partition: 0,
        offset: replay.seq,
    };
    let mut landed = None;
    crate::log::read_range_with(&**runtime.log(), &tp, next, end, |records| {
        landed = (records.iter())
            .find(|stored| {
                codec::decode(&stored.record.value)
                    .is_ok_and(|envelope| envelope.source == Some(wanted))
            })
            .map(|stored| stored.offset);
        landed.is_none()
    })
    .await?;
    Ok(landed)
}

/// The input kind of a topic name, if the pipeline reads it.
fn input_kind(runtime: &Runtime, topic: &str) -> Option<SourceTopic> {
    [
        SourceTopic::Incoming,
        SourceTopic::Inflight,
        SourceTopic::Complete,
        SourceTopic::Control,
    ]
    .into_iter()
    .find(|kind| runtime.topics().name(*kind) == topic)
}

/// The partitioning key of `event` on the input `kind`, if it belongs there.
fn route_key(kind: SourceTopic, event: &Event) -> Option<String> {
    match (kind, event) {
        (SourceTopic::Incoming, Event::PaymentSubmitted(_)) => Inflight::state_key(event),
        (SourceTopic::Inflight, _) => Accounts::state_key(event),
        (SourceTopic::Complete, Event::Completed { payment, .. }) => Some(payment.id.as_str()),
        (SourceTopic::Control, Event::Control(_)) => Some("control"),
        _ => None,
    }
    .map(str::to_owned)
}

/// Appends raw records to a topic, for tests and drills of the DLQ path.
/// Without a partition each record goes where its key belongs.
pub async fn inject(
    runtime: &Runtime,
    topic: &str,
    partition: Option<u32>,
    records: Vec<(String, Vec<u8>)>,
) -> Result<Vec<(u32, u64)>, DlqError> {
    let partitions = if topic == runtime.topics().commands
        || topic == runtime.topics().audit
        || topic == runtime.topics().logs
    {
        1
    } else if runtime.topics().all().contains(&topic) {
        runtime.config().log.partitions
    } else {
        return Err(DlqError::Unprocessable(format!(
            "topic {topic:?} is not one of kpay's topics"
        )));
    };
    if let Some(p) = partition.filter(|p| *p >= partitions) {
        return Err(DlqError::Unprocessable(format!(
            "partition {p} does not exist: {topic} has {partitions}"
        )));
    }
    let mut landed = Vec::with_capacity(records.len());
    let mut groups: std::collections::BTreeMap<u32, Vec<Record>> = Default::default();
    for (key, value) in records {
        let p = partition.unwrap_or_else(|| partition_for(&key, partitions));
        groups.entry(p).or_default().push(Record {
            key: Bytes::from(key.into_bytes()),
            value: Bytes::from(value),
            timestamp_ms: now_ms(),
        });
    }
    for (p, group) in groups {
        let count = group.len() as u64;
        let first = runtime
            .log()
            .append(&TopicPartition::new(topic, p), group)
            .await?;
        landed.extend((first..first + count).map(|offset| (p, offset)));
    }
    Ok(landed)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Ids parse into zero-padded store keys (topic names may hold dots); bad ids are refused.
    #[test]
    fn ids_map_to_ordered_keys() {
        assert_eq!(
            parse_id("payment.incoming:3:17:inflight").unwrap(),
            "payment.incoming:00003:00000000000000000017:inflight"
        );
        for bad in ["", "a:b:c:d", "t:1:x:p", "t:1:2:", ":1:2:p", "1:2:p"] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
    }

    // Hex round-trips; odd lengths and non-hex digits are refused.
    #[test]
    fn hex_round_trip() {
        let bytes = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)).unwrap(), bytes);
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
    }
}
