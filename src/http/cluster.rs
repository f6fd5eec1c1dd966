//! `/api/v1/cluster`: the group this instance belongs to, its generation,
//! every member with its URL and partitions, and the partitions this
//! instance's tasks act as owner for.

use axum::extract::State as Extract;
use axum::http::HeaderMap;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{ApiError, Query};
use super::forward::{self, Scope, ScopeQuery};
use super::State;
use crate::cluster::MemberState;

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new().routes(routes!(cluster))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ClusterView {
    /// Whether this instance shares its partitions through a group
    /// (`cluster.scale_out` on Kafka); otherwise it owns every partition.
    pub scale_out: bool,
    /// The consumer group (`cluster.group`).
    pub group: String,
    /// `single` (no group), `joining`, `stable` or `stopped`.
    #[schema(example = "stable")]
    pub state: String,
    /// The group's generation (0 without a group or between generations).
    pub generation: i32,
    /// This instance's member id (`null` without one).
    #[serde(rename = "self")]
    pub self_id: Option<String>,
    /// Every member of the generation, as the group's leader assigned it.
    pub members: Vec<MemberInfo>,
    /// The partitions this instance's tasks append for now.
    pub acting: Vec<u32>,
    /// Payments completed per second on the partitions this instance owns,
    /// over the last complete throughput window.
    pub completed_per_second: f64,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct MemberInfo {
    pub id: String,
    /// Its HTTP API.
    pub url: String,
    pub partitions: Vec<u32>,
    /// `stable` (its tasks act for every partition it owns), `taking_over`
    /// (some still catch up to the last owner's checkpoint), `rebalancing`
    /// (it is between generations, or in another one), or `unreachable`
    /// (it did not answer in time). `null` in a member's own part.
    pub state: Option<String>,
    /// Payments it completed per second, over the last complete window
    /// (`null` when it did not answer, and in a member's own part).
    pub completed_per_second: Option<f64>,
}

/// The group and who owns which partition: the same from every member,
/// each member's state as it reports it (`?scope=member`: this member's
/// own view only).
#[utoipa::path(get, path = "/api/v1/cluster", tag = "control", params(ScopeQuery),
    responses((status = 200, body = ClusterView)))]
async fn cluster(
    Extract(state): Extract<State>,
    Query(query): Query<ScopeQuery>,
    headers: HeaderMap,
) -> Result<Json<ClusterView>, ApiError> {
    let mut view = own_view(&state);
    if query.scope.unwrap_or_default() == Scope::Member || view.state != "stable" {
        return Ok(Json(view));
    }
    let mine = member_state(&view, &view.generation, &view.acting);
    let parts = forward::gather::<ClusterView>(&state, "/api/v1/cluster", &[], &headers).await?;
    for member in &mut view.members {
        let (state, rate) = match (parts.iter().flatten()).find(|(m, _)| m.id == member.id) {
            None => (mine.clone(), Some(view.completed_per_second)),
            Some((_, Ok(part))) => (
                member_state(part, &view.generation, &member.partitions),
                Some(part.completed_per_second),
            ),
            Some((_, Err(_))) => ("unreachable".into(), None),
        };
        member.state = Some(state);
        member.completed_per_second = rate;
    }
    Ok(Json(view))
}

/// A member's state, from its own view, against the generation asked in.
fn member_state(part: &ClusterView, generation: &i32, owned: &[u32]) -> String {
    match () {
        () if part.state != "stable" || part.generation != *generation => "rebalancing".into(),
        () if owned.iter().all(|p| part.acting.contains(p)) => "stable".into(),
        () => "taking_over".into(),
    }
}

/// Completions per second on the owned partitions, in the last complete window.
fn completed_per_second(state: &State) -> f64 {
    let owned = state.runtime.ownership().owned();
    let windows = state.runtime.windows_of(|p| owned.owns(p));
    let now = crate::model::now_ms();
    let complete = (windows.windows.iter().rev()).find(|w| w.start_ms + windows.window_ms <= now);
    complete.map_or(0.0, |w| {
        w.count as f64 * 1_000.0 / windows.window_ms.max(1) as f64
    })
}

/// The group as this instance sees it, without the other members' states.
fn own_view(state: &State) -> ClusterView {
    let config = state.runtime.config();
    let member = state.membership.get().map(|states| states.borrow().clone());
    let mut view = ClusterView {
        scale_out: config.scales_out(),
        group: config.cluster.group.clone(),
        state: "single".into(),
        generation: 0,
        self_id: None,
        members: Vec::new(),
        acting: state
            .runtime
            .ownership()
            .acting_partitions()
            .into_iter()
            .collect(),
        completed_per_second: completed_per_second(state),
    };
    match member {
        None => {}
        Some(MemberState::Joining) => view.state = "joining".into(),
        Some(MemberState::Stopped(_)) => view.state = "stopped".into(),
        Some(MemberState::Stable(assignment)) => {
            view.state = "stable".into();
            view.generation = assignment.generation;
            view.self_id = Some(assignment.member_id);
            view.members = (assignment.members.into_iter())
                .map(|m| MemberInfo {
                    id: m.id,
                    url: m.url,
                    partitions: m.partitions,
                    state: None,
                    completed_per_second: None,
                })
                .collect();
        }
    }
    view
}
