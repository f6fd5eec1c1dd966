//! The embedded axum server: REST API under `/api/v1` (one router per
//! resource), OpenAPI document and Swagger UI, health probes and the web UI.

pub mod accounts;
pub mod auth;
mod body;
pub mod cluster;
pub mod control;
pub mod error;
pub mod forward;
pub mod generator;
pub mod health;
pub mod idempotency;
pub mod metrics;
pub mod ops;
pub mod origin;
pub mod payments;
pub mod screening;
pub mod stream;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tower_http::services::ServeDir;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::generator::Generator;
use crate::instrument::live::LiveView;
use crate::instrument::slo::SloTracker;
use crate::ops::audit::AuditLog;
use crate::runtime::Runtime;

/// What every handler can reach: the runtime and the planes' handles,
/// wired by the composition root (`app`).
pub struct AppState {
    /// The running pipeline.
    pub runtime: Runtime,
    /// Where state-changing calls are recorded.
    pub audit: AuditLog,
    /// The payment generator (started and stopped over the API).
    pub generator: Arc<Generator>,
    /// The last two minutes of completions, for the dashboard.
    pub live: Arc<LiveView>,
    /// Since when each business goal has been met or missed.
    pub slo: Arc<SloTracker>,
    /// The group membership, on a cluster (`cluster.scale_out`).
    pub membership: std::sync::OnceLock<tokio::sync::watch::Receiver<crate::cluster::MemberState>>,
    /// Cancelled when the HTTP server begins its graceful stop, so that
    /// long-lived responses (the event stream) end and do not hold it open.
    pub closing: tokio_util::sync::CancellationToken,
    /// `Idempotency-Key`s whose first call is being answered now.
    pub keys_in_flight: idempotency::InFlight,
}

pub type State = Arc<AppState>;

/// A list endpoint's `limit`: `default` when absent, else 1 to the configured page bound.
pub fn page_limit(
    state: &State,
    requested: Option<usize>,
    default: usize,
) -> Result<usize, error::ApiError> {
    let max = state.runtime.config().limits.max_page_items;
    match requested.unwrap_or(default) {
        limit @ 1.. if limit <= max => Ok(limit),
        _ => Err(error::ApiError::BadRequest(format!(
            "limit must be between 1 and {max}"
        ))),
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kpay",
        description = "Payments as event-streaming microservices. Money is integer cents.\n\n\
            Safe retries: the calls that move money or change an account take an \
            `Idempotency-Key` header (1-40 \
            characters of [A-Za-z0-9_.:-]). The same key with the same method, path and body gets \
            the first answer again, with `Idempotent-Replayed: true`; with another call, 409. Keys \
            are kept as long as payments (`limits.payment_retention_seconds`). The effect itself \
            happens once: a payment's id (the key when the body has none), a batch item's id \
            (`<key>.<index>` when it has none), a deposit's `id` (the key when the body has none) \
            and an account's id are each applied once.",
        version = "1"
    ),
    tags(
        (name = "accounts", description = "Open, fund, close and look up accounts"),
        (name = "payments", description = "Submit payments and follow them"),
        (name = "metrics", description = "Business metrics and the ledger check"),
        (name = "control", description = "Pause with drain, resume, rate limit"),
        (name = "screening", description = "Screening rules before the debit; review of held payments"),
        (name = "generator", description = "Payments at a set rate, for demos and load"),
        (name = "operations", description = "Dead letter queue, audit trail, error log, record injection"),
        (name = "health", description = "Liveness and readiness")
    )
)]
struct ApiDoc;

/// Every API route with its OpenAPI annotations.
fn routes() -> OpenApiRouter<State> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(accounts::router())
        .merge(payments::router())
        .merge(screening::router())
        .merge(metrics::router())
        .merge(control::router())
        .merge(ops::router())
        .merge(generator::router())
        .merge(stream::router())
        .merge(health::router())
        .merge(cluster::router())
}

