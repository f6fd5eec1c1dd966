//! `/api/v1/generator`: start and stop the payment generator, and its status.

use axum::extract::State as Extract;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, ErrorBody, JsonBody};
use super::State;
use crate::generator::{GeneratorError, GeneratorStatus, Settings};

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new().routes(routes!(status, command))
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GeneratorAction {
    Start,
    Stop,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GeneratorRequest {
    /// `start` (again: restart with these settings) or `stop`.
    pub action: GeneratorAction,
    /// Payments per second (start; default 100).
    #[schema(example = 200)]
    pub rate: Option<i64>,
    /// Accounts `gen-00000`, … to use (start; default `generator.accounts`).
    #[schema(example = 1000)]
    pub accounts: Option<i64>,
    /// Zipf exponent of account choice: 0 uniform, 1.1 a few hot accounts (start; default 0).
    #[schema(example = 0.0)]
    pub skew: Option<f64>,
}

/// Whether the generator runs, with what settings, and what it has sent.
#[utoipa::path(get, path = "/api/v1/generator", tag = "generator",
    responses((status = 200, body = GeneratorStatus)))]
async fn status(Extract(state): Extract<State>) -> Json<GeneratorStatus> {
    Json(state.generator.status())
}

/// Starts (opening its accounts) or stops the generator. It submits through
/// the same path as `POST /payments`, sends nothing while paused and never
/// faster than the rate limit.
#[utoipa::path(post, path = "/api/v1/generator", tag = "generator",
    request_body = GeneratorRequest,
    responses((status = 200, body = GeneratorStatus), (status = 400, body = ErrorBody)))]
async fn command(
    Extract(state): Extract<State>,
    JsonBody(request): JsonBody<GeneratorRequest>,
) -> Result<Json<GeneratorStatus>, ApiError> {
    match request.action {
        GeneratorAction::Stop => Ok(Json(state.generator.stop())),
        GeneratorAction::Start => {
            let config = &state.runtime.config().generator;
            // Out-of-range numbers become 0, which the bounds check refuses by name.
            let settings = Settings {
                rate_per_second: request.rate.map_or(100, |r| u64::try_from(r).unwrap_or(0)),
                accounts: request
                    .accounts
                    .map_or(config.accounts, |a| u32::try_from(a).unwrap_or(0)),
                skew: request.skew.unwrap_or(0.0),
            };
            match state.generator.start(settings).await {
                Ok(status) => Ok(Json(status)),
                Err(GeneratorError::Invalid(message)) => Err(ApiError::BadRequest(message)),
                Err(GeneratorError::Runtime(error)) => Err(error.into()),
            }
        }
    }
}
