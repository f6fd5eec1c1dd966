//! `/api/v1/payments`: submit (one or a batch) and follow payments. HTTP types
//! are translated to events here; events never leak into responses.

use axum::extract::{OriginalUri, State as Extract};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::auth::Caller;
use super::error::{ApiError, ErrorBody, JsonBody, Path, Query};
use super::forward::{self, Owner, Scope};
use super::idempotency::IdempotencyKey;
use super::State;
use crate::model::{
    new_payment_id, partition_for, validate_id, Hop, PaymentRef, PaymentStatus, Submitter,
};
use crate::pipeline::inflight::{validate_payment, Inflight, PaymentState};
use crate::pipeline::Processor;
use crate::runtime::ingest::Admission;
use crate::runtime::payment_list::{Cursor, Listed, PaymentFilter};

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new()
        .routes(routes!(submit, list_payments))
        .routes(routes!(submit_batch))
        .routes(routes!(get_payment))
}

#[derive(Deserialize, Serialize, ToSchema, Clone)]
#[serde(deny_unknown_fields)]
pub struct PaymentRequest {
    /// Idempotency key; generated (UUID v7) when absent.
    #[schema(example = "order-1001")]
    pub id: Option<String>,
    #[schema(example = "demo-0001")]
    pub from: String,
    #[schema(example = "demo-0002")]
    pub to: String,
    /// Amount in cents (> 0, at most the configured maximum).
    #[schema(example = 1250)]
    pub amount: i64,
}

#[derive(Serialize, ToSchema)]
pub struct PaymentAccepted {
    #[schema(example = "order-1001")]
    pub id: String,
    /// `accepted` for a new payment, the current status for a repeat.
    #[schema(example = "accepted")]
    pub status: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub payments: Vec<PaymentRequest>,
}

#[derive(Serialize, ToSchema)]
pub struct BatchItem {
    /// HTTP status this payment would have had alone (202, 400, 409, 503, 507).
    pub status_code: u16,
    /// The payment's id: the one given, or the one made for it; `null` only
    /// for a refused item that came without one.
    pub id: Option<String>,
    pub status: Option<String>,
    pub error: Option<super::error::ErrorDetail>,
}