/// The OpenAPI document and the API router, built from the handlers' annotations.
pub fn api(state: State) -> (Router, utoipa::openapi::OpenApi) {
    let (router, api) = routes().split_for_parts();
    let api = with_error_responses(api);
    let api = with_parameter_rules(api, state.runtime.config());
    let max_body = state.runtime.config().server.max_body_bytes;
    // Before the layers, so that a 405 passes them like any answer (CORS
    // preflights and the audit included).
    let router = router
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            (
                state.clone(),
                Arc::new(idempotency::Keyed::from_document(&api)),
            ),
            idempotency::layer,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            origin::cors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            origin::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit_changes,
        ))
        .layer(axum::middleware::from_fn(count_requests));
    (router.with_state(state), api)
}

/// Refuses a negative time filter (`since`, `until`: ms since the epoch).
pub fn check_times(times: [(&str, Option<i64>); 2]) -> Result<(), error::ApiError> {
    match times
        .into_iter()
        .find(|(_, at)| at.is_some_and(|at| at < 0))
    {
        Some((name, _)) => Err(error::ApiError::BadRequest(format!(
            "{name} must be ≥ 0 (ms since the epoch)"
        ))),
        None => Ok(()),
    }
}

/// States in the OpenAPI document the rules the handlers check on
/// parameters, with this instance's limits: `limit` is 1 to
/// `limits.max_page_items`; ids (path `id`s, `from`, `to`, an account
/// cursor) are 1–64 characters of `[A-Za-z0-9_.:-]`; times are ≥ 0; a
/// dead letter's topic is one of the input topics' names.
fn with_parameter_rules(
    mut api: utoipa::openapi::OpenApi,
    config: &crate::config::Config,
) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{path::ParameterIn, RefOr, Schema};
    let (limits, topics) = (&config.limits, &config.topics);
    let inputs = [
        &topics.incoming,
        &topics.inflight,
        &topics.complete,
        &topics.commands,
    ];
    for (path, item) in api.paths.paths.iter_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            for parameter in operation.parameters.iter_mut().flatten() {
                let Some(RefOr::T(Schema::Object(schema))) = parameter.schema.as_mut() else {
                    continue;
                };
                let is_path = parameter.parameter_in == ParameterIn::Path;
                match parameter.name.as_str() {
                    "limit" => {
                        schema.minimum = Some(1.into());
                        schema.maximum = Some((limits.max_page_items as u64).into());
                    }
                    "since" | "until" => schema.minimum = Some(0.into()),
                    "id" if is_path && path.starts_with("/api/v1/dlq") => {
                        schema.pattern = Some(DLQ_ID_PATTERN.into());
                    }
                    "after" if path == "/api/v1/dlq" => {
                        schema.pattern = Some(DLQ_ID_PATTERN.into())
                    }
                    "topic" if path == "/api/v1/dlq" => {
                        schema.enum_values =
                            Some(inputs.iter().map(|t| t.as_str().into()).collect());
                    }
                    "id" if is_path => schema.pattern = Some(ID_PATTERN.into()),
                    "from" | "to" => schema.pattern = Some(ID_PATTERN.into()),
                    "after" if path == "/api/v1/accounts" => {
                        schema.pattern = Some(ID_PATTERN.into());
                    }
                    _ => {}
                }
            }
        }
    }
    api
}

/// Ids of accounts and payments, as `model::validate_id` checks them.
const ID_PATTERN: &str = "^[A-Za-z0-9_.:-]{1,64}$";

/// Dead letter ids: `<topic>:<partition>:<offset>:<processor>`.
const DLQ_ID_PATTERN: &str =
    "^[A-Za-z0-9._-]{1,249}:[0-9]{1,9}:[0-9]{1,18}:(inflight|account|confirmed|control)$";

