//! Scale-out on Kafka: two kpay processes in one group share the
//! partitions. Each record is written once to each topic while both run,
//! balances agree on both, and after `kill -9` of one the other takes every
//! partition and finishes every payment, with the ledger still balanced.

mod common;

use std::time::Duration;

use common::{get, kafka_broker, kafka_topics, post, wait_until, Binary};
use kpay::config::KafkaConfig;
use kpay::log::kafka::KafkaLog;
use kpay::log::{Log, TopicPartition};
use serde_json::{json, Value};

const ACCOUNTS: usize = 10;
const OPENING: i64 = 10_000;

/// Records on every partition of `topic`.
async fn records_on(log: &KafkaLog, topic: &str, partitions: u32) -> u64 {
    let mut total = 0;
    for partition in 0..partitions {
        let tp = TopicPartition::new(topic, partition);
        total += log.high_watermark(&tp).await.unwrap() - log.log_start(&tp).await.unwrap();
    }
    total
}

/// The partitions each member owns, as `base` sees the group.
async fn owned_by_members(c: &reqwest::Client, base: &str) -> Vec<Vec<u64>> {
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

async fn confirmed(c: &reqwest::Client, base: &str, id: &str) -> bool {
    get(c, &format!("{base}/api/v1/payments/{id}")).await.1["status"] == "confirmed"
}

async fn balances(c: &reqwest::Client, base: &str) -> Vec<Value> {
    let mut all = Vec::new();
    for n in 0..ACCOUNTS {
        all.push(get(c, &format!("{base}/api/v1/accounts/so-{n}")).await.1["balance"].clone());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_partitions_and_write_each_record_once() {
    let Some(broker) = kafka_broker("two_instances_share_the_partitions") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut env = kafka_topics(&broker, dir.path());
    let group = format!("g-{}", uuid::Uuid::now_v7());
    for (key, value) in [
        ("KPAY_CLUSTER__SCALE_OUT", "true"),
        ("KPAY_CLUSTER__GROUP", group.as_str()),
        ("KPAY_CLUSTER__SESSION_TIMEOUT_MS", "4000"),
        ("KPAY_CLUSTER__HEARTBEAT_INTERVAL_MS", "500"),
    ] {
        env.push((key.to_owned(), value.to_owned()));
    }
    let topic = |key: &str| env.iter().find(|(k, _)| k == key).unwrap().1.clone();
    let (confirmed_topic, incoming_topic) = (
        topic("KPAY_TOPICS__CONFIRMED"),
        topic("KPAY_TOPICS__INCOMING"),
    );
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let a = Binary::start(&dir.path().join("a"), &env_refs).await;
    let mut b = Binary::start(&dir.path().join("b"), &env_refs).await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let partitions = 8;
    wait_until(Duration::from_secs(30), || async {
        let mut seen: Vec<u64> = owned_by_members(&c, &a.base).await.concat();
        seen.sort_unstable();
        seen == (0..partitions).collect::<Vec<u64>>()
            && owned_by_members(&c, &a.base).await.len() == 2
            && owned_by_members(&c, &b.base).await == owned_by_members(&c, &a.base).await
    })
    .await;

    for n in 0..ACCOUNTS {
        let body = json!({"id": format!("so-{n}"), "opening_balance": OPENING});
        let (status, answer) = post(&c, &format!("{}/api/v1/accounts", a.base), body).await;
        assert_eq!(status, 201, "{answer}");
    }
    let payments: usize = 50;
    for n in 0..payments {
        let base = if n % 2 == 0 { &a.base } else { &b.base };
        let body = json!({"id": format!("sp-{n}"), "from": format!("so-{}", n % ACCOUNTS),
                          "to": format!("so-{}", (n + 3) % ACCOUNTS), "amount": 100});
        let (status, answer) = post(&c, &format!("{base}/api/v1/payments"), body).await;
        assert_eq!(status, 202, "{answer}");
    }
    // Every payment confirmed as seen from both instances (the owner, and the follower).
    for n in 0..payments {
        let id = format!("sp-{n}");
        wait_until(Duration::from_secs(30), || async {
            confirmed(&c, &a.base, &id).await && confirmed(&c, &b.base, &id).await
        })
        .await;
    }
    let kafka = KafkaConfig {
        brokers: vec![broker.clone()],
        ..KafkaConfig::default()
    };
    let log = KafkaLog::connect(&kafka).await.unwrap();
    assert_eq!(
        records_on(&log, &confirmed_topic, partitions as u32).await as usize,
        payments,
        "each payment written once to payment.confirmed"
    );
    assert_eq!(
        records_on(&log, &incoming_topic, partitions as u32).await as usize,
        payments
    );
    wait_until(Duration::from_secs(10), || async {
        balances(&c, &a.base).await == balances(&c, &b.base).await
    })
    .await;
    let total: i64 = balances(&c, &a.base)
        .await
        .iter()
        .map(|b| b.as_i64().unwrap())
        .sum();
    assert_eq!(total, OPENING * ACCOUNTS as i64);

    // Kill one: the other takes every partition and finishes new payments.
    b.kill9();
    wait_until(Duration::from_secs(20), || async {
        owned_by_members(&c, &a.base).await == vec![(0..partitions).collect::<Vec<u64>>()]
    })
    .await;
    for n in payments..payments + 20 {
        let body = json!({"id": format!("sp-{n}"), "from": format!("so-{}", n % ACCOUNTS),
                          "to": format!("so-{}", (n + 3) % ACCOUNTS), "amount": 100});
        let (status, answer) = post(&c, &format!("{}/api/v1/payments", a.base), body).await;
        assert_eq!(status, 202, "{answer}");
    }
    for n in 0..payments + 20 {
        let id = format!("sp-{n}");
        wait_until(Duration::from_secs(30), || async {
            confirmed(&c, &a.base, &id).await
        })
        .await;
    }
    let (_, ledger) = get(&c, &format!("{}/api/v1/ledger/integrity", a.base)).await;
    assert_eq!(ledger["ok"], true, "{ledger}");
    let total: i64 = balances(&c, &a.base)
        .await
        .iter()
        .map(|b| b.as_i64().unwrap())
        .sum();
    assert_eq!(total, OPENING * ACCOUNTS as i64);
    a.stop().await;
}
