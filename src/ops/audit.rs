//! The audit trail: every state-changing API call (control commands
//! included) with principal, role, action, parameters, source address,
//! outcome and time. Calls are queued to a journal that appends them to
//! `ops.audit` (for outside consumers) and keeps the newest entries in the
//! store for `GET /api/v1/logs/audit`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::journal::{Entry, Journal, Target};
use crate::runtime::Runtime;

/// Store table prefix of audit entries.
pub const TABLE: &str = "l";

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

impl Entry for AuditEntry {
    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }

    fn record_key(&self) -> String {
        self.principal.clone()
    }

    fn at_ms(&self) -> i64 {
        self.at_ms
    }
}

/// The sending side, held by the HTTP layer.
pub type AuditLog = Journal<AuditEntry>;

/// Starts the writer task; returns the handle the HTTP layer records with.
pub fn start(runtime: &Runtime) -> AuditLog {
    let target = Target {
        topic: runtime.topics().audit.clone(),
        table: TABLE,
        keep: runtime.config().limits.audit_entries,
    };
    Journal::start(runtime, target)
}
