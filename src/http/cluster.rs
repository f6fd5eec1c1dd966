//! `/api/v1/cluster`: the group this instance belongs to, its generation,
//! every member with its URL and partitions, and the partitions this
//! instance's tasks act as owner for.

use axum::extract::State as Extract;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::State;
use crate::cluster::MemberState;

pub fn router() -> OpenApiRouter<State> {
    OpenApiRouter::new().routes(routes!(cluster))
}

#[derive(Serialize, ToSchema)]
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
}

#[derive(Serialize, ToSchema)]
pub struct MemberInfo {
    pub id: String,
    /// Its HTTP API.
    pub url: String,
    pub partitions: Vec<u32>,
}

/// The group and who owns which partition, as this instance sees it.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "control",
    responses((status = 200, body = ClusterView)))]
async fn cluster(Extract(state): Extract<State>) -> Json<ClusterView> {
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
                })
                .collect();
        }
    }
    Json(view)
}