/// Documents on every operation the errors any request may get, besides
/// those its handler declares: a bad query, path or body (400), auth (401,
/// 403), an unknown resource (404), a body too large (413) or not JSON
/// (415), the log or intake unavailable (503), and on writes no space on
/// the data directory's device (507). Every error has the `ErrorBody` shape.
fn with_error_responses(mut api: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let common = [
        ("400", "Invalid request: query, path or body"),
        ("401", "Missing or unknown bearer token"),
        (
            "403",
            "The token's role may not do this; or, with no token configured, a foreign Host \
             (forbidden_host) or a change from another site (forbidden_origin)",
        ),
        ("404", "Not found"),
        ("413", "Request body larger than the limit"),
        ("415", "Body is not JSON (Content-Type: application/json)"),
        (
            "503",
            "Unavailable: shutting down, backpressure, or the log is unavailable",
        ),
    ];
    // Writes may find the data directory's device full (or below
    // `data.min_free_bytes`); the batch reports it per payment instead.
    let storage = (
        "507",
        "Insufficient storage: no space left on the device holding the data directory \
         (or less free than data.min_free_bytes); nothing was written, retry once space is freed",
    );
    for (path, item) in api.paths.paths.iter_mut() {
        let writes_whole = path != "/api/v1/payments/batch";
        let operations = [
            (&mut item.get, false),
            (&mut item.put, writes_whole),
            (&mut item.post, writes_whole),
            (&mut item.delete, writes_whole),
            (&mut item.patch, writes_whole),
        ];
        for (operation, writes) in operations {
            let Some(operation) = operation else {
                continue;
            };
            let extra = writes.then_some(storage);
            for (status, description) in common.into_iter().chain(extra) {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| {
                        let content = ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                            .build();
                        ResponseBuilder::new()
                            .description(description)
                            .content("application/json", content)
                            .build()
                            .into()
                    });
            }
        }
    }
    api
}

/// Records every state-changing API call in the audit trail, refused ones
/// included (the auth layer inside tags the response with the principal).
async fn audit_changes(
    axum::extract::State(state): axum::extract::State<State>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let changes = !matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if !changes || !request.uri().path().starts_with("/api/v1/") {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(
            || request.uri().path().to_owned(),
            |p| p.as_str().to_owned(),
        );
    let action = format!("{} {route}", request.method());
    let parameters = audited_parameters(&state, request.uri());
    let source = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.to_string());
    let response = next.run(request).await;
    let principal = response.extensions().get::<auth::Principal>().cloned();
    let status = response.status().as_u16();
    let entry = crate::ops::audit::AuditEntry {
        seq: 0,
        at_ms: crate::model::now_ms(),
        principal: principal
            .as_ref()
            .map_or("anonymous".into(), |p| p.name.clone()),
        role: principal.map_or("none", |p| p.role).to_owned(),
        action,
        parameters,
        source,
        status,
        outcome: match status {
            200..=399 => "ok",
            400..=499 => "refused",
            _ => "failed",
        }
        .to_owned(),
    };
    match state.audit.record(entry).await {
        Ok(_) => response,
        Err((class, error)) => audit_missed(class, &error, response),
    }
}

/// The path and query as called, with every query value that is a
/// configured token replaced: a token sent in the wrong place must not be
/// copied into the trail. (Values are compared as sent, not percent-decoded.)
fn audited_parameters(state: &State, uri: &axum::http::Uri) -> String {
    let Some(query) = uri.query() else {
        return uri.path().to_owned();
    };
    let tokens = &state.runtime.config().tokens;
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or(("", pair));
            match tokens.find(value.as_bytes()) {
                Some(_) if key.is_empty() => "<redacted>".to_owned(),
                Some(_) => format!("{key}=<redacted>"),
                None => pair.to_owned(),
            }
        })
        .collect();
    format!("{}?{}", uri.path(), pairs.join("&"))
}

/// An audit entry that is not in the trail: counted and logged. A control
/// or administrative call that succeeded is then not answered with its
/// success, since nothing would show who did it: it gets 503 saying that
/// the action took effect but is unaudited. A refused or failed call keeps
/// its own answer, which tells the caller more than the trail's trouble.
fn audit_missed(
    class: crate::ops::audit::Class,
    error: &crate::ops::journal::JournalError,
    response: axum::response::Response,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let class = class.as_str();
    ::metrics::counter!("kpay_audit_dropped_total", "class" => class).increment(1);
    tracing::warn!(class, %error, "audit entry not written");
    let admin = class == crate::ops::audit::Class::Admin.as_str();
    if !admin || !response.status().is_success() {
        return response;
    }
    error::ApiError::Unavailable(format!(
        "the action took effect but its audit entry was not written ({error}); \
         check its effect before retrying"
    ))
    .into_response()
}