#[derive(Serialize, ToSchema)]
pub struct BatchResponse {
    /// One result per submitted payment, in order.
    pub results: Vec<BatchItem>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct HopView {
    /// `admitted`, `debited`, `credited`, `rejected`, `refunded`, `completed`.
    #[schema(example = "debited")]
    pub stage: String,
    /// The processor that took the step: `inflight` or `account`.
    #[schema(example = "account")]
    pub processor: String,
    /// The topic of the record it processed.
    #[schema(example = "payment.inflight")]
    pub topic: String,
    /// Partition and offset of that record.
    pub partition: u32,
    pub offset: u64,
    /// Time in: when the record was appended to the topic, ms since the epoch.
    pub received_at: i64,
    /// Time out: when the processor handled it, ms since the epoch.
    pub processed_at: i64,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct PaymentView {
    pub id: String,
    pub from: String,
    pub to: String,
    /// Cents.
    pub amount: i64,
    /// `accepted`, `inflight`, `held`, `confirmed`, `rejected` or `reversed`.
    #[schema(example = "confirmed")]
    pub status: String,
    /// For `rejected` and `reversed`: `insufficient_funds`, `unknown_account`, …
    pub reason: Option<String>,
    /// When it was accepted, ms since the epoch.
    pub accepted_at: i64,
    /// When it reached its terminal state.
    pub completed_at: Option<i64>,
    pub lineage: Vec<HopView>,
    /// Who submitted it, kept as long as the payment. `null` for a payment
    /// another producer wrote to `payment.incoming` without saying, or
    /// (with `cluster.secret`) whose attribution kpay did not sign.
    pub submitted_by: Option<SubmitterView>,
    /// With `single_inflight_debit`: the payer's payment this one waits
    /// for (status `accepted`), or waited for.
    pub waiting_for: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SubmitterView {
    /// As in the audit trail: `local`, `teller#0`, `generator`, …
    #[schema(example = "teller#0")]
    pub principal: String,
    /// The caller's address, or the component that submitted it.
    #[schema(example = "10.0.0.7:51234")]
    pub source: String,
}

impl From<Submitter> for SubmitterView {
    fn from(by: Submitter) -> Self {
        Self {
            principal: by.principal,
            source: by.source,
        }
    }
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct PaymentList {
    /// Newest first, by acceptance time (then id).
    pub items: Vec<PaymentView>,
    /// Pass as `after` for the next page; absent on the last page. A page
    /// whose filter matched little may end early (even empty) with one.
    pub next_after: Option<String>,
}

/// A payment's status, as a filter.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusFilter {
    Accepted,
    Inflight,
    Held,
    Confirmed,
    Rejected,
    Reversed,
}

impl From<StatusFilter> for PaymentStatus {
    fn from(status: StatusFilter) -> Self {
        match status {
            StatusFilter::Accepted => Self::Accepted,
            StatusFilter::Inflight => Self::Inflight,
            StatusFilter::Held => Self::Held,
            StatusFilter::Confirmed => Self::Confirmed,
            StatusFilter::Rejected => Self::Rejected,
            StatusFilter::Reversed => Self::Reversed,
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only payments in this status.
    #[param(inline)]
    pub status: Option<StatusFilter>,
    /// Only payments from this account.
    pub from: Option<String>,
    /// Only payments to this account.
    pub to: Option<String>,
    /// Only payments accepted at or after this time, ms since the epoch.
    #[param(minimum = 0)]
    pub since: Option<i64>,
    /// Only payments accepted at or before this time, ms since the epoch.
    #[param(minimum = 0)]
    pub until: Option<i64>,
    /// The `next_after` of the previous page.
    #[param(pattern = r"^[0-9]{1,18}\.[A-Za-z0-9_.:-]{0,64}$")]
    pub after: Option<String>,
    /// At most this many (default 50, at most the configured page limit).
    #[param(minimum = 1)]
    pub limit: Option<usize>,
    /// `cluster` (default) or `member` (only the partitions this instance owns).
    #[param(inline)]
    pub scope: Option<Scope>,
}

/// Checks a request and turns it into the payment to submit.
fn to_payment(state: &State, request: PaymentRequest) -> Result<PaymentRef, ApiError> {
    let id = match request.id {
        Some(id) => {
            validate_id(&id).map_err(|e| ApiError::BadRequest(format!("id {e}")))?;
            id
        }
        None => new_payment_id(),
    };
    let payment = PaymentRef {
        id,
        from: request.from,
        to: request.to,
        amount_cents: request.amount,
        accepted_at_ms: 0,
    };
    let max = state.runtime.config().limits.max_amount_cents;
    validate_payment(&payment, max).map_err(ApiError::BadRequest)?;
    Ok(payment)
}

async fn submit_one(
    state: &State,
    caller: &Caller,
    request: PaymentRequest,
) -> Result<PaymentAccepted, ApiError> {
    let payment = to_payment(state, request)?;
    let submitted_by = caller.0.clone();
    let admission = state.runtime.ingest().submit(payment, submitted_by).await?;
    Ok(match admission {
        Admission::Accepted(payment) => PaymentAccepted {
            id: payment.id,
            status: PaymentStatus::Accepted.as_str().into(),
        },
        Admission::Duplicate(payment, status) => PaymentAccepted {
            id: payment.id,
            status: status.as_str().into(),
        },
    })
}

/// Submit a payment. 202 means it is durable in the log; 507 means the data
/// directory's device is full (or below `data.min_free_bytes`) and nothing
/// was written: retry once space is freed.
#[utoipa::path(post, path = "/api/v1/payments", tag = "payments", request_body = PaymentRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the call safe to repeat: \
        the same key and body get the first answer again (`Idempotent-Replayed: true`), another body 409. \
        The key is the payment's id when the body has none. 1-40 characters of [A-Za-z0-9_.:-]; kept as long as payments.")),
    responses((status = 202, body = PaymentAccepted), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
              (status = 503, body = ErrorBody),
              (status = 507, description = "Insufficient storage: no space left on the device \
                holding the data directory (or less free than data.min_free_bytes); the \
                payment was not accepted, retry once space is freed", body = ErrorBody)))]
async fn submit(
    Extract(state): Extract<State>,
    caller: Caller,
    key: Option<axum::Extension<IdempotencyKey>>,
    JsonBody(mut request): JsonBody<PaymentRequest>,
) -> Result<(StatusCode, Json<PaymentAccepted>), ApiError> {
    // The key is the payment's id when the body has none: a retry after a
    // lost answer is then the same payment, not another.
    if let (None, Some(axum::Extension(IdempotencyKey(key)))) = (&request.id, key) {
        request.id = Some(key);
    }
    let accepted = submit_one(&state, &caller, request).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// Submit many payments; each gets its own result.
#[utoipa::path(post, path = "/api/v1/payments/batch", tag = "payments", request_body = BatchRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the batch as a whole safe \
        to repeat: the same key and body get the first answer again, another body 409; an item without \
        an id gets `<key>.<index>`.")),
    responses((status = 200, body = BatchResponse), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody, description = "The Idempotency-Key was used for another call, or is being answered"),
              (status = 413, body = ErrorBody)))]
async fn submit_batch(
    Extract(state): Extract<State>,
    caller: Caller,
    key: Option<axum::Extension<IdempotencyKey>>,
    JsonBody(mut request): JsonBody<BatchRequest>,
) -> Result<Json<BatchResponse>, ApiError> {
    // With a key, an item without an id is `<key>.<index>`: the batch
    // again is the same payments.
    if let Some(axum::Extension(IdempotencyKey(key))) = key {
        for (index, payment) in request.payments.iter_mut().enumerate() {
            payment.id.get_or_insert_with(|| format!("{key}.{index}"));
        }
    }
    let max = state.runtime.config().limits.max_batch_payments;
    if request.payments.is_empty() || request.payments.len() > max {
        return Err(ApiError::BadRequest(format!(
            "a batch holds 1 to {max} payments, got {}",
            request.payments.len()
        )));
    }
    // A refused item is answered with its own id, so clients need not
    // match answers by position.
    let ids: Vec<Option<String>> = request.payments.iter().map(|p| p.id.clone()).collect();
    let answers = join_all(
        request
            .payments
            .into_iter()
            .map(|p| submit_one(&state, &caller, p)),
    )
    .await;
    let results = answers
        .into_iter()
        .zip(ids)
        .map(|(answer, id)| match answer {
            Ok(accepted) => BatchItem {
                status_code: 202,
                id: Some(accepted.id),
                status: Some(accepted.status),
                error: None,
            },
            Err(error) => BatchItem {
                status_code: error.status().as_u16(),
                id,
                status: None,
                error: Some(error.body().error),
            },
        })
        .collect();
    Ok(Json(BatchResponse { results }))
}

fn hop_view(topics: &crate::config::TopicsConfig, hop: Hop) -> HopView {
    HopView {
        stage: hop.stage.as_str().to_owned(),
        processor: hop.stage.processor().to_owned(),
        topic: topics.name(hop.stage.input()).to_owned(),
        partition: hop.partition,
        offset: hop.offset,
        received_at: hop.received_at_ms,
        processed_at: hop.at_ms,
    }
}

pub(super) fn find(state: &State, id: &str) -> Result<Option<PaymentView>, ApiError> {
    if let Some(row) = state.runtime.payment(id)? {
        return Ok(Some(row_view(state, row)));
    }
    Ok(accepted_here(state, id))
}

/// A payment as the inflight processor has it.
fn row_view(state: &State, row: PaymentState) -> PaymentView {
    PaymentView {
        id: row.payment.id,
        from: row.payment.from,
        to: row.payment.to,
        amount: row.payment.amount_cents,
        status: row.status.as_str().into(),
        reason: row.reason.map(|r| r.as_str().into()),
        accepted_at: row.payment.accepted_at_ms,
        completed_at: row.completed_at_ms,
        lineage: (row.lineage.into_iter())
            .map(|hop| hop_view(state.runtime.topics(), hop))
            .collect(),
        submitted_by: row.submitted_by.map(SubmitterView::from),
        waiting_for: row.waiting_for,
    }
}

/// Payment `id` as accepted here and not yet admitted, if it is.
fn accepted_here(state: &State, id: &str) -> Option<PaymentView> {
    (state.runtime.ingest().accepted(id)).map(|(payment, by)| accepted_view(payment, by))
}

/// A payment accepted and not admitted yet.
fn accepted_view(payment: PaymentRef, by: Option<Submitter>) -> PaymentView {
    PaymentView {
        id: payment.id,
        from: payment.from,
        to: payment.to,
        amount: payment.amount_cents,
        status: PaymentStatus::Accepted.as_str().into(),
        reason: None,
        accepted_at: payment.accepted_at_ms,
        completed_at: None,
        lineage: Vec::new(),
        submitted_by: by.map(SubmitterView::from),
        waiting_for: None,
    }
}

/// A payment's status, reason and lineage (one entry per hop). On a cluster,
/// answered by the owner of the payment's partition; a payment that waits
/// in `payment.incoming` (admission paused) is known to the member that
/// accepted it until admitted.
#[utoipa::path(get, path = "/api/v1/payments/{id}", tag = "payments",
    params(("id" = String, Path, description = "Payment id")),
    responses((status = 200, body = PaymentView), (status = 404, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "The cluster is rebalancing, or the owner did not answer")))]
