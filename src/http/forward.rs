//! Answers on a cluster: a read about one key is answered by the member
//! that owns the key's partition, whichever member is asked, and the views
//! that span every partition gather each member's part.
//!
//! - [`owner_of`] says where a key's partition is answered: here (this
//!   instance's task acts as its owner), at another member's URL, or
//!   nowhere for now (the group is rebalancing: 503 with the reason, never
//!   an answer from a copy that may be behind).
//! - [`forward`] asks the owner, one hop with a deadline. The request is
//!   marked as forwarded, so that a member which no longer owns the
//!   partition (a rebalance in between) answers 503 instead of passing it on.
//! - [`gather`] asks every other member for its part of a view
//!   (`?scope=member`), all at once, each with the same deadline.
//!
//! Every answer on a cluster names the member that gave it
//! (`X-Kpay-Answered-By`). Without a group (the embedded log, or Kafka
//! without `cluster.scale_out`) everything is answered here.

use std::sync::LazyLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::State;
use crate::cluster::{MemberState, MemberView};

/// Longest wait for another member's answer.
pub const DEADLINE: Duration = Duration::from_secs(1);

/// Marks a request one member passes to another (its value: the sender's URL).
pub static FORWARDED: HeaderName = HeaderName::from_static("x-kpay-forwarded");

/// Names the member whose state an answer comes from (its URL).
pub static ANSWERED_BY: HeaderName = HeaderName::from_static("x-kpay-answered-by");

/// Largest answer taken from another member.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

static CLIENT: LazyLock<reqwest::Client> = LazyLock::new(|| {
    reqwest::Client::builder()
        .timeout(DEADLINE)
        .connect_timeout(DEADLINE)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client without TLS always builds")
});

/// Whose view a request asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The whole cluster's: this member's part and every other member's.
    #[default]
    Cluster,
    /// Only this member's part: the partitions it owns (how members ask each other).
    Member,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ScopeQuery {
    /// `cluster` (default) or `member`; the same without a group.
    #[param(inline)]
    pub scope: Option<Scope>,
}

/// Where a read about one partition is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// By this instance: no group, or it owns the partition and its task
    /// `processor` acts as owner.
    Here,
    /// By the member at this URL.
    At(String),
}

/// Who answers about `partition`, as far as `processor`'s task goes; 503
/// while nobody can answer with the partition's current state.
pub fn owner_of(
    state: &State,
    processor: &'static str,
    partition: u32,
    headers: &HeaderMap,
) -> Result<Owner, ApiError> {
    let Some(membership) = state.membership.get() else {
        return Ok(Owner::Here);
    };
    let assignment = match &*membership.borrow() {
        MemberState::Stable(assignment) => assignment.clone(),
        MemberState::Joining => {
            return Err(ApiError::Unavailable(format!(
                "the cluster is rebalancing: partition {partition} has no owner yet; retry shortly"
            )))
        }
        MemberState::Stopped(why) => {
            return Err(ApiError::Unavailable(format!(
                "this instance has left the group ({why}); ask another member"
            )))
        }
    };
    let Some(owner) = (assignment.members.iter()).find(|m| m.partitions.contains(&partition))
    else {
        return Err(ApiError::Unavailable(format!(
            "partition {partition} has no owner in generation {}; retry shortly",
            assignment.generation
        )));
    };
    if owner.id != assignment.member_id {
        return match headers.contains_key(&FORWARDED) {
            // One hop only: the sender's view of the group is out of date.
            true => Err(ApiError::Unavailable(format!(
                "partition {partition} moved to {} (a rebalance is under way); retry shortly",
                owner.url
            ))),
            false => Ok(Owner::At(owner.url.clone())),
        };
    }
    match state.runtime.ownership().acts_for(processor, partition) {
        true => Ok(Owner::Here),
        false => Err(ApiError::Unavailable(format!(
            "partition {partition} is being taken over by this instance; retry shortly"
        ))),
    }
}

/// This instance's URL as the group knows it (`None` without a group).
pub fn self_url(state: &State) -> Option<String> {
    let membership = state.membership.get()?;
    match &*membership.borrow() {
        MemberState::Stable(a) => (a.members.iter())
            .find(|m| m.id == a.member_id)
            .map(|m| m.url.clone()),
        _ => None,
    }
}

