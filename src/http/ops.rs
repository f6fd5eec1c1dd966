//! The operational plane over HTTP: the dead letter queue (list, inspect,
//! replay, delete), the audit trail, the error log, and raw record injection
//! for DLQ drills.

use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::Extension;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::auth::{Caller, Principal};
use super::error::{ApiError, ErrorBody, JsonBody, Path, Query};
use super::State;
use crate::ops::dlq::{self, DeadLetter, Filter};

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new()
        .routes(routes!(list_dead_letters))
        .routes(routes!(get_dead_letter, delete_dead_letter))
        .routes(routes!(replay_dead_letter))
        .routes(routes!(inject_records))
        .routes(routes!(audit_log))
        .routes(routes!(error_log))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DlqQuery {
    /// At most this many (default 100).
    pub limit: Option<usize>,
    /// Continue after this id (the `next` of the previous page).
    pub after: Option<String>,
    /// `waiting` (default) or `replayed`.
    #[param(schema_with = dlq_statuses)]
    pub status: Option<String>,
    /// Only this error class: `decode`, `unauthenticated`, `unexpected_event`,
    /// `impossible_state`, `overflow`, `expired` (another: 400).
    #[param(schema_with = dlq_classes)]
    pub class: Option<String>,
    /// Only records from this input topic (`payment.incoming`,
    /// `payment.inflight`, `payment.complete`, `control.commands` by
    /// default; another: 400).
    pub topic: Option<String>,
    /// Only records this processor gave up on: `inflight`, `account`,
    /// `confirmed`, `control` (another: 400).
    #[param(schema_with = dlq_processors)]
    pub processor: Option<String>,
}

/// A string parameter that takes one of `values`, as the OpenAPI document states it.
fn one_of_schema(values: &[&str]) -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(values.iter().copied()))
        .build()
}

fn dlq_statuses() -> utoipa::openapi::Object {
    one_of_schema(&["waiting", "replayed"])
}

fn dlq_classes() -> utoipa::openapi::Object {
    one_of_schema(crate::runtime::dead_letter::CLASSES)
}

fn dlq_processors() -> utoipa::openapi::Object {
    one_of_schema(crate::runtime::dead_letter::PROCESSORS)
}

fn audit_classes() -> utoipa::openapi::Object {
    one_of_schema(&["admin", "submission"])
}

fn log_levels() -> utoipa::openapi::Object {
    one_of_schema(&["warn", "error"])
}

const AUDIT_ROLES: &[&str] = &["operator", "teller", "viewer", "local", "none"];
const AUDIT_OUTCOMES: &[&str] = &["ok", "refused", "failed"];

fn audit_roles() -> utoipa::openapi::Object {
    one_of_schema(AUDIT_ROLES)
}

fn audit_outcomes() -> utoipa::openapi::Object {
    one_of_schema(AUDIT_OUTCOMES)
}

#[derive(Serialize, ToSchema)]
pub struct DeadLetterView {
    #[serde(flatten)]
    pub letter: DeadLetter,
    /// `waiting` for an operator, or `replayed`.
    #[schema(example = "waiting")]
    pub status: String,
    /// The value (or its kept prefix) as text when it is UTF-8 (JSON
    /// records, typos), else absent.
    pub value_text: Option<String>,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(letter: DeadLetter) -> Self {
        let status = match letter.replay.as_ref().and_then(|r| r.offset) {
            Some(_) => "replayed",
            None => "waiting",
        };
        let value_text = dlq::unhex(&letter.value_hex).ok().and_then(|mut bytes| {
            // A kept prefix may end inside a character: the text stops before it.
            if let Err(error) = std::str::from_utf8(&bytes) {
                if letter.truncated && error.error_len().is_none() {
                    bytes.truncate(error.valid_up_to());
                }
            }
            String::from_utf8(bytes).ok()
        });
        Self {
            letter,
            status: status.to_owned(),
            value_text,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct DeadLetterList {
    pub items: Vec<DeadLetterView>,
    /// Dead letters waiting in all (not only this page).
    pub waiting: u64,
    /// Pass as `after` for the next page; absent on the last one.
    pub next: Option<String>,
}

/// Dead letters in (topic, partition, offset) order, paged and filtered.
#[utoipa::path(get, path = "/api/v1/dlq", tag = "operations", params(DlqQuery),
    responses((status = 200, body = DeadLetterList), (status = 400, body = ErrorBody)))]
async fn list_dead_letters(
    Extract(state): Extract<State>,
    Query(query): Query<DlqQuery>,
) -> Result<Json<DeadLetterList>, ApiError> {
    let limit = super::page_limit(&state, query.limit, 100)?;
    let replayed = match query.status.as_deref() {
        None | Some("waiting") => false,
        Some("replayed") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "status {other:?} is not one of waiting, replayed"
            )))
        }
    };
    use crate::runtime::dead_letter::{CLASSES, PROCESSORS};
    let topics = state.runtime.topics();
    let inputs = [
        &topics.incoming,
        &topics.inflight,
        &topics.complete,
        &topics.commands,
    ];
    let inputs: Vec<&str> = inputs.iter().map(|t| t.as_str()).collect();
    one_of("class", &query.class, CLASSES)?;
    one_of("topic", &query.topic, &inputs)?;
    one_of("processor", &query.processor, PROCESSORS)?;
    let filter = Filter {
        replayed,
        class: query.class,
        topic: query.topic,
        processor: query.processor,
    };
    let runtime = &state.runtime;
    let (items, next) = dlq::list(runtime, &filter, query.after.as_deref(), limit)?;
    Ok(Json(DeadLetterList {
        items: items.into_iter().map(DeadLetterView::from).collect(),
        waiting: dlq::waiting(runtime),
        next,
    }))
}

