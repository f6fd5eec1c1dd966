//! Cross-site requests. With no token configured (protected mode) kpay lets
//! its local clients act, and a browser is a local client too: any page the
//! operator has open could send a body-less POST (pause, close, replay) that
//! needs no CORS preflight, and a DNS-rebinding page, whose own name
//! resolves to 127.0.0.1, could read every answer. So in protected mode:
//! - every request needs a `Host` that is a loopback name or address, or is
//!   listed in `server.allowed_hosts` (else 403 `forbidden_host`);
//! - a change (any method but GET, HEAD, OPTIONS) is refused with 403
//!   `forbidden_origin` when it carries an `Origin` that is neither the
//!   server's own nor in `server.allowed_origins`, or carries
//!   `Sec-Fetch-Site: cross-site` without a listed `Origin`.
//!
//! curl sends no `Origin` and the dashboard sends its own, so both work.
//! With tokens neither check applies: a browser never sends a bearer token
//! on its own. In both modes CORS is answered for `server.allowed_origins`
//! only, and other origins get no CORS headers at all.

use std::time::Duration;

use axum::extract::{Request, State as Extract};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tower::{Layer, ServiceExt};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::error::{ErrorBody, ErrorDetail};
use super::State;
use crate::config::hosts::{host_name, is_loopback_name, origin_authority};
use crate::config::ServerConfig;

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// Longest part of a refused `Host` or `Origin` echoed in the answer and
/// the log: a client picks these values, and their size is its choice too.
const MAX_ECHOED_CHARS: usize = 100;

/// `value` for a message, cut to [`MAX_ECHOED_CHARS`] and quoted.
fn echoed(value: &str) -> String {
    let cut: String = value.chars().take(MAX_ECHOED_CHARS).collect();
    let more = if cut.len() < value.len() { "…" } else { "" };
    format!("{cut:?}{more}")
}

/// Why a request was refused; answered as 403 with its own code.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    Host(String),
    Origin(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (code, message) = match self {
            Self::Host(message) => ("forbidden_host", message),
            Self::Origin(message) => ("forbidden_origin", message),
        };
        tracing::warn!(code, %message, "cross-site request refused");
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message,
            },
        };
        (StatusCode::FORBIDDEN, Json(body)).into_response()
    }
}

/// The authority the client addressed: the `Host` header, or in HTTP/2
/// the request target's authority, which takes its place.
fn addressed_host(request: &Request) -> Option<&str> {
    match request.headers().get(header::HOST) {
        Some(value) => value.to_str().ok(),
        None => request.uri().authority().map(|a| a.as_str()),
    }
}

/// The Host check: `Ok` with the host when it is a loopback one or listed.
fn check_host<'a>(host: Option<&'a str>, server: &ServerConfig) -> Result<&'a str, Refusal> {
    let Some(host) = host else {
        return Err(Refusal::Host("the request has no valid Host header".into()));
    };
    let listed = |name: &str| {
        let allowed = &server.allowed_hosts;
        allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
    };
    match host_name(host) {
        Some(name) if is_loopback_name(name) || listed(name) => Ok(host),
        _ => Err(Refusal::Host(format!(
            "Host {} is neither a loopback name or address nor listed in \
             server.allowed_hosts; with no token configured kpay answers local names only",
            echoed(host)
        ))),
    }
}

/// Whether `origin` is one of `server.allowed_origins`.
fn is_listed(origin: &str, server: &ServerConfig) -> bool {
    let allowed = &server.allowed_origins;
    allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
}

/// The Origin check of a change whose Host passed: no `Origin` (curl), the
/// server's own (scheme http(s), same host and port) or a listed one, and
/// no `Sec-Fetch-Site: cross-site` unless the origin is listed (a listed
/// dashboard on another site is cross-site by definition).
fn check_origin(headers: &HeaderMap, host: &str, server: &ServerConfig) -> Result<(), Refusal> {
    let mut origins = headers.get_all(header::ORIGIN).iter();
    let (first, second) = (origins.next(), origins.next());
    let origin = first.map(|o| String::from_utf8_lossy(o.as_bytes()));
    let listed = second.is_none() && origin.as_deref().is_some_and(|o| is_listed(o, server));
    let fetch_site = headers.get("sec-fetch-site").map(HeaderValue::as_bytes);
    if !listed && fetch_site.is_some_and(|site| site.eq_ignore_ascii_case(b"cross-site")) {
        return Err(Refusal::Origin(
            "a change sent by another site's page (Sec-Fetch-Site: cross-site) is refused \
             when no token is configured"
                .into(),
        ));
    }
    let Some(origin) = origin else {
        return Ok(());
    };
    let own = origin_authority(&origin).is_some_and(|a| a.eq_ignore_ascii_case(host));
    if listed || (second.is_none() && own) {
        return Ok(());
    }
    Err(Refusal::Origin(format!(
        "a change from Origin {} is refused: it is not this server's origin nor \
         listed in server.allowed_origins, and no token is configured",
        echoed(&origin)
    )))
}

/// What protected mode refuses of `request`; `check_origin` for the API,
/// whose changes a page could send.
fn refusal(request: &Request, server: &ServerConfig, check_changes: bool) -> Option<Refusal> {
    let host = match check_host(addressed_host(request), server) {
        Ok(host) => host,
        Err(refusal) => return Some(refusal),
    };
    let reads = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !check_changes || reads {
        return None;
    }
    check_origin(request.headers(), host, server).err()
}

