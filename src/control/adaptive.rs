//! Adaptive intake: every `control.adaptive_interval_ms` a controller looks
//! at the live signals and sets the intake rate (`runtime::throttle`):
//! - a goal at risk (p99 latency above 70 % of `slo.latency_p99_ms`, or
//!   the wait the payments in flight have ahead of them above half of it;
//!   lag above `slo.max_lag_records`; free space below the floor): back off
//!   multiplicatively, to 70 % of what actually flowed, at most once a
//!   second (a cut takes that long to show);
//! - headroom (p99 below half the goal and the wait ahead below a quarter,
//!   lag below half its bound): up by a tenth a second, slowly (by a half
//!   while far below: a quarter and a tenth);
//! - otherwise: hold.
//!
//! It never goes above the operator's rate limit (nor
//! `control.adaptive_max_per_second` without one), nor below
//! `control.adaptive_min_per_second`. The decision is a pure function
//! ([`next`]); the loop around it reads the signals and reports each change.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::runtime::Runtime;

/// What the controller looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signals {
    /// p99 latency of the newest second with completions, ms.
    pub p99_ms: Option<u64>,
    /// Payments that reached a terminal state per second, lately (the
    /// best of the newest seconds).
    pub completed_per_second: u64,
    /// Payments admitted and not yet terminal: at the rate they complete,
    /// how long the newest one will wait (Little's law), before its
    /// latency shows.
    pub inflight: u64,
    /// Records waiting behind every input of the pipeline.
    pub lag_records: u64,
    /// Free space below `data.min_free_bytes`.
    pub space_low: bool,
}

/// The goals and bounds it works within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// p99 goal, ms (0: latency is not a signal).
    pub goal_p99_ms: u64,
    /// Lag bound, records (0: lag is not a signal).
    pub max_lag_records: u64,
    pub min_per_second: u64,
    /// The operator's limit, else `adaptive_max_per_second`.
    pub max_per_second: u64,
    /// How often [`next`] is asked, ms.
    pub interval_ms: u64,
}

/// The rate to set after `current` (0: not set yet), and why; `cut_lately`:
/// the controller backed off less than a second ago.
pub fn next(current: u64, signals: &Signals, policy: &Policy, cut_lately: bool) -> (u64, String) {
    let (min, max) = (
        policy.min_per_second,
        policy.max_per_second.max(policy.min_per_second),
    );
    let current = if current == 0 {
        max
    } else {
        current.clamp(min, max)
    };
    let p99 = signals.p99_ms.unwrap_or(0);
    let ahead_ms = signals.inflight * 1_000 / signals.completed_per_second.max(1);
    let goal = policy.goal_p99_ms;
    let bound = policy.max_lag_records;
    // Percent of the goal: the p99 measured, and the wait ahead.
    let share = |ms: u64| (ms * 100).checked_div(goal).unwrap_or(0);
    let (measured, waiting) = (share(p99), share(ahead_ms));
    let risk = if signals.space_low {
        Some("free space is below data.min_free_bytes".to_owned())
    } else if measured > RISK_P99 {
        Some(format!(
            "p99 {p99} ms is above {RISK_P99} % of the {goal} ms goal"
        ))
    } else if signals.inflight > 0 && waiting > RISK_AHEAD {
        Some(format!(
            "{} payments in flight at {}/s wait about {ahead_ms} ms, above {RISK_AHEAD} % of the {goal} ms goal",
            signals.inflight, signals.completed_per_second
        ))
    } else if bound > 0 && signals.lag_records > bound {
        Some(format!(
            "lag {} records is above {bound}",
            signals.lag_records
        ))
    } else {
        None
    };
    if let Some(why) = risk {
        if cut_lately {
            return (current, format!("holding after a back-off: {why}"));
        }
        // From what actually flowed: a rate far above it would take many
        // steps to matter.
        let flowing = signals.completed_per_second.max(min).min(current);
        let rate = (flowing * 7 / 10).max(min);
        return (rate, format!("backing off: {why}"));
    }
    let calm_lag = bound == 0 || signals.lag_records * 2 < bound;
    let calm = measured < CALM_P99 && waiting < CALM_AHEAD;
    if calm && calm_lag && current < max {
        // Far below the goal: up by half a second; closer: by a tenth.
        let fast = measured < FAST_P99 && waiting < FAST_AHEAD;
        let part = if fast { 2 } else { 10 };
        let step = (current / part).max(min) * policy.interval_ms.min(1_000) / 1_000;
        let rate = current.saturating_add(step.max(1)).min(max);
        let why = format!(
            "headroom: p99 {p99} ms, {ahead_ms} ms ahead, lag {} records",
            signals.lag_records
        );
        return (rate, why);
    }
    (
        current,
        "holding: the goals are met without headroom to spare".to_owned(),
    )
}

