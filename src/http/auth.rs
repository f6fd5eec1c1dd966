//! Who may change what. Tokens and roles come from config or the environment
//! (`KPAY_TOKENS='s3cret:operator,t3ller:teller'`). Reads are open unless
//! `server.protect_reads` is set. With no token configured the server is in
//! protected mode: it listens on loopback only (start-up refuses anything
//! else) and lets its local clients act, so the local demo just works.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State as Extract};
use axum::http::request::Parts;
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::State;
use crate::config::Role;
use crate::model::Submitter;

/// Who made a request, for commands and the audit trail: `local` in
/// protected mode, else the role and the token's position in the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    /// `operator`, `teller`, `viewer`, `local`, or `none` (no valid token).
    pub role: &'static str,
}

/// Who is calling, as kept with what they submit: the principal and the
/// caller's address (`unknown` when the server was not told it).
pub struct Caller(pub Submitter);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let principal = (parts.extensions.get::<Principal>())
            .map_or_else(|| "local".to_owned(), |p| p.name.clone());
        let source = (parts.extensions.get::<ConnectInfo<SocketAddr>>())
            .map_or_else(|| "unknown".to_owned(), |c| c.0.to_string());
        Ok(Self(Submitter::new(principal, source)))
    }
}

/// Runs the request as `principal` and tags the response with it too, so
/// the audit layer outside sees who acted (or was refused).
async fn run_as(principal: Principal, mut request: Request, next: Next) -> Response {
    request.extensions_mut().insert(principal.clone());
    let mut response = next.run(request).await;
    response.extensions_mut().insert(principal);
    response
}

fn refuse(error: ApiError, principal: Principal) -> Response {
    let unauthorized = matches!(error, ApiError::Unauthorized(_));
    let mut response = error.into_response();
    if unauthorized {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response.extensions_mut().insert(principal);
    response
}

/// The role a request needs, from its method and path; `None`: open.
fn required_role(method: &Method, path: &str, protect_reads: bool) -> Option<Role> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return protect_reads.then_some(Role::Viewer);
    }
    let review = path.ends_with("/approve") || path.ends_with("/decline");
    if path.starts_with("/api/v1/accounts") || (path.starts_with("/api/v1/payments") && !review) {
        return Some(Role::Teller);
    }
    Some(Role::Operator)
}

/// Checks the bearer token of every API request against the role it needs.
pub async fn authorize(Extract(state): Extract<State>, request: Request, next: Next) -> Response {
    let tokens = &state.runtime.config().tokens;
    if tokens.is_empty() {
        let local = Principal {
            name: "local".into(),
            role: "local",
        };
        return run_as(local, request, next).await;
    }
    let protect_reads = state.runtime.config().server.protect_reads;
    let needed = required_role(request.method(), request.uri().path(), protect_reads);
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes().to_vec());
    let found = presented.and_then(|t| tokens.find(&t));
    let principal = match found {
        Some((index, role)) => Principal {
            name: format!("{}#{index}", role.as_str()),
            role: role.as_str(),
        },
        None => Principal {
            name: "anonymous".into(),
            role: "none",
        },
    };
    match (needed, found) {
        (None, _) => run_as(principal, request, next).await,
        (Some(_), None) => {
            let message = "send a valid token as `Authorization: Bearer <token>`";
            refuse(ApiError::Unauthorized(message.into()), principal)
        }
        (Some(needed), Some((_, role))) if role < needed => {
            let message = format!(
                "this token's role is {}; this needs {}",
                role.as_str(),
                needed.as_str()
            );
            refuse(ApiError::Forbidden(message), principal)
        }
        (Some(_), Some(_)) => run_as(principal, request, next).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Writes need teller (money) or operator (everything else); reads are open unless protected.
    #[test]
    fn roles_per_route() {
        let (get, post, put) = (Method::GET, Method::POST, Method::PUT);
        let cases = [
            (&get, "/api/v1/payments/x", false, None),
            (&get, "/api/v1/payments/x", true, Some(Role::Viewer)),
            (&post, "/api/v1/payments", false, Some(Role::Teller)),
            (&post, "/api/v1/accounts/a/close", false, Some(Role::Teller)),
            (&post, "/api/v1/control/pause", false, Some(Role::Operator)),
            (
                &post,
                "/api/v1/payments/p1/approve",
                false,
                Some(Role::Operator),
            ),
            (
                &post,
                "/api/v1/payments/p1/decline",
                false,
                Some(Role::Operator),
            ),
            (&put, "/api/v1/screening/rules", false, Some(Role::Operator)),
            (
                &put,
                "/api/v1/control/rate-limit",
                false,
                Some(Role::Operator),
            ),
        ];
        for (method, path, protect_reads, role) in cases {
            assert_eq!(
                required_role(method, path, protect_reads),
                role,
                "{method} {path}"
            );
        }
    }
}