/// Counts requests by route template and status for Prometheus.
async fn count_requests(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    ::metrics::counter!("kpay_http_requests_total", "route" => route, "status" => status)
        .increment(1);
    response
}

/// The whole application: API, Swagger UI and the static web UI.
pub fn app(state: State, static_dir: PathBuf) -> Router {
    let (router, api) = api(state.clone());
    // The API checks Host inside its audit layer; the rest needs the check too.
    let rest = Router::new()
        .merge(SwaggerUi::new("/swagger-ui").url("/api-docs/openapi.json", api))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback_service(ServeDir::new(static_dir).not_found_service(
            axum::handler::HandlerWithoutStateExt::into_service(not_found),
        ))
        .layer(axum::middleware::from_fn_with_state(
            state,
            origin::guard_host,
        ));
    router.merge(rest)
}

/// A route asked with a method it does not take (`OPTIONS` included): 405
/// in the API's error shape; the route adds `Allow`.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::MethodNotAllowed(format!(
        "{method} is not allowed on {}; Allow lists the methods it takes",
        uri.path()
    ))
}

/// A path with no route and no file: 404 in the API's error shape.
async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::NotFound(format!("no route {method} {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::audit::Class;
    use crate::ops::journal::JournalError;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    // Every field a request body takes an array in is one the body check
    // lets through (`body::ARRAY_FIELDS`), and no other.
    #[test]
    fn the_array_fields_are_those_of_the_request_bodies() {
        let (_, api) = routes().split_for_parts();
        let doc = serde_json::to_value(&api).unwrap();
        let schemas = &doc["components"]["schemas"];
        let mut pending: Vec<String> = Vec::new();
        for item in doc["paths"].as_object().unwrap().values() {
            for operation in item.as_object().unwrap().values() {
                let schema = &operation["requestBody"]["content"]["application/json"]["schema"];
                pending.extend(refs(schema));
            }
        }
        let (mut seen, mut arrays) = (
            std::collections::BTreeSet::new(),
            std::collections::BTreeSet::new(),
        );
        while let Some(name) = pending.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let schema = &schemas[&name];
            for (field, property) in schema["properties"].as_object().into_iter().flatten() {
                let kinds = property["type"].to_string();
                if kinds.contains("array") {
                    arrays.insert(field.clone());
                }
                pending.extend(refs(property));
            }
        }
        let listed: std::collections::BTreeSet<String> =
            body::ARRAY_FIELDS.iter().map(|f| f.to_string()).collect();
        assert_eq!(arrays, listed);
    }

    /// The schema names `value` refers to, however deep.
    fn refs(value: &serde_json::Value) -> Vec<String> {
        match value {
            serde_json::Value::Object(map) => map
                .iter()
                .flat_map(|(key, v)| match (key.as_str(), v.as_str()) {
                    ("$ref", Some(r)) => vec![r.rsplit('/').next().unwrap().to_owned()],
                    _ => refs(v),
                })
                .collect(),
            serde_json::Value::Array(items) => items.iter().flat_map(refs).collect(),
            _ => Vec::new(),
        }
    }

    // A control call that succeeded but is unaudited is not answered with its success; others keep their answer.
    #[test]
    fn an_unaudited_success_of_a_control_call_is_not_answered_as_success() {
        let missed = |class, status: StatusCode| {
            audit_missed(class, &JournalError::Full, status.into_response()).status()
        };
        let cases = [
            (
                Class::Admin,
                StatusCode::OK,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (Class::Admin, StatusCode::FORBIDDEN, StatusCode::FORBIDDEN),
            (
                Class::Admin,
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                Class::Submission,
                StatusCode::ACCEPTED,
                StatusCode::ACCEPTED,
            ),
        ];
        for (class, answered, sent) in cases {
            assert_eq!(missed(class, answered), sent, "{answered}");
        }
    }
}
