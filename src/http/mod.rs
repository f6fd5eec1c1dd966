//! The embedded axum server: REST API under `/api/v1` (one router per
//! resource), OpenAPI document and Swagger UI, health probes and the web UI.

pub mod accounts;
pub mod auth;
pub mod control;
pub mod error;
pub mod health;
pub mod metrics;
pub mod payments;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tower_http::services::ServeDir;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::runtime::Runtime;

/// Most payment ids remembered for `GET /payments` (recent payments).
pub const RECENT_PAYMENTS: usize = 10_000;

/// What every handler can reach.
pub struct AppState {
    /// The running pipeline.
    pub runtime: Runtime,
    /// Ids of recently accepted payments, newest last, for the recent list.
    pub recent_payments: Mutex<VecDeque<String>>,
    /// Bearer tokens and their roles; empty: protected mode (loopback only).
    pub tokens: auth::Tokens,
}

pub type State = Arc<AppState>;

impl AppState {
    pub fn new(runtime: Runtime) -> State {
        // The config was validated at load, so the token list parses.
        let tokens = auth::Tokens::parse(&runtime.shared.config.tokens).unwrap_or_default();
        Arc::new(Self {
            runtime,
            recent_payments: Mutex::new(VecDeque::with_capacity(RECENT_PAYMENTS)),
            tokens,
        })
    }

    pub fn remember_payment(&self, id: &str) {
        let mut recent = self.recent_payments.lock().expect("recent lock");
        if recent.len() == RECENT_PAYMENTS {
            recent.pop_front();
        }
        recent.push_back(id.to_owned());
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "kpay",
        description = "Payments as event-streaming microservices. Money is integer cents.",
        version = "1"
    ),
    tags(
        (name = "accounts", description = "Open, fund, close and look up accounts"),
        (name = "payments", description = "Submit payments and follow them"),
        (name = "metrics", description = "Business metrics and the ledger check"),
        (name = "control", description = "Pause with drain, resume, rate limit"),
        (name = "health", description = "Liveness and readiness")
    )
)]
struct ApiDoc;

/// The OpenAPI document and the API router, built from the handlers' annotations.
pub fn api(state: State) -> (Router, utoipa::openapi::OpenApi) {
    let (router, api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(accounts::router())
        .merge(payments::router())
        .merge(metrics::router())
        .merge(control::router())
        .merge(health::router())
        .split_for_parts();
    let max_body = state.runtime.shared.config.server.max_body_bytes;
    let router = router
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .layer(axum::middleware::from_fn(count_requests));
    (router.with_state(state), api)
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
    let (router, api) = api(state);
    router
        .merge(SwaggerUi::new("/swagger-ui").url("/api-docs/openapi.json", api))
        .fallback_service(ServeDir::new(static_dir))
}

/// Runs the whole system on `listener` until `stop` resolves, then shuts
/// down in order: HTTP intake, drain, processors, store.
pub async fn serve(
    config: crate::config::Config,
    listener: tokio::net::TcpListener,
    bootstrap: Vec<crate::model::Event>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (log, store) = crate::runtime::open_backends(&config)?;
    let static_dir = config.server.static_dir.clone();
    let runtime = Runtime::start(config, log, store).await?;
    if !bootstrap.is_empty() {
        let count = bootstrap.len();
        // Opening is idempotent, so a second run opens nothing twice.
        for chunk in bootstrap.chunks(10_000) {
            runtime.append_account_events(chunk.to_vec()).await?;
        }
        tracing::info!(count, "bootstrap accounts appended");
    }
    let state = AppState::new(runtime);
    let router = app(state.clone(), static_dir);
    tracing::info!(address = %listener.local_addr()?, "kpay listening");
    let intake = state.runtime.shared.shutdown.clone();
    let stop = async move {
        tokio::select! {
            () = stop => {}
            () = intake.cancelled() => {}
        }
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await?;
    state.runtime.shutdown().await?;
    tracing::info!("kpay stopped cleanly");
    Ok(())
}
