//! Pillar 4, the operational plane: the dead letter queue and the audit
//! trail (and, as they land, error logs, lineage tools, automation).

pub mod audit;
pub mod dlq;
