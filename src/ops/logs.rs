//! The error log: a `tracing` layer that sends every WARN and ERROR event,
//! with its fields as context (processor, topic, partition, offset, payment
//! id, …), to a journal: the `ops.logs` topic and the newest entries in the
//! store for `GET /api/v1/logs/errors`. Logs to stdout are unaffected.
//!
//! The layer is process-wide (installed by `main`); it forwards to the
//! journal opened last, and drops events while none is open.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use utoipa::ToSchema;

use super::journal::{Entry, Journal, JournalWriter, Target};
use crate::config::Config;
use crate::model::now_ms;
use crate::runtime::Runtime;

/// Store table prefix of error log entries.
pub const TABLE: &str = "e";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogEntry {
    /// Position in `ops.logs`; orders the log.
    pub seq: u64,
    /// When it was logged, ms since the epoch.
    pub at_ms: i64,
    /// `WARN` or `ERROR`.
    #[schema(example = "WARN")]
    pub level: String,
    /// The module that logged it.
    #[schema(example = "kpay::runtime::task")]
    pub target: String,
    /// What happened.
    #[schema(example = "dead-lettered")]
    pub message: String,
    /// The event's context fields, e.g. `processor`, `topic`, `partition`,
    /// `offset`, `payment_id`, `reason`.
    pub fields: BTreeMap<String, String>,
}

impl Entry for LogEntry {
    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }

    fn record_key(&self) -> String {
        self.level.clone()
    }

    fn at_ms(&self) -> i64 {
        self.at_ms
    }
}

/// Where the layer sends entries: the journal of the running runtime.
static SINK: RwLock<Option<Arc<Journal<LogEntry>>>> = RwLock::new(None);

/// Opens the error log's journal and points the layer at it, before the
/// runtime starts, so that what the runtime logs while starting queues up;
/// its writer starts once the runtime runs.
pub fn open(config: &Config) -> JournalWriter<LogEntry> {
    let target = Target {
        topic: config.topics.logs.clone(),
        table: TABLE,
        keep: config.limits.error_log_entries,
    };
    let (journal, writer) = Journal::new(target);
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(journal));
    writer
}

/// Newest entries first, at most `limit`, optionally of one level.
pub fn newest(
    runtime: &Runtime,
    level: Option<&str>,
    limit: usize,
) -> Result<Vec<LogEntry>, crate::store::StoreError> {
    let Some(level) = level else {
        return runtime
            .store()
            .rows_before(TABLE, None)
            .take(limit)
            .collect();
    };
    // The table is bounded (`limits.error_log_entries`), so a full scan is too.
    let rows = runtime.store().rows_before::<LogEntry>(TABLE, None);
    rows.filter(|e| {
        e.as_ref()
            .map_or(true, |e| e.level.eq_ignore_ascii_case(level))
    })
    .take(limit)
    .collect()
}

/// The `tracing` layer; filter it to WARN and above when installing.
pub struct ErrorLayer;

impl<S: Subscriber> tracing_subscriber::Layer<S> for ErrorLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let metadata = event.metadata();
        // kpay's own events only: a library's retry chatter is not the
        // operator's error log (it still reaches stdout).
        let target = metadata.target();
        if *metadata.level() > Level::WARN
            || !target.starts_with("kpay")
            || target.starts_with(module_path!())
        {
            return;
        }
        let Some(journal) = SINK.read().ok().and_then(|sink| sink.clone()) else {
            return;
        };
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        journal.record(LogEntry {
            seq: 0,
            at_ms: now_ms(),
            level: metadata.level().to_string(),
            target: metadata.target().to_owned(),
            message: visitor.message,
            fields: visitor.fields,
        });
    }
}

/// Collects an event's message and fields as text.
#[derive(Default)]
struct Fields {
    message: String,
    fields: BTreeMap<String, String>,
}

/// Longest field value kept; longer ones are cut (a log is not a dump).
const MAX_FIELD_CHARS: usize = 1_000;

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.put(field, text);
    }
}

impl Fields {
    fn put(&mut self, field: &Field, mut value: String) {
        if let Some((cut, _)) = value.char_indices().nth(MAX_FIELD_CHARS) {
            value.truncate(cut);
            value.push('…');
        }
        if field.name() == "message" {
            self.message = value;
        } else if self.fields.len() < 32 {
            self.fields.insert(field.name().to_owned(), value);
        }
    }
}
