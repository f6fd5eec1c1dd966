//! No record stops kpay: a record of any size, on any topic, at and
//! over every size limit it meets (the codec's event limit, the dead
//! letter's kept prefix, the log's record limit, all of it in the key), is
//! dead-lettered in bounded form and the pipeline flows on, on both
//! backends. A task that fails for another reason is restarted with
//! backoff and reported; the process stops (non-zero) only when it cannot go on.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    assert_confirmed, get, kafka_broker, operator_client, post, terminal, wait_until, Binary,
    TestServer, RAW_RECORDS_ENV,
};
use kpay::log::embedded::EmbeddedLogConfig;
use kpay::log::{LogError, Record, TopicPartition};
use kpay::model::codec::MAX_EVENT_BYTES;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The largest dead letter as published or listed: the kept prefix as hex
/// (and as text in a listing), the bounded key (escaped) and reason, and the
/// fixed fields.
fn letter_bound(keep: usize) -> usize {
    3 * keep + 6 * 256 + 1_024 + 1_024
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// (key, value) pairs at and over each limit a record meets.
fn sizes(keep: usize, log_limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let value = |n: usize| vec![b'x'; n];
    vec![
        (b"k".to_vec(), Vec::new()),
        (b"k".to_vec(), value(keep)),
        (b"k".to_vec(), value(keep + 1)),
        (b"k".to_vec(), value(MAX_EVENT_BYTES)),
        (b"k".to_vec(), value(MAX_EVENT_BYTES + 1)),
        (b"k".to_vec(), value(log_limit - 1)),
        (vec![b'K'; log_limit - 1], b"v".to_vec()),
        (b"k".to_vec(), value(log_limit)),
        (b"k".to_vec(), value(2 * log_limit)),
    ]
}

async fn dead_letters(client: &reqwest::Client, server: &TestServer) -> Vec<Value> {
    let url = server.url("/api/v1/dlq?limit=1000");
    let (status, body) = get(client, &url).await;
    assert_eq!(status, 200, "{body}");
    body["items"].as_array().unwrap().clone()
}

/// Appends every size to every input topic, then checks that each record
/// the log took is dead-lettered, bounded, by every processor that reads
/// it, that the DLQ topic holds bounded letters, that payments still flow
/// and that nothing was restarted; then again after a restart.
async fn every_size_on_every_topic(server: TestServer, client: reqwest::Client, kafka: bool) {
    let keep = server.config().limits.dead_letter_value_bytes;
    let log_limit = EmbeddedLogConfig::default().max_record_bytes;
    let topics = server.runtime().topics().clone();
    // (topic, how many processors read it): the inputs, and topics only
    // written by kpay, where a record is read by no task.
    let inputs = [
        (topics.incoming.clone(), 1),
        (topics.inflight.clone(), 1),
        (topics.complete.clone(), 2),
        (topics.commands.clone(), 1),
        (topics.confirmed.clone(), 0),
        (topics.audit.clone(), 0),
        (topics.logs.clone(), 0),
    ];
    // (where the record sits, its value's length and SHA-256)
    let mut expected: Vec<(String, u64, String)> = Vec::new();
    for (topic, readers) in &inputs {
        let tp = TopicPartition::new(topic.clone(), 0);
        for (key, value) in sizes(keep, log_limit) {
            let (len, digest) = (value.len(), sha256_hex(&value));
            let whole = key.len() + len;
            let record = Record {
                key: Bytes::from(key),
                value: Bytes::from(value),
                timestamp_ms: kpay::model::now_ms(),
            };
            match server.runtime().log().append(&tp, vec![record]).await {
                Ok(offset) => {
                    for _ in 0..*readers {
                        let place = format!("{topic}:0:{offset}");
                        expected.push((place, len as u64, digest.clone()));
                    }
                }
                // The embedded log refuses a record over its limit at the
                // append, and nothing else happens.
                Err(LogError::RecordTooLarge { .. }) if !kafka && whole > log_limit => {}
                Err(error) if kafka => println!("{topic}: {whole} bytes refused: {error}"),
                Err(error) => panic!("{topic}: {whole} bytes: {error}"),
            }
        }
    }
    assert!(
        expected.len() >= 4 * 7,
        "too few records taken: {}",
        expected.len()
    );
    wait_until(Duration::from_secs(60), || async {
        dead_letters(&client, &server).await.len() == expected.len()
    })
    .await;
    let letters = dead_letters(&client, &server).await;
    for (place, len, digest) in &expected {
        let letter = letters
            .iter()
            .find(|l| l["id"].as_str().unwrap().starts_with(&format!("{place}:")))
            .unwrap_or_else(|| panic!("no dead letter for {place}"));
        assert_eq!(letter["value_bytes"], *len, "{place}");
        assert_eq!(letter["truncated"], *len as usize > keep, "{place}");
        assert_eq!(
            letter["value_hex"].as_str().unwrap().len(),
            2 * keep.min(*len as usize)
        );
        assert_eq!(letter["value_sha256"], *digest, "{place}");
        assert!(letter.to_string().len() < letter_bound(keep), "{place}");
    }
    // The DLQ topic holds every letter, each far below any record limit.
    let mut published = 0;
    let log = server.runtime().log();
    for p in 0..server.config().log.partitions {
        let tp = TopicPartition::new(topics.dlq.clone(), p);
        let (mut next, end) = (0, log.high_watermark(&tp).await.unwrap());
        // One read returns what one fetch holds: read on to the end.
        let started = std::time::Instant::now();
        while next < end {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{tp} stuck at {next}"
            );
            for stored in log.read(&tp, next, 1_000).await.unwrap() {
                assert!(stored.record.value.len() < letter_bound(keep));
                published += 1;
                next = stored.offset + 1;
            }
        }
    }
    assert_eq!(published, expected.len());
    payments_flow(&client, &server, "after-sizes").await;
    let server = server.restart().await;
    assert_eq!(dead_letters(&client, &server).await.len(), expected.len());
    payments_flow(&client, &server, "after-restart").await;
    server.stop().await;
}

