//! A journal: entries queued without waiting, appended by one writer task to
//! a one-partition topic (for outside consumers) and kept, newest first up to
//! a bound, in a store table (for the API). The audit trail and the error log
//! are journals.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::mpsc;

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

/// The sending side.
pub struct Journal<T> {
    queue: mpsc::Sender<T>,
    /// Entries dropped because the queue was full or the writer had stopped.
    pub dropped: AtomicU64,
    _entries: PhantomData<fn(T)>,
}

/// The writing side, until it is started on a running runtime; entries
/// queue (up to [`QUEUE`]) meanwhile.
pub struct JournalWriter<T> {
    target: Target,
    receiver: mpsc::Receiver<T>,
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
        let queued = self.queue.try_send(entry).is_ok();
        if !queued {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        queued
    }
}

async fn writer<T: Entry>(runtime: Runtime, target: Target, mut receiver: mpsc::Receiver<T>) {
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
        let entries = std::mem::take(&mut batch);
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<T> = entries.by_ref().take(MAX_BATCH_ROWS).collect();
            if let Err(error) = write(&runtime, &target, chunk).await {
                // Printed, not traced: a traced error could feed the error log itself.
                eprintln!("kpay: journal {} not written: {error}", target.topic);
            }
        }
        if stopping {
            return;
        }
    }
}

async fn write<T: Entry>(
    runtime: &Runtime,
    target: &Target,
    mut entries: Vec<T>,
) -> Result<(), RuntimeError> {
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
    let last = first + entries.len() as u64 - 1;
    for (n, entry) in entries.iter_mut().enumerate() {
        let seq = first + n as u64;
        entry.set_seq(seq);
        batch.insert(row_key(target.table, seq).as_bytes(), encode_row(entry));
    }
    // Trim the oldest beyond the bound, one batch's worth per write.
    let keep = target.keep as u64;
    for seq in
        (last + 1).saturating_sub(keep + entries.len() as u64)..(last + 1).saturating_sub(keep)
    {
        batch.remove(row_key(target.table, seq).as_bytes());
    }
    runtime.store().apply(batch)?;
    Ok(())
}

fn row_key(table: &str, seq: u64) -> String {
    format!("{table}/{seq:020}")
}
