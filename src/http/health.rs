//! Liveness and readiness probes.

use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::ApiError;
use super::State;

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(example = "ok")]
    pub status: String,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: the log answers, the data directory's device has room (free
/// space above `data.min_free_bytes`, and the last write did not find it
/// full), no processor is down (failed, waiting to be restarted), and every
/// processor has caught up with the log as it was at start.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, body = Health), (status = 503, body = super::error::ErrorBody)))]
async fn readyz(Extract(state): Extract<State>) -> Result<(StatusCode, Json<Health>), ApiError> {
    if state.runtime.intake_closing().is_cancelled() {
        return Err(ApiError::Unavailable("shutting down".into()));
    }
    if let Some(reason) = state.runtime.space().shortage() {
        return Err(ApiError::Unavailable(format!(
            "{reason}; intake answers 507 until space is freed"
        )));
    }
    if let Some(reason) = state.runtime.tasks_down().first() {
        return Err(ApiError::Unavailable(format!(
            "a processor is down: {reason}"
        )));
    }
    if !state.runtime.log().healthy() {
        return Err(ApiError::Unavailable(
            "the log (Kafka) is unavailable; intake answers 503 until it is back".into(),
        ));
    }
    if !state.runtime.ready() {
        return Err(ApiError::Unavailable(
            "processors are catching up with the log".into(),
        ));
    }
    Ok((
        StatusCode::OK,
        Json(Health {
            status: "ready".into(),
        }),
    ))
}