/// One dead letter, waiting or replayed, with its raw bytes.
#[utoipa::path(get, path = "/api/v1/dlq/{id}", tag = "operations",
    params(("id" = String, Path, description = "`<topic>:<partition>:<offset>:<processor>`")),
    responses((status = 200, body = DeadLetterView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn get_dead_letter(
    Extract(state): Extract<State>,
    Path(id): Path<String>,
) -> Result<Json<DeadLetterView>, ApiError> {
    dlq::find(&state.runtime, &id)?
        .map(|letter| Json(letter.into()))
        .ok_or_else(|| ApiError::NotFound(format!("dead letter {id} not found")))
}

/// Deletes a dead letter (the record stays in its topic until retention).
#[utoipa::path(delete, path = "/api/v1/dlq/{id}", tag = "operations",
    params(("id" = String, Path, description = "`<topic>:<partition>:<offset>:<processor>`")),
    responses((status = 204, description = "Deleted"), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn delete_dead_letter(
    Extract(state): Extract<State>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    dlq::delete(&state.runtime, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// A corrected value as text (at most one of `value`, `value_hex`).
    pub value: Option<String>,
    /// A corrected value as hex-encoded bytes.
    #[schema(example = "02000b6f726465722d31303031")]
    pub value_hex: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ReplayResponse {
    /// The letter with its replay: where and when it landed.
    pub dead_letter: DeadLetterView,
    /// True when it had been replayed before: nothing new was appended.
    pub already_replayed: bool,
}

/// Appends the dead letter's event (as stored, or corrected) to its source
/// topic, on the partition its key belongs to; processed exactly once.
/// Replaying again answers with the first replay and appends nothing.
#[utoipa::path(post, path = "/api/v1/dlq/{id}/replay", tag = "operations",
    params(("id" = String, Path, description = "`<topic>:<partition>:<offset>:<processor>`")),
    request_body(content = Option<ReplayRequest>),
    responses((status = 200, body = ReplayResponse), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 422, description = "The value does not decode or does not belong on the topic", body = ErrorBody)))]
async fn replay_dead_letter(
    Extract(state): Extract<State>,
    Caller(who): Caller,
    Path(id): Path<String>,
    body: Option<JsonBody<ReplayRequest>>,
) -> Result<Json<ReplayResponse>, ApiError> {
    let request = body.map(|JsonBody(b)| b).unwrap_or_default();
    let correction = match (request.value, request.value_hex) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "send at most one of value and value_hex".into(),
            ))
        }
        (Some(text), None) => Some(text.into_bytes()),
        (None, Some(hex)) => Some(dlq::unhex(&hex).map_err(ApiError::BadRequest)?),
        (None, None) => None,
    };
    let done = dlq::replay(&state.runtime, &id, correction, &who.principal).await?;
    Ok(Json(ReplayResponse {
        dead_letter: done.letter.into(),
        already_replayed: done.already,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InjectRecord {
    /// The record key (decides the partition when none is given).
    #[serde(default)]
    pub key: String,
    /// The value as text (exactly one of `value`, `value_hex`).
    pub value: Option<String>,
    /// The value as hex-encoded bytes.
    pub value_hex: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InjectRequest {
    /// One of kpay's topics, e.g. `payment.incoming`.
    #[schema(example = "payment.incoming")]
    pub topic: String,
    /// Partition for every record; by default each record's key decides.
    pub partition: Option<u32>,
    /// Records appended in this order (per partition, in one append).
    pub records: Vec<InjectRecord>,
}

#[derive(Serialize, ToSchema)]
pub struct InjectedRecord {
    pub partition: u32,
    pub offset: u64,
}

#[derive(Serialize, ToSchema)]
pub struct InjectResponse {
    pub topic: String,
    /// Where each record landed, in request order per partition.
    pub records: Vec<InjectedRecord>,
}

/// Appends raw records to a topic, bypassing every check of the API: for
/// tests and DLQ drills. Off unless `ops.raw_records = true`
/// (`KPAY_OPS__RAW_RECORDS`), and then for an operator token only: refused
/// in protected mode (no tokens). `ops.audit`, `ops.logs` and `payment.dlq`
/// are never writable here. Records are appended as given, unsigned: with
/// `cluster.secret` set, those on the internal topics (and binary ones on
/// `payment.incoming`) are dead-lettered as `unauthenticated`.
#[utoipa::path(post, path = "/api/v1/ops/records", tag = "operations",
    request_body = InjectRequest,
    responses((status = 201, body = InjectResponse), (status = 400, body = ErrorBody),
        (status = 403, description = "No tokens are configured (protected mode), the token is \
            not an operator's, or the topic is one of ops.audit, ops.logs, payment.dlq", body = ErrorBody),
        (status = 404, description = "Raw records are off (ops.raw_records = false, the default)",
            body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn inject_records(
    Extract(state): Extract<State>,
    who: Option<Extension<Principal>>,
    JsonBody(request): JsonBody<InjectRequest>,
) -> Result<(StatusCode, Json<InjectResponse>), ApiError> {
    let runtime = &state.runtime;
    may_inject(&state, who.as_ref().map(|Extension(p)| p), &request.topic)?;
    let max = runtime.config().limits.max_batch_payments;
    if request.records.is_empty() || request.records.len() > max {
        return Err(ApiError::BadRequest(format!(
            "records must hold 1 to {max} records"
        )));
    }
    let mut records = Vec::with_capacity(request.records.len());
    for (n, record) in request.records.into_iter().enumerate() {
        let value = match (record.value, record.value_hex) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(hex)) => {
                dlq::unhex(&hex).map_err(|e| ApiError::BadRequest(format!("records[{n}]: {e}")))?
            }
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "records[{n}]: send exactly one of value and value_hex"
                )))
            }
        };
        records.push((record.key, value));
    }
    let landed = dlq::inject(runtime, &request.topic, request.partition, records).await?;
    tracing::info!(topic = %request.topic, records = landed.len(), "raw records injected");
    Ok((
        StatusCode::CREATED,
        Json(InjectResponse {
            topic: request.topic,
            records: landed
                .into_iter()
                .map(|(partition, offset)| InjectedRecord { partition, offset })
                .collect(),
        }),
    ))
}