/// At risk above these percentages of the p99 goal: the p99 measured,
/// the wait ahead of the payments in flight.
const RISK_P99: u64 = 70;
const RISK_AHEAD: u64 = 50;
/// Headroom below these; much headroom below the `FAST_` ones.
const CALM_P99: u64 = 50;
const CALM_AHEAD: u64 = 25;
const FAST_P99: u64 = 25;
const FAST_AHEAD: u64 = 10;

/// A change of the rate, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateChange {
    pub from: u64,
    pub to: u64,
    pub reason: String,
}

/// Starts the controller when `control.adaptive` is on, reading the
/// signals with `read` (the composition root wires the instrumentation
/// plane in); its changes come out of the returned channel (the
/// composition root audits them).
pub fn start<F, Fut>(runtime: &Runtime, read: F) -> Option<mpsc::Receiver<RateChange>>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Signals> + Send,
{
    let config = runtime.config();
    if !config.control.adaptive {
        return None;
    }
    let (changes, receiver) = mpsc::channel(64);
    let interval = Duration::from_millis(config.control.adaptive_interval_ms);
    let task = runtime.clone();
    runtime.spawn(async move {
        let mut last_cut: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = task.stopped() => return,
            }
            let signals = read().await;
            let config = task.config();
            let operator = task.rate_limit_share();
            let policy = Policy {
                goal_p99_ms: config.slo.latency_p99_ms,
                max_lag_records: config.slo.max_lag_records,
                min_per_second: config.control.adaptive_min_per_second,
                max_per_second: if operator > 0 {
                    operator
                } else {
                    config.control.adaptive_max_per_second
                },
                interval_ms: config.control.adaptive_interval_ms,
            };
            let before = task.throttle().get();
            let cut_lately = last_cut.is_some_and(|at| at.elapsed() < Duration::from_secs(1));
            let (rate, reason) = next(before.rate, &signals, &policy, cut_lately);
            if rate < before.rate || before.rate == 0 {
                last_cut = Some(std::time::Instant::now());
            }
            task.throttle().set(rate, reason.clone());
            if rate != before.rate {
                let change = RateChange {
                    from: before.rate,
                    to: rate,
                    reason,
                };
                let _ = changes.try_send(change);
            }
        }
    });
    Some(receiver)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        goal_p99_ms: 200,
        max_lag_records: 10_000,
        min_per_second: 10,
        max_per_second: 5_000,
        interval_ms: 1_000,
    };

    fn signals(p99: u64, flowing: u64, lag: u64) -> Signals {
        Signals {
            p99_ms: Some(p99),
            completed_per_second: flowing,
            inflight: 0,
            lag_records: lag,
            space_low: false,
        }
    }

    // A goal at risk cuts to 70 % of what flowed; headroom adds a tenth;
    // in between it holds; never above the limit nor below the floor.
    #[test]
    fn backs_off_fast_and_climbs_slowly_within_bounds() {
        assert_eq!(next(0, &signals(300, 1_000, 0), &POLICY, false).0, 700);
        assert_eq!(next(2_000, &signals(40, 1_000, 0), &POLICY, false).0, 3_000);
        assert_eq!(next(2_000, &signals(60, 1_000, 0), &POLICY, false).0, 2_200);
        assert_eq!(
            next(2_000, &signals(120, 1_000, 0), &POLICY, false).0,
            2_000
        );
        assert_eq!(next(4_900, &signals(10, 5_000, 0), &POLICY, false).0, 5_000);
        assert_eq!(
            next(9_000, &signals(120, 1_000, 0), &POLICY, false).0,
            5_000
        );
        assert_eq!(next(12, &signals(999, 1, 0), &POLICY, false).0, 10);
        let (rate, why) = next(2_000, &signals(50, 1_000, 20_000), &POLICY, false);
        assert_eq!(rate, 700);
        assert!(why.contains("lag 20000"), "{why}");
        let low = Signals {
            space_low: true,
            ..signals(10, 1_000, 0)
        };
        let (_, why) = next(2_000, &low, &POLICY, false);
        assert!(why.contains("free space"), "{why}");
        // 500 in flight at 1,000/s wait 500 ms: at risk before p99 shows it.
        let queued = Signals {
            inflight: 500,
            ..signals(10, 1_000, 0)
        };
        let (rate, why) = next(2_000, &queued, &POLICY, false);
        assert_eq!(rate, 700, "{why}");
        assert!(why.contains("500 payments in flight"), "{why}");
        // Once backed off, it waits for the cut to show before another.
        assert_eq!(next(700, &queued, &POLICY, true).0, 700);
        // A tenth a second: a fiftieth per step of 200 ms.
        let fast = Policy {
            interval_ms: 200,
            ..POLICY
        };
        assert_eq!(next(2_000, &signals(60, 1_000, 0), &fast, false).0, 2_040);
    }
}