async fn get_payment(
    Extract(state): Extract<State>,
    Path(id): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    validate_id(&id).map_err(|e| ApiError::BadRequest(format!("id {e}")))?;
    let partition = partition_for(&id, state.runtime.config().log.partitions);
    let not_found = || {
        ApiError::NotFound(format!(
            "payment {id} not found (settled payments are kept for {} s)",
            state.runtime.config().limits.payment_retention_seconds
        ))
    };
    match forward::owner_of(&state, Inflight::NAME, partition, &headers)? {
        Owner::Here => {
            let view = find(&state, &id)?.ok_or_else(not_found)?;
            Ok(forward::answered_here(&state, Json(view).into_response()))
        }
        Owner::At(url) => {
            let answer = forward::forward(&state, &url, &uri, &headers).await?;
            match (answer.status(), accepted_here(&state, &id)) {
                (StatusCode::NOT_FOUND, Some(view)) => {
                    Ok(forward::answered_here(&state, Json(view).into_response()))
                }
                _ => Ok(answer),
            }
        }
    }
}

/// Payments newest first, by acceptance time, in pages: pass `next_after`
/// back as `after`. Every filter given must hold. On a cluster, each member
/// gives the page of the partitions it owns, and the pages are merged.
#[utoipa::path(get, path = "/api/v1/payments", tag = "payments", params(ListQuery),
    responses((status = 200, body = PaymentList), (status = 400, body = ErrorBody),
              (status = 503, body = ErrorBody, description = "A member did not answer")))]
