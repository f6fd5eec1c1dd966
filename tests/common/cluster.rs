//! Helpers of the cluster tests: one test's environment (its own topics and
//! group on the broker), accounts `so-0`…, payments `sp-N` between them,
//! and what the members say about the group.

use kpay::log::kafka::KafkaLog;
use kpay::log::{Log, TopicPartition};
use serde_json::{json, Value};

use super::{get, kafka_topics, post, Binary};

pub const ACCOUNTS: usize = 10;
pub const OPENING: i64 = 10_000;

/// The environment of one test's cluster: its own topics on `broker`, a new
/// group, and a short session so that takeovers are quick.
pub fn cluster_env(broker: &str, dir: &std::path::Path) -> Vec<(String, String)> {
    let mut env = kafka_topics(broker, dir);
    let group = format!("g-{}", uuid::Uuid::now_v7());
    for (key, value) in [
        ("KPAY_CLUSTER__SCALE_OUT", "true"),
        ("KPAY_CLUSTER__GROUP", group.as_str()),
        ("KPAY_CLUSTER__SESSION_TIMEOUT_MS", "4000"),
        ("KPAY_CLUSTER__HEARTBEAT_INTERVAL_MS", "500"),
    ] {
        env.push((key.to_owned(), value.to_owned()));
    }
    env
}

/// `env` as the `(&str, &str)` pairs `Binary` takes.
pub fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// An HTTP client whose every request gives up after `seconds`.
pub fn client(seconds: u64) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(seconds))
        .build()
        .unwrap()
}

/// Opens `so-0`… with `OPENING` cents each, through `base`.
pub async fn open_accounts(c: &reqwest::Client, base: &str) {
    for n in 0..ACCOUNTS {
        let body = json!({"id": format!("so-{n}"), "opening_balance": OPENING});
        let (status, answer) = post(c, &format!("{base}/api/v1/accounts"), body).await;
        assert_eq!(status, 201, "{answer}");
    }
}

/// Records on every partition of `topic`.
pub async fn records_on(log: &KafkaLog, topic: &str, partitions: u32) -> u64 {
    let mut total = 0;
    for partition in 0..partitions {
        let tp = TopicPartition::new(topic, partition);
        total += log.high_watermark(&tp).await.unwrap() - log.log_start(&tp).await.unwrap();
    }
    total
}

/// The partitions each member owns, as `base` sees the group.
pub async fn owned_by_members(c: &reqwest::Client, base: &str) -> Vec<Vec<u64>> {
    let (_, view) = get(c, &format!("{base}/api/v1/cluster")).await;
    if view["state"] != "stable" {
        return Vec::new();
    }
    (view["members"].as_array().unwrap().iter())
        .map(|m| {
            m["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_u64().unwrap())
                .collect()
        })
        .collect()
}

pub async fn confirmed(c: &reqwest::Client, base: &str, id: &str) -> bool {
    get(c, &format!("{base}/api/v1/payments/{id}")).await.1["status"] == "confirmed"
}

pub async fn balances(c: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut all = Vec::new();
    for n in 0..ACCOUNTS {
        all.push(get(c, &format!("{base}/api/v1/accounts/so-{n}")).await.1["balance"].clone());
    }
    all
}

/// Sends `signal` (`STOP`, `CONT`) to the process.
pub fn signal(server: &Binary, signal: &str) {
    let pid = server.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}").as_str(), pid.as_str()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Submits `sp-{from}`..`sp-{to}` round-robin over `bases`, tolerating
/// refusals from a stopped instance (its time-outs).
pub async fn submit_range(
    c: &reqwest::Client,
    bases: &[&str],
    from: usize,
    to: usize,
) -> Vec<String> {
    let mut accepted = Vec::new();
    for n in from..to {
        let base = bases[n % bases.len()];
        let body = json!({"id": format!("sp-{n}"), "from": format!("so-{}", n % ACCOUNTS),
                          "to": format!("so-{}", (n + 3) % ACCOUNTS), "amount": 100});
        if let Ok(response) = c
            .post(format!("{base}/api/v1/payments"))
            .json(&body)
            .send()
            .await
        {
            if response.status() == 202 {
                accepted.push(format!("sp-{n}"));
            }
        }
    }
    accepted
}

/// The status of payment `id` once it is terminal (`confirmed` or
/// `rejected`), as `base` answers; 503s (a rebalance) are asked again.
pub async fn terminal_status(c: &reqwest::Client, base: &str, id: &str) -> String {
    let url = format!("{base}/api/v1/payments/{id}");
    let start = std::time::Instant::now();
    loop {
        if let Ok(answer) = c.get(&url).send().await {
            if answer.status() == 200 {
                let payment: Value = answer.json().await.unwrap();
                let status = payment["status"].as_str().unwrap().to_owned();
                if status == "confirmed" || status == "rejected" {
                    return status;
                }
            }
        }
        assert!(
            start.elapsed().as_secs() < 60,
            "{id} not terminal within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
