//! Adaptive intake against a pipeline that cannot keep up: the account
//! processor is slowed (a test hook) to about 500 payments/s while the
//! generator offers 1,500/s. With fixed intake every payment is accepted
//! and waits, so p99 grows past the goal; with `control.adaptive` the
//! controller backs the intake off (the rest are refused, to retry) and
//! p99 stays under the goal. Each run prints its curve: second, rate in
//! force, completions and p99.

mod common;

use std::time::Duration;

use common::{get, post, TestServer};
use kpay::model::now_ms;
use serde_json::json;

/// The p99 goal of both runs, ms.
const GOAL_MS: u64 = 400;
const SECONDS: usize = 16;

/// One second of a run: (second, rate in force, completions, p99 ms).
type Point = (usize, u64, u64, Option<u64>);

async fn run(adaptive: bool) -> Vec<Point> {
    let (server, c) = TestServer::builder()
        .config(move |config| {
            config.control.adaptive = adaptive;
            config.control.adaptive_interval_ms = 200;
            config.control.adaptive_max_per_second = 5_000;
            config.slo.latency_p99_ms = GOAL_MS;
            config.generator.accounts = 100;
            // Small batches: the slowed task sleeps per batch, at most 0.2 s.
            config.pipeline.batch_records = 50;
        })
        .start()
        .await;
    server
        .runtime()
        .throttle()
        .slow_accounts(Duration::from_millis(4));
    let start = json!({"action": "start", "rate": 1_500, "accounts": 100});
    let (status, answer) = post(&c, &server.url("/api/v1/generator"), start).await;
    assert_eq!(status, 200, "{answer}");
    let began = now_ms();
    let mut rates = Vec::new();
    for second in 1..=SECONDS {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, control) = get(&c, &server.url("/api/v1/control/status")).await;
        rates.push(control["rate_in_force"].as_u64().unwrap_or(0));
        if second == SECONDS {
            assert_eq!(control["adaptive"], json!(adaptive), "{control}");
            let by = if adaptive { "controller" } else { "operator" };
            assert_eq!(control["rate_set_by"], by, "{control}");
        }
    }
    // Every second of the run, as the live view kept it.
    let seconds = server.state.live.points(now_ms());
    let seconds = seconds.iter().filter(|p| p.at >= began - began % 1_000);
    let curve: Vec<Point> = seconds
        .enumerate()
        .map(|(n, p)| (n + 1, rates.get(n).copied().unwrap_or(0), p.count, p.p99_ms))
        .collect();
    let stop = json!({"action": "stop"});
    post(&c, &server.url("/api/v1/generator"), stop).await;
    server.runtime().throttle().slow_accounts(Duration::ZERO);
    if adaptive {
        // Each change of the rate is a control event in the audit trail.
        let (_, audit) = get(&c, &server.url("/api/v1/logs/audit?limit=100")).await;
        let changes = (audit["items"].as_array().unwrap().iter())
            .filter(|e| e["principal"] == "controller")
            .count();
        assert!(changes >= 2, "rate changes audited: {audit}");
    }
    server.stop().await;
    println!(
        "{} intake: second, rate in force, completed, p99 ms",
        if adaptive { "adaptive" } else { "fixed" }
    );
    for (second, rate, count, p99) in &curve {
        println!(
            "  {second:>2}  {rate:>5}  {count:>5}  {}",
            p99.map_or("-".into(), |p| p.to_string())
        );
    }
    curve
}

/// The worst p99 of the last `n` seconds that had completions.
fn tail_p99(curve: &[Point], n: usize) -> u64 {
    curve
        .iter()
        .rev()
        .take(n)
        .filter_map(|p| p.3)
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_intake_holds_p99_under_the_goal_where_fixed_intake_misses_it() {
    let fixed = run(false).await;
    let adaptive = run(true).await;
    let (missed, held) = (tail_p99(&fixed, 5), tail_p99(&adaptive, 5));
    assert!(
        missed > GOAL_MS,
        "fixed intake should miss the {GOAL_MS} ms goal: {fixed:?}"
    );
    assert!(
        held <= GOAL_MS,
        "adaptive intake should hold the {GOAL_MS} ms goal: {adaptive:?}"
    );
    // It admitted what the pipeline could take, not a trickle.
    let completed: u64 = adaptive.iter().rev().take(5).map(|p| p.2).sum();
    assert!(completed >= 5 * 150, "adaptive completions: {adaptive:?}");
}
