//! Pillar 4, the operational plane: the dead letter queue with replay, the
//! audit trail and the error log (both journals), and lineage (kept by the
//! inflight processor in each payment's row, shown by `GET /payments/{id}`),
//! and rebuilding the state from the log.

pub mod audit;
pub mod dlq;
pub mod idempotency;
pub mod journal;
pub mod logs;
pub mod rebuild;
pub mod store_size;