/// Whether `who` may inject into `topic`: the setting, an operator token,
/// and never the journals or the dead letter queue, whose entries others
/// trust as kpay's own account of what happened.
fn may_inject(state: &State, who: Option<&Principal>, topic: &str) -> Result<(), ApiError> {
    let config = state.runtime.config();
    if !config.ops.raw_records {
        return Err(ApiError::NotFound(
            "raw record injection is off: set ops.raw_records = true \
             (KPAY_OPS__RAW_RECORDS=true) and use an operator token"
                .into(),
        ));
    }
    if config.tokens.is_empty() {
        return Err(ApiError::Forbidden(
            "raw record injection needs an operator token; with no tokens \
             configured (protected mode) it is refused"
                .into(),
        ));
    }
    if who.map(|p| p.role) != Some(crate::config::Role::Operator.as_str()) {
        return Err(ApiError::Forbidden(
            "raw record injection needs an operator token".into(),
        ));
    }
    let topics = &config.topics;
    if [&topics.audit, &topics.logs, &topics.dlq].contains(&&topic.to_owned()) {
        return Err(ApiError::Forbidden(format!(
            "topic {topic} is never writable through raw record injection"
        )));
    }
    Ok(())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// At most this many entries, newest first (default 100).
    pub limit: Option<usize>,
    /// `admin` (default: control and administrative calls) or `submission`
    /// (payments and accounts).
    #[param(schema_with = audit_classes)]
    pub class: Option<String>,
    /// A substring of `METHOD route`, e.g. `control` or `POST`.
    pub action: Option<String>,
    /// Exactly this principal, e.g. `operator#0`.
    pub principal: Option<String>,
    /// `operator`, `teller`, `viewer`, `local` or `none`.
    #[param(schema_with = audit_roles)]
    pub role: Option<String>,
    /// `ok`, `refused` or `failed`.
    #[param(schema_with = audit_outcomes)]
    pub outcome: Option<String>,
    /// At or after this time, ms since the epoch.
    pub since: Option<i64>,
    /// At or before this time, ms since the epoch.
    pub until: Option<i64>,
    /// Only entries strictly older than this seq (the `next_before` of the page before).
    pub before: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditList {
    /// The class listed: `admin` or `submission`.
    #[schema(example = "admin")]
    pub class: String,
    pub items: Vec<crate::ops::audit::AuditEntry>,
    /// Pass as `before` for the next page; absent on the last one.
    pub next_before: Option<u64>,
}

/// Checks that `value`, when given, is one of `allowed`.
fn one_of(key: &str, value: &Option<String>, allowed: &[&str]) -> Result<(), ApiError> {
    match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(ApiError::BadRequest(format!(
            "{key} {v:?} is not one of {}",
            allowed.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// The audit trail of one class, newest first, filtered (every filter
/// given must match) and paged by seq.
#[utoipa::path(get, path = "/api/v1/logs/audit", tag = "operations", params(AuditQuery),
    responses((status = 200, body = AuditList), (status = 400, body = ErrorBody)))]
async fn audit_log(
    Extract(state): Extract<State>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<AuditList>, ApiError> {
    use crate::ops::audit::{self, Class, Filter};
    let limit = super::page_limit(&state, query.limit, 100)?;
    let class = match query.class.as_deref() {
        None => Class::Admin,
        Some(text) => Class::parse(text).ok_or_else(|| {
            ApiError::BadRequest(format!("class {text:?} is not one of admin, submission"))
        })?,
    };
    one_of("outcome", &query.outcome, AUDIT_OUTCOMES)?;
    one_of("role", &query.role, AUDIT_ROLES)?;
    // Positions are Kafka-style offsets (int64 in the API document): a
    // larger cursor names no entry and is refused like any bad value.
    if query.before.is_some_and(|before| before > i64::MAX as u64) {
        return Err(ApiError::BadRequest(
            "before must be a seq between 0 and 9223372036854775807".into(),
        ));
    }
    super::check_times([("since", query.since), ("until", query.until)])?;
    if let (Some(since), Some(until)) = (query.since, query.until) {
        if since > until {
            return Err(ApiError::BadRequest("since must not be after until".into()));
        }
    }
    let filter = Filter {
        action: query.action.filter(|a| !a.is_empty()),
        principal: query.principal,
        role: query.role,
        outcome: query.outcome,
        since: query.since,
        until: query.until,
        ..Filter::class(class)
    };
    let (items, next_before) = audit::page(&state.runtime, &filter, query.before, limit)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(AuditList {
        class: class.as_str().to_owned(),
        items,
        next_before,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ErrorLogQuery {
    /// At most this many entries, newest first (default 100).
    pub limit: Option<usize>,
    /// Only `warn` or only `error`.
    #[param(schema_with = log_levels)]
    pub level: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorLogList {
    pub items: Vec<crate::ops::logs::LogEntry>,
}

/// WARN and ERROR events with their context (processor, topic, partition,
/// offset, payment id, …), newest first.
#[utoipa::path(get, path = "/api/v1/logs/errors", tag = "operations", params(ErrorLogQuery),
    responses((status = 200, body = ErrorLogList), (status = 400, body = ErrorBody)))]
async fn error_log(
    Extract(state): Extract<State>,
    Query(query): Query<ErrorLogQuery>,
) -> Result<Json<ErrorLogList>, ApiError> {
    let limit = super::page_limit(&state, query.limit, 100)?;
    let level = query.level.as_deref();
    if let Some(other) =
        level.filter(|l| !["warn", "error"].contains(&l.to_ascii_lowercase().as_str()))
    {
        return Err(ApiError::BadRequest(format!(
            "level {other:?} is not one of warn, error"
        )));
    }
    let items = crate::ops::logs::newest(&state.runtime, level, limit)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(ErrorLogList { items }))
}
