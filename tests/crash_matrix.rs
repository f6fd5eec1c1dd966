//! The crash matrix: the real binary is aborted at each named crash point
//! (`KPAY_CRASH_AT=<point>:<nth>`, see `src/failpoint.rs`) in the middle of
//! HTTP traffic, on the embedded log and on Kafka. Each case checks that the
//! process did die there (abort signal and the drill's line on stderr, within
//! a time limit: a point that never fires fails the case), restarts it without
//! the point, sends more traffic, and then finds every acknowledged payment
//! terminal once with its hops once, each balance equal to its opening balance
//! plus exactly the confirmed payments, matching counts, money conserved, and
//! no dead letter left.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::traffic::{self, Driver, Ledger};
use common::{get, post, wait_until, Binary};
use rand::Rng;
use serde_json::json;

/// One crash point and how to reach it.
struct Case {
    point: &'static str,
    /// The crash comes on a pass drawn from this range (printed, so that a
    /// failure can be replayed with the same one).
    passes: std::ops::Range<u64>,
    /// Settings that make the point frequent.
    env: &'static [(&'static str, &'static str)],
    /// The point is in DLQ replay: a dead letter is replayed mid-traffic,
    /// and the operator's second replay settles it with this sequence number.
    replay: Option<u64>,
    /// What the restarted server must log about its recovery.
    recovered: Option<&'static str>,
}

const fn case(point: &'static str, passes: std::ops::Range<u64>) -> Case {
    Case {
        point,
        passes,
        env: &[],
        replay: None,
        recovered: None,
    }
}

/// The payment the replayed dead letter carries once corrected.
const FIXED: &str = "dlq-fixed";

/// Crashes per case (one for DLQ replays).
const CRASHES: usize = 2;

/// SIGABRT, what `std::process::abort` ends a process with.
const SIGABRT: i32 = 6;

