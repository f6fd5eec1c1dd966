//! Pillar 4, the operational plane: the dead letter queue (and, as they land,
//! error and audit logs, lineage tools, automation).

pub mod dlq;
