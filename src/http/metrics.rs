//! Business metrics and the ledger check (pillar 2's first answers).

use axum::extract::State as Extract;
use axum::Json;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::State;
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Query};
use super::forward::{self, Scope, ScopeQuery};
use crate::instrument::lag::LagView;
use crate::instrument::slo::SloStatus;
use crate::instrument::{Integrity, PipelineMetrics, ThroughputView};

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new()
        .routes(routes!(pipeline))
        .routes(routes!(integrity))
        .routes(routes!(throughput))
        .routes(routes!(lag))
        .routes(routes!(slo))
        .routes(routes!(prometheus))
}

/// Prometheus exposition (text format 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain"),
              (status = 503, body = super::error::ErrorBody)))]
async fn prometheus(Extract(state): Extract<State>) -> Result<impl IntoResponse, ApiError> {
    if !state.runtime.config().instrument.enabled {
        return Err(ApiError::Unavailable(
            "instrumentation is off (instrument.enabled = false)".into(),
        ));
    }
    let text = crate::instrument::prometheus::render(&state.runtime).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}

#[derive(Serialize, ToSchema)]
pub struct SloList {
    pub goals: Vec<SloStatus>,
    /// Every goal met.
    pub all_met: bool,
}

/// Business goals from config: each with its current value, met or not, since when.
#[utoipa::path(get, path = "/api/v1/metrics/slo", tag = "metrics",
    responses((status = 200, body = SloList), (status = 503, body = super::error::ErrorBody)))]
async fn slo(Extract(state): Extract<State>) -> Result<Json<SloList>, ApiError> {
    let goals = crate::instrument::slo::status(&state.runtime, &state.slo).await?;
    let all_met = goals.iter().all(|g| g.met);
    Ok(Json(SloList { goals, all_met }))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct LagList {
    /// One entry per task and input partition.
    pub items: Vec<LagView>,
    /// Sum of `lag_records`.
    pub total_lag_records: u64,
}

/// Consumer lag per processor and input partition. On a cluster, each
/// partition's lag as its owner reads it, gathered from every member.
#[utoipa::path(get, path = "/api/v1/metrics/lag", tag = "metrics", params(ScopeQuery),
    responses((status = 200, body = LagList), (status = 503, body = super::error::ErrorBody)))]
async fn lag(
    Extract(state): Extract<State>,
    Query(query): Query<ScopeQuery>,
    headers: HeaderMap,
) -> Result<Json<LagList>, ApiError> {
    let mut items = crate::instrument::lag::owned_lag(&state.runtime).await?;
    if query.scope.unwrap_or_default() == Scope::Cluster {
        let parts = forward::gather_all::<LagList>(&state, "/api/v1/metrics/lag", &[], &headers);
        items.extend(
            parts
                .await?
                .into_iter()
                .flatten()
                .flat_map(|part| part.items),
        );
        items.sort_by(|a, b| {
            (&a.processor, &a.topic, a.partition).cmp(&(&b.processor, &b.topic, b.partition))
        });
    }
    let total_lag_records = items.iter().map(|i| i.lag_records).sum();
    Ok(Json(LagList {
        items,
        total_lag_records,
    }))
}

/// Tumbling windows by completion time: count, amount, latency percentiles.
#[utoipa::path(get, path = "/api/v1/metrics/throughput", tag = "metrics",
    responses((status = 200, body = ThroughputView)))]
async fn throughput(Extract(state): Extract<State>) -> Json<ThroughputView> {
    let merged = state.runtime.windows();
    Json(ThroughputView::from(&merged))
}

/// Money inflight and confirmed, rejections and reversals.
#[utoipa::path(get, path = "/api/v1/metrics/pipeline", tag = "metrics",
    responses((status = 200, body = PipelineMetrics)))]
async fn pipeline(Extract(state): Extract<State>) -> Json<PipelineMetrics> {
    let runtime = &state.runtime;
    Json(PipelineMetrics::new(
        &runtime.inflight_totals(),
        &runtime.confirmed_totals(),
    ))
}

/// Conservation of money: balances + money in transit = money funded.
#[utoipa::path(get, path = "/api/v1/ledger/integrity", tag = "metrics",
    responses((status = 200, body = Integrity)))]
async fn integrity(Extract(state): Extract<State>) -> Json<Integrity> {
    Json(Integrity::from(&state.runtime.ledger()))
}
