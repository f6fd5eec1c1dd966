//! The audit trail: every state-changing API call (control commands
//! included) with principal, role, action, parameters, source address,
//! outcome and time. Calls are queued to a writer task that appends them to
//! `ops.audit` (for outside consumers) and keeps the newest entries in the
//! store for `GET /api/v1/logs/audit`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::ToSchema;

use crate::log::{Record, TopicPartition};
use crate::runtime::{RuntimeError, Shared};
use crate::store::{encode_row, Batch, MAX_BATCH_ROWS};

/// Store table prefix of audit entries.
pub const TABLE: &str = "l";
/// Entries waiting for the writer; beyond it entries are counted as dropped.
pub const QUEUE: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Position in `ops.audit`; orders the trail. (Records in the topic carry
    /// 0 here: their offset is their position.)
    pub seq: u64,
    /// When the call finished, ms since the epoch.
    pub at_ms: i64,
    /// Who: `local` in protected mode, else `<role>#<token index>`.
    pub principal: String,
    /// `operator`, `teller`, `viewer`, or `local`.
    pub role: String,
    /// Method and route, e.g. `POST /api/v1/control/pause`.
    pub action: String,
    /// The path and query as called, e.g. `/api/v1/control/pause?wait=true`.
    pub parameters: String,
    /// The caller's address.
    pub source: String,
    /// HTTP status of the answer.
    pub status: u16,
    /// `ok`, `refused` (4xx) or `failed` (5xx).
    pub outcome: String,
}

/// The sending side, held by the HTTP layer.
pub struct AuditLog {
    queue: mpsc::Sender<AuditEntry>,
    /// Entries dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl AuditLog {
    /// Queues an entry without waiting; a full queue drops it (counted).
    pub fn record(&self, entry: AuditEntry) {
        if self.queue.try_send(entry).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("audit queue full: entry dropped");
        }
    }
}

/// Starts the writer task; returns the handle the HTTP layer records with.
pub fn start(shared: &Arc<Shared>) -> AuditLog {
    let (queue, receiver) = mpsc::channel(QUEUE);
    shared.tracker.spawn(writer(shared.clone(), receiver));
    AuditLog {
        queue,
        dropped: AtomicU64::new(0),
    }
}

async fn writer(shared: Arc<Shared>, mut receiver: mpsc::Receiver<AuditEntry>) {
    let mut batch = Vec::with_capacity(MAX_BATCH_ROWS);
    loop {
        let stopping = tokio::select! {
            received = receiver.recv_many(&mut batch, MAX_BATCH_ROWS) => received == 0,
            () = shared.processors_stop.cancelled() => true,
        };
        if stopping {
            // Write what is still queued, then stop with the processors.
            while let Ok(entry) = receiver.try_recv() {
                batch.push(entry);
            }
        }
        for chunk in std::mem::take(&mut batch).chunks(MAX_BATCH_ROWS) {
            if let Err(error) = write(&shared, chunk.to_vec()).await {
                tracing::error!(%error, "audit entries not written");
            }
        }
        if stopping {
            return;
        }
    }
}

async fn write(shared: &Shared, mut entries: Vec<AuditEntry>) -> Result<(), RuntimeError> {
    let tp = TopicPartition::new(shared.topics.audit.clone(), 0);
    let records = entries
        .iter()
        .map(|e| Record {
            key: Bytes::from(e.principal.clone().into_bytes()),
            value: Bytes::from(serde_json::to_vec(e).expect("plain struct serializes")),
            timestamp_ms: e.at_ms,
        })
        .collect();
    let first = shared.log.append(&tp, records).await?;
    let mut batch = Batch::default();
    for (n, entry) in entries.iter_mut().enumerate() {
        entry.seq = first + n as u64;
        batch.insert(row_key(entry.seq).as_bytes(), encode_row(entry));
    }
    let keep = shared.config.limits.audit_entries as u64;
    if let Some(last) = entries.last() {
        // Trim the oldest beyond the bound, one batch's worth per write.
        for seq in (last.seq + 1).saturating_sub(keep + entries.len() as u64)
            ..(last.seq + 1).saturating_sub(keep)
        {
            batch.remove(row_key(seq).as_bytes());
        }
    }
    shared.store.apply(batch)?;
    Ok(())
}

fn row_key(seq: u64) -> String {
    format!("{TABLE}/{seq:020}")
}
