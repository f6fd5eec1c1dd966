//! The `Idempotency-Key` header on the calls that move money or change an
//! account, those the OpenAPI document lists it on (the convention of
//! Stripe, Adyen and the IETF httpapi draft): the same key with the same
//! call (method, path, body) gets the first answer again, marked
//! `Idempotent-Replayed: true`; with another call, 409. Two calls with one
//! key at once: the second gets 409 and may retry. Answers are kept by
//! `ops::idempotency` for as long as payments.
//!
//! The handlers see the key ([`IdempotencyKey`]) and make the effect itself
//! idempotent with it: a payment without an id takes the key as its id, a
//! batch's items without one `<key>.<index>`, a deposit without an id the
//! key. So a retry after a crash that lost the kept answer still moves the
//! money once.

use std::collections::HashSet;
use std::sync::Mutex;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State as Extract};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::State;
use crate::model::now_ms;
use crate::ops::idempotency::{self, Answer, MAX_ANSWER_BYTES};

/// The request header.
pub const HEADER: &str = "idempotency-key";
/// The header on a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";

/// The key a call was made with, for its handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(pub String);

/// Keys whose first call is being answered now.
#[derive(Default)]
pub struct InFlight(Mutex<HashSet<String>>);

struct Claim<'a> {
    keys: &'a InFlight,
    key: String,
}

impl InFlight {
    fn claim(&self, key: &str) -> Option<Claim<'_>> {
        let mut keys = self.0.lock().expect("keys lock");
        keys.insert(key.to_owned()).then(|| Claim {
            keys: self,
            key: key.to_owned(),
        })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.keys.0.lock().expect("keys lock").remove(&self.key);
    }
}

/// Whether an answer is the call's answer for good: a success, or a refusal
/// of the call itself. Not kept: auth refusals (a retry with a token may
/// succeed), unavailable and storage answers (a retry later may), errors.
fn kept(status: StatusCode) -> bool {
    status.is_success() || matches!(status.as_u16(), 400 | 404 | 409 | 413 | 415 | 422)
}

/// The operations that take the header, as (method, route): those the
/// OpenAPI document says take it.
#[derive(Default)]
pub struct Keyed(HashSet<(Method, String)>);

impl Keyed {
    /// Reads them from the document.
    pub fn from_document(api: &utoipa::openapi::OpenApi) -> Self {
        let mut keyed = HashSet::new();
        for (path, item) in &api.paths.paths {
            let operations = [
                (Method::POST, &item.post),
                (Method::PUT, &item.put),
                (Method::PATCH, &item.patch),
                (Method::DELETE, &item.delete),
            ];
            for (method, operation) in operations {
                let takes = (operation.as_ref().and_then(|o| o.parameters.as_ref()))
                    .is_some_and(|ps| ps.iter().any(|p| p.name.eq_ignore_ascii_case(HEADER)));
                if takes {
                    keyed.insert((method, path.clone()));
                }
            }
        }
        Self(keyed)
    }
}

/// The middleware, inside auth (an unauthorised call never reaches it).
pub async fn layer(
    Extract((state, keyed)): Extract<(State, std::sync::Arc<Keyed>)>,
    request: Request,
    next: Next,
) -> Response {
    // Only the operations that take a key; any other goes on as it came (a
    // method the route does not take gets its 405).
    let route = request.extensions().get::<axum::extract::MatchedPath>();
    let takes = route.is_some_and(|r| {
        keyed
            .0
            .contains(&(request.method().clone(), r.as_str().to_owned()))
    });
    let Some(value) = request.headers().get(HEADER).filter(|_| takes) else {
        return next.run(request).await;
    };
    let key = match value
        .to_str()
        .map_err(|_| "Idempotency-Key is not text".to_owned())
    {
        Ok(key) => key.trim().to_owned(),
        Err(message) => return ApiError::BadRequest(message).into_response(),
    };
    if let Err(message) = idempotency::validate_key(&key) {
        return ApiError::BadRequest(message).into_response();
    }
    let (parts, body) = request.into_parts();
    let limit = state.runtime.config().server.max_body_bytes;
    let Ok(bytes) = to_bytes(body, limit).await else {
        return ApiError::TooLarge.into_response();
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let print = idempotency::fingerprint(parts.method.as_str(), path, &bytes);
    let Some(_claim) = state.keys_in_flight.claim(&key) else {
        return ApiError::ConflictAs(
            "idempotency_key_in_use",
            format!("a call with Idempotency-Key {key} is being answered; retry once it is"),
        )
        .into_response();
    };
    match idempotency::find(&state.runtime, &key) {
        Ok(Some(answer)) if answer.fingerprint == print => return replay(answer),
        Ok(Some(_)) => {
            return ApiError::Conflict(format!(
                "Idempotency-Key {key} was used for another call (method, path or body differ)"
            ))
            .into_response()
        }
        Ok(None) => {}
        Err(error) => return ApiError::from(error).into_response(),
    }
    let mut request = Request::from_parts(parts, Body::from(bytes));
    request.extensions_mut().insert(IdempotencyKey(key.clone()));
    let response = next.run(request).await;
    let status = response.status();
    if !kept(status) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(body) = to_bytes(body, MAX_ANSWER_BYTES).await else {
        return ApiError::Internal("an answer too large to keep".into()).into_response();
    };
    let answer = Answer {
        fingerprint: print,
        status: status.as_u16(),
        content_type: (parts.headers.get(header::CONTENT_TYPE))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: body.to_vec(),
        at_ms: now_ms(),
    };
    if let Err(error) = idempotency::keep(&state.runtime, &key, &answer) {
        tracing::warn!(%error, key, "the answer to a keyed call is not kept");
    }
    Response::from_parts(parts, Body::from(body))
}

fn replay(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
    let mut response = (status, Body::from(answer.body)).into_response();
    let headers = response.headers_mut();
    if let Some(value) = answer
        .content_type
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    response
}