async fn list_payments(
    Extract(state): Extract<State>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Result<Json<PaymentList>, ApiError> {
    let limit = super::page_limit(&state, query.limit, 50)?;
    let after = match query.after.as_deref() {
        None => None,
        Some(text) => Some(Cursor::parse(text).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "after {text:?} is not a cursor: pass the `next_after` of the previous page"
            ))
        })?),
    };
    for (name, id) in [("from", &query.from), ("to", &query.to)] {
        if let Some(id) = id {
            validate_id(id).map_err(|e| ApiError::BadRequest(format!("{name} {e}")))?;
        }
    }
    super::check_times([("since", query.since), ("until", query.until)])?;
    let filter = PaymentFilter {
        status: query.status.map(Into::into),
        from: query.from,
        to: query.to,
        since_ms: query.since,
        until_ms: query.until,
    };
    let owned = state.runtime.ownership().owned();
    let page = (state.runtime).payments_page(&filter, after.as_ref(), limit, |p| owned.owns(p))?;
    let items = (page.items.into_iter())
        .map(|item| match item {
            Listed::Row(row) => row_view(&state, row),
            Listed::Accepted(payment, by) => accepted_view(payment, by),
        })
        .collect();
    let mut list = PaymentList {
        items,
        next_after: page.next.map(|cursor| cursor.to_string()),
    };
    if query.scope.unwrap_or_default() == Scope::Cluster {
        // The same query of every other member, for its partitions.
        let numbers = [query.since, query.until].map(|at| at.map(|at| at.to_string()));
        let limit_text = limit.to_string();
        let texts = [
            ("status", filter.status.map(PaymentStatus::as_str)),
            ("from", filter.from.as_deref()),
            ("to", filter.to.as_deref()),
            ("since", numbers[0].as_deref()),
            ("until", numbers[1].as_deref()),
            ("after", query.after.as_deref()),
            ("limit", Some(limit_text.as_str())),
        ];
        let asked: Vec<(&str, &str)> = (texts.into_iter())
            .filter_map(|(name, value)| value.map(|value| (name, value)))
            .collect();
        let pages =
            forward::gather_all::<PaymentList>(&state, "/api/v1/payments", &asked, &headers);
        if let Some(pages) = pages.await? {
            list = merge_pages(std::iter::once(list).chain(pages), limit);
        }
    }
    Ok(Json(list))
}

/// Members' pages merged into one: the newest `limit`, and only down to
/// where the member that stopped highest stopped (below it, that member's
/// next payments are not in its page).
fn merge_pages(pages: impl Iterator<Item = PaymentList>, limit: usize) -> PaymentList {
    let key = |view: &PaymentView| Cursor {
        at_ms: view.accepted_at,
        id: view.id.clone(),
    };
    let mut bound: Option<Cursor> = None;
    let mut items = Vec::new();
    for page in pages {
        let stopped = page.next_after.as_deref().and_then(Cursor::parse);
        bound = bound.max(stopped);
        items.extend(page.items);
    }
    items.retain(|view| bound.as_ref().is_none_or(|b| key(view) >= *b));
    items.sort_by_key(|view| std::cmp::Reverse(key(view)));
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(key)
    } else {
        bound
    };
    PaymentList {
        items,
        next_after: next.map(|cursor| cursor.to_string()),
    }
}
