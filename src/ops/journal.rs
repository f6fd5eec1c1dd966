//! A journal: entries queued, appended by one writer task to a one-partition
//! topic (for outside consumers) and kept, newest first up to a bound, in a
//! store table (for the API). The audit trail (two journals, one per class,
//! sharing one topic) and the error log are journals. An entry is either
//! queued without waiting ([`Journal::record`]) or awaited until it is
//! appended durably and stored ([`Journal::record_durable`]).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::log::{Record, TopicPartition};
use crate::runtime::{Runtime, RuntimeError};
use crate::store::{encode_row, Batch, MAX_BATCH_ROWS};

/// Entries waiting for the writer; beyond it entries are counted as dropped.
pub const QUEUE: usize = 10_000;

/// What a journal entry must tell the journal.
pub trait Entry: Serialize + DeserializeOwned + Send + 'static {
    /// Sets the entry's position in the topic (which orders the journal).
    fn set_seq(&mut self, seq: u64);
    /// The record key on the topic.
    fn record_key(&self) -> String;
    /// When it happened, ms since the epoch.
    fn at_ms(&self) -> i64;
}

/// Where a journal writes.
pub struct Target {
    /// The one-partition topic.
    pub topic: String,
    /// The store table prefix.
    pub table: &'static str,
    /// Newest entries kept in the store.
    pub keep: usize,
}

/// Why an awaited entry was not written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the journal's queue is full")]
    Full,
    #[error("the journal's writer has stopped")]
    Stopped,
    #[error("the journal entry was not written: {0}")]
    Failed(String),
}

/// An entry waiting for the writer, with whom to tell its seq when awaited.
struct Queued<T> {
    entry: T,
    done: Option<oneshot::Sender<Result<u64, String>>>,
}

/// The sending side.
pub struct Journal<T> {
    queue: mpsc::Sender<Queued<T>>,
    /// Entries dropped because the queue was full or the writer had stopped.
    pub dropped: AtomicU64,
    _entries: PhantomData<fn(T)>,
}

/// The writing side, until it is started on a running runtime; entries
/// queue (up to [`QUEUE`]) meanwhile.
pub struct JournalWriter<T> {
    target: Target,
    receiver: mpsc::Receiver<Queued<T>>,
}

impl<T: Entry> JournalWriter<T> {
    /// Starts the writer task; it stops with the runtime's processors,
    /// after writing what is still queued.
    pub fn start(self, runtime: &Runtime) {
        runtime.spawn(writer(runtime.clone(), self.target, self.receiver));
    }
}

impl<T: Entry> Journal<T> {
    /// A journal and its writer, not started yet.
    pub fn new(target: Target) -> (Self, JournalWriter<T>) {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let journal = Self {
            queue,
            dropped: AtomicU64::new(0),
            _entries: PhantomData,
        };
        (journal, JournalWriter { target, receiver })
    }

    /// A journal whose writer runs with `runtime`.
    pub fn start(runtime: &Runtime, target: Target) -> Self {
        let (journal, writer) = Self::new(target);
        writer.start(runtime);
        journal
    }

    /// Queues an entry without waiting; returns false when it was dropped (counted).
    pub fn record(&self, entry: T) -> bool {
        let queued = self.queue.try_send(Queued { entry, done: None }).is_ok();
        if !queued {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }

    /// Queues an entry and waits until it is appended to the topic (durably,
    /// as every append) and stored; returns its seq. A full queue is not
    /// waited on: the entry is dropped (counted) and the caller decides.
    /// The wait is bounded by the log's own deadlines on the append.
    pub async fn record_durable(&self, entry: T) -> Result<u64, JournalError> {
        let (done, written) = oneshot::channel();
        let queued = Queued {
            entry,
            done: Some(done),
        };
        if let Err(error) = self.queue.try_send(queued) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(match error {
                mpsc::error::TrySendError::Full(_) => JournalError::Full,
                mpsc::error::TrySendError::Closed(_) => JournalError::Stopped,
            });
        }
        match written.await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(error)) => Err(JournalError::Failed(error)),
            Err(_) => Err(JournalError::Stopped),
        }
    }
}

