//! The owners' published checkpoints, on a cluster. After each checkpoint
//! the owner of a task appends where it stands (the next offset of each
//! input) to the positions topic, partition = the task's partition. Every
//! instance reads that topic into a board; a following task reads its
//! inputs up to the board's position and no further, so its state is never
//! ahead of what the owner has durably appended (see `ownership`).
//!
//! Positions only grow: a publication below the board's (a zombie's, a
//! late one) changes nothing. With a cluster secret each publication is
//! signed like the internal topics, and an unsigned one is ignored: a
//! forged position could make a follower run ahead of the owner's outputs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::core::Core;
use super::task::Positions;
use super::RuntimeError;
use crate::log::{Record, TopicPartition};
use crate::model::{now_ms, SourceTopic};

/// Records read back from the end, per step, to find the latest
/// publication of each task when the board starts.
const STEP_BACK: u64 = 256;

/// How long a board loop waits for new publications before looking again.
const POLL: Duration = Duration::from_millis(500);

/// One publication: a task's next offsets after its checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Published {
    processor: String,
    partition: u32,
    next: Vec<(SourceTopic, u32, u64)>,
}

/// The latest published position of every task, as far as read.
#[derive(Default)]
pub struct Board {
    latest: RwLock<HashMap<(String, u32), Positions>>,
    /// Per partition of the positions topic: the next offset to read.
    read_to: Vec<AtomicU64>,
    /// Publications handed to the publisher and not yet appended.
    pending: AtomicUsize,
    publish: Option<mpsc::UnboundedSender<Published>>,
}

impl Board {
    /// A board that neither reads nor publishes (no cluster).
    pub fn off() -> Self {
        Self::default()
    }

    /// Whether this instance shares its partitions with others.
    pub fn is_on(&self) -> bool {
        self.publish.is_some()
    }

    /// Where the owner of (`processor`, `partition`) last checkpointed;
    /// `None`: never, as far as read.
    pub fn bound(&self, processor: &str, partition: u32) -> Option<Positions> {
        let latest = self.latest.read().expect("board lock");
        latest.get(&(processor.to_owned(), partition)).cloned()
    }

