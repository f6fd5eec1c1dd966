//! Snapshots of the task partitions' state on Kafka, so that an instance
//! that joins a cluster with an empty data directory restores instead of
//! replaying the whole log.
//!
//! Every `cluster.snapshot_interval_ms`, right after a checkpoint, the
//! owner of a task partition takes its rows as stored (the table's rows of
//! that partition, its blocks of settled rows, and last its checkpoint: positions,
//! copy checks, statistics) and a writer appends them to
//! `topics.snapshots`, partition = the task's partition, keyed by the
//! processor: a `Begin` record, `Rows` records of at most [`PART_BYTES`],
//! and an `End` record naming the `Begin`'s offset and how many parts came
//! between. A snapshot without its `End` (the writer stopped) is not one.
//!
//! At start, a task with no checkpoint in the store finds the latest
//! complete snapshot of its partition (read back from the end of the
//! topic), writes its rows as they are (the checkpoint last, so that a
//! crash in between restores again), and then starts from the snapshot's
//! positions like any task after a restart. No log compaction is needed:
//! only the latest complete snapshot is read, and the topic's retention
//! may drop older ones (it must keep more than one interval). With a
//! cluster secret, every record is signed and an unsigned one is ignored.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::core::Core;
use super::RuntimeError;
use crate::config::Config;
use crate::log::{read_range, Log, Record, StoredRecord, TopicPartition};
use crate::model::seal::Sealer;
use crate::model::{now_ms, partition_for};
use crate::pipeline::account::Accounts;
use crate::pipeline::confirmed::Confirmed;
use crate::pipeline::inflight::Inflight;
use crate::pipeline::Processor;
use crate::store::{block_prefixes, checkpoint_key, RawRow, Store, StoreError};

/// Bytes of rows in one record, at most (Kafka's default record limit is 1 MiB).
const PART_BYTES: usize = 256 << 10;

/// Records read per step back from the end, looking for the latest snapshot.
const STEP_BACK: u64 = 64;

/// Snapshots waiting for the writer, at most; one more is skipped (the
/// task takes it again at its next checkpoint).
const QUEUE: usize = 64;

/// One record of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
enum Part {
    Begin {
        id: u64,
    },
    Rows {
        id: u64,
        rows: Vec<RawRow>,
    },
    End {
        id: u64,
        begin: u64,
        parts: u32,
        rows: u64,
    },
}

/// A task partition's rows, taken right after a checkpoint.
pub(super) struct Taken {
    processor: &'static str,
    partition: u32,
    rows: Vec<RawRow>,
}

/// Hands snapshots to the writer.
pub struct Snapshots {
    sender: mpsc::Sender<Taken>,
}

impl Snapshots {
    /// Queues `taken` for writing; false when the queue is full.
    pub(super) fn offer(&self, taken: Taken) -> bool {
        self.sender.try_send(taken).is_ok()
    }
}

/// The rows of `P`'s task of `partition` as stored: its table's rows of
/// that partition, its blocks of settled rows, and its checkpoint, last.
pub(super) fn take<P: Processor>(
    store: &Store,
    partition: u32,
    partitions: u32,
) -> Result<Taken, StoreError> {
    let mut rows = Vec::new();
    if P::TABLE != "-" {
        let prefix = format!("{}/", P::TABLE);
        rows = store.raw_rows(&prefix, |key| partition_for(key, partitions) == partition)?;
        for prefix in block_prefixes(P::TABLE, partition) {
            rows.extend(store.raw_rows(&prefix, |_| true)?);
        }
    }
    let key = checkpoint_key(P::NAME, partition);
    if let Some(checkpoint) = store.raw_get(&key)? {
        rows.push((key.into_bytes(), checkpoint));
    }
    Ok(Taken {
        processor: P::NAME,
        partition,
        rows,
    })
}

/// Starts the writer; it stops with the processors.
pub(super) fn start(core: &Arc<Core>) -> Snapshots {
    let (sender, receiver) = mpsc::channel(QUEUE);
    core.tracker.spawn(writer(core.clone(), receiver));
    Snapshots { sender }
}

async fn writer(core: Arc<Core>, mut queue: mpsc::Receiver<Taken>) {
    loop {
        let taken = tokio::select! {
            taken = queue.recv() => taken,
            () = core.processors_stop.cancelled() => None,
        };
        let Some(taken) = taken else { return };
        let (processor, partition, rows) = (taken.processor, taken.partition, taken.rows.len());
        let started = Instant::now();
        match write(&core, taken).await {
            Ok(bytes) => tracing::debug!(
                processor,
                partition,
                rows,
                bytes,
                ms = started.elapsed().as_millis() as u64,
                "snapshot written"
            ),
            // Only late: the task takes another at a later checkpoint.
            Err(error) => tracing::warn!(processor, partition, %error, "snapshot not written"),
        }
    }
}