/// Tags a response answered here with this instance's URL, on a cluster.
pub fn answered_here(state: &State, mut response: Response) -> Response {
    if let Some(url) = self_url(state).and_then(|u| HeaderValue::from_str(&u).ok()) {
        response.headers_mut().insert(ANSWERED_BY.clone(), url);
    }
    response
}

/// The request `uri` (`GET`) asked of the owner at `url`, with the caller's
/// credentials, passed back as the owner answered it (status, body, content type).
pub async fn forward(
    state: &State,
    url: &str,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let path_and_query = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let answer = get(state, url, path_and_query, &[], headers).await?;
    let status = StatusCode::from_u16(answer.status().as_u16())
        .map_err(|_| unreachable_owner(url, "an invalid status"))?;
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    let body = read_bounded(url, answer).await?;
    let mut response = (status, Body::from(body)).into_response();
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
    }
    if let Ok(value) = HeaderValue::from_str(url) {
        response.headers_mut().insert(ANSWERED_BY.clone(), value);
    }
    Ok(response)
}

/// Every other member's part of a view: `GET {member}{path}?{query}&scope=member`,
/// all at once; each an answer or why there is none.
/// `None` without a group; 503 while the group rebalances.
pub async fn gather<T: DeserializeOwned>(
    state: &State,
    path: &str,
    query: &[(&str, &str)],
    headers: &HeaderMap,
) -> Result<Option<Vec<(MemberView, Result<T, ApiError>)>>, ApiError> {
    let Some(membership) = state.membership.get() else {
        return Ok(None);
    };
    let assignment =
        match &*membership.borrow() {
            MemberState::Stable(assignment) => assignment.clone(),
            _ => return Err(ApiError::Unavailable(
                "the cluster is rebalancing: the members' parts do not add up yet; retry shortly"
                    .into(),
            )),
        };
    let others = (assignment.members.into_iter()).filter(|m| m.id != assignment.member_id);
    let asks = others.map(|member| async move {
        let query = [query, &[("scope", "member")]].concat();
        let part = ask(state, &member.url, path, &query, headers).await;
        (member, part)
    });
    Ok(Some(futures::future::join_all(asks).await))
}

/// [`gather`], when every member's part is needed: 503 naming the first
/// member without one.
pub async fn gather_all<T: DeserializeOwned>(
    state: &State,
    path: &str,
    query: &[(&str, &str)],
    headers: &HeaderMap,
) -> Result<Option<Vec<T>>, ApiError> {
    let Some(parts) = gather(state, path, query, headers).await? else {
        return Ok(None);
    };
    let parts = parts.into_iter().map(|(_, part)| part);
    parts.collect::<Result<Vec<T>, ApiError>>().map(Some)
}

/// One member's answer to `GET {url}{path}?{query}`, read as `T` if it is a 200.
async fn ask<T: DeserializeOwned>(
    state: &State,
    url: &str,
    path: &str,
    query: &[(&str, &str)],
    headers: &HeaderMap,
) -> Result<T, ApiError> {
    let answer = get(state, url, path, query, headers).await?;
    let status = answer.status();
    let body = read_bounded(url, answer).await?;
    if status != reqwest::StatusCode::OK {
        return Err(ApiError::Unavailable(format!(
            "member {url} answered {path} with {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    serde_json::from_slice(&body)
        .map_err(|e| unreachable_owner(url, &format!("an unreadable answer ({e})")))
}

async fn get(
    state: &State,
    url: &str,
    path_and_query: &str,
    query: &[(&str, &str)],
    headers: &HeaderMap,
) -> Result<reqwest::Response, ApiError> {
    let mut request = CLIENT.get(format!("{url}{path_and_query}")).query(query);
    if let Some(credentials) = headers.get(header::AUTHORIZATION) {
        request = request.header(header::AUTHORIZATION, credentials);
    }
    let from = self_url(state).unwrap_or_default();
    request
        .header(FORWARDED.clone(), from)
        .send()
        .await
        .map_err(|e| unreachable_owner(url, &e.to_string()))
}

async fn read_bounded(url: &str, mut answer: reqwest::Response) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    while let Some(chunk) =
        (answer.chunk().await).map_err(|e| unreachable_owner(url, &e.to_string()))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(unreachable_owner(url, "an answer over 16 MiB"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn unreachable_owner(url: &str, why: &str) -> ApiError {
    ApiError::Unavailable(format!(
        "member {url} did not answer in time ({why}); the group drops it if it stays silent"
    ))
}
