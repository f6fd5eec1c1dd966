//! The composition root: the one place that wires kpay together. It opens
//! the backends, installs the instrumentation recorder, opens the error log,
//! starts the runtime (tasks, sequencers, flusher) with the planes' hooks,
//! starts the audit trail and the planes' background loops, serves HTTP, and
//! owns the order of shutdown: HTTP intake, drain, processors, store.
//!
//! Nothing below imports this module; `main` and `bench` call it.

use std::future::Future;
use std::sync::Arc;

use crate::cluster::{Member, MemberConfig, MemberState};
use crate::config::Config;
use crate::generator::Generator;
use crate::http::{AppState, State};
use crate::instrument::live::LiveView;
use crate::instrument::slo::SloTracker;
use crate::instrument::{prometheus, slo};
use crate::log::Log;
use crate::model::Event;
use crate::ops;
use crate::runtime::{open_backends, Runtime, RuntimeError};
use crate::store::Store;

/// Opens the backends named by `config` and starts everything but the HTTP
/// listener; returns what the HTTP handlers reach.
pub async fn start(config: Config) -> Result<State, RuntimeError> {
    let (log, store) = open_backends(&config).await?;
    start_on(config, log, store).await
}

/// Starts everything but the HTTP listener over opened backends.
pub async fn start_on(
    config: Config,
    log: Arc<dyn Log>,
    store: Store,
) -> Result<State, RuntimeError> {
    let instrumented = config.instrument.enabled;
    if instrumented {
        // Before any task runs: handles looked up earlier would record nowhere.
        prometheus::install()?;
        prometheus::describe();
    }
    // Opened first, so that what the runtime logs while starting is kept.
    let error_log = ops::logs::open(&config);
    let live = Arc::new(LiveView::default());
    let runtime = Runtime::start(config, log, store, live.clone()).await?;
    error_log.start(&runtime);
    let slo = Arc::new(SloTracker::default());
    slo::watch(&runtime, slo.clone());
    if instrumented {
        prometheus::keep_up(&runtime);
    }
    let changes = {
        let (runtime, live) = (runtime.clone(), live.clone());
        crate::control::adaptive::start(&runtime.clone(), move || {
            adaptive_signals(runtime.clone(), live.clone())
        })
    };
    let state = Arc::new(AppState {
        audit: ops::audit::start(&runtime),
        generator: Generator::new(runtime.clone()),
        runtime,
        live,
        slo,
        membership: std::sync::OnceLock::new(),
        closing: tokio_util::sync::CancellationToken::new(),
        keys_in_flight: Default::default(),
    });
    if let Some(changes) = changes {
        audit_rate_changes(&state, changes);
    }
    forget_expired_keys(&state.runtime);
    Ok(state)
}

/// How often the kept answers of `Idempotency-Key`s older than the payment
/// retention are deleted.
const KEY_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes kept `Idempotency-Key` answers once older than the retention.
fn forget_expired_keys(runtime: &Runtime) {
    let task = runtime.clone();
    runtime.spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(KEY_SWEEP) => {}
                () = task.stopped() => return,
            }
            let sweep = task.clone();
            let swept =
                tokio::task::spawn_blocking(move || ops::idempotency::forget_expired(&sweep));
            match swept.await {
                Ok(Ok(0)) => {}
                Ok(Ok(forgotten)) => tracing::debug!(forgotten, "expired idempotency keys deleted"),
                Ok(Err(error)) => tracing::warn!(%error, "expired idempotency keys not deleted"),
                Err(error) => tracing::warn!(%error, "the idempotency key sweep failed"),
            }
        }
    });
}

/// What the adaptive controller looks at, from the instrumentation plane:
/// the newest seconds' p99 and completions, what is in flight, the lag,
/// the free space.
async fn adaptive_signals(
    runtime: Runtime,
    live: Arc<LiveView>,
) -> crate::control::adaptive::Signals {
    let points = live.points(crate::model::now_ms());
    let newest = points.iter().rev().take(3);
    let lag = crate::instrument::lag::owned_lag(&runtime).await;
    crate::control::adaptive::Signals {
        p99_ms: newest.clone().find_map(|p| p.p99_ms),
        completed_per_second: newest.map(|p| p.count).max().unwrap_or(0),
        inflight: runtime.inflight_totals().inflight_count,
        lag_records: lag.map_or(0, |views| views.iter().map(|v| v.lag_records).sum()),
        space_low: runtime.check_space().is_err(),
    }
}

