//! `GET /api/v1/stream`: server-sent events for the dashboard. Once a second
//! it pushes one `snapshot`: business metrics, control state, generator,
//! DLQ size, lag, goals and the last two minutes by the second.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State as Extract;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::metrics::SloList;
use super::State;
use crate::control::ControlStatus;
use crate::generator::GeneratorStatus;
use crate::instrument::live::LivePoint;
use crate::instrument::PipelineMetrics;

/// How often a snapshot is pushed.
const PERIOD: Duration = Duration::from_secs(1);

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new().routes(routes!(stream))
}

#[derive(Serialize, ToSchema)]
pub struct LagTotal {
    /// Records behind, over every task and input.
    pub records: u64,
    /// Age of the oldest record waiting, ms.
    pub oldest_age_ms: i64,
}

/// What one `snapshot` event carries.
#[derive(Serialize, ToSchema)]
pub struct Snapshot {
    /// When it was taken, ms since the epoch.
    pub at: i64,
    pub pipeline: PipelineMetrics,
    pub control: ControlStatus,
    pub generator: GeneratorStatus,
    /// Dead letters waiting for an operator.
    pub dlq_waiting: u64,
    pub lag: LagTotal,
    pub slo: SloList,
    /// The complete seconds of the last two minutes, oldest first.
    pub live: Vec<LivePoint>,
}

/// Builds one snapshot.
pub async fn snapshot(state: &State) -> Result<Snapshot, crate::runtime::RuntimeError> {
    let runtime = &state.runtime;
    // Queues and lag of the partitions this instance owns (all, without a group).
    let owned = runtime.ownership().owned();
    let lag = crate::instrument::lag::owned_lag(runtime).await?;
    let goals = crate::instrument::slo::status(runtime, &state.slo).await?;
    let at = crate::model::now_ms();
    Ok(Snapshot {
        at,
        pipeline: PipelineMetrics::new(&runtime.inflight_totals(), &runtime.confirmed_totals()),
        control: crate::control::status(runtime, |p| owned.owns(p)).await?,
        generator: state.generator.status(),
        dlq_waiting: crate::ops::dlq::waiting(runtime),
        lag: LagTotal {
            records: lag.iter().map(|l| l.lag_records).sum(),
            oldest_age_ms: lag.iter().map(|l| l.oldest_age_ms).max().unwrap_or(0),
        },
        slo: SloList {
            all_met: goals.iter().all(|g| g.met),
            goals,
        },
        live: state.live.points(at),
    })
}

/// Server-sent events: a `snapshot` (JSON, see the schema) every second,
/// until the client goes away or the server stops.
#[utoipa::path(get, path = "/api/v1/stream", tag = "metrics",
    responses((status = 200, description = "`text/event-stream` of `snapshot` events", body = Snapshot, content_type = "text/event-stream")))]
async fn stream(
    Extract(state): Extract<State>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (closing, shutdown) = (state.closing.clone(), state.runtime.intake_closing());
    let stop = async move {
        tokio::select! {
            () = closing.cancelled() => {}
            () = shutdown.cancelled() => {}
        }
    };
    let ticks = stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::time::sleep(PERIOD).await;
        }
        let event = match snapshot(&state).await {
            Ok(snapshot) => Event::default()
                .event("snapshot")
                .json_data(&snapshot)
                .unwrap_or_else(|e| Event::default().event("error").data(e.to_string())),
            Err(error) => Event::default().event("error").data(error.to_string()),
        };
        Some((Ok(event), (state, false)))
    });
    let ticks = futures::StreamExt::take_until(ticks, stop);
    Sse::new(ticks).keep_alive(KeepAlive::default())
}
