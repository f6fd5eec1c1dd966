//! Scale-out on Kafka: two kpay processes in one group share the
//! partitions. Each record is written once to each topic while both run,
//! balances agree on both, and after `kill -9` of one the other takes every
//! partition and finishes every payment, with the ledger still balanced.

mod common;

use std::time::Duration;

use common::cluster::{
    balances, client, cluster_env, confirmed, env_refs, open_accounts, owned_by_members,
    records_on, signal, submit_range, terminal_status, ACCOUNTS, OPENING,
};
use common::{get, kafka_broker, post, wait_until, Binary};
use kpay::config::KafkaConfig;
use kpay::log::kafka::KafkaLog;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_partitions_and_write_each_record_once() {
    let Some(broker) = kafka_broker("two_instances_share_the_partitions") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let env = cluster_env(&broker, dir.path());
    let topic = |key: &str| env.iter().find(|(k, _)| k == key).unwrap().1.clone();
    let (confirmed_topic, incoming_topic) = (
        topic("KPAY_TOPICS__CONFIRMED"),
        topic("KPAY_TOPICS__INCOMING"),
    );
    let env_refs = env_refs(&env);
    let a = Binary::start(&dir.path().join("a"), &env_refs).await;
    let mut b = Binary::start(&dir.path().join("b"), &env_refs).await;
    let c = client(10);
    let partitions = 8;
    wait_until(Duration::from_secs(30), || async {
        let mut seen: Vec<u64> = owned_by_members(&c, &a.base).await.concat();
        seen.sort_unstable();
        seen == (0..partitions).collect::<Vec<u64>>()
            && owned_by_members(&c, &a.base).await.len() == 2
            && owned_by_members(&c, &b.base).await == owned_by_members(&c, &a.base).await
    })
    .await;

    open_accounts(&c, &a.base).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_instance_that_wakes_up_moves_no_money_twice() {
    // SIGSTOP one instance under load (a long stall: it misses its heartbeats and is dropped), let the other take over and go on, SIGCONT it: it appends for a moment as a zombie, learns it was fenced and follows. Every payment ends once, every balance is its opening balance plus exactly its confirmed payments, on both.
    let Some(broker) = kafka_broker("a_stalled_instance_that_wakes_up") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let env = cluster_env(&broker, dir.path());
    let env_refs = env_refs(&env);
    let a = Binary::start(&dir.path().join("a"), &env_refs).await;
    let b = Binary::start(&dir.path().join("b"), &env_refs).await;
    let c = client(2);
    wait_until(Duration::from_secs(30), || async {
        owned_by_members(&c, &a.base).await.len() == 2
    })
    .await;
    open_accounts(&c, &a.base).await;
    let mut accepted = submit_range(&c, &[&a.base, &b.base], 0, 40).await;
    signal(&b, "STOP");
    accepted.extend(submit_range(&c, &[&a.base], 40, 80).await);
    // The stalled member is dropped; the other owns everything and goes on.
    wait_until(Duration::from_secs(30), || async {
        owned_by_members(&c, &a.base).await.len() == 1
    })
    .await;
    accepted.extend(submit_range(&c, &[&a.base], 80, 120).await);
    signal(&b, "CONT");
    accepted.extend(submit_range(&c, &[&a.base, &b.base], 120, 160).await);
    let mut confirmed_ids = Vec::new();
    for id in &accepted {
        if terminal_status(&c, &a.base, id).await == "confirmed" {
            confirmed_ids.push(id.clone());
        }
    }
    let mut expected = vec![OPENING; ACCOUNTS];
    for id in &confirmed_ids {
        let n: usize = id.trim_start_matches("sp-").parse().unwrap();
        expected[n % ACCOUNTS] -= 100;
        expected[(n + 3) % ACCOUNTS] += 100;
    }
    let expected: Vec<Value> = expected.into_iter().map(Value::from).collect();
    for base in [&a.base, &b.base] {
        wait_until(Duration::from_secs(30), || async {
            balances(&c, base).await == expected
        })
        .await;
        let (_, ledger) = get(&c, &format!("{base}/api/v1/ledger/integrity")).await;
        assert_eq!(ledger["ok"], true, "{ledger}");
    }
    assert!(
        confirmed_ids.len() >= 100,
        "{} of {} confirmed",
        confirmed_ids.len(),
        accepted.len()
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_during_a_pause_keeps_the_cluster_paused() {
    // Paused through one member, a third joins (a rebalance): every member, the new one included, says paused and admits nothing until a resume through any of them.
    let Some(broker) = kafka_broker("a_rebalance_during_a_pause") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let env = cluster_env(&broker, dir.path());
    let env_refs = env_refs(&env);
    let a = Binary::start(&dir.path().join("a"), &env_refs).await;
    let b = Binary::start(&dir.path().join("b"), &env_refs).await;
    let c = client(10);
    wait_until(Duration::from_secs(30), || async {
        owned_by_members(&c, &a.base).await.len() == 2
    })
    .await;
    open_accounts(&c, &a.base).await;
    let (status, answer) = post(&c, &format!("{}/api/v1/control/pause", a.base), json!({})).await;
    assert_eq!(status, 200, "{answer}");
    let third = Binary::start(&dir.path().join("c"), &env_refs).await;
    wait_until(Duration::from_secs(30), || async {
        owned_by_members(&c, &a.base).await.len() == 3
            && owned_by_members(&c, &b.base).await.len() == 3
            && owned_by_members(&c, &third.base).await.len() == 3
    })
    .await;
    let bases = [&a.base, &b.base, &third.base];
    for base in bases {
        let (_, status) = get(&c, &format!("{base}/api/v1/control/status")).await;
        assert_eq!(status["state"], "paused", "{base}: {status}");
    }
    let ids = submit_range(&c, &[&a.base, &b.base, &third.base], 0, 12).await;
    assert_eq!(ids.len(), 12);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Not yet admitted, a payment is known to the instance that accepted it.
    for (n, id) in ids.iter().enumerate() {
        let base = bases[n % bases.len()];
        let (_, payment) = get(&c, &format!("{base}/api/v1/payments/{id}")).await;
        assert_eq!(
            payment["status"], "accepted",
            "admitted while paused: {payment}"
        );
    }
    let (status, _) = post(
        &c,
        &format!("{}/api/v1/control/resume", third.base),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    for id in &ids {
        wait_until(Duration::from_secs(30), || async {
            confirmed(&c, &a.base, id).await
        })
        .await;
    }
    for server in [a, b, third] {
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_is_the_clusters_total() {
    // A limit of 200/s set through one member holds for the cluster as a whole: each member admits its share (the share of partitions it owns), so 600 payments submitted to both are admitted at 200/s ± 15%, measured from their owners' admission hops.
    let Some(broker) = kafka_broker("the_rate_limit_is_the_clusters_total") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let env = cluster_env(&broker, dir.path());
    let env_refs = env_refs(&env);
    let a = Binary::start(&dir.path().join("a"), &env_refs).await;
    let b = Binary::start(&dir.path().join("b"), &env_refs).await;
    let c = client(10);
    wait_until(Duration::from_secs(30), || async {
        owned_by_members(&c, &a.base).await.len() == 2
            && owned_by_members(&c, &b.base).await.len() == 2
    })
    .await;
    open_accounts(&c, &a.base).await;
    let limit = 200u64;
    let response = c
        .put(format!("{}/api/v1/control/rate-limit", a.base))
        .json(&json!({"payments_per_second": limit}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Both members have applied it before the load starts.
    wait_until(Duration::from_secs(10), || async {
        get(&c, &format!("{}/api/v1/control/status", b.base))
            .await
            .1["rate_limit"]
            == limit
    })
    .await;
    let count = limit as usize * 3;
    let ids: Vec<String> = (0..count).map(|n| format!("rl-{n}")).collect();
    for (half, base) in [&a.base, &b.base].into_iter().enumerate() {
        let batch: Vec<Value> = (ids.iter().skip(half).step_by(2))
            .map(|id| json!({"id": id, "from": "so-1", "to": "so-2", "amount": 1}))
            .collect();
        let (status, _) = post(
            &c,
            &format!("{base}/api/v1/payments/batch"),
            json!({"payments": batch}),
        )
        .await;
        assert_eq!(status, 200);
    }
    // Each payment as its partition's owner admitted it.
    let (_, view) = get(&c, &format!("{}/api/v1/cluster", a.base)).await;
    let owner_of = |partition: u32| {
        let members = view["members"].as_array().unwrap();
        let owner = members.iter().find(|m| {
            m["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p.as_u64() == Some(u64::from(partition)))
        });
        owner.unwrap()["url"].as_str().unwrap().to_owned()
    };
    let mut admitted = Vec::new();
    for id in &ids {
        let base = owner_of(kpay::model::partition_for(id, 8));
        wait_until(Duration::from_secs(30), || async {
            confirmed(&c, &base, id).await
        })
        .await;
        let (_, payment) = get(&c, &format!("{base}/api/v1/payments/{id}")).await;
        admitted.push(payment["lineage"][0]["processed_at"].as_i64().unwrap());
    }
    admitted.sort_unstable();
    let steady = &admitted[(limit / 5) as usize..];
    let seconds = (steady[steady.len() - 1] - steady[0]) as f64 / 1_000.0;
    let rate = (steady.len() - 1) as f64 / seconds;
    println!("admitted at {rate:.1}/s with a cluster limit of {limit}/s");
    let (low, high) = (limit as f64 * 0.85, limit as f64 * 1.15);
    assert!(
        (low..=high).contains(&rate),
        "admitted at {rate:.1}/s with a cluster limit of {limit}/s"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_restores_from_the_snapshots() {
    // One instance takes snapshots every second; a second one joins with an empty data directory: it restores every task partition from the latest snapshots (it says so), then replays only the tail. Its local copy of the ledger (the integrity check) and the payments and accounts it comes to own agree with the first's.
    let Some(broker) = kafka_broker("a_new_instance_restores") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut env = cluster_env(&broker, dir.path());
    env.push(("KPAY_CLUSTER__SNAPSHOT_INTERVAL_MS".into(), "1000".into()));
    let env_refs = env_refs(&env);
    let a = Binary::start(&dir.path().join("a"), &env_refs).await;
    let c = client(10);
    wait_until(Duration::from_secs(30), || async {
        owned_by_members(&c, &a.base).await.len() == 1
    })
    .await;
    open_accounts(&c, &a.base).await;
    let accepted = submit_range(&c, &[&a.base], 0, 40).await;
    for id in &accepted {
        terminal_status(&c, &a.base, id).await;
    }
    // Past an interval and a checkpoint: the snapshots hold all of it.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let more = submit_range(&c, &[&a.base], 40, 60).await;
    let mut with_info = env_refs.clone();
    with_info.push(("RUST_LOG", "warn,kpay::runtime::snapshot=info"));
    let output = dir.path().join("b.out");
    let b = Binary::spawn_logged(&dir.path().join("b"), &with_info, &output);
    b.wait_ready().await;
    let said = std::fs::read_to_string(&output).unwrap();
    assert!(
        said.contains("restored task partitions from their snapshots"),
        "{said}"
    );
    wait_until(Duration::from_secs(30), || async {
        owned_by_members(&c, &b.base).await.len() == 2
            && owned_by_members(&c, &a.base).await.len() == 2
    })
    .await;
    let ids: Vec<String> = accepted.iter().chain(&more).cloned().collect();
    for id in &ids {
        terminal_status(&c, &b.base, id).await;
    }
    let ledger = |base: String| {
        let c = c.clone();
        async move { get(&c, &format!("{base}/api/v1/ledger/integrity")).await.1 }
    };
    wait_until(Duration::from_secs(30), || async {
        ledger(a.base.clone()).await == ledger(b.base.clone()).await
    })
    .await;
    let (_, on_b) = get(&c, &format!("{}/api/v1/ledger/integrity", b.base)).await;
    assert_eq!(on_b["ok"], true, "{on_b}");
    assert_eq!(on_b["accounts"], ACCOUNTS, "{on_b}");
    assert_eq!(balances(&c, &a.base).await, balances(&c, &b.base).await);
    a.stop().await;
    b.stop().await;
}
