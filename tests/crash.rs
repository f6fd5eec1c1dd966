//! Acknowledged = durable and exactly-once effect, shown with the real binary:
//! payments are driven over HTTP while the server is killed with SIGKILL at
//! random moments, restarted each time, and finally checked account by account.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::traffic::{self, Driver, Ledger};
use common::{get, kpay_command, refused_start, Binary, TestServer};
use rand::Rng;
use serde_json::json;

const KILLS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_moves_money_once() {
    // After repeated SIGKILLs mid-traffic, every acknowledged payment has exactly one terminal state,
    // balances equal opening balances plus exactly the confirmed payments, money is conserved and counts match.
    crash_run(tempfile::tempdir().unwrap(), Vec::new(), KILLS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_kafka_loses_nothing_and_moves_money_once() {
    // The same on the Kafka backend: offsets live in the store, the log on the broker.
    let test = "kill_9_on_kafka_loses_nothing_and_moves_money_once";
    let Some(broker) = common::kafka_broker(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let backend = common::kafka_topics(&broker, dir.path());
    crash_run(dir, backend, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_one_debit_in_flight_per_payer_loses_nothing() {
    // The same with screening on and each payer's payments in a queue in
    // its account row: the queue and its releases survive every crash.
    let rules = vec![(
        "KPAY_SCREENING__SINGLE_INFLIGHT_DEBIT".to_owned(),
        "true".to_owned(),
    )];
    crash_run(tempfile::tempdir().unwrap(), rules, 4).await;
}

async fn crash_run(dir: tempfile::TempDir, backend: Vec<(String, String)>, kills: usize) {
    let client = reqwest::Client::new();
    let mut env = vec![
        ("KPAY_PIPELINE__COMMIT_INTERVAL_MS", "150"),
        ("KPAY_PIPELINE__FLUSH_INTERVAL_MS", "100"),
    ];
    env.extend(backend.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let mut server = Binary::start(dir.path(), &env).await;
    traffic::open_accounts(&client, &server.base).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for round in 0..kills {
        let driver = Driver::start(&server.base, &ledger, round);
        let wait_ms = rand::thread_rng().gen_range(300..1_500);
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        server.kill9();
        driver.stop().await;
        server = Binary::start(dir.path(), &env).await;
    }
    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    assert!(
        ledger.acknowledged.len() > 200,
        "too little traffic: {}",
        ledger.acknowledged.len()
    );
    let outcome = traffic::check(&client, &server.base, &ledger).await;
    assert!(outcome.every_path_taken(), "every path taken");
    let (_, rules) = get(&client, &format!("{}/api/v1/screening/rules", server.base)).await;
    let single = rules["rules"]["single_inflight_debit"] == json!(true);
    let screened = backend.iter().any(|(k, _)| k.starts_with("KPAY_SCREENING"));
    assert_eq!(single, screened, "{rules}");
    assert_eq!(
        outcome.waited > 0,
        screened,
        "payments waited: {}",
        outcome.waited
    );

    // A graceful stop exits 0, and replays left no dead letters behind.
    let exit = server.terminate();
    assert!(exit.success(), "SIGTERM exit: {exit:?}");
    traffic::assert_no_dead_letters(dir.path());
    println!(
        "crash test: {} acknowledged, {} unknown, {} confirmed, {} rejected, {} reversed, {} waited",
        ledger.acknowledged.len(),
        ledger.unknown.len(),
        outcome.count("confirmed"),
        outcome.count("rejected"),
        outcome.count("reversed"),
        outcome.waited
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_inflight_payments_and_exits_zero() {
    // SIGTERM under load stops intake, finishes every admitted payment, checkpoints and exits 0; nothing acknowledged is lost.
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let server = Binary::start(dir.path(), &[]).await;
    traffic::open_accounts(&client, &server.base).await;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let driver = Driver::start(&server.base, &ledger, 0);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let exit = server.stop().await;
    driver.stop().await;
    assert!(exit.success(), "SIGTERM exit: {exit:?}");

    let store = kpay::store::Store::open(&dir.path().join("state"), 1 << 20).unwrap();
    for p in 0..8 {
        let key = kpay::store::checkpoint_key("inflight", p);
        let checkpoint: kpay::store::Checkpoint<kpay::pipeline::inflight::InflightStats> =
            store.get(&key).unwrap().unwrap_or_default();
        assert_eq!(
            checkpoint.stats.inflight_count, 0,
            "partition {p} stopped with payments in flight"
        );
    }
    drop(store);
    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    assert!(
        ledger.acknowledged.len() > 50,
        "too little traffic: {}",
        ledger.acknowledged.len()
    );
    let server = Binary::start(dir.path(), &[]).await;
    for id in ledger.acknowledged.keys() {
        common::terminal(&client, &server.base, id).await;
    }
    let (_, integrity) = get(&client, &format!("{}/api/v1/ledger/integrity", server.base)).await;
    assert_eq!(integrity["ok"], true, "{integrity}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_refuses_to_start() {
    // Two processes on one data directory would corrupt it; the second exits with an error instead.
    let dir = tempfile::tempdir().unwrap();
    let first = Binary::start(dir.path(), &[]).await;
    let mut second = Binary::spawn(dir.path(), &[]);
    let exit = tokio::task::spawn_blocking(move || second.child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        !exit.success(),
        "second server started on the same data: {exit:?}"
    );
    let client = reqwest::Client::new();
    assert_eq!(get(&client, &format!("{}/readyz", first.base)).await.0, 200);
}

#[test]
fn bad_config_stops_the_start_with_the_key_named() {
    // A bad setting is a one-line error naming the key and a non-zero exit, before anything is written.
    let dir = tempfile::tempdir().unwrap();
    let output = kpay_command()
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("KPAY_LOG__PARTITIONS", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("log.partitions"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    assert!(
        !dir.path().join("data").exists(),
        "data written before the config was checked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_lost_under_a_kept_state_is_refused_with_what_to_do() {
    // New records would reuse offsets the state has read and be skipped: refuse, say why and what to do.
    let (server, client) = TestServer::with_accounts(&[("a", 1_000), ("b", 0)]).await;
    let (dir, config) = (server.dir(), server.config().clone());
    let body = json!({"id": "p-1", "from": "a", "to": "b", "amount": 5});
    let (status, _) = common::post(&client, &server.url("/api/v1/payments"), body).await;
    assert_eq!(status, 202);
    common::terminal(&client, &server.base, "p-1").await;
    server.stop().await;
    std::fs::remove_dir_all(dir.path().join("log")).unwrap();
    let error = refused_start(config).await;
    assert!(
        error.contains("but the log ends at 0") && error.contains("Restore the log"),
        "{error}"
    );
}

/// Why the server refuses to start on `config`'s data (it must refuse).
/// The newest segment file of the embedded log under `dir`.
fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    segments.sort();
    segments.pop().expect("a segment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_back_and_damage_before_the_end_is_refused() {
    // A crash mid-write leaves a partial frame (never acknowledged): cut back, every payment
    // still there once. Damage with valid records after it: refuse, saying what to do.
    let (server, client) = TestServer::with_accounts(&[("a", 100_000), ("b", 0)]).await;
    let (dir, config) = (server.dir(), server.config().clone());
    for n in 0..50 {
        let body = json!({"id": format!("t-{n}"), "from": "a", "to": "b", "amount": 10});
        let (status, _) = common::post(&client, &server.url("/api/v1/payments"), body).await;
        assert_eq!(status, 202);
    }
    for n in 0..50 {
        common::terminal(&client, &server.base, &format!("t-{n}")).await;
    }
    server.stop().await;

    // A torn write: the start of a frame that never finished.
    let segment = last_segment(dir.path());
    let intact = std::fs::read(&segment).unwrap();
    let mut torn = intact.clone();
    torn.extend_from_slice(&intact[..intact.len().min(37)]);
    std::fs::write(&segment, &torn).unwrap();
    let server = TestServer::start(config.clone()).await;
    for n in 0..50 {
        let payment = common::terminal(&client, &server.base, &format!("t-{n}")).await;
        assert_eq!(payment["status"], "confirmed");
    }
    let (_, bob) = get(&client, &server.url("/api/v1/accounts/b")).await;
    assert_eq!(bob["balance"], 500, "each moved once");
    let body = json!({"id": "after", "from": "a", "to": "b", "amount": 10});
    assert_eq!(
        common::post(&client, &server.url("/api/v1/payments"), body)
            .await
            .0,
        202
    );
    assert_eq!(
        common::terminal(&client, &server.base, "after").await["status"],
        "confirmed"
    );
    server.stop().await;

    // Damage in the middle, valid records after it: acknowledged data is at stake.
    let segment = last_segment(dir.path());
    let mut damaged = std::fs::read(&segment).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x5a;
    std::fs::write(&segment, &damaged).unwrap();
    let error = match kpay::runtime::open_backends(&config).await {
        Ok(_) => panic!("a damaged log must be refused"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("corrupt log at") && error.contains("restore the data directory"),
        "{error}"
    );
}

/// The most recently modified file under `dir`, at any depth.
fn newest_file(dir: &std::path::Path) -> std::path::PathBuf {
    fn walk(dir: &std::path::Path, files: &mut Vec<(std::time::SystemTime, std::path::PathBuf)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, files);
            } else {
                files.push((path.metadata().unwrap().modified().unwrap(), path));
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    files.sort();
    files.pop().expect("a state file").1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_state_file_is_rebuilt_from_the_log_or_refused() {
    // The newest state file deleted: the state restarts from the log, every
    // payment once. Deleted after retention removed log history: refused.
    let (server, client) = TestServer::builder()
        .config(|c| {
            c.log.partitions = 1;
            c.log.history_bytes = 0;
        })
        .accounts(&[("a", 1_000_000), ("b", 0)])
        .start()
        .await;
    let (dir, config) = (server.dir(), server.config().clone());
    for n in 0..40 {
        let to = if n % 10 == 9 { "nobody" } else { "b" };
        let body = json!({"id": format!("s-{n}"), "from": "a", "to": to, "amount": 10});
        let (status, _) = common::post(&client, &server.url("/api/v1/payments"), body).await;
        assert_eq!(status, 202);
    }
    for n in 0..40 {
        common::terminal(&client, &server.base, &format!("s-{n}")).await;
    }
    server.stop().await;
    let deleted = newest_file(&dir.path().join("state"));
    std::fs::remove_file(&deleted).unwrap();
    eprintln!("deleted the newest state file: {}", deleted.display());

    let server = TestServer::start(config.clone()).await;
    for n in 0..40 {
        let payment = common::terminal(&client, &server.base, &format!("s-{n}")).await;
        let expected = if n % 10 == 9 { "reversed" } else { "confirmed" };
        assert_eq!(payment["status"], expected, "after deleting {deleted:?}");
    }
    let (_, bob) = get(&client, &server.url("/api/v1/accounts/b")).await;
    assert_eq!(
        bob["balance"], 360,
        "each moved once after deleting {deleted:?}"
    );
    let (_, ledger) = get(&client, &server.url("/api/v1/ledger/integrity")).await;
    assert_eq!(ledger["ok"], true, "{ledger}");

    // Enough traffic to fill segments, which retention then removes.
    let incoming = kpay::log::TopicPartition::new("payment.incoming".to_string(), 0);
    let mut batch_no = 0;
    loop {
        let start = server.runtime().log().log_start(&incoming).await.unwrap();
        if start > 0 {
            break;
        }
        assert!(batch_no < 40, "retention never removed a segment");
        let payments: Vec<_> = (0..1_000)
            .map(|n| json!({"id": format!("bulk-{batch_no}-{n}"), "from": "a", "to": "b", "amount": 1}))
            .collect();
        let url = server.url("/api/v1/payments/batch");
        let (status, body) = common::post(&client, &url, json!({"payments": payments})).await;
        assert_eq!(status, 200, "{body}");
        batch_no += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    server.stop().await;
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let error = refused_start(config).await;
    assert!(
        error.contains("removed by retention") && error.contains("Restore the state"),
        "{error}"
    );
}