async fn run(case: &Case, broker: Option<&str>) {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // The setup injects a dead letter, which needs raw records on and the
    // operator token; the armed runs are in protected mode, where the
    // token is ignored.
    let client = common::operator_client();
    let backend = broker
        .map(|broker| common::kafka_topics(broker, dir.path()))
        .unwrap_or_default();
    let mut env = vec![
        ("KPAY_PIPELINE__COMMIT_INTERVAL_MS", "150"),
        ("KPAY_PIPELINE__FLUSH_INTERVAL_MS", "100"),
    ];
    env.extend(backend.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    env.extend(case.env.iter().copied());

    // Accounts (and a dead letter to replay) first, then a clean stop, so
    // that the passes count from the traffic on.
    let setup_log = dir.path().join("setup.log");
    let mut setup_env = env.clone();
    setup_env.extend(common::RAW_RECORDS_ENV);
    let mut setup = Binary::spawn_logged(dir.path(), &setup_env, &setup_log);
    ready(&mut setup, &setup_log, "setup").await;
    traffic::open_accounts(&client, &setup.base).await;
    let letter = match case.replay {
        Some(_) => {
            // Topics are named per test on Kafka.
            let topic = backend
                .iter()
                .find(|(key, _)| key == "KPAY_TOPICS__INCOMING")
                .map_or("payment.incoming", |(_, name)| name.as_str());
            Some(dead_letter(&client, &setup.base, topic).await)
        }
        None => None,
    };
    let exit = setup.terminate();
    assert!(exit.success(), "setup stop: {exit:?}");

    // Armed: traffic until the process aborts at the point; twice (once
    // for a replay, which the operator retries only once it is back).
    let crashes = if case.replay.is_some() { 1 } else { CRASHES };
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut crashed = Vec::new();
    for round in 0..crashes {
        let nth = rand::thread_rng().gen_range(case.passes.clone());
        let spec = format!("{}:{nth}", case.point);
        let mut armed_env = env.clone();
        armed_env.push(("KPAY_CRASH_AT", &spec));
        let output = dir.path().join(format!("crash-{round}.log"));
        let mut server = Binary::spawn_logged(dir.path(), &armed_env, &output);
        let line = format!("kpay: crash drill: aborting at {} (pass {nth})", case.point);
        if let Some(exit) = ready_or_exited(&mut server, &output, &spec).await {
            // After a first crash, recovery itself passes the point (a big
            // catch-up checkpoint, say) and may crash there: a crash during
            // recovery, which the next start must survive too.
            let said = std::fs::read_to_string(&output).unwrap();
            assert!(
                round > 0 && exit.signal() == Some(SIGABRT) && said.contains(&line),
                "{spec}: the server exited before it was ready: {exit:?}\n{said}"
            );
            crashed.push(format!("{spec} during recovery"));
            continue;
        }
        if round > 0 {
            recovered(case, &output);
        }
        let driver = Driver::start(&server.base, &ledger, round);
        let armed_at = Instant::now();
        let acknowledged_at_start = ledger.lock().unwrap().acknowledged.len();
        if let Some(id) = &letter {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let url = format!("{}/api/v1/dlq/{id}/replay", server.base);
            let answer = client.post(url).json(&correction()).send().await;
            assert!(
                answer.is_err(),
                "the replay was answered, not cut short: {answer:?}"
            );
        }
        let limit = Duration::from_secs(if broker.is_some() { 60 } else { 30 });
        let exit = loop {
            if let Some(exit) = server.child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                armed_at.elapsed() < limit,
                "{spec}: the process did not crash within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let crashed_after = armed_at.elapsed();
        let acknowledged = ledger.lock().unwrap().acknowledged.len() - acknowledged_at_start;
        driver.stop().await;
        let said = std::fs::read_to_string(&output).unwrap();
        assert_eq!(exit.signal(), Some(SIGABRT), "{spec}: {exit:?}\n{said}");
        assert!(said.contains(&line), "{spec}: the output says\n{said}");
        // After a first crash, recovery passes the point too, so the second
        // crash may come before much new traffic.
        if case.replay.is_none() && round == 0 {
            assert!(
                acknowledged >= 20,
                "{spec}: crashed before the traffic got going ({acknowledged} acknowledged)"
            );
        }
        crashed.push(format!(
            "{spec} after {:.2} s and {acknowledged} acknowledged",
            crashed_after.as_secs_f64()
        ));
    }

    // Restarted without the point: recovery, then more traffic.
    let restart_log = dir.path().join("restart.log");
    let mut server = Binary::spawn_logged(dir.path(), &env, &restart_log);
    ready(&mut server, &restart_log, "restart").await;
    recovered(case, &restart_log);
    let driver = Driver::start(&server.base, &ledger, crashes);
    tokio::time::sleep(Duration::from_millis(500)).await;
    driver.stop().await;
    let mut ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    if let (Some(id), Some(seq)) = (&letter, case.replay) {
        // The operator replays again: settled from the log (the first
        // reservation's number), or appended now (a new number); once.
        let url = format!("{}/api/v1/dlq/{id}/replay", server.base);
        let (status, answer) = post(&client, &url, correction()).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["dead_letter"]["replay"]["seq"], seq, "{answer}");
        let (from, to) = (traffic::account(0), traffic::account(1));
        ledger.acknowledged.insert(FIXED.into(), (from, to, 123));
        let (status, answer) = post(&client, &url, correction()).await;
        assert_eq!(
            (status, &answer["already_replayed"]),
            (200, &json!(true)),
            "{answer}"
        );
    }
    let outcome = traffic::check(&client, &server.base, &ledger).await;
    let exit = server.terminate();
    assert!(exit.success(), "SIGTERM exit: {exit:?}");
    traffic::assert_no_dead_letters(dir.path());
    println!(
        "crash matrix {} on {}: crashed at {}; {} acknowledged and {} unknown in all, \
         {} confirmed, {} rejected, {} reversed; {:.1} s",
        case.point,
        if broker.is_some() {
            "kafka"
        } else {
            "embedded"
        },
        crashed.join(", then "),
        ledger.acknowledged.len(),
        ledger.unknown.len(),
        outcome.count("confirmed"),
        outcome.count("rejected"),
        outcome.count("reversed"),
        started.elapsed().as_secs_f64()
    );
}

/// Waits until `server` is ready (caught up with the log); fails at once if it
/// exits, and after a minute, with what it said and what it lags behind.
async fn ready(server: &mut Binary, output: &Path, what: &str) {
    if let Some(exit) = ready_or_exited(server, output, what).await {
        let said = std::fs::read_to_string(output).unwrap_or_default();
        panic!("{what}: the server exited before it was ready: {exit:?}\n{said}");
    }
}

/// Waits until `server` is ready, or returns how it exited first; fails after
/// a minute, with what it said and what it lags behind.
async fn ready_or_exited(server: &mut Binary, output: &Path, what: &str) -> Option<ExitStatus> {
    let client = reqwest::Client::new();
    let url = format!("{}/readyz", server.base);
    let started = Instant::now();
    loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            return Some(exit);
        }
        let answer = client.get(&url).send().await;
        if matches!(&answer, Ok(r) if r.status() == 200) {
            return None;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let readyz = match answer {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(error) => error.to_string(),
            };
            let lag = match client
                .get(format!("{}/api/v1/metrics/lag", server.base))
                .send()
                .await
            {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(error) => error.to_string(),
            };
            let said = std::fs::read_to_string(output).unwrap_or_default();
            panic!("{what}: not ready within a minute: {readyz}\nlag: {lag}\n{said}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts a restarted server's output shows the recovery the case expects.
fn recovered(case: &Case, output: &Path) {
    if let Some(line) = case.recovered {
        let said = std::fs::read_to_string(output).unwrap();
        assert!(
            said.contains(line),
            "{}: no {line:?} at restart:\n{said}",
            case.point
        );
    }
}

/// The corrected value of the dead letter: a payment in the public format.
fn correction() -> serde_json::Value {
    let payment = json!({
        "id": FIXED,
        "from": traffic::account(0),
        "to": traffic::account(1),
        "amount": 123,
    });
    json!({ "value": payment.to_string() })
}

/// Puts a record no processor can read on `payment.incoming` and waits for its
/// dead letter; returns the letter's id.
async fn dead_letter(client: &reqwest::Client, base: &str, topic: &str) -> String {
    let body = json!({"topic": topic, "records": [{"key": FIXED, "value": "not a payment"}]});
    let (status, answer) = post(client, &format!("{base}/api/v1/ops/records"), body).await;
    assert_eq!(status, 201, "{answer}");
    let record = &answer["records"][0];
    let id = format!(
        "{}:{}:{}:inflight",
        answer["topic"].as_str().unwrap(),
        record["partition"],
        record["offset"]
    );
    let url = format!("{base}/api/v1/dlq/{id}");
    wait_until(Duration::from_secs(20), || async {
        get(client, &url).await.0 == 200
    })
    .await;
    id
}

/// Two tests per point: on the embedded log, and on Kafka when a broker is
/// available (`KPAY_TEST_KAFKA`; skipped loudly without it, a failure in CI).
macro_rules! both_backends {
    ($($embedded:ident, $kafka:ident: $case:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $embedded() {
            run(&$case, None).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $kafka() {
            let Some(broker) = common::kafka_broker(stringify!($kafka)) else {
                return;
            };
            run(&$case, Some(&broker)).await;
        }
    )*};
}

both_backends! {
    ingest_before_append_embedded, ingest_before_append_kafka:
        case("ingest.before_append", 150..350);
    ingest_after_append_embedded, ingest_after_append_kafka:
        case("ingest.after_append", 150..350);
    task_mid_produce_embedded, task_mid_produce_kafka:
        case("task.mid_produce", 200..400);
    task_after_produce_embedded, task_after_produce_kafka:
        case("task.after_produce", 500..1000);
    task_before_commit_embedded, task_before_commit_kafka:
        case("task.before_commit", 300..700);
    // Two rows per store batch: most checkpoints are written in chunks.
    store_mid_commit_embedded, store_mid_commit_kafka: Case {
        env: &[("KPAY_DATA__STORE_BATCH_ROWS", "2")],
        recovered: Some("rolled back a checkpoint a crash interrupted"),
        ..case("store.mid_commit", 10..30)
    };
    task_after_commit_embedded, task_after_commit_kafka:
        case("task.after_commit", 300..700);
    // Reserved, not appended: the retry finds nothing and appends with a new number.
    dlq_after_reserve_embedded, dlq_after_reserve_kafka: Case {
        replay: Some(2),
        ..case("dlq.after_reserve", 1..2)
    };
    // Appended, not settled: the retry finds it in the log and appends nothing.
    dlq_after_append_embedded, dlq_after_append_kafka: Case {
        replay: Some(1),
        ..case("dlq.after_append", 1..2)
    };
}

// A torn group commit: part of a multi-record write on disk, never synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mid_write_embedded() {
    let case = Case {
        recovered: Some("cut a torn tail off the last log segment"),
        ..case("log.mid_write", 100..250)
    };
    run(&case, None).await;
}

// One append in several produce requests: the first acknowledged, the rest never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_mid_append_kafka() {
    let Some(broker) = common::kafka_broker("kafka_mid_append_kafka") else {
        return;
    };
    let case = Case {
        env: &[("KPAY_LOG__KAFKA__MAX_BATCH_RECORDS", "2")],
        ..case("kafka.mid_append", 20..40)
    };
    run(&case, Some(&broker)).await;
}
