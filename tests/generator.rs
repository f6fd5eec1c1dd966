//! The payment generator and the live stream, end to end over HTTP.

mod common;

use std::time::{Duration, Instant};

use common::{get, post, wait_until, TestServer};
use serde_json::{json, Value};

async fn generator(c: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    post(c, &format!("{base}/api/v1/generator"), body).await
}

async fn sent(c: &reqwest::Client, base: &str) -> u64 {
    get(c, &format!("{base}/api/v1/generator")).await.1["sent"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_sends_every_outcome_and_honours_pause_and_rate_limit() {
    let (server, c) = TestServer::builder().start().await;
    let base = server.base.clone();
    for bad in [
        json!({"action": "start", "rate": 0}),
        json!({"action": "start", "rate": 10, "accounts": 1}),
        json!({"action": "start", "rate": 10, "skew": -1.0}),
        json!({"action": "start", "rate": 10, "speed": 1}),
        json!({"action": "launch"}),
    ] {
        let (status, answer) = generator(&c, &base, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    let (status, started) = generator(
        &c,
        &base,
        json!({"action": "start", "rate": 400, "accounts": 50, "skew": 1.0}),
    )
    .await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["running"], true);
    // Every outcome shows up: confirmed, rejected (empty account), reversed (missing account).
    wait_until(Duration::from_secs(20), || async {
        let (_, m) = get(&c, &format!("{base}/api/v1/metrics/pipeline")).await;
        m["confirmed"]["count"].as_u64() > Some(200)
            && m["rejected"]["by_reason"]["insufficient_funds"].as_u64() > Some(0)
            && m["reversed"]["by_reason"]["unknown_account"].as_u64() > Some(0)
    })
    .await;
    let (_, account) = get(&c, &format!("{base}/api/v1/accounts/gen-00000")).await;
    assert_eq!(account["status"], "open", "{account}");
    // The rate: about 400 per second.
    let (before, start) = (sent(&c, &base).await, Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rate = (sent(&c, &base).await - before) as f64 / start.elapsed().as_secs_f64();
    assert!((300.0..=480.0).contains(&rate), "sent {rate:.0}/s at 400/s");

    // Paused: nothing is sent.
    let (status, _) = post(
        &c,
        &format!("{base}/api/v1/control/pause?wait=true"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let during = sent(&c, &base).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sent(&c, &base).await, during, "sent while paused");
    post(&c, &format!("{base}/api/v1/control/resume"), json!({})).await;

    // A rate limit below the generator's rate caps it.
    let limit = c
        .put(format!("{base}/api/v1/control/rate-limit"))
        .json(&json!({"payments_per_second": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(limit.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before, start) = (sent(&c, &base).await, Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rate = (sent(&c, &base).await - before) as f64 / start.elapsed().as_secs_f64();
    assert!(
        (60.0..=125.0).contains(&rate),
        "sent {rate:.0}/s under a 100/s limit"
    );

    // Stopped: nothing more; every submission answered.
    let (status, stopped) = generator(&c, &base, json!({"action": "stop"})).await;
    assert_eq!(status, 200);
    assert_eq!(stopped["running"], false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, done) = get(&c, &format!("{base}/api/v1/generator")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, later) = get(&c, &format!("{base}/api/v1/generator")).await;
    assert_eq!(done["sent"], later["sent"]);
    assert_eq!(
        later["sent"].as_u64().unwrap(),
        later["accepted"].as_u64().unwrap() + later["refused"].as_u64().unwrap(),
        "{later}"
    );
    let (_, ledger) = get(&c, &format!("{base}/api/v1/ledger/integrity")).await;
    assert_eq!(ledger["ok"], true, "{ledger}");
    // Running at shutdown: the server still stops cleanly.
    generator(&c, &base, json!({"action": "start", "rate": 1000})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_pushes_a_snapshot_every_second() {
    let (server, c) = TestServer::builder().start().await;
    let base = server.base.clone();
    generator(
        &c,
        &base,
        json!({"action": "start", "rate": 200, "accounts": 20}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut response = c.get(format!("{base}/api/v1/stream")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (mut text, start) = (String::new(), Instant::now());
    while text.matches("event: snapshot").count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.chunk())
            .await
            .expect("a snapshot within 5 s")
            .unwrap()
            .expect("stream open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1_800),
        "{elapsed:?}: one per second"
    );
    let snapshots: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let last = snapshots.last().unwrap();
    for field in ["pipeline", "control", "generator", "slo", "lag"] {
        assert!(last[field].is_object(), "{field}: {last}");
    }
    assert_eq!(last["generator"]["running"], true);
    assert_eq!(last["control"]["state"], "running");
    let live = last["live"].as_array().unwrap();
    assert!(live.len() <= 120, "bounded");
    let counted: u64 = live.iter().map(|p| p["count"].as_u64().unwrap()).sum();
    assert!(counted > 100, "{counted} completions in the live seconds");
    let busy = live.iter().find(|p| p["count"].as_u64() > Some(0)).unwrap();
    assert!(busy["p99_ms"].as_u64().is_some() && busy["at"].as_i64().unwrap() % 1_000 == 0);
    drop(response);
    server.stop().await;
}
