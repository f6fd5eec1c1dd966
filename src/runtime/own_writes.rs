//! kpay's own writes from its API: account events on `payment.inflight` and
//! operator commands on `control.commands`. Each record carries a source
//! `(Api, writer, sequence)`, like a derived record carries its input's
//! coordinates, so the processors' copy check skips a byte-for-byte copy
//! appended later by anyone who may write the topic. A cluster secret makes
//! the record unforgeable; the source makes it unrepeatable.
//!
//! The sequence only grows, in append order: appends are serialised, and
//! the sequence is reserved in blocks that are durable in the store before
//! any number of them is used, so no crash or clock change reuses one.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{Core, RuntimeError};
use crate::log::{Record, TopicPartition};
use crate::model::{codec, now_ms, partition_for, Envelope, Event, Source, SourceTopic};
use crate::store::Store;

/// Where the writer's identity and reserved sequence live in the store.
const KEY: &str = "m/api_writes";

/// Sequence numbers reserved per durable store write.
pub const BLOCK: u64 = 1_000;

/// What the store keeps: who this data directory writes as, and the first
/// sequence number not reserved yet.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Reserved {
    writer: u32,
    until: u64,
}

struct Sequence {
    next: u64,
    reserved: Reserved,
}

/// The serialised, sequenced append path of kpay's own API writes.
pub(super) struct OwnWrites {
    sequence: Mutex<Sequence>,
}

impl OwnWrites {
    /// Reads the writer and its reservation; a new data directory gets a
    /// random writer number, so instances on one cluster differ. Numbers
    /// below the reservation may have been used before a crash: the next
    /// one is the reservation's end.
    pub(super) fn open(store: &Store) -> Result<Self, RuntimeError> {
        let reserved = match store.get::<Reserved>(KEY)? {
            Some(reserved) => reserved,
            None => Reserved {
                writer: rand::random(),
                until: 0,
            },
        };
        Ok(Self {
            sequence: Mutex::new(Sequence {
                next: reserved.until,
                reserved,
            }),
        })
    }

    /// Appends `events` to `kind`'s topic (`Inflight` or `Control`), each
    /// keyed and partitioned by its key, sourced, and signed when a cluster
    /// secret is set. Returns the offset of the last record appended.
    pub(super) async fn append(
        &self,
        core: &Core,
        kind: SourceTopic,
        events: Vec<(String, Event)>,
    ) -> Result<Option<u64>, RuntimeError> {
        let partitions = match kind {
            SourceTopic::Control => 1,
            _ => core.config.log.partitions,
        };
        let mut groups: BTreeMap<u32, Vec<(String, Event)>> = BTreeMap::new();
        for (key, event) in events {
            groups
                .entry(partition_for(&key, partitions))
                .or_default()
                .push((key, event));
        }
        let mut sequence = self.sequence.lock().await;
        let mut last = None;
        for (partition, group) in groups {
            let first = reserve(core, &mut sequence, group.len() as u64).await?;
            let writer = sequence.reserved.writer;
            let records = (first..).zip(group).map(|(offset, (key, event))| {
                let source = Source {
                    topic: SourceTopic::Api,
                    partition: writer,
                    offset,
                };
                let value = codec::encode(&Envelope::new(Some(source), event));
                Record {
                    value: Bytes::from(core.seal(kind, key.as_bytes(), value)),
                    key: Bytes::from(key.into_bytes()),
                    timestamp_ms: now_ms(),
                }
            });
            let tp = TopicPartition::new(core.config.topics.name(kind), partition);
            let records: Vec<Record> = records.collect();
            let count = records.len() as u64;
            let first_offset = core.log.append(&tp, records).await?;
            last = Some(first_offset + count - 1);
        }
        Ok(last)
    }
}

/// Takes `count` sequence numbers, first making the reservation durable
/// when it runs out; returns the first.
async fn reserve(core: &Core, sequence: &mut Sequence, count: u64) -> Result<u64, RuntimeError> {
    if sequence.next + count > sequence.reserved.until {
        let until = sequence.next + count.max(BLOCK);
        let reserved = Reserved {
            until,
            ..sequence.reserved
        };
        core.store.put(KEY, &reserved)?;
        core.store.flush().await?;
        sequence.reserved = reserved;
    }
    let first = sequence.next;
    sequence.next += count;
    Ok(first)
}
