//! The control processor: applies commands from `control.commands` in order
//! to the control state (paused, rate limit). The state is checkpointed like
//! any task's, so every restart (and, with Kafka, every instance reading the
//! same topic) sees the same state: a paused system comes back paused.

use serde::{Deserialize, Serialize};

use super::{Ctx, Emit, OutTopic, ProcessError, Processor};
use crate::model::{ControlAction, Event, ScreeningRules};

/// What the control plane has been told, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    /// New payments wait in `payment.incoming` while true.
    pub paused: bool,
    /// When `paused` last changed, ms since the epoch (0: never).
    pub since_ms: i64,
    /// Admissions per second; 0 = unlimited.
    pub rate_limit_per_second: u64,
    /// Commands applied so far.
    pub commands_applied: u64,
    /// Who gave the last command, and why.
    pub last_principal: Option<String>,
    pub last_reason: Option<String>,
    /// The screening rules in force (all off until set).
    pub screening: ScreeningRules,
    /// The offset of the command that set them (`None`: never set; the
    /// `[screening]` settings are then applied once at start).
    pub screening_version: Option<u64>,
}

pub struct ControlPlane;

impl Processor for ControlPlane {
    type State = ();
    type Stats = ControlState;
    const NAME: &'static str = "control";
    const TABLE: &'static str = "-";

    fn handle(
        _state: &mut Option<()>,
        control: &mut ControlState,
        event: Event,
        ctx: &Ctx,
    ) -> Result<Option<Emit>, ProcessError> {
        let Event::Control(command) = event else {
            return Err(ProcessError::UnexpectedEvent { kind: event.kind() });
        };
        let mut emit = None;
        match command.action {
            ControlAction::Pause | ControlAction::Resume => {
                let paused = command.action == ControlAction::Pause;
                if control.paused != paused {
                    control.paused = paused;
                    control.since_ms = command.at_ms;
                }
            }
            ControlAction::SetRateLimit(per_second) => control.rate_limit_per_second = per_second,
            ControlAction::SetScreeningRules(rules) => {
                // Every account partition screens; each gets the rules at
                // a fixed place in its own input.
                control.screening = rules.clone();
                control.screening_version = Some(ctx.offset);
                emit = Some(Emit {
                    topic: OutTopic::EveryInflight,
                    key: "screening".into(),
                    event: Event::ScreeningRules {
                        rules,
                        version: ctx.offset,
                    },
                });
            }
        }
        control.commands_applied += 1;
        control.last_principal = Some(command.principal);
        control.last_reason = command.reason;
        Ok(emit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ControlCommand, SourceTopic};

    fn apply(state: &mut ControlState, action: ControlAction, at_ms: i64) {
        let command = ControlCommand {
            action,
            principal: "ops".into(),
            reason: Some("drill".into()),
            at_ms,
        };
        let ctx = Ctx {
            topic: SourceTopic::Control,
            partition: 0,
            offset: 0,
            received_at_ms: 0,
            now_ms: 0,
            partitions: 1,
            forgotten_before_ms: i64::MIN,
            max_amount_cents: 100_000_000_000,
            submitted_by: None,
        };
        ControlPlane::handle(&mut None, state, Event::Control(command), &ctx).unwrap();
    }

    // Commands apply in order; a repeated pause keeps its first `since`; the rate limit is independent.
    #[test]
    fn commands_apply_in_order() {
        let mut state = ControlState::default();
        apply(&mut state, ControlAction::Pause, 10);
        apply(&mut state, ControlAction::Pause, 20);
        assert!(state.paused);
        assert_eq!(state.since_ms, 10);
        apply(&mut state, ControlAction::SetRateLimit(500), 30);
        apply(&mut state, ControlAction::Resume, 40);
        assert!(!state.paused);
        assert_eq!((state.since_ms, state.rate_limit_per_second), (40, 500));
        assert_eq!(state.commands_applied, 4);
        assert_eq!(state.last_principal.as_deref(), Some("ops"));
    }
}
