//! `GET /metrics` against a real server, validated by Prometheus's own
//! `promtool check metrics`. Its own test binary, because the metrics
//! recorder is process-wide.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{post, skip_or_fail_in_ci, terminal, wait_until, TestServer};
use serde_json::json;

fn promtool_check(text: &str) -> Option<(bool, String)> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(text.as_bytes()).ok()?;
    let output = child.wait_with_output().ok()?;
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    Some((output.status.success(), said))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_is_valid_and_tells_the_business_story() {
    // The exposition parses and lints clean with promtool and carries payments by status, money, latency, lag, DLQ, HTTP and RSS.
    let (server, c) = TestServer::with_accounts(&[("a", 10_000), ("b", 0)]).await;
    for (n, amount) in [(0, 100), (1, 250), (2, 1_000_000)] {
        let body = json!({"id": format!("m{n}"), "from": "a", "to": "b", "amount": amount});
        assert_eq!(post(&c, &server.url("/api/v1/payments"), body).await.0, 202);
    }
    for n in 0..3 {
        terminal(&c, &server.base, &format!("m{n}")).await;
    }
    // Tasks checkpoint within their commit interval (500 ms) once idle.
    let metrics = server.url("/metrics");
    wait_until(Duration::from_secs(5), || async {
        let text = c.get(&metrics).send().await.unwrap().text().await.unwrap();
        text.contains("kpay_checkpoint_duration_seconds_bucket{")
    })
    .await;
    let response = c.get(&metrics).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for line in [
        "kpay_payments_total{status=\"confirmed\"} 2",
        "kpay_payments_total{status=\"rejected\"} 1",
        "kpay_confirmed_amount_cents_total 350",
        "kpay_inflight_payments 0",
        "kpay_dlq_records 0",
        "kpay_ledger_ok 1",
        "kpay_payment_latency_seconds_count 3",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    for name in [
        "kpay_consumer_lag_records{",
        "kpay_consumer_lag_oldest_seconds{",
        "kpay_task_batch_records_bucket{",
        "kpay_checkpoint_duration_seconds_bucket{",
        "kpay_http_requests_total{route=\"/api/v1/payments\",status=\"202\"} 3",
        "kpay_process_resident_memory_bytes ",
    ] {
        assert!(text.contains(name), "missing {name:?} in\n{text}");
    }
    match promtool_check(&text) {
        Some((ok, said)) => assert!(ok, "promtool check metrics failed:\n{said}"),
        None => skip_or_fail_in_ci(
            "exposition_is_valid_and_tells_the_business_story",
            "the promtool validation: promtool is not installed here \
             (.ci/run installs Debian's prometheus package)",
        ),
    }
    server.stop().await;
}
