//! Pillar 3, the control plane: commands as events through
//! `control.commands` (pause with drain, resume, rate limit), the status an
//! operator sees, bootstrap, and the shutdown signal (SIGTERM or Ctrl-C).
//! The commands are applied by the control processor, which is pure logic
//! like every processor and so lives with them (`pipeline::control`).

pub mod adaptive;
pub mod bootstrap;

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C). The
/// handlers are installed when this is called, not when it is first awaited:
/// a signal that arrives while the server is still starting is kept for
/// then, instead of ending the process the default way (killed, no drain).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        let wait = |name: &'static str, installed: std::io::Result<tokio::signal::unix::Signal>| async move {
            match installed {
                Ok(mut signal) => drop(signal.recv().await),
                Err(error) => {
                    tracing::error!(%error, "cannot listen for {name}");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = wait("SIGTERM", terminate) => {}
            () = wait("Ctrl-C", interrupt) => {}
        }
        tracing::info!("shutdown requested: stopping intake and draining");
    }
}

use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use crate::log::TopicPartition;
use crate::model::{
    now_ms, ControlAction, ControlCommand, CountAmount, ScreeningRules, SourceTopic,
};
use crate::pipeline::control::ControlPlane;
use crate::pipeline::inflight::Inflight;
use crate::pipeline::Processor;
use crate::runtime::{Runtime, RuntimeError};

/// How long a command call waits for the control processor to apply it.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);

/// How long a start waits for the control processor to read the commands
/// there were, before it decides whether the `[screening]` settings apply.
const START_WAIT: Duration = Duration::from_secs(30);

/// The control plane as an operator sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ControlStatus {
    /// `running`, `draining` (paused, admitted payments still finishing) or `paused`.
    #[schema(example = "running")]
    pub state: String,
    /// When the system was last paused or resumed, ms since the epoch (0: never).
    pub since: i64,
    /// Admitted payments not yet terminal.
    pub inflight: CountAmount,
    /// Accepted payments waiting in `payment.incoming` to be admitted.
    pub queued: u64,
    /// Admissions per second; 0 = unlimited.
    pub rate_limit: u64,
    /// Commands applied since the start of the log.
    pub commands_applied: u64,
    /// Whether the adaptive controller sets the intake rate (`control.adaptive`).
    pub adaptive: bool,
    /// The rate in force, payments per second (0: unlimited): the
    /// controller's intake rate when adaptive, else the operator's limit.
    pub rate_in_force: u64,
    /// Who set it: `operator` or `controller`.
    #[schema(example = "controller")]
    pub rate_set_by: String,
    /// Why: the controller's reason, or the operator's last command's.
    pub rate_reason: Option<String>,
}

/// Appends a command to `control.commands` and waits (bounded) until the
/// control processor has applied it; returns its offset.
pub async fn command(
    runtime: &Runtime,
    action: ControlAction,
    principal: &str,
    reason: Option<String>,
) -> Result<u64, RuntimeError> {
    let runtime = &runtime;
    let command = ControlCommand {
        action,
        principal: principal.to_owned(),
        reason,
        at_ms: now_ms(),
    };
    let offset = runtime.append_command(command).await?;
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    while applied_position(runtime) <= offset && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(offset)
}

/// Sets the screening rules through `control.commands` and waits (bounded)
/// until every account partition screens with them; returns whether they do.
pub async fn set_screening(
    runtime: &Runtime,
    rules: ScreeningRules,
    principal: &str,
    reason: Option<String>,
) -> Result<bool, RuntimeError> {
    let action = ControlAction::SetScreeningRules(rules);
    let offset = command(runtime, action, principal, reason).await?;
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    loop {
        if runtime.screening_applied().is_some_and(|v| v >= offset) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sets the `[screening]` settings once, on a log whose commands never set
/// rules: after the control processor has read every command there was at
/// start, so that rules an operator set are never replaced by the settings.
pub async fn apply_initial_screening(
    runtime: &Runtime,
    rules: ScreeningRules,
) -> Result<(), RuntimeError> {
    if !rules.any() {
        return Ok(());
    }
    let tp = TopicPartition::new(runtime.topics().commands.clone(), 0);
    let end = runtime.log().high_watermark(&tp).await?;
    let deadline = tokio::time::Instant::now() + START_WAIT;
    while applied_position(runtime) < end {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "the control processor has not read control.commands yet: [screening] not applied"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if runtime.control_state().screening_version.is_some() {
        return Ok(());
    }
    let reason = Some("[screening] settings at the first start".to_owned());
    if !set_screening(runtime, rules, "config", reason).await? {
        tracing::warn!("the [screening] settings are not applied on every partition yet");
    }
    Ok(())
}

/// The next offset of `control.commands` the control processor will read.
fn applied_position(runtime: &Runtime) -> u64 {
    runtime
        .input_positions()
        .into_iter()
        .find(|input| input.processor == ControlPlane::NAME)
        .map_or(0, |input| input.position)
}

/// Running, draining or paused, with what is in flight, and what is queued
/// on the partitions `counted` admits.
pub async fn status(
    runtime: &Runtime,
    counted: impl Fn(u32) -> bool,
) -> Result<ControlStatus, RuntimeError> {
    let control = runtime.control_state();
    let inflight = runtime.inflight_totals();
    let mut queued = 0;
    let admissions = runtime
        .input_positions()
        .into_iter()
        .filter(|input| input.processor == Inflight::NAME && input.topic == SourceTopic::Incoming)
        .filter(|input| counted(input.partition));
    for input in admissions {
        let tp = TopicPartition::new(runtime.topics().incoming.clone(), input.partition);
        queued += runtime
            .log()
            .high_watermark(&tp)
            .await?
            .saturating_sub(input.position);
    }
    let state = match (control.paused, inflight.inflight_count) {
        (false, _) => "running",
        (true, 0) => "paused",
        (true, _) => "draining",
    };
    let adaptive = runtime.config().control.adaptive;
    let intake = runtime.throttle().get();
    let (rate_in_force, rate_set_by, rate_reason) = if adaptive {
        (intake.rate, "controller", Some(intake.reason))
    } else {
        let why = control.last_reason.clone();
        (control.rate_limit_per_second, "operator", why)
    };
    Ok(ControlStatus {
        adaptive,
        rate_in_force,
        rate_set_by: rate_set_by.to_owned(),
        rate_reason,
        state: state.to_owned(),
        since: control.since_ms,
        inflight: CountAmount {
            count: inflight.inflight_count,
            amount: inflight.inflight_amount_cents,
        },
        queued,
        rate_limit: control.rate_limit_per_second,
        commands_applied: control.commands_applied,
    })
}
