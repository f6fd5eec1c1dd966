//! `/api/v1/screening/rules` (the rules, changed as a command through
//! `control.commands`) and the review of held payments:
//! `POST /api/v1/payments/{id}/approve` and `/decline` (operator).

use std::time::Duration;

use axum::extract::{Path, State as Extract};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::auth::Caller;
use super::error::{ApiError, ErrorBody, JsonBody};
use super::forward::{self, Owner};
use super::payments::{find, PaymentView};
use super::State;
use crate::control;
use crate::model::{partition_for, validate_id, PaymentStatus, Reason, ScreeningRules, Stage};
use crate::pipeline::inflight::Inflight;
use crate::pipeline::Processor;

/// How long a review waits to see its outcome before it answers
/// (paused: the review waits in the log, and the answer says `held`).
const REVIEW_WAIT: Duration = Duration::from_secs(2);

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new()
        .routes(routes!(get_rules, put_rules))
        .routes(routes!(approve))
        .routes(routes!(decline))
}

/// The screening rules in force, and where they came from.
#[derive(Serialize, ToSchema)]
pub struct RulesView {
    pub rules: ScreeningRules,
    /// Offset in `control.commands` of the command that set them (`null`:
    /// never set, every rule off).
    pub version: Option<u64>,
    /// Whether every account partition screens with them yet.
    pub in_force: bool,
    /// Who set them, and why (the last control command's).
    pub set_by: Option<String>,
}

fn rules_view(state: &State) -> RulesView {
    let control = state.runtime.control_state();
    let applied = state.runtime.screening_applied();
    RulesView {
        in_force: control.screening_version.is_none_or(|v| applied >= Some(v)),
        rules: control.screening,
        version: control.screening_version,
        set_by: control.last_principal,
    }
}

/// The screening rules in force (a rule that is `null` is off).
#[utoipa::path(get, path = "/api/v1/screening/rules", tag = "screening",
    responses((status = 200, body = RulesView)))]
async fn get_rules(Extract(state): Extract<State>) -> Json<RulesView> {
    Json(rules_view(&state))
}

/// Replace the screening rules (operator). A command through
/// `control.commands`: ordered, audited, the same after a restart or
/// `kpay rebuild`. Answers once every account partition screens with them
/// (bounded; `in_force` says whether they do).
#[utoipa::path(put, path = "/api/v1/screening/rules", tag = "screening",
    request_body = ScreeningRules,
    responses((status = 200, body = RulesView), (status = 400, body = ErrorBody)))]
async fn put_rules(
    Extract(state): Extract<State>,
    Caller(who): Caller,
    JsonBody(rules): JsonBody<ScreeningRules>,
) -> Result<Json<RulesView>, ApiError> {
    rules.validate().map_err(ApiError::BadRequest)?;
    state.runtime.check_space()?;
    control::set_screening(&state.runtime, rules, &who.principal, None).await?;
    Ok(Json(rules_view(&state)))
}

/// A review's answer: the payment as it stands after the review.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ReviewAnswer {
    pub id: String,
    /// `approve` or `decline`.
    pub review: String,
    /// The payment's status now: `inflight` or later once approved,
    /// `rejected` once declined, still `held` while paused.
    pub status: String,
}

/// Send a held payment on to its debit (operator). Idempotent: approving
/// an approved payment answers 200 again. 409 for a payment that is not
/// held (or was declined). While paused, the approval waits in the log
/// and is admitted on resume (202, status `held`).
#[utoipa::path(post, path = "/api/v1/payments/{id}/approve", tag = "screening",
    params(("id" = String, Path, description = "Payment id")),
    responses((status = 200, body = ReviewAnswer, description = "Approved"),
              (status = 202, body = ReviewAnswer, description = "Approval recorded; applied on resume"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn approve(
    Extract(state): Extract<State>,
    Caller(who): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<ReviewAnswer>), ApiError> {
    review(&state, &who.principal, &id, true, &headers).await
}

/// End a held payment as `rejected`, reason `declined` (operator).
/// Idempotent like approve; 409 for a payment that is not held (or was
/// approved).
#[utoipa::path(post, path = "/api/v1/payments/{id}/decline", tag = "screening",
    params(("id" = String, Path, description = "Payment id")),
    responses((status = 200, body = ReviewAnswer, description = "Declined"),
              (status = 202, body = ReviewAnswer, description = "Decline recorded; applied on resume"),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn decline(
    Extract(state): Extract<State>,
    Caller(who): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<ReviewAnswer>), ApiError> {
    review(&state, &who.principal, &id, false, &headers).await
}

/// What a review did to a payment, as its row shows it.
fn reviewed(view: &PaymentView) -> Option<bool> {
    let stage = |s: Stage| view.lineage.iter().any(|h| h.stage == s.as_str());
    if stage(Stage::Approved) {
        return Some(true);
    }
    (stage(Stage::Declined) || view.reason.as_deref() == Some(Reason::Declined.as_str()))
        .then_some(false)
}

async fn review(
    state: &State,
    principal: &str,
    id: &str,
    approve: bool,
    headers: &HeaderMap,
) -> Result<(StatusCode, Json<ReviewAnswer>), ApiError> {
    validate_id(id).map_err(|e| ApiError::BadRequest(format!("id {e}")))?;
    let partition = partition_for(id, state.runtime.config().log.partitions);
    if let Owner::At(url) = forward::owner_of(state, Inflight::NAME, partition, headers)? {
        return Err(ApiError::Unavailable(format!(
            "payment {id} is kept by the member at {url}: send the review there"
        )));
    }
    let word = if approve { "approve" } else { "decline" };
    let answer = |code, status: &str| {
        let review = word.to_owned();
        let (id, status) = (id.to_owned(), status.to_owned());
        Ok((code, Json(ReviewAnswer { id, review, status })))
    };
    let view =
        find(state, id)?.ok_or_else(|| ApiError::NotFound(format!("payment {id} not found")))?;
    match reviewed(&view) {
        Some(done) if done == approve => return answer(StatusCode::OK, &view.status),
        _ if view.status != PaymentStatus::Held.as_str() => {
            return Err(ApiError::Conflict(format!(
                "payment {id} is {}, not held for review: it cannot be {word}d",
                view.status
            )));
        }
        _ => {}
    }
    let held = (view.lineage.iter().rev())
        .find(|h| h.stage == Stage::Held.as_str())
        .map(|h| (h.partition, h.offset))
        .ok_or_else(|| ApiError::Internal(format!("held payment {id} has no held hop")))?;
    state.runtime.check_space()?;
    state
        .runtime
        .append_review(id, approve, principal, held)
        .await?;
    let deadline = tokio::time::Instant::now() + REVIEW_WAIT;
    loop {
        let now = find(state, id)?.ok_or_else(|| ApiError::NotFound(format!("payment {id}")))?;
        match reviewed(&now) {
            Some(done) if done == approve => return answer(StatusCode::OK, &now.status),
            Some(_) => {
                return Err(ApiError::Conflict(format!(
                    "payment {id} was {} by another review first",
                    if approve { "declined" } else { "approved" }
                )))
            }
            None if tokio::time::Instant::now() >= deadline => {
                return answer(StatusCode::ACCEPTED, &now.status)
            }
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
