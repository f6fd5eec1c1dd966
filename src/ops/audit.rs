//! The audit trail: every state-changing API call (control commands
//! included) with principal, role, action, parameters, source address,
//! outcome and time.
//!
//! Calls come in two classes, each a journal with its own store table and
//! bound, both appending to `ops.audit` (for outside consumers; the class
//! follows from the action's route):
//! - `admin`: control and administrative calls (everything but payments and
//!   accounts), few and precious. Each entry is awaited: the call is not
//!   answered until its entry is appended durably and stored, and payment
//!   traffic never pushes one out, because it is kept apart.
//! - `submission`: payment and account submissions, many; queued without
//!   waiting so that intake does not wait on the trail.
//!
//! `GET /api/v1/logs/audit` reads one class at a time, filtered and paged
//! by seq (the offset in `ops.audit`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::journal::{Entry, Journal, JournalError, Target};
use crate::runtime::Runtime;
use crate::store::StoreError;

/// Store table prefix of admin audit entries (and of every class before
/// the classes were kept apart; those rows are read by their route).
pub const TABLE: &str = "l";
/// Store table prefix of submission audit entries.
pub const SUBMISSIONS: &str = "s";

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

/// The class of an audited call, which decides where it is kept and whether
/// its caller waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Control and administration: awaited, kept in [`TABLE`].
    Admin,
    /// Payment and account submissions: queued, kept in [`SUBMISSIONS`].
    Submission,
}

impl Class {
    /// The class of an action (`METHOD route`) by its route.
    pub fn of(action: &str) -> Self {
        let route = action.split_once(' ').map_or(action, |(_, route)| route);
        if route.starts_with("/api/v1/payments") || route.starts_with("/api/v1/accounts") {
            Self::Submission
        } else {
            Self::Admin
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Self::Admin),
            "submission" => Some(Self::Submission),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Submission => "submission",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Self::Admin => TABLE,
            Self::Submission => SUBMISSIONS,
        }
    }
}

/// The sending side, held by the HTTP layer: one journal per class.
pub struct AuditLog {
    admin: Journal<AuditEntry>,
    submissions: Journal<AuditEntry>,
}

impl AuditLog {
    /// Records `entry` in its class: awaited until durable for admin calls,
    /// queued for submissions. An error means the entry is not in the trail
    /// (a full queue is counted as dropped).
    pub async fn record(&self, entry: AuditEntry) -> Result<Class, (Class, JournalError)> {
        match Class::of(&entry.action) {
            Class::Admin => match self.admin.record_durable(entry).await {
                Ok(_) => Ok(Class::Admin),
                Err(error) => Err((Class::Admin, error)),
            },
            Class::Submission if self.submissions.record(entry) => Ok(Class::Submission),
            Class::Submission => Err((Class::Submission, JournalError::Full)),
        }
    }
}

/// Starts both writer tasks; returns the handle the HTTP layer records with.
pub fn start(runtime: &Runtime) -> AuditLog {
    let limits = &runtime.config().limits;
    let target = |table, keep| Target {
        topic: runtime.topics().audit.clone(),
        table,
        keep,
    };
    AuditLog {
        admin: Journal::start(runtime, target(TABLE, limits.audit_entries)),
        submissions: Journal::start(
            runtime,
            target(SUBMISSIONS, limits.audit_submission_entries),
        ),
    }
}

/// Which entries a reader wants; every field set must match.
#[derive(Debug, Clone)]
pub struct Filter {
    pub class: Class,
    /// A substring of the action (`METHOD route`), e.g. `control`.
    pub action: Option<String>,
    pub principal: Option<String>,
    pub role: Option<String>,
    pub outcome: Option<String>,
    /// At or after this time, ms since the epoch.
    pub since: Option<i64>,
    /// At or before this time, ms since the epoch.
    pub until: Option<i64>,
}

impl Filter {
    /// All entries of one class.
    pub fn class(class: Class) -> Self {
        Self {
            class,
            action: None,
            principal: None,
            role: None,
            outcome: None,
            since: None,
            until: None,
        }
    }

    fn matches(&self, e: &AuditEntry) -> bool {
        let equal = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        Class::of(&e.action) == self.class
            && self.action.as_deref().is_none_or(|a| e.action.contains(a))
            && equal(&self.principal, &e.principal)
            && equal(&self.role, &e.role)
            && equal(&self.outcome, &e.outcome)
            && self.since.is_none_or(|t| e.at_ms >= t)
            && self.until.is_none_or(|t| e.at_ms <= t)
    }
}

/// Entries matching `filter` with a seq below `before`, newest first, at
/// most `limit`, and the `before` of the next page when there are more.
/// The table is bounded (its `limits.audit_*` key), so the scan is too;
/// paging by seq is exact: a page holds only entries strictly older than
/// the last one of the page before, and skips none.
pub fn page(
    runtime: &Runtime,
    filter: &Filter,
    before: Option<u64>,
    limit: usize,
) -> Result<(Vec<AuditEntry>, Option<u64>), StoreError> {
    let before = before.map(|seq| format!("{seq:020}"));
    let rows = runtime
        .store()
        .rows_before::<AuditEntry>(filter.class.table(), before.as_deref());
    let mut items = rows
        .filter(|row| row.as_ref().map_or(true, |e| filter.matches(e)))
        .take(limit + 1)
        .collect::<Result<Vec<_>, _>>()?;
    let more = items.len() > limit;
    items.truncate(limit);
    let next = more.then(|| items.last().map(|e| e.seq)).flatten();
    Ok((items, next))
}