async fn writer<T: Entry>(
    runtime: Runtime,
    target: Target,
    mut receiver: mpsc::Receiver<Queued<T>>,
) {
    // Rows kept, counted once here and then followed, because two journals
    // share a topic and a table's seqs therefore have gaps.
    let mut kept = runtime.store().count(target.table);
    let mut batch = Vec::with_capacity(MAX_BATCH_ROWS);
    loop {
        let stopping = tokio::select! {
            received = receiver.recv_many(&mut batch, MAX_BATCH_ROWS) => received == 0,
            () = runtime.stopped() => true,
        };
        if stopping {
            // Write what is still queued, then stop with the processors.
            while let Ok(entry) = receiver.try_recv() {
                batch.push(entry);
            }
        }
        let queued = std::mem::take(&mut batch);
        let mut queued = queued.into_iter().peekable();
        while queued.peek().is_some() {
            let (chunk, done): (Vec<T>, Vec<_>) = queued
                .by_ref()
                .take(MAX_BATCH_ROWS)
                .map(|q| (q.entry, q.done))
                .unzip();
            let written = write(&runtime, &target, chunk, &mut kept).await;
            if let Err(error) = &written {
                // Printed, not traced: a traced error could feed the error log itself.
                eprintln!("kpay: journal {} not written: {error}", target.topic);
            }
            for (n, done) in done.into_iter().enumerate() {
                let result = match &written {
                    Ok(first) => Ok(first + n as u64),
                    Err(error) => Err(error.to_string()),
                };
                if let Some(done) = done {
                    // The waiter may have gone (its request was dropped).
                    let _ = done.send(result);
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Appends `entries`, stores them and trims the table's oldest rows beyond
/// the bound (at most one batch's worth per write); returns the first seq.
async fn write<T: Entry>(
    runtime: &Runtime,
    target: &Target,
    mut entries: Vec<T>,
    kept: &mut u64,
) -> Result<u64, RuntimeError> {
    let tp = TopicPartition::new(target.topic.clone(), 0);
    let records = entries
        .iter()
        .map(|e| Record {
            key: Bytes::from(e.record_key().into_bytes()),
            value: Bytes::from(serde_json::to_vec(e).expect("plain struct serializes")),
            timestamp_ms: e.at_ms(),
        })
        .collect();
    let first = runtime.log().append(&tp, records).await?;
    let mut batch = Batch::default();
    for (n, entry) in entries.iter_mut().enumerate() {
        let seq = first + n as u64;
        entry.set_seq(seq);
        batch.insert(row_key(target.table, seq).as_bytes(), encode_row(entry));
    }
    let excess = (*kept + entries.len() as u64).saturating_sub(target.keep as u64);
    let excess = excess.min(MAX_BATCH_ROWS as u64) as usize;
    let oldest: Vec<(String, T)> = runtime.store().scan(target.table, None, excess)?;
    for (key, _) in &oldest {
        batch.remove(format!("{}/{key}", target.table).as_bytes());
    }
    runtime.store().apply(batch)?;
    *kept = *kept + entries.len() as u64 - oldest.len() as u64;
    Ok(first)
}

fn row_key(table: &str, seq: u64) -> String {
    format!("{table}/{seq:020}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::audit::AuditEntry;

    fn entry() -> AuditEntry {
        AuditEntry {
            seq: 0,
            at_ms: 0,
            principal: "local".into(),
            role: "local".into(),
            action: "POST /api/v1/control/pause".into(),
            parameters: "/api/v1/control/pause".into(),
            source: "127.0.0.1:1".into(),
            status: 200,
            outcome: "ok".into(),
        }
    }

    fn target() -> Target {
        Target {
            topic: "ops.audit".into(),
            table: "l",
            keep: 10,
        }
    }

    // An awaited entry is refused at once when the queue is full, and counted as dropped.
    #[tokio::test]
    async fn a_full_queue_refuses_an_awaited_entry_and_counts_it() {
        let (journal, _writer) = Journal::<AuditEntry>::new(target());
        for _ in 0..QUEUE {
            assert!(journal.record(entry()));
        }
        let refused = journal.record_durable(entry()).await;
        assert!(matches!(refused, Err(JournalError::Full)), "{refused:?}");
        assert_eq!(journal.dropped.load(Ordering::Relaxed), 1);
    }

    // An awaited entry fails rather than waits forever when there is no writer.
    #[tokio::test]
    async fn an_awaited_entry_fails_when_the_writer_is_gone() {
        let (journal, writer) = Journal::<AuditEntry>::new(target());
        drop(writer);
        let refused = journal.record_durable(entry()).await;
        assert!(matches!(refused, Err(JournalError::Stopped)), "{refused:?}");
    }
}
