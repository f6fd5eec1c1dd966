//! The pipeline below HTTP: dead letters for records that cannot be
//! processed, and log retention once every processor has passed a segment.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{test_config, wait_until, TestServer};
use kpay::log::{Record, TopicPartition};
use kpay::model::{PaymentRef, Submitter};
use kpay::ops::dlq::{DeadLetter, TABLE};

async fn submit_many(server: &TestServer, prefix: &str, count: usize) {
    for n in 0..count {
        let payment = PaymentRef {
            id: format!("{prefix}-{n}"),
            from: "a".into(),
            to: "b".into(),
            amount_cents: 1,
            accepted_at_ms: 0,
        };
        server
            .runtime()
            .ingest()
            .submit(payment, Submitter::new("test", "tests/pipeline.rs"))
            .await
            .unwrap();
    }
}

async fn wait_confirmed(server: &TestServer, count: u64) {
    wait_until(Duration::from_secs(30), || async {
        server.runtime().confirmed_totals().confirmed_count >= count
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_records_are_dead_lettered_and_the_rest_flows() {
    // Garbage on each input topic lands in the DLQ with its coordinates and reason; valid records after it complete.
    let (server, _) = TestServer::with_accounts(&[("a", 1_000_000), ("b", 0)]).await;
    let dir = server.dir();
    let shared = server.runtime().clone();
    let garbage = Record {
        key: Bytes::from_static(b"junk"),
        value: Bytes::from_static(b"\xff\x00 not an event"),
        timestamp_ms: 0,
    };
    let topics = [
        &shared.topics().incoming,
        &shared.topics().inflight,
        &shared.topics().complete,
    ];
    let mut expected = Vec::new();
    for topic in topics {
        let tp = TopicPartition::new(topic.clone(), 1);
        let offset = shared
            .log()
            .append(&tp, vec![garbage.clone()])
            .await
            .unwrap();
        expected.push((topic.clone(), offset));
    }
    submit_many(&server, "after", 200).await;
    wait_confirmed(&server, 200).await;
    drop(shared);
    server.stop().await;

    let store = kpay::store::Store::open(&dir.path().join("state"), 1 << 20).unwrap();
    let letters: Vec<(String, DeadLetter)> = store.scan(TABLE, None, 100).unwrap();
    // payment.complete is read by two processors (inflight and confirmed), so
    // its garbage is dead-lettered by each of them.
    assert_eq!(letters.len(), 4, "{letters:#?}");
    for (topic, offset) in expected {
        let found: Vec<&DeadLetter> = letters
            .iter()
            .map(|(_, l)| l)
            .filter(|l| {
                l.source_topic == topic && l.source_partition == 1 && l.source_offset == offset
            })
            .collect();
        assert!(!found.is_empty(), "no dead letter for {topic}:1:{offset}");
        for letter in found {
            assert_eq!(letter.class, "decode");
            assert!(
                letter.reason.contains("unknown schema version 255"),
                "{}",
                letter.reason
            );
            assert_eq!(letter.key, "junk");
            assert_eq!(letter.value_hex, "ff00206e6f7420616e206576656e74");
        }
    }
    drop(store);
    let server = TestServer::start(test_config(dir.path())).await;
    let ledger = kpay::instrument::Integrity::from(&server.runtime().ledger());
    assert!(ledger.ok, "{ledger:?}");
    assert_eq!(server.runtime().confirmed_totals().confirmed_count, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_segments_every_processor_has_passed() {
    // Once all consumers have durably passed old segments, they are deleted and disk use stops growing with traffic.
    let (server, _) = TestServer::builder()
        .config(|c| {
            c.log.sink_retain_records = 100;
            c.log.history_bytes = 0;
        })
        .accounts(&[("a", 1_000_000_000), ("b", 0)])
        .start()
        .await;
    let shared = server.runtime().clone();
    // About 3 MiB of records in all: three times the 1 MiB segment size.
    for (round, tag) in ["first", "second", "third"].into_iter().enumerate() {
        submit_many(&server, tag, 6_000).await;
        wait_confirmed(&server, 6_000 * (round as u64 + 1)).await;
    }
    let bound = 2 << 20;
    wait_until(Duration::from_secs(10), || async {
        let tp = TopicPartition::new(shared.topics().incoming.clone(), 0);
        shared.log().log_start(&tp).await.unwrap() > 0 && shared.log().disk_bytes() <= bound
    })
    .await;
    for topic in [
        &shared.topics().incoming,
        &shared.topics().inflight,
        &shared.topics().complete,
    ] {
        for p in 0..4 {
            let tp = TopicPartition::new(topic.clone(), p);
            let start = shared.log().log_start(&tp).await.unwrap();
            let end = shared.log().high_watermark(&tp).await.unwrap();
            if end > 1_000 {
                assert!(start > 0 && start <= end, "{tp}: start {start}, end {end}");
            }
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_rows_live_in_blocks_whose_dead_copies_are_collected() {
    // Every version of an account row goes into a new block; the copies it replaces die in older blocks, which checkpoints delete or pack again, so the blocks hold at most about three copies per live row. With no row cache, every debit and credit reads its account from the blocks; a restart reads them from the store, and a listing pages them in id order.
    const ACCOUNTS: usize = 200;
    const PAYMENTS: usize = 6_000;
    let ids: Vec<String> = (0..ACCOUNTS).map(|n| format!("acct-{n:03}")).collect();
    let opened: Vec<(&str, i64)> = ids.iter().map(|id| (id.as_str(), 1_000_000)).collect();
    let (server, client) = TestServer::builder()
        .config(|c| c.pipeline.cache_rows_per_task = 0)
        .accounts(&opened)
        .start()
        .await;
    let mut expected: std::collections::BTreeMap<&str, i64> = opened.iter().copied().collect();
    for n in 0..PAYMENTS {
        let (from, to) = (n % ACCOUNTS, (n * 7 + 1 + n / ACCOUNTS) % ACCOUNTS);
        if from == to {
            continue;
        }
        let amount = (n % 97 + 1) as i64;
        *expected.get_mut(ids[from].as_str()).unwrap() -= amount;
        *expected.get_mut(ids[to].as_str()).unwrap() += amount;
        let payment = PaymentRef {
            id: format!("p-{n}"),
            from: ids[from].clone(),
            to: ids[to].clone(),
            amount_cents: amount,
            accepted_at_ms: 0,
        };
        let submitter = Submitter::new("test", "tests/pipeline.rs");
        let ingest = server.runtime().ingest();
        ingest.submit(payment, submitter).await.unwrap();
    }
    let sent = (0..PAYMENTS)
        .filter(|n| n % ACCOUNTS != (n * 7 + 1 + n / ACCOUNTS) % ACCOUNTS)
        .count() as u64;
    wait_confirmed(&server, sent).await;
    let (config, dir) = (server.config().clone(), server.dir());
    server.stop().await;

    let (_, store) = common::open_backends_retrying(&config).await.unwrap();
    let blocks = store.raw_rows("b/a/", |_| true).unwrap();
    let mut copies = 0;
    for (key, bytes) in &blocks {
        let key = String::from_utf8_lossy(key);
        copies += kpay::store::block_entries(&key, bytes).unwrap().len();
    }
    println!(
        "{} account blocks hold {copies} copies of {ACCOUNTS} rows",
        blocks.len()
    );
    assert!(copies >= ACCOUNTS, "{copies} copies");
    // Collected, at most three copies per row (and a checkpoint's worth not yet);
    // without collection, one per account per checkpoint.
    assert!(copies <= 4 * ACCOUNTS, "{copies} copies");
    drop(store);

    let server = TestServer::start(config).await;
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let cursor = after
            .as_ref()
            .map_or(String::new(), |a| format!("&after={a}"));
        let url = server.url(&format!("/api/v1/accounts?limit=64{cursor}"));
        let (status, page) = common::get(&client, &url).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap().clone();
        listed.extend(items.iter().map(|a| {
            let id = a["id"].as_str().unwrap().to_owned();
            (id, a["balance"].as_i64().unwrap())
        }));
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    let wanted: Vec<(String, i64)> = (expected.iter())
        .map(|(id, cents)| (id.to_string(), *cents))
        .collect();
    assert_eq!(listed, wanted);
    let (_, integrity) = common::get(&client, &server.url("/api/v1/ledger/integrity")).await;
    assert_eq!(integrity["ok"], true, "{integrity}");
    server.stop().await;
    drop(dir);
}