/// The Host and Origin checks of protected mode, for the API. It sits inside
/// the audit layer, so that a refused change is recorded as refused.
pub async fn guard(Extract(state): Extract<State>, request: Request, next: Next) -> Response {
    guarded(&state, request, next, true).await
}

/// The Host check of protected mode, for what is not the API (the web UI's
/// files and Swagger UI), which has only reads.
pub async fn guard_host(Extract(state): Extract<State>, request: Request, next: Next) -> Response {
    guarded(&state, request, next, false).await
}

/// Runs `request` unless protected mode refuses it (with tokens configured,
/// only the token counts); `changes` says whether the Origin check applies.
async fn guarded(state: &State, request: Request, next: Next, changes: bool) -> Response {
    let config = state.runtime.config();
    if !config.tokens.is_empty() {
        return next.run(request).await;
    }
    match refusal(&request, &config.server, changes) {
        Some(refused) => refused.into_response(),
        None => next.run(request).await,
    }
}

/// CORS for the origins in `server.allowed_origins` (preflights answered
/// here, before auth, since a browser sends them without the token). Other
/// requests pass untouched: tower-http's layer would answer every OPTIONS
/// and add its headers whatever the origin.
pub async fn cors(Extract(state): Extract<State>, request: Request, next: Next) -> Response {
    let server = &state.runtime.config().server;
    let origin = request.headers().get(header::ORIGIN);
    let listed = origin
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| is_listed(o, server));
    if !listed {
        let mut response = next.run(request).await;
        if !server.allowed_origins.is_empty() {
            // Answers differ by Origin once some origins get CORS headers,
            // so a shared cache must not hand one origin's answer to another.
            let vary = HeaderValue::from_static("origin");
            response.headers_mut().append(header::VARY, vary);
        }
        return response;
    }
    // Mirroring is safe: only a listed origin reaches this point.
    let layer = CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
        ])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .allow_private_network(true)
        .max_age(PREFLIGHT_MAX_AGE);
    match layer.layer(next).oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's headers, by name and value.
    type Headers<'a> = &'a [(&'a str, &'a str)];

    fn request(method: Method, headers: Headers) -> Request {
        let mut builder = Request::builder()
            .method(method)
            .uri("/api/v1/control/pause");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(axum::body::Body::empty()).unwrap()
    }

    fn code(refusal: Option<Refusal>) -> &'static str {
        match refusal {
            None => "allowed",
            Some(Refusal::Host(_)) => "forbidden_host",
            Some(Refusal::Origin(_)) => "forbidden_origin",
        }
    }

    // Every combination of Host, Origin and Sec-Fetch-Site the guard decides on, with the answer it must give.
    #[test]
    fn decisions() {
        let server = ServerConfig {
            allowed_hosts: vec!["kpay.internal".into()],
            allowed_origins: vec!["https://ops.example".into()],
            ..ServerConfig::default()
        };
        let local = ("host", "127.0.0.1:8080");
        // "method header answer": the header (name:value) besides the local
        // Host, or a Host of its own; "-" for none.
        let cases = [
            "POST - allowed",
            "POST origin:http://127.0.0.1:8080 allowed",
            "POST origin:http://127.0.0.1:9090 forbidden_origin",
            "POST origin:http://evil.example forbidden_origin",
            "POST origin:null forbidden_origin",
            "POST origin:https://ops.example allowed",
            "DELETE sec-fetch-site:cross-site forbidden_origin",
            "POST sec-fetch-site:same-origin allowed",
            "GET origin:http://evil.example allowed",
            "GET host:evil.example:8080 forbidden_host",
            "GET host:127.0.0.1.evil.example forbidden_host",
            "GET host:kpay.internal:1 allowed",
            "GET host:[::1]:8080 allowed",
        ];
        for case in cases {
            let [method, header, expected] = case.split(' ').collect::<Vec<_>>()[..] else {
                panic!("a case is three words: {case}");
            };
            let headers: Vec<(&str, &str)> = match header.split_once(':') {
                Some(own @ ("host", _)) => vec![own],
                Some(other) => vec![local, other],
                None => vec![local],
            };
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let decided = refusal(&request(method.clone(), &headers), &server, true);
            assert_eq!(code(decided), expected, "{method} {headers:?}");
        }
        let no_host = request(Method::GET, &[]);
        assert_eq!(code(refusal(&no_host, &server, true)), "forbidden_host");
        let two = request(
            Method::POST,
            &[
                local,
                ("origin", "http://127.0.0.1:8080"),
                ("origin", "http://evil.example"),
            ],
        );
        assert_eq!(code(refusal(&two, &server, true)), "forbidden_origin");
        let foreign = request(Method::POST, &[local, ("origin", "http://evil.example")]);
        assert_eq!(code(refusal(&foreign, &server, false)), "allowed");
        let long = format!("http://{}.example", "a".repeat(5_000));
        let Some(Refusal::Origin(message)) = refusal(
            &request(Method::POST, &[local, ("origin", &long)]),
            &server,
            true,
        ) else {
            panic!("a long foreign origin must be refused");
        };
        assert!(message.len() < 400, "{message}");
    }
}