    /// Hands a checkpoint's positions to the publisher (in order per task).
    pub(super) fn publish(&self, processor: &str, partition: u32, positions: &Positions) {
        let Some(sender) = &self.publish else { return };
        let next = (positions.iter())
            .map(|(&(kind, p), &offset)| (kind, p, offset))
            .collect();
        let published = Published {
            processor: processor.to_owned(),
            partition,
            next,
        };
        self.pending.fetch_add(1, Ordering::SeqCst);
        if sender.send(published).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether every publication handed over is appended.
    pub fn published_all(&self) -> bool {
        self.pending.load(Ordering::SeqCst) == 0
    }

    /// The next offset read of partition `partition` of the positions topic.
    pub(super) fn read_to(&self, partition: u32) -> u64 {
        (self.read_to.get(partition as usize)).map_or(0, |at| at.load(Ordering::SeqCst))
    }

    fn note(&self, published: Published) {
        let mut latest = self.latest.write().expect("board lock");
        let entry = latest
            .entry((published.processor, published.partition))
            .or_default();
        for (kind, partition, offset) in published.next {
            let at = entry.entry((kind, partition)).or_insert(0);
            *at = (*at).max(offset);
        }
    }
}

/// Starts a board on the positions topic: one reader per partition and
/// one publisher, all stopped with the processors. The board is in place
/// before they run, so that nothing they read goes elsewhere.
pub(super) fn start(core: &Arc<Core>) {
    let partitions = core.config.log.partitions;
    let (sender, receiver) = mpsc::unbounded_channel();
    let board = Board {
        read_to: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
        publish: Some(sender),
        ..Board::default()
    };
    if core.board.set(board).is_err() {
        return;
    }
    core.tracker.spawn(publisher(core.clone(), receiver));
    for partition in 0..partitions {
        core.tracker.spawn(reader(core.clone(), partition));
    }
}

fn topic(core: &Core, partition: u32) -> TopicPartition {
    TopicPartition::new(core.config.topics.positions.clone(), partition)
}

/// Longest wait of the publisher, once the processors stop, for their
/// final checkpoints' positions.
const FINAL_WAIT: Duration = Duration::from_secs(2);

/// The next publication; after the processors stop, only those handed over
/// until the last processor task has ended (its final checkpoint), at most
/// [`FINAL_WAIT`], then `None`.
async fn next_publication(
    core: &Core,
    queue: &mut mpsc::UnboundedReceiver<Published>,
) -> Option<Published> {
    tokio::select! {
        published = queue.recv() => return published,
        () = core.processors_stop.cancelled() => {}
    }
    let deadline = tokio::time::Instant::now() + FINAL_WAIT;
    loop {
        // Read before looking at the queue: a task hands over its last
        // publication before it ends.
        let ended = core.tasks_running.load(Ordering::SeqCst) == 0;
        if let Ok(published) = queue.try_recv() {
            return Some(published);
        }
        if ended || tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn publisher(core: Arc<Core>, mut queue: mpsc::UnboundedReceiver<Published>) {
    while let Some(published) = next_publication(&core, &mut queue).await {
        let tp = topic(&core, published.partition);
        let key = format!("{}/{}", published.processor, published.partition);
        let mut value = postcard::to_allocvec(&published).expect("postcard into a Vec");
        if let Some(sealer) = &core.sealer {
            sealer.seal(key.as_bytes(), &mut value);
        }
        let record = Record {
            key: Bytes::from(key.into_bytes()),
            value: Bytes::from(value),
            timestamp_ms: now_ms(),
        };
        // A publication that cannot be appended is only late: the next
        // checkpoint publishes a later position.
        if let Err(error) = core.log.append(&tp, vec![record]).await {
            tracing::warn!(%tp, %error, "position not published");
        }
        core.board().pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one partition of the positions topic into the board: first the
/// latest publication of each task (read back from the end), then the tail.
async fn reader(core: Arc<Core>, partition: u32) {
    let tp = topic(&core, partition);
    loop {
        let result = tokio::select! {
            result = read_partition(&core, &tp) => result,
            () = core.processors_stop.cancelled() => return,
        };
        if let Err(error) = result {
            tracing::warn!(%tp, %error, "positions not readable; retrying");
            tokio::time::sleep(POLL).await;
        }
    }
}

async fn read_partition(core: &Core, tp: &TopicPartition) -> Result<(), RuntimeError> {
    let log = &core.log;
    let start = log.log_start(tp).await?;
    let end = log.high_watermark(tp).await?;
    // The tasks of one partition publish here: the last few records hold
    // the latest of each, unless one task has been idle for long.
    let tasks_here = 3;
    let mut upper = end;
    while upper > start {
        let from = upper.saturating_sub(STEP_BACK).max(start);
        if read_range(core, tp, from, upper).await? >= tasks_here {
            break;
        }
        upper = from;
    }
    let board = core.board();
    let mut next = end;
    board.read_to[tp.partition as usize].store(next, Ordering::SeqCst);
    loop {
        log.wait_for(tp, next, POLL).await?;
        let records = log.read(tp, next, 1_024).await?;
        note_all(core, &records);
        if let Some(last) = records.last() {
            next = last.offset + 1;
        }
        board.read_to[tp.partition as usize].store(next, Ordering::SeqCst);
    }
}

/// Notes the publications in [from, end); returns how many tasks they name.
async fn read_range(
    core: &Core,
    tp: &TopicPartition,
    from: u64,
    end: u64,
) -> Result<usize, RuntimeError> {
    let board = core.board();
    note_all(
        core,
        &crate::log::read_range(&*core.log, tp, from, end).await?,
    );
    let latest = board.latest.read().expect("board lock");
    Ok(latest.keys().filter(|(_, p)| *p == tp.partition).count())
}

/// Notes every publication among `records` (unreadable or unsigned ones are ignored).
fn note_all(core: &Core, records: &[crate::log::StoredRecord]) {
    for stored in records {
        if let Some(published) = decode(core, stored) {
            core.board().note(published);
        }
    }
}

fn decode(core: &Core, stored: &crate::log::StoredRecord) -> Option<Published> {
    let record = &stored.record;
    let value = match &core.sealer {
        Some(sealer) => sealer.open(&record.key, &record.value).ok()?,
        None => &record.value[..],
    };
    postcard::from_bytes(value).ok()
}
