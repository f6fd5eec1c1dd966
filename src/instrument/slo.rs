//! Business goals (SLOs) from config, evaluated every second against the
//! windows, the DLQ and consumer lag: each goal, its current value, whether
//! it is met and since when.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use utoipa::ToSchema;

use crate::config::SloConfig;
use crate::model::now_ms;
use crate::pipeline::windows::WindowStats;
use crate::runtime::{dead_letter, Runtime, RuntimeError};

/// A goal checked once: what it is, the value now, whether it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluated {
    pub name: &'static str,
    pub objective: String,
    pub current: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SloStatus {
    /// `latency_p99`, `throughput`, `dlq_empty`, `lag`.
    pub name: String,
    /// The goal in words, e.g. `p99 latency < 200 ms`.
    pub objective: String,
    /// The value it is judged on now.
    pub current: f64,
    pub met: bool,
    /// Since when (ms since the epoch) it has been met or missed.
    pub since: i64,
}

/// What the goals are judged on.
pub struct Inputs<'a> {
    pub windows: &'a WindowStats,
    pub dlq_size: u64,
    pub lag_records: u64,
    pub now_ms: i64,
}

/// Judges every configured goal. Latency uses the newest window with
/// payments; throughput the newest window that has ended.
pub fn evaluate(config: &SloConfig, inputs: &Inputs) -> Vec<Evaluated> {
    let mut goals = Vec::new();
    if config.latency_p99_ms > 0 {
        let p99 = inputs
            .windows
            .windows
            .iter()
            .rev()
            .find(|w| w.count > 0)
            .map_or(0, |w| w.latency.0.value_at_quantile(0.99));
        goals.push(Evaluated {
            name: "latency_p99",
            objective: format!("p99 latency < {} ms", config.latency_p99_ms),
            current: p99 as f64,
            met: p99 < config.latency_p99_ms,
        });
    }
    if config.min_throughput_per_second > 0 {
        let window_ms = inputs.windows.window_ms.max(1);
        let ended = inputs
            .windows
            .windows
            .iter()
            .rev()
            .find(|w| w.start_ms + window_ms <= inputs.now_ms);
        let rate = ended.map_or(0.0, |w| w.count as f64 * 1_000.0 / window_ms as f64);
        goals.push(Evaluated {
            name: "throughput",
            objective: format!(
                "throughput > {} payments/s",
                config.min_throughput_per_second
            ),
            current: rate,
            met: rate > config.min_throughput_per_second as f64,
        });
    }
    if config.dlq_empty {
        goals.push(Evaluated {
            name: "dlq_empty",
            objective: "dead letter queue empty".into(),
            current: inputs.dlq_size as f64,
            met: inputs.dlq_size == 0,
        });
    }
    if config.max_lag_records > 0 {
        goals.push(Evaluated {
            name: "lag",
            objective: format!("consumer lag < {} records", config.max_lag_records),
            current: inputs.lag_records as f64,
            met: inputs.lag_records < config.max_lag_records,
        });
    }
    goals
}

/// Remembers since when each goal has been in its current state.
#[derive(Default)]
pub struct SloTracker {
    /// Goal name → (met, since ms).
    states: Mutex<BTreeMap<&'static str, (bool, i64)>>,
}

impl SloTracker {
    pub fn observe(&self, evaluated: Vec<Evaluated>, now_ms: i64) -> Vec<SloStatus> {
        let mut states = self.states.lock().expect("slo lock");
        evaluated
            .into_iter()
            .map(|goal| {
                let entry = states.entry(goal.name).or_insert((goal.met, now_ms));
                if entry.0 != goal.met {
                    *entry = (goal.met, now_ms);
                }
                SloStatus {
                    name: goal.name.to_owned(),
                    objective: goal.objective,
                    current: goal.current,
                    met: goal.met,
                    since: entry.1,
                }
            })
            .collect()
    }
}

/// Every business goal now: value, met or not, since when.
pub async fn status(
    runtime: &Runtime,
    tracker: &SloTracker,
) -> Result<Vec<SloStatus>, RuntimeError> {
    let lag_records = super::lag::owned_lag(runtime)
        .await?
        .iter()
        .map(|l| l.lag_records)
        .sum();
    let dlq_size = runtime.store().count(dead_letter::TABLE);
    let now = now_ms();
    let windows = runtime.windows();
    let inputs = Inputs {
        windows: &windows,
        dlq_size,
        lag_records,
        now_ms: now,
    };
    Ok(tracker.observe(evaluate(&runtime.config().slo, &inputs), now))
}

/// Judges the business goals every second, so `since` is right to the
/// second, until the processors stop.
pub fn watch(runtime: &Runtime, tracker: Arc<SloTracker>) {
    let handle = runtime.clone();
    runtime.spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = handle.stopped() => break,
            }
            if let Err(error) = status(&handle, &tracker).await {
                tracing::warn!(%error, "cannot judge business goals");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::windows::Window;

    fn windows(counts_and_p99: &[(i64, u64, u64)]) -> WindowStats {
        let mut stats = WindowStats::new(1_000, 10);
        for (start_ms, count, latency_ms) in counts_and_p99 {
            let mut window = Window {
                start_ms: *start_ms,
                count: *count,
                ..Window::default()
            };
            for _ in 0..*count {
                window.latency.0.record(*latency_ms).unwrap();
            }
            stats.windows.push_back(window);
        }
        stats
    }

    // Each goal is judged on the right window and flips with its value; `since` moves only on a flip.
    #[test]
    fn goals_are_judged_and_tracked() {
        let config = SloConfig {
            latency_p99_ms: 200,
            min_throughput_per_second: 5,
            dlq_empty: true,
            max_lag_records: 100,
        };
        let stats = windows(&[(0, 10, 150), (1_000, 2, 500)]);
        let inputs = Inputs {
            windows: &stats,
            dlq_size: 0,
            lag_records: 3,
            now_ms: 1_500,
        };
        let goals = evaluate(&config, &inputs);
        let by_name: BTreeMap<_, _> = goals.iter().map(|g| (g.name, g)).collect();
        assert!(
            !by_name["latency_p99"].met,
            "newest window with data has p99 ≈ 500"
        );
        assert_eq!(
            by_name["throughput"].current, 10.0,
            "the ended window [0, 1000) had 10"
        );
        assert!(by_name["throughput"].met && by_name["dlq_empty"].met && by_name["lag"].met);
        let tracker = SloTracker::default();
        let first = tracker.observe(goals.clone(), 1_500);
        assert!(first.iter().all(|s| s.since == 1_500));
        let again = tracker.observe(goals, 2_000);
        assert!(
            again.iter().all(|s| s.since == 1_500),
            "no flip, no new since"
        );
        let inputs = Inputs {
            windows: &stats,
            dlq_size: 1,
            lag_records: 3,
            now_ms: 2_500,
        };
        let flipped = tracker.observe(evaluate(&config, &inputs), 2_500);
        let dlq = flipped.iter().find(|s| s.name == "dlq_empty").unwrap();
        assert!(!dlq.met && dlq.since == 2_500);
    }

    // A goal set to 0 (or false) is not judged at all.
    #[test]
    fn disabled_goals_are_absent() {
        let config = SloConfig {
            latency_p99_ms: 0,
            min_throughput_per_second: 0,
            dlq_empty: false,
            max_lag_records: 0,
        };
        let stats = WindowStats::new(1_000, 1);
        let inputs = Inputs {
            windows: &stats,
            dlq_size: 9,
            lag_records: 9,
            now_ms: 0,
        };
        assert!(evaluate(&config, &inputs).is_empty());
    }
}