/// Appends one snapshot; the bytes of its rows.
async fn write(core: &Core, taken: Taken) -> Result<usize, RuntimeError> {
    let tp = topic(&core.config, taken.partition);
    let id = rand::random::<u64>();
    let append = |part: Part| {
        let record = seal(core.sealer.as_ref(), taken.processor, &part);
        core.log.append(&tp, vec![record])
    };
    let begin = append(Part::Begin { id }).await?;
    let (mut parts, mut bytes, mut at) = (0u32, 0usize, 0usize);
    let total = taken.rows.len() as u64;
    let mut rows = taken.rows.into_iter().peekable();
    while rows.peek().is_some() {
        let mut part = Vec::new();
        let mut part_bytes = 0;
        while let Some((key, value)) =
            rows.next_if(|(k, v)| part.is_empty() || part_bytes + k.len() + v.len() <= PART_BYTES)
        {
            part_bytes += key.len() + value.len();
            part.push((key, value));
        }
        at += part.len();
        bytes += part_bytes;
        append(Part::Rows { id, rows: part }).await?;
        parts += 1;
    }
    debug_assert_eq!(at as u64, total);
    append(Part::End {
        id,
        begin,
        parts,
        rows: total,
    })
    .await?;
    Ok(bytes)
}

fn topic(config: &Config, partition: u32) -> TopicPartition {
    TopicPartition::new(config.topics.snapshots.clone(), partition)
}

fn seal(sealer: Option<&Sealer>, processor: &str, part: &Part) -> Record {
    let mut value = postcard::to_allocvec(part).expect("postcard into a Vec");
    if let Some(sealer) = sealer {
        sealer.seal(processor.as_bytes(), &mut value);
    }
    Record {
        key: Bytes::copy_from_slice(processor.as_bytes()),
        value: Bytes::from(value),
        timestamp_ms: now_ms(),
    }
}

/// The processor and part of a snapshot record (`None`: not one, or not
/// signed with the cluster secret).
fn open(sealer: Option<&Sealer>, stored: &StoredRecord) -> Option<(String, Part)> {
    let record = &stored.record;
    let value = match sealer {
        Some(sealer) => sealer.open(&record.key, &record.value).ok()?,
        None => &record.value[..],
    };
    let processor = String::from_utf8(record.key.to_vec()).ok()?;
    Some((processor, postcard::from_bytes(value).ok()?))
}

/// Restores every task partition that has no checkpoint in `store` from
/// its latest complete snapshot, if there is one; how many it restored.
pub(super) async fn restore_missing(
    config: &Config,
    log: &dyn Log,
    store: &Store,
) -> Result<usize, RuntimeError> {
    let secret = &config.cluster.secret;
    let sealer = (!secret.is_empty()).then(|| Sealer::new(secret.expose()));
    let started = Instant::now();
    let mut restores = Vec::new();
    for partition in 0..config.log.partitions {
        let mut missing = BTreeSet::new();
        for processor in [Inflight::NAME, Accounts::NAME, Confirmed::NAME] {
            if !store.contains(&checkpoint_key(processor, partition))? {
                missing.insert(processor.to_owned());
            }
        }
        if !missing.is_empty() {
            let (tp, sealer) = (topic(config, partition), sealer.as_ref());
            restores.push(async move { restore_partition(log, store, &tp, sealer, missing).await });
        }
    }
    // Every partition at once: most of the time goes into waiting for the broker.
    let restored: usize = (futures::future::try_join_all(restores).await?.into_iter()).sum();
    if restored > 0 {
        tracing::info!(
            restored,
            ms = started.elapsed().as_millis() as u64,
            "restored task partitions from their snapshots"
        );
    }
    Ok(restored)
}

/// Looks back from the end of `tp` for the latest complete snapshot of
/// each processor in `missing` and writes it into `store`.
async fn restore_partition(
    log: &dyn Log,
    store: &Store,
    tp: &TopicPartition,
    sealer: Option<&Sealer>,
    mut missing: BTreeSet<String>,
) -> Result<usize, RuntimeError> {
    let start = log.log_start(tp).await?;
    let mut upper = log.high_watermark(tp).await?;
    let mut restored = 0;
    while upper > start && !missing.is_empty() {
        let from = upper.saturating_sub(STEP_BACK).max(start);
        let window = read_range(log, tp, from, upper).await?;
        for stored in window.iter().rev() {
            let Some((
                processor,
                Part::End {
                    id,
                    begin,
                    parts,
                    rows,
                },
            )) = open(sealer, stored)
            else {
                continue;
            };
            if !missing.contains(&processor) {
                continue;
            }
            let loaded = read_range(log, tp, begin.max(start), stored.offset).await?;
            let mut got = Vec::new();
            let mut count = 0;
            for record in &loaded {
                match open(sealer, record) {
                    Some((p, Part::Rows { id: of, rows })) if p == processor && of == id => {
                        got.extend(rows);
                        count += 1;
                    }
                    _ => {}
                }
            }
            if count != parts || got.len() as u64 != rows {
                tracing::warn!(%tp, processor, "snapshot incomplete (retention?); looking further back");
                continue;
            }
            store.put_raw(&got)?;
            tracing::info!(%tp, processor, rows, "restored from a snapshot");
            missing.remove(&processor);
            restored += 1;
        }
        upper = from;
    }
    Ok(restored)
}