/// A payment goes through and every processor is up.
async fn payments_flow(client: &reqwest::Client, server: &TestServer, id: &str) {
    let body = json!({"id": id, "from": "alice", "to": "bob", "amount": 100});
    let (status, answer) = post(client, &server.url("/api/v1/payments"), body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        terminal(client, &server.base, id).await["status"],
        "confirmed"
    );
    assert_eq!(get(client, &server.url("/readyz")).await.0, 200);
    assert!(server.runtime().tasks_down().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_at_and_over_every_size_limit_are_dead_lettered_and_the_rest_flows() {
    // On the backend the suite runs on: every record the log takes, of any size, on every input topic, becomes a bounded dead letter; none stops a task.
    let (server, client) = TestServer::with_accounts(&[("alice", 10_000), ("bob", 0)]).await;
    let kafka = server.config().log.is_kafka();
    every_size_on_every_topic(server, client, kafka).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_at_and_over_every_size_limit_on_kafka_are_dead_lettered() {
    // The same on a Kafka-protocol broker, whose fetch size is one more limit a record meets: set to its smallest (1 KiB), records up to 2 MiB are still read.
    let test = "records_at_and_over_every_size_limit_on_kafka_are_dead_lettered";
    let Some(broker) = kafka_broker(test) else {
        return;
    };
    let (server, client) = TestServer::builder()
        .kafka(&broker)
        // The smallest fetch allowed: nearly every record here is larger.
        .config(|c| c.log.kafka.fetch_max_bytes = 1024)
        .accounts(&[("alice", 10_000), ("bob", 0)])
        .start()
        .await;
    every_size_on_every_topic(server, client, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_900_kb_record_of_the_report_is_dead_lettered_in_part_and_replayed_only_corrected() {
    // The reported poison pill (900,000 bytes into payment.incoming over the API) becomes a dead letter keeping a prefix, the length and the digest; the server stays ready across a restart; a replay as stored is refused with the reason, a corrected one goes through.
    let (server, client) = TestServer::builder()
        .config(|c| c.server.max_body_bytes = 2 << 20)
        .raw_records()
        .accounts(&[("alice", 10_000), ("bob", 0)])
        .start()
        .await;
    let value = "x".repeat(900_000);
    let body = json!({"topic": "payment.incoming", "records": [{"key": "k", "value": value}]});
    let (status, answer) = post(&client, &server.url("/api/v1/ops/records"), body).await;
    assert_eq!(status, 201, "{answer}");
    let (partition, offset) = (
        &answer["records"][0]["partition"],
        &answer["records"][0]["offset"],
    );
    let id = format!("payment.incoming:{partition}:{offset}:inflight");
    let url = server.url(&format!("/api/v1/dlq/{id}"));
    wait_until(Duration::from_secs(20), || async {
        get(&client, &url).await.0 == 200
    })
    .await;
    let (_, letter) = get(&client, &url).await;
    let keep = server.config().limits.dead_letter_value_bytes;
    assert_eq!(letter["value_bytes"], 900_000);
    assert_eq!(letter["truncated"], true);
    assert_eq!(letter["value_sha256"], sha256_hex(value.as_bytes()));
    assert_eq!(letter["value_text"].as_str().unwrap().len(), keep);
    assert!(
        letter["reason"].as_str().unwrap().contains("event limit"),
        "{letter}"
    );
    let dlq = server.runtime().topics().dlq.clone();
    let tp = TopicPartition::new(dlq, partition.as_u64().unwrap() as u32);
    let published = server.runtime().log().read(&tp, 0, 10).await.unwrap();
    println!(
        "dead letter of the 900,000-byte record: {} bytes on the DLQ topic, {} as listed",
        published[0].record.value.len(),
        letter.to_string().len()
    );
    assert!(published[0].record.value.len() < letter_bound(keep));
    // The OpenAPI document describes the new fields.
    let (_, openapi) = get(&client, &server.url("/api-docs/openapi.json")).await;
    let schema = &openapi["components"]["schemas"]["DeadLetter"]["properties"];
    for field in ["value_hex", "value_bytes", "value_sha256", "truncated"] {
        assert!(schema[field].is_object(), "{field} missing: {schema}");
    }
    payments_flow(&client, &server, "after-poison").await;

    let server = server.restart().await;
    payments_flow(&client, &server, "after-poison-restart").await;
    let replay = server.url(&format!("/api/v1/dlq/{id}/replay"));
    let (status, refused) = post(&client, &replay, json!({})).await;
    assert_eq!(status, 422, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("not the whole record"), "{message}");
    assert!(message.contains("900000"), "{message}");
    let corrected = json!({"id": "fixed", "from": "alice", "to": "bob", "amount": 5}).to_string();
    let (status, done) = post(&client, &replay, json!({"value": corrected})).await;
    assert_eq!(status, 200, "{done}");
    assert_confirmed(&client, &server.base, "fixed").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_for_another_reason_is_restarted_with_backoff_and_reported() {
    // A state row that does not decode fails the account task (not its input): it is restarted from its checkpoint with backoff, /readyz answers 503 with the reason, each restart is counted and logged as an ERROR, the payment waits; once the row is repaired the payment completes, money moved once.
    // ERROR events as the error log's layer sees them. The error log itself
    // follows the server started last in this process, so the test keeps its own.
    use tracing_subscriber::layer::SubscriberExt;
    let seen = ErrorEvents::default();
    let subscriber = tracing_subscriber::registry().with(seen.clone());
    tracing::subscriber::set_global_default(subscriber)
        .expect("one subscriber in this test binary");
    let (server, client) = TestServer::builder()
        .config(|c| c.pipeline.cache_rows_per_task = 0)
        .accounts(&[("alice", 10_000), ("bob", 0)])
        .start()
        .await;
    payments_flow(&client, &server, "before").await;
    // An account's rows are in blocks of the account table, which a task
    // keeps in memory once written or read: the store's newest copy of
    // alice's is damaged while kpay is down, and read after the start.
    let (config, dir) = (server.config().clone(), server.dir());
    server.stop().await;
    let (_, store) = common::open_backends_retrying(&config).await.unwrap();
    let (block, saved) = common::newest_block_of(&store, "a", "alice");
    store.put(&block, &()).unwrap();
    store.flush().await.unwrap();
    drop(store);
    let server = TestServer::start(config).await;
    let store = server.runtime().store().clone();
    let body = json!({"id": "stuck", "from": "alice", "to": "bob", "amount": 300});
    let (status, answer) = post(&client, &server.url("/api/v1/payments"), body).await;
    assert_eq!(status, 202, "{answer}");
    let readyz = server.url("/readyz");
    wait_until(Duration::from_secs(10), || async {
        get(&client, &readyz).await.0 == 503
    })
    .await;
    let (_, why) = get(&client, &readyz).await;
    let why = why["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        why.contains("a processor is down: account/") && why.contains(&block),
        "{why}"
    );
    // Backoff: 100, 200, 400 ms, ... so within 3 s a few restarts, not hundreds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = client.get(server.url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    let restarts: f64 = text
        .lines()
        .find(|l| l.starts_with("kpay_task_restarts_total{processor=\"account\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no restart counter: {text}"));
    println!("account task restarts within 3 s of the corrupt row: {restarts}");
    assert!((2.0..=8.0).contains(&restarts), "restarts: {restarts}");
    let logged = seen.0.lock().unwrap().clone();
    let restarts_logged = logged
        .iter()
        .filter(|m| m.contains("task failed; restarting it from its last checkpoint"))
        .count();
    assert!(restarts_logged as f64 >= restarts, "{logged:?}");
    // The payment waits for the account task meanwhile.
    let (_, stuck) = get(&client, &server.url("/api/v1/payments/stuck")).await;
    assert_ne!(stuck["status"], "confirmed");

    store.put_raw(&[(block.into_bytes(), saved)]).unwrap();
    wait_until(Duration::from_secs(15), || async {
        get(&client, &readyz).await.0 == 200
    })
    .await;
    assert_confirmed(&client, &server.base, "stuck").await;
    let (_, alice) = get(&client, &server.url("/api/v1/accounts/alice")).await;
    assert_eq!(alice["balance"], 10_000 - 100 - 300, "{alice}");
    let (_, integrity) = get(&client, &server.url("/api/v1/ledger/integrity")).await;
    assert_eq!(integrity["ok"], true, "{integrity}");
    server.stop().await;
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_survives_the_poison_record_and_exits_zero_on_sigterm() {
    // The real binary, sent the reported 900,000-byte record, stays ready, and a SIGTERM stop exits 0.
    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![("KPAY_SERVER__MAX_BODY_BYTES", "2097152")];
    env.extend(RAW_RECORDS_ENV);
    let server = Binary::start(dir.path(), &env).await;
    let client = operator_client();
    let body = json!({"topic": "payment.incoming", "records": [{"key": "k", "value": "x".repeat(900_000)}]});
    let (status, answer) = post(
        &client,
        &format!("{}/api/v1/ops/records", server.base),
        body,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let dlq = format!("{}/api/v1/dlq", server.base);
    wait_until(Duration::from_secs(20), || async {
        get(&client, &dlq).await.1["waiting"] == 1
    })
    .await;
    assert_eq!(
        get(&client, &format!("{}/readyz", server.base)).await.0,
        200
    );
    let exit = server.stop().await;
    assert!(exit.success(), "SIGTERM exit: {exit:?}");
    let server = Binary::start(dir.path(), &env).await;
    let dlq = format!("{}/api/v1/dlq", server.base);
    assert_eq!(get(&client, &dlq).await.1["waiting"], 1);
    let exit = server.stop().await;
    assert!(exit.success(), "SIGTERM exit: {exit:?}");
}

/// The messages of every ERROR event from kpay, with their fields.
#[derive(Clone, Default)]
struct ErrorEvents(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for ErrorEvents {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == tracing::Level::ERROR && meta.target().starts_with("kpay") {
            let mut text = Text::default();
            event.record(&mut text);
            self.0.lock().unwrap().push(text.0);
        }
    }
}

#[derive(Default)]
struct Text(String);

impl tracing::field::Visit for Text {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}
