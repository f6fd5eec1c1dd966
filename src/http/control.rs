//! `/api/v1/control`: pause (with drain) and resume, as commands through the log.

use std::time::Duration;

use axum::extract::State as Extract;
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::auth::Caller;
use super::error::{ApiError, ErrorBody, JsonBody, Query};
use super::forward::{self, Scope, ScopeQuery};
use super::State;
use crate::control::{self, ControlStatus};
use crate::model::ControlAction;

/// Longest `?wait=true` on pause.
const MAX_WAIT_MS: u64 = 300_000;

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(rate_limit))
}

/// Highest admission rate that can be set, payments per second.
const MAX_RATE_PER_SECOND: u64 = 10_000_000;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRequest {
    /// Admissions per second; 0 = unlimited.
    #[schema(example = 1000)]
    pub payments_per_second: u64,
    /// Why, recorded with the command.
    pub reason: Option<String>,
}

/// Limit admissions (a token bucket); changeable at runtime, 0 = unlimited.
#[utoipa::path(put, path = "/api/v1/control/rate-limit", tag = "control",
    request_body = RateLimitRequest,
    responses((status = 200, body = ControlStatus), (status = 400, body = ErrorBody)))]
async fn rate_limit(
    Extract(state): Extract<State>,
    Caller(who): Caller,
    headers: HeaderMap,
    JsonBody(request): JsonBody<RateLimitRequest>,
) -> Result<Json<ControlStatus>, ApiError> {
    if request.payments_per_second > MAX_RATE_PER_SECOND {
        return Err(ApiError::BadRequest(format!(
            "payments_per_second is at most {MAX_RATE_PER_SECOND} (0 = unlimited)"
        )));
    }
    let reason = reason(Some(JsonBody(CommandRequest {
        reason: request.reason,
    })))?;
    let action = ControlAction::SetRateLimit(request.payments_per_second);
    control::command(&state.runtime, action, &who.principal, reason).await?;
    Ok(Json(status_after_command(&state, &headers).await?))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// Why, recorded with the command.
    #[schema(example = "end-of-day reconciliation")]
    pub reason: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PauseQuery {
    /// Return only once nothing admitted is still in flight.
    pub wait: Option<bool>,
    /// Bound of that wait, ms (default 30000, at most 300000).
    pub timeout_ms: Option<u64>,
}

/// Running, draining or paused; what is in flight and queued. On a cluster,
/// `queued` adds up every member's owned partitions.
#[utoipa::path(get, path = "/api/v1/control/status", tag = "control", params(ScopeQuery),
    responses((status = 200, body = ControlStatus),
              (status = 503, body = ErrorBody, description = "The cluster is rebalancing, or a member did not answer")))]
async fn status(
    Extract(state): Extract<State>,
    Query(query): Query<ScopeQuery>,
    headers: HeaderMap,
) -> Result<Json<ControlStatus>, ApiError> {
    Ok(Json(
        status_in(&state, query.scope.unwrap_or_default(), &headers).await?,
    ))
}

/// The status a command answers with: the cluster's, or this member's part
/// when the others cannot be asked now (the command is applied either way).
async fn status_after_command(
    state: &State,
    headers: &HeaderMap,
) -> Result<ControlStatus, ApiError> {
    match status_in(state, Scope::Cluster, headers).await {
        Err(ApiError::Unavailable(_)) => status_in(state, Scope::Member, headers).await,
        other => other,
    }
}

/// The control status of the whole cluster, or of this member's part.
async fn status_in(
    state: &State,
    scope: Scope,
    headers: &HeaderMap,
) -> Result<ControlStatus, ApiError> {
    let owned = state.runtime.ownership().owned();
    let mut status = control::status(&state.runtime, |p| owned.owns(p)).await?;
    if scope == Scope::Cluster {
        let parts = forward::gather_all::<Queued>(state, "/api/v1/control/status", &[], headers);
        let parts = parts.await?.unwrap_or_default();
        status.queued += parts.iter().map(|part| part.queued).sum::<u64>();
    }
    Ok(status)
}

/// A member's part of the control status that adds up.
#[derive(Deserialize)]
struct Queued {
    queued: u64,
}

fn reason(body: Option<JsonBody<CommandRequest>>) -> Result<Option<String>, ApiError> {
    let reason = body.and_then(|JsonBody(b)| b.reason);
    if reason.as_ref().is_some_and(|r| r.len() > 500) {
        return Err(ApiError::BadRequest(
            "reason is longer than 500 bytes".into(),
        ));
    }
    Ok(reason)
}

/// Stop admitting new payments; admitted ones finish (drain). Submissions are
/// still accepted and wait as `accepted`. `?wait=true` returns once drained.
#[utoipa::path(post, path = "/api/v1/control/pause", tag = "control", params(PauseQuery),
    request_body(content = Option<CommandRequest>),
    responses((status = 200, body = ControlStatus), (status = 400, body = ErrorBody)))]
async fn pause(
    Extract(state): Extract<State>,
    Caller(who): Caller,
    headers: HeaderMap,
    Query(query): Query<PauseQuery>,
    body: Option<JsonBody<CommandRequest>>,
) -> Result<Json<ControlStatus>, ApiError> {
    let timeout_ms = query.timeout_ms.unwrap_or(30_000);
    if timeout_ms > MAX_WAIT_MS {
        return Err(ApiError::BadRequest(format!(
            "timeout_ms is at most {MAX_WAIT_MS}"
        )));
    }
    control::command(
        &state.runtime,
        ControlAction::Pause,
        &who.principal,
        reason(body)?,
    )
    .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        // Drained when the local copy of every partition has nothing in flight.
        let now = control::status(&state.runtime, |_| false).await?;
        if !query.wait.unwrap_or(false)
            || now.state != "draining"
            || tokio::time::Instant::now() >= deadline
        {
            return Ok(Json(status_after_command(&state, &headers).await?));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Admit again, from exactly where intake stopped.
#[utoipa::path(post, path = "/api/v1/control/resume", tag = "control",
    request_body(content = Option<CommandRequest>),
    responses((status = 200, body = ControlStatus), (status = 400, body = ErrorBody)))]
async fn resume(
    Extract(state): Extract<State>,
    Caller(who): Caller,
    headers: HeaderMap,
    body: Option<JsonBody<CommandRequest>>,
) -> Result<Json<ControlStatus>, ApiError> {
    control::command(
        &state.runtime,
        ControlAction::Resume,
        &who.principal,
        reason(body)?,
    )
    .await?;
    Ok(Json(status_after_command(&state, &headers).await?))
}