/// Records each change of the adaptive controller's rate as a control
/// event in the audit trail.
fn audit_rate_changes(
    state: &State,
    mut changes: tokio::sync::mpsc::Receiver<crate::control::adaptive::RateChange>,
) {
    let audited = state.clone();
    state.runtime.spawn(async move {
        while let Some(change) = changes.recv().await {
            let entry = ops::audit::AuditEntry {
                seq: 0,
                at_ms: crate::model::now_ms(),
                principal: "controller".into(),
                role: "controller".into(),
                action: "ADAPT intake rate".into(),
                parameters: format!(
                    "{} → {} payments/s: {}",
                    change.from, change.to, change.reason
                ),
                source: "control.adaptive".into(),
                status: 200,
                outcome: "ok".into(),
            };
            if let Err((_, error)) = audited.audit.record(entry).await {
                tracing::warn!(%error, "the adaptive rate change is not in the audit trail");
            }
        }
    });
}

/// Runs the whole system on `listener` until `stop` resolves (or a task
/// fails for good), then shuts down in order: HTTP intake, drain,
/// processors, store. Stopped by an error, it returns that error.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    bootstrap: Vec<Event>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let static_dir = config.server.static_dir.clone();
    let state = start(config).await?;
    let member = join_group(&state, &listener).await?;
    open_bootstrap_accounts(&state.runtime, bootstrap).await?;
    let screening = state.runtime.config().screening.clone();
    crate::control::apply_initial_screening(&state.runtime, screening).await?;
    let router = crate::http::app(state.clone(), static_dir);
    tracing::info!(address = %listener.local_addr()?, "kpay listening");
    let intake = state.runtime.intake_closing();
    let closing = state.closing.clone();
    let stop = async move {
        tokio::select! {
            () = stop => {}
            () = intake.cancelled() => {}
        }
        closing.cancel();
    };
    let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(stop)
        .await?;
    let stopped = state.runtime.shutdown().await;
    if let Some(member) = member {
        // After the final checkpoints: the others take over without waiting
        // for this member's session to expire.
        wait_published(&state.runtime).await;
        let leave = tokio::time::timeout(LEAVE_WAIT, member.leave());
        if leave.await.is_err() {
            tracing::warn!("the group did not confirm the leave in time; the session ends it");
        }
    }
    // Stopped by an error rather than asked to: the caller exits non-zero
    // with that first reason (the shutdown may fail for the same cause).
    if let Some(reason) = state.runtime.failure() {
        anyhow::bail!("stopped on an error: {reason}");
    }
    stopped?;
    tracing::info!("kpay stopped cleanly");
    Ok(())
}

/// On a cluster: joins the group and lets its assignments decide which
/// partitions this instance's tasks append for (see `runtime::ownership`).
async fn join_group(
    state: &State,
    listener: &tokio::net::TcpListener,
) -> anyhow::Result<Option<Member>> {
    let config = state.runtime.config();
    if !config.scales_out() {
        return Ok(None);
    }
    let mut member_config = MemberConfig::from_config(config);
    if config.cluster.advertised_url.is_empty() {
        member_config.url = format!("http://{}", listener.local_addr()?);
    }
    let member = Member::start(member_config).await?;
    let _ = state.membership.set(member.state());
    let runtime = state.runtime.clone();
    let mut states = member.state();
    let releases = member.releaser();
    state.runtime.spawn(async move {
        loop {
            let now = states.borrow_and_update().clone();
            let ownership = runtime.ownership();
            match now {
                MemberState::Stable(assignment) => {
                    let owned = assignment.partitions.iter().copied().collect();
                    ownership.set(assignment.generation, owned);
                }
                MemberState::Joining | MemberState::Stopped(_) => {
                    ownership.set(0, Default::default());
                    while !(ownership.released() && runtime.positions_published()) {
                        tokio::select! {
                            () = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
                            // Stopping: the tasks end as they are, the member leaves.
                            () = runtime.stopped() => return,
                        }
                    }
                    if states.has_changed().unwrap_or(false) {
                        continue;
                    }
                    releases.released();
                }
            }
            tokio::select! {
                changed = states.changed() => if changed.is_err() { return },
                () = runtime.stopped() => return,
            }
        }
    });
    Ok(Some(member))
}

/// How long a stopping member waits for the group to take its leave.
const LEAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits (bounded) until the last checkpoints' positions are published.
async fn wait_published(runtime: &Runtime) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !runtime.positions_published() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Appends the `--bootstrap` accounts; opening is idempotent, so a second
/// run opens nothing twice.
async fn open_bootstrap_accounts(
    runtime: &Runtime,
    bootstrap: Vec<Event>,
) -> Result<(), RuntimeError> {
    if bootstrap.is_empty() {
        return Ok(());
    }
    let count = bootstrap.len();
    for chunk in bootstrap.chunks(10_000) {
        runtime.append_account_events(chunk.to_vec()).await?;
    }
    tracing::info!(count, "bootstrap accounts appended");
    Ok(())
}
