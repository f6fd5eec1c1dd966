//! The operational plane end to end over HTTP: malformed records on every
//! input topic land in the DLQ with their coordinates and the rest flows;
//! replay (corrected, idempotent); a processor error mid-batch; the DLQ bound;
//! the error log from the real binary.

mod common;

use std::time::Duration;

use common::{
    get, kpay_command, open_account, operator_client, post, terminal, test_config, wait_until,
    Binary, TestServer, RAW_RECORDS_ENV,
};
use kpay::model::{codec, now_ms, partition_for, Envelope, Event, Outcome, PaymentRef};
use kpay::ops::dlq::hex;
use serde_json::{json, Value};

fn encoded(event: Event) -> String {
    hex(&codec::encode(&Envelope::new(None, event)))
}

fn payment(id: &str, from: &str, to: &str, amount_cents: i64) -> PaymentRef {
    PaymentRef {
        id: id.into(),
        from: from.into(),
        to: to.into(),
        amount_cents,
        accepted_at_ms: now_ms(),
    }
}

/// Appends raw records through the API; returns (partition, offset) of each.
async fn inject(
    c: &reqwest::Client,
    base: &str,
    topic: &str,
    partition: Option<u32>,
    records: Value,
) -> Vec<(u32, u64)> {
    let body = json!({"topic": topic, "partition": partition, "records": records});
    let (status, answer) = post(c, &format!("{base}/api/v1/ops/records"), body).await;
    assert_eq!(status, 201, "{answer}");
    answer["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["partition"].as_u64().unwrap() as u32,
                r["offset"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Injects one record into `topic` and waits until `processor` dead-letters
/// it; returns the dead letter's id and the letter.
async fn dead_lettered(
    c: &reqwest::Client,
    base: &str,
    topic: &str,
    processor: &str,
    record: Value,
) -> (String, Value) {
    let landed = inject(c, base, topic, None, json!([record])).await;
    let (p, offset) = landed[0];
    let id = format!("{topic}:{p}:{offset}:{processor}");
    let url = format!("{base}/api/v1/dlq/{id}");
    wait_until(Duration::from_secs(10), || async {
        get(c, &url).await.0 == 200
    })
    .await;
    let (_, letter) = get(c, &url).await;
    (id, letter)
}

async fn dlq(c: &reqwest::Client, base: &str, query: &str) -> Value {
    let (status, list) = get(c, &format!("{base}/api/v1/dlq?{query}")).await;
    assert_eq!(status, 200, "{list}");
    list
}

async fn balance(c: &reqwest::Client, base: &str, id: &str) -> i64 {
    let (_, account) = get(c, &format!("{base}/api/v1/accounts/{id}")).await;
    account["balance"].as_i64().unwrap()
}

async fn ledger_ok(c: &reqwest::Client, base: &str) {
    let (_, ledger) = get(c, &format!("{base}/api/v1/ledger/integrity")).await;
    assert_eq!(ledger["ok"], true, "{ledger}");
}

async fn pay(c: &reqwest::Client, base: &str, id: &str, amount: i64) {
    let body = json!({"id": id, "from": "alice", "to": "bob", "amount": amount});
    let (status, answer) = post(c, &format!("{base}/api/v1/payments"), body).await;
    assert_eq!(status, 202, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_on_every_input_topic_are_dead_lettered_and_the_rest_flows() {
    let (server, c) = TestServer::with_raw_records(&[("alice", 100_000), ("bob", 0)]).await;
    let base = server.base.clone();
    let garbage = json!([{"key": "junk", "value_hex": "ff00206e6f7420616e206576656e74"}]);
    let topics = [
        ("payment.incoming", vec!["inflight"]),
        ("payment.inflight", vec!["account"]),
        // Read by two processors: each gives up on the record once.
        ("payment.complete", vec!["confirmed", "inflight"]),
        ("control.commands", vec!["control"]),
    ];
    let mut expected = Vec::new();
    for (topic, processors) in &topics {
        let partition = if *topic == "control.commands" { 0 } else { 1 };
        let landed = inject(&c, &base, topic, Some(partition), garbage.clone()).await;
        for processor in processors {
            let (p, offset) = landed[0];
            expected.push(format!("{topic}:{p}:{offset}:{processor}"));
        }
    }
    for n in 0..20 {
        pay(&c, &base, &format!("after-{n}"), 100).await;
    }
    for n in 0..20 {
        let done = terminal(&c, &base, &format!("after-{n}")).await;
        assert_eq!(done["status"], "confirmed", "{done}");
    }
    wait_until(Duration::from_secs(10), || async {
        dlq(&c, &base, "").await["waiting"] == expected.len()
    })
    .await;
    let list = dlq(&c, &base, "").await;
    let mut ids: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected);
    for letter in list["items"].as_array().unwrap() {
        assert_eq!(letter["class"], "decode", "{letter}");
        assert!(
            letter["reason"]
                .as_str()
                .unwrap()
                .contains("unknown schema version 255"),
            "{letter}"
        );
        assert_eq!(letter["key"], "junk");
        assert_eq!(letter["status"], "waiting");
        assert_eq!(letter["value_hex"], "ff00206e6f7420616e206576656e74");
        assert!(letter["at_ms"].as_i64().unwrap() > 0);
        let id = letter["id"].as_str().unwrap();
        let (status, one) = get(&c, &format!("{base}/api/v1/dlq/{id}")).await;
        assert_eq!((status, &one["id"]), (200, &letter["id"]));
    }
    // Filters and paging.
    let by_topic = dlq(&c, &base, "topic=payment.complete").await;
    assert_eq!(by_topic["items"].as_array().unwrap().len(), 2);
    let first = dlq(&c, &base, "limit=2").await;
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let after = first["next"].as_str().unwrap();
    let rest = dlq(&c, &base, &format!("after={after}&limit=100")).await;
    assert_eq!(rest["items"].as_array().unwrap().len(), expected.len() - 2);
    assert!(rest["next"].is_null());
    assert_eq!(dlq(&c, &base, "class=overflow").await["items"], json!([]));
    for bad in ["status=lost", "after=nonsense", "limit=0"] {
        let (status, body) = get(&c, &format!("{base}/api/v1/dlq?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"]["message"].as_str().is_some(), "{body}");
    }
    let (status, _) = get(
        &c,
        &format!("{base}/api/v1/dlq/payment.incoming:9:9:inflight"),
    )
    .await;
    assert_eq!(status, 404);
    // The DLQ size is a metric and an SLO.
    let (_, slo) = get(&c, &format!("{base}/api/v1/metrics/slo")).await;
    let goal = slo["goals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "dlq_empty")
        .unwrap()
        .clone();
    assert_eq!(goal["met"], false, "{goal}");
    assert_eq!(goal["current"], expected.len() as f64);
    let metrics = prometheus_text(&base).await;
    assert!(
        metrics.contains(&format!("kpay_dlq_records {}", expected.len())),
        "{metrics}"
    );
    assert_eq!(balance(&c, &base, "bob").await, 2_000);
    ledger_ok(&c, &base).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrected_replay_completes_once_and_replaying_again_changes_nothing() {
    let (server, c) = TestServer::with_raw_records(&[("alice", 10_000), ("bob", 0)]).await;
    let base = server.base.clone();
    // A foreign producer's payment that is not in kpay's format.
    let text = r#"{"id":"fix-me","from":"alice","to":"bob","amount":"5.00"}"#;
    let record = json!({"key": "fix-me", "value": text});
    let (id, letter) = dead_lettered(&c, &base, "payment.incoming", "inflight", record).await;
    assert_eq!(letter["value_text"], text, "{letter}");
    let replay_url = format!("{base}/api/v1/dlq/{id}/replay");
    // As stored it still does not decode: refused with a reason, nothing appended.
    let (status, refused) = post(&c, &replay_url, json!({})).await;
    assert_eq!(status, 422, "{refused}");
    common::assert_error_mentions(&refused, "corrected value");
    let (status, _) = post(&c, &replay_url, json!({"value": "x", "value_hex": "00"})).await;
    assert_eq!(status, 400);
    let (status, _) = post(&c, &replay_url, json!({"value_hex": "zz"})).await;
    assert_eq!(status, 400);
    // Corrected: the same payment in kpay's format.
    let fixed = encoded(Event::PaymentSubmitted(payment(
        "fix-me", "alice", "bob", 500,
    )));
    let (status, first) = post(&c, &replay_url, json!({"value_hex": fixed})).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["already_replayed"], false);
    let replay = &first["dead_letter"]["replay"];
    assert_eq!(replay["corrected"], true);
    // The operator token's holder, first in the list.
    assert_eq!(replay["principal"], "operator#0");
    let done = terminal(&c, &base, "fix-me").await;
    assert_eq!(done["status"], "confirmed", "{done}");
    assert_eq!(
        done["lineage"][0]["offset"], replay["offset"],
        "admitted from the replayed record"
    );
    assert_eq!(balance(&c, &base, "bob").await, 500);
    // Again, with or without a body: the first answer, nothing appended.
    let shared = server.runtime().clone();
    let p = partition_for("fix-me", shared.config().log.partitions);
    let incoming = kpay::log::TopicPartition::new("payment.incoming", p);
    let end = shared.log().high_watermark(&incoming).await.unwrap();
    for body in [json!({"value_hex": fixed}), json!({})] {
        let (status, again) = post(&c, &replay_url, body).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["already_replayed"], true);
        assert_eq!(
            again["dead_letter"]["replay"],
            first["dead_letter"]["replay"]
        );
    }
    assert_eq!(shared.log().high_watermark(&incoming).await.unwrap(), end);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(balance(&c, &base, "bob").await, 500);
    assert_eq!(dlq(&c, &base, "").await["waiting"], 0);
    let replayed = dlq(&c, &base, "status=replayed").await;
    assert_eq!(replayed["items"][0]["status"], "replayed", "{replayed}");

    // A derived record: a deposit to an account that does not exist yet is
    // an impossible state; once the account is opened, its replay lands once.
    let deposit = encoded(Event::Deposit {
        account: "carol".into(),
        amount_cents: 700,
        at_ms: now_ms(),
    });
    let record = json!({"key": "carol", "value_hex": deposit});
    let (id, letter) = dead_lettered(&c, &base, "payment.inflight", "account", record).await;
    assert_eq!(letter["class"], "impossible_state", "{letter}");
    open_account(&c, &base, "carol", 0).await;
    let url = format!("{base}/api/v1/dlq/{id}/replay");
    let (status, answer) = c.post(&url).send().await.map(|r| (r.status(), r)).unwrap();
    assert_eq!(status, 200, "{:?}", answer.text().await);
    let (status, _) = post(&c, &url, json!({})).await;
    assert_eq!(status, 200);
    wait_until(Duration::from_secs(10), || async {
        balance(&c, &base, "carol").await == 700
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(balance(&c, &base, "carol").await, 700, "deposited once");
    // Deleting: gone for reads and replays.
    let (status, _) = get(&c, &format!("{base}/api/v1/dlq/{id}")).await;
    assert_eq!(status, 200);
    let deleted = c
        .delete(format!("{base}/api/v1/dlq/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(get(&c, &format!("{base}/api/v1/dlq/{id}")).await.0, 404);
    assert_eq!(post(&c, &url, json!({})).await.0, 404);
    ledger_ok(&c, &base).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_error_mid_batch_loses_and_duplicates_nothing() {
    let (server, c) = TestServer::with_raw_records(&[("alice", 100_000), ("bob", 0)]).await;
    let (base, partitions) = (server.base.clone(), server.config().log.partitions);
    // Five good payments whose ids live on partition 2, around two bad
    // records, appended in one write so one batch reads them all.
    let ids: Vec<String> = (0..)
        .map(|n| format!("mid-{n}"))
        .filter(|id| partition_for(id, partitions) == 2)
        .take(5)
        .collect();
    let good = |n: usize| {
        let event = Event::PaymentSubmitted(payment(&ids[n], "alice", "bob", 100 * (n as i64 + 1)));
        json!({"key": ids[n], "value_hex": encoded(event)})
    };
    // An event that does not belong on payment.incoming, and bytes that do not decode.
    let wrong = Event::Completed {
        payment: payment("stray", "alice", "bob", 1),
        outcome: Outcome::Confirmed,
        completed_at_ms: 0,
        lineage: vec![],
    };
    let records = json!([
        good(0),
        good(1),
        {"key": "stray", "value_hex": encoded(wrong)},
        good(2),
        good(3),
        {"key": "junk", "value": "not an event"},
        good(4),
    ]);
    let landed = inject(&c, &base, "payment.incoming", Some(2), records).await;
    let offsets: Vec<u64> = landed.iter().map(|(_, o)| *o).collect();
    for (n, offset) in [0, 1, 3, 4, 6].into_iter().enumerate() {
        let done = terminal(&c, &base, &ids[n]).await;
        assert_eq!(done["status"], "confirmed", "{done}");
        assert_eq!(done["lineage"][0]["offset"], offsets[offset], "{done}");
    }
    wait_until(Duration::from_secs(10), || async {
        dlq(&c, &base, "").await["waiting"] == 2
    })
    .await;
    let list = dlq(&c, &base, "").await;
    let letters: Vec<(&str, u64)> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["class"].as_str().unwrap(),
                l["source_offset"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        letters,
        vec![("unexpected_event", offsets[2]), ("decode", offsets[5])]
    );
    // 100 + 200 + 300 + 400 + 500, each once.
    assert_eq!(balance(&c, &base, "bob").await, 1_500);
    assert_eq!(balance(&c, &base, "alice").await, 98_500);
    let (_, metrics) = get(&c, &format!("{base}/api/v1/metrics/pipeline")).await;
    assert_eq!(metrics["confirmed"]["count"], 5, "{metrics}");
    assert_eq!(metrics["inflight"]["count"], 0, "{metrics}");
    ledger_ok(&c, &base).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_is_bounded_and_overflow_is_counted() {
    let (server, c) = TestServer::builder()
        .raw_records()
        .config(|c| c.limits.dlq_entries = 2)
        .start()
        .await;
    let base = server.base.clone();
    let junk = json!([
        {"key": "j1", "value": "junk"},
        {"key": "j2", "value": "junk"},
        {"key": "j3", "value": "junk"},
    ]);
    inject(&c, &base, "payment.incoming", Some(0), junk).await;
    wait_until(Duration::from_secs(10), || async {
        let metrics = prometheus_text(&base).await;
        metrics.contains("kpay_dlq_overflow_total")
    })
    .await;
    assert_eq!(dlq(&c, &base, "").await["waiting"], 2);
    // Still on the DLQ topic, for other tools.
    let shared = server.runtime().clone();
    let topic = kpay::log::TopicPartition::new(shared.topics().dlq.clone(), 0);
    assert_eq!(shared.log().high_watermark(&topic).await.unwrap(), 3);
    // Unknown topics and partitions are refused with a reason.
    for (body, want) in [
        (json!({"topic": "nope", "records": [{"value": "x"}]}), 422),
        (
            json!({"topic": "payment.incoming", "partition": 99, "records": [{"value": "x"}]}),
            422,
        ),
        (json!({"topic": "payment.incoming", "records": []}), 400),
        (
            json!({"topic": "payment.incoming", "records": [{"key": "k"}]}),
            400,
        ),
    ] {
        let (status, answer) = post(&c, &format!("{base}/api/v1/ops/records"), body).await;
        assert_eq!(status, want, "{answer}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_reach_the_error_log_with_their_context() {
    // The real binary, whose `main` installs the error-log layer.
    let dir = tempfile::tempdir().unwrap();
    let server = Binary::start(dir.path(), &RAW_RECORDS_ENV).await;
    let (c, base) = (operator_client(), server.base.clone());
    let landed = inject(
        &c,
        &base,
        "payment.incoming",
        None,
        json!([{"key": "order-77", "value": "garbage"}]),
    )
    .await;
    let (p, offset) = landed[0];
    let url = format!("{base}/api/v1/logs/errors?level=warn");
    wait_until(Duration::from_secs(10), || async {
        get(&c, &url).await.1["items"]
            .as_array()
            .is_some_and(|items| !items.is_empty())
    })
    .await;
    let (_, log) = get(&c, &url).await;
    let entry = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["message"] == "dead-lettered")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(entry["level"], "WARN");
    let fields = &entry["fields"];
    assert_eq!(fields["processor"], "inflight", "{entry}");
    assert_eq!(fields["topic"], "payment.incoming");
    assert_eq!(fields["partition"], p.to_string());
    assert_eq!(fields["offset"], offset.to_string());
    assert_eq!(fields["payment_id"], "order-77");
    assert_eq!(fields["class"], "decode");
    let (_, errors_only) = get(&c, &format!("{base}/api/v1/logs/errors?level=error")).await;
    assert_eq!(errors_only["items"], json!([]), "{errors_only}");
    let (status, _) = get(&c, &format!("{base}/api/v1/logs/errors?level=loud")).await;
    assert_eq!(status, 400);
}

/// Runs `kpay rebuild` on `dir`; returns (success, stdout + stderr).
fn rebuild(dir: &std::path::Path, dry_run: bool) -> (bool, String) {
    rebuild_with(dir, dry_run, &[])
}

fn rebuild_with(dir: &std::path::Path, dry_run: bool, env: &[(&str, &str)]) -> (bool, String) {
    let mut command = kpay_command();
    command.envs(env.iter().copied());
    command
        .arg("--data-dir")
        .arg(dir)
        .arg("rebuild")
        .env("KPAY_LOG__PARTITIONS", "4")
        // One record per input per read: a replay then meets completions
        // before the admissions they depend on unless it orders them.
        .env("KPAY_PIPELINE__BATCH_RECORDS", "2")
        .env("RUST_LOG", "warn");
    if dry_run {
        command.arg("--dry-run");
    }
    let output = command.output().expect("run kpay rebuild");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Everything the API says about the state, for before/after comparisons.
async fn snapshot(c: &reqwest::Client, base: &str, payments: &[&str]) -> Value {
    let (_, accounts) = get(c, &format!("{base}/api/v1/accounts?limit=100")).await;
    let mut views = Vec::new();
    for id in payments {
        let (_, mut view) = get(c, &format!("{base}/api/v1/payments/{id}")).await;
        // A hop's time out is when it was processed: not part of the state.
        let lineage = view["lineage"].as_array_mut();
        for hop in lineage.unwrap_or_else(|| panic!("payment {id} has no lineage")) {
            hop["processed_at"] = Value::Null;
        }
        views.push(view);
    }
    let (_, metrics) = get(c, &format!("{base}/api/v1/metrics/pipeline")).await;
    let (_, control) = get(c, &format!("{base}/api/v1/control/status")).await;
    let accounts: Vec<Value> = accounts["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            json!([
                a["id"],
                a["balance"],
                a["status"],
                a["last_payment_id"],
                a["emptied_by"]
            ])
        })
        .collect();
    json!({
        "accounts": accounts,
        "payments": views,
        "confirmed": metrics["confirmed"],
        "rejected": metrics["rejected"],
        "reversed": metrics["reversed"],
        "inflight": metrics["inflight"],
        "control": control["state"],
        "rate_limit": control["rate_limit"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_from_the_log_equals_the_live_state_and_repairs_a_tampered_one() {
    let (server, c) = TestServer::with_raw_records(&[
        ("alice", 10_000),
        ("bob", 500),
        ("carol", 0),
        ("dave", 40),
    ])
    .await;
    let (base, dir) = (server.base.clone(), server.dir());
    let (status, _) = post(
        &c,
        &format!("{base}/api/v1/accounts/carol/close"),
        json!({}),
    )
    .await;
    assert!((200..300).contains(&status), "{status}");
    let deposit = json!({"amount": 250});
    let (status, _) = post(&c, &format!("{base}/api/v1/accounts/bob/deposit"), deposit).await;
    assert!((200..300).contains(&status), "{status}");
    let control = |path: &str| format!("{base}/api/v1/control/{path}");
    c.put(control("rate-limit"))
        .json(&json!({"payments_per_second": 5000}))
        .send()
        .await
        .unwrap();
    let cases = [
        ("ok-1", "alice", "bob", 1_000, "confirmed"),
        ("ok-2", "bob", "alice", 300, "confirmed"),
        ("broke", "carol", "alice", 1, "rejected"),
        ("poor", "bob", "alice", 1_000_000, "rejected"),
        ("ghost", "alice", "nobody", 700, "reversed"),
        ("closed", "alice", "carol", 200, "reversed"),
    ];
    for (id, from, to, amount, _) in cases {
        let body = json!({"id": id, "from": from, "to": to, "amount": amount});
        let (status, answer) = post(&c, &format!("{base}/api/v1/payments"), body.clone()).await;
        assert_eq!(status, 202, "{answer}");
        // The same request again is a duplicate, accepted once.
        post(&c, &format!("{base}/api/v1/payments"), body).await;
    }
    // In one append: the rejection completes before the earlier confirmed
    // payment, so `payment.complete` is not in `payment.incoming`'s order.
    let batch = json!({"payments": [
        {"id": "batch-ok", "from": "alice", "to": "bob", "amount": 10},
        {"id": "batch-poor", "from": "carol", "to": "bob", "amount": 10},
    ]});
    let (status, answer) = post(&c, &format!("{base}/api/v1/payments/batch"), batch).await;
    assert_eq!(status, 200, "{answer}");
    for (id, _, _, _, status) in cases {
        assert_eq!(terminal(&c, &base, id).await["status"], status);
    }
    assert_eq!(terminal(&c, &base, "batch-ok").await["status"], "confirmed");
    assert_eq!(
        terminal(&c, &base, "batch-poor").await["status"],
        "rejected"
    );
    // An account closed by moving its balance: a payment the account
    // processor itself submitted.
    let url = format!("{base}/api/v1/accounts/dave/close");
    let (status, _) = post(&c, &url, json!({"transfer_to": "bob"})).await;
    assert!((200..300).contains(&status), "{status}");
    common::wait_until(std::time::Duration::from_secs(10), || async {
        get(&c, &format!("{base}/api/v1/accounts/dave")).await.1["status"] == "closed"
    })
    .await;
    let (_, dave) = get(&c, &format!("{base}/api/v1/accounts/dave")).await;
    let emptied_by = dave["emptied_by"].as_str().unwrap().to_owned();
    // A dead letter, replayed corrected: a replay source in the log.
    let record = json!({"key": "fixed", "value": "garbage"});
    let (id, _) = dead_lettered(&c, &base, "payment.incoming", "inflight", record).await;
    let fixed = encoded(Event::PaymentSubmitted(payment(
        "fixed", "alice", "bob", 50,
    )));
    let url = format!("{base}/api/v1/dlq/{id}/replay");
    assert_eq!(post(&c, &url, json!({"value_hex": fixed})).await.0, 200);
    assert_eq!(terminal(&c, &base, "fixed").await["status"], "confirmed");
    // Paused at the end, with one payment waiting unadmitted.
    let (status, _) = post(&c, &control("pause?wait=true"), json!({})).await;
    assert_eq!(status, 200);
    let body = json!({"id": "waiting", "from": "alice", "to": "bob", "amount": 5});
    assert_eq!(
        post(&c, &format!("{base}/api/v1/payments"), body).await.0,
        202
    );
    let mut ids: Vec<&str> = cases.iter().map(|c| c.0).collect();
    ids.extend(["fixed", "waiting", "batch-ok", "batch-poor", &emptied_by]);
    let before = snapshot(&c, &base, &ids).await;
    server.stop().await;

    let (ok, report) = rebuild(dir.path(), true);
    assert!(ok, "{report}");
    assert!(!report.contains("DIFFERENT"), "{report}");
    assert!(
        report.contains("payments") && report.contains("equal"),
        "{report}"
    );

    // Tamper with a balance behind the pipeline's back: the log says otherwise.
    {
        // Its newest copy, in a block of the account table.
        let store = kpay::store::Store::open(&dir.path().join("state"), 1 << 20).unwrap();
        let (block, bytes) = common::newest_block_of(&store, "a", "bob");
        let mut rows = kpay::store::block_entries(&block, &bytes).unwrap();
        let at = rows.iter().position(|(key, _)| key == "bob").unwrap();
        let mut bob: kpay::pipeline::account::Account =
            kpay::store::decode_row(&block, &rows[at].1).unwrap();
        bob.balance_cents += 1_000_000;
        rows[at].1 = kpay::store::encode_row(&bob).into();
        let rows = rows.into_iter().map(|(key, row)| (key, 0, row));
        let packed = kpay::store::pack(rows.collect(), &mut 0);
        assert_eq!(packed.len(), 1, "one block as before");
        store
            .put_raw(&[(block.into_bytes(), packed[0].bytes.to_vec())])
            .unwrap();
        futures::executor::block_on(store.flush()).unwrap();
    }
    let (ok, report) = rebuild(dir.path(), true);
    assert!(!ok, "{report}");
    assert!(
        report.contains("DIFFERENT") && report.contains("bob: live"),
        "{report}"
    );
    let (ok, report) = rebuild(dir.path(), false);
    assert!(!ok && report.contains("now in place"), "{report}");
    assert!(dir.path().join("state.before-rebuild").exists());
    let (ok, report) = rebuild(dir.path(), true);
    assert!(ok, "{report}");

    // The rebuilt state serves the same answers, and the pipeline goes on from it.
    let server = TestServer::start(test_config(dir.path())).await;
    let base = server.base.clone();
    assert_eq!(snapshot(&c, &base, &ids).await, before);
    assert_eq!(
        dlq(&c, &base, "status=replayed").await["items"][0]["id"],
        id
    );
    let (status, _) = post(&c, &format!("{base}/api/v1/control/resume"), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(terminal(&c, &base, "waiting").await["status"], "confirmed");
    assert_eq!(
        balance(&c, &base, "bob").await,
        500 + 250 + 1_000 - 300 + 50 + 5 + 10 + 40
    );
    ledger_ok(&c, &base).await;
    let after = snapshot(&c, &base, &ids).await;
    server.stop().await;

    // The state lost entirely: a server started without it replays the whole
    // log (its tasks re-emit, downstream skips the copies) to the same state.
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    std::fs::remove_dir_all(dir.path().join("state.before-rebuild")).unwrap();
    let mut config = test_config(dir.path());
    config.pipeline.batch_records = 2;
    let server = TestServer::start(config).await;
    assert_eq!(snapshot(&c, &server.base, &ids).await, after);
    ledger_ok(&c, &server.base).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_left_in_doubt_by_a_crash_is_settled_from_the_log() {
    // A replay is reserved (durably) before its append. After a crash in
    // between, the next replay call finds out from the log whether it landed.
    use kpay::model::{Source, SourceTopic};
    use kpay::ops::dlq::{DeadLetter, Replay};
    let (server, c) = TestServer::with_raw_records(&[("alice", 10_000), ("bob", 0)]).await;
    let base = server.base.clone();
    let shared = server.runtime().clone();
    let junk = json!([{"key": "landed", "value": "x"}, {"key": "lost", "value": "y"}]);
    let landed = inject(&c, &base, "payment.incoming", Some(0), junk).await;
    let ids: Vec<String> = landed
        .iter()
        .map(|(p, o)| format!("payment.incoming:{p}:{o}:inflight"))
        .collect();
    wait_until(Duration::from_secs(10), || async {
        dlq(&c, &base, "").await["waiting"] == 2
    })
    .await;
    // Simulate both crash points: reservation written, then (for the first)
    // the append done, but neither settled.
    let mut appended = None;
    for (n, (id, name)) in ids.iter().zip(["landed", "lost"]).enumerate() {
        let event = Event::PaymentSubmitted(payment(name, "alice", "bob", 100));
        let partition = partition_for(name, 4);
        let tp = kpay::log::TopicPartition::new("payment.incoming", partition);
        let seq = 1_000 + n as u64;
        let (p, o) = landed[n];
        let key = format!("d/payment.incoming:{p:05}:{o:020}:inflight");
        let mut letter: DeadLetter = shared.store().get(&key).unwrap().unwrap();
        assert_eq!(&letter.id, id);
        letter.replay = Some(Replay {
            seq,
            topic: tp.topic.clone(),
            partition,
            from_offset: shared.log().high_watermark(&tp).await.unwrap(),
            offset: None,
            at_ms: now_ms(),
            principal: "local".into(),
            corrected: true,
        });
        letter.value_hex = encoded(event.clone());
        shared.store().put(&key, &letter).unwrap();
        if name == "landed" {
            let replay = Source {
                topic: SourceTopic::Replay,
                partition: 0,
                offset: seq,
            };
            let envelope = Envelope::new(Some(replay), event);
            let record = kpay::log::Record {
                key: bytes::Bytes::from_static(b"landed"),
                value: bytes::Bytes::from(codec::encode(&envelope)),
                timestamp_ms: now_ms(),
            };
            appended = Some((
                tp.clone(),
                shared.log().append(&tp, vec![record]).await.unwrap(),
            ));
        }
    }
    // The counter moves with each reservation (in the same store batch).
    shared.store().put("m/replay_seq", &1_001u64).unwrap();
    let (tp, offset) = appended.unwrap();
    assert_eq!(terminal(&c, &base, "landed").await["status"], "confirmed");
    let end = shared.log().high_watermark(&tp).await.unwrap();
    // It landed: settled at that offset, nothing appended again.
    let (status, answer) = replay_as_stored(&c, &base, &ids[0]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["dead_letter"]["replay"]["offset"], offset,
        "{answer}"
    );
    assert_eq!(answer["dead_letter"]["replay"]["seq"], 1_000);
    assert_eq!(shared.log().high_watermark(&tp).await.unwrap(), end);
    // It did not land: appended now, once.
    let (status, answer) = replay_as_stored(&c, &base, &ids[1]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(terminal(&c, &base, "lost").await["status"], "confirmed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        balance(&c, &base, "bob").await,
        200,
        "each moved money once"
    );
    ledger_ok(&c, &base).await;
    server.stop().await;
}

/// An id of the form `{prefix}-{n}` for each partition, in partition order.
fn one_per_partition(prefix: &str, partitions: u32) -> Vec<String> {
    (0..partitions)
        .map(|p| {
            (0..)
                .map(|n| format!("{prefix}-{n}"))
                .find(|id| partition_for(id, partitions) == p)
                .expect("some id lands on every partition")
        })
        .collect()
}

// Settled payments are forgotten once the retention has passed on their
// partition, the same way live and in a rebuild; a copy of a forgotten
// payment is refused as expired instead of moving its money again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settled_payments_are_forgotten_after_the_retention_and_copies_refused() {
    let (server, c) = TestServer::builder()
        .raw_records()
        .config(|c| c.limits.payment_retention_seconds = 2)
        .accounts(&[("alice", 100_000), ("bob", 0)])
        .start()
        .await;
    let (base, dir, config) = (server.base.clone(), server.dir(), server.config().clone());
    let partitions = config.log.partitions;
    let early = one_per_partition("early", partitions);
    let mut accepted_at = Vec::new();
    for id in &early {
        let body = json!({"id": id, "from": "alice", "to": "bob", "amount": 100});
        let (status, answer) = post(&c, &format!("{base}/api/v1/payments"), body).await;
        assert_eq!(status, 202, "{answer}");
        let done = terminal(&c, &base, id).await;
        assert_eq!(done["status"], "confirmed");
        accepted_at.push(done["accepted_at"].as_i64().unwrap());
    }
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    // Newer payments on every partition move its clock past the retention.
    let late = one_per_partition("late", partitions);
    for id in &late {
        pay(&c, &base, id, 10).await;
    }
    for id in &late {
        assert_eq!(terminal(&c, &base, id).await["status"], "confirmed");
    }
    for id in &early {
        let url = format!("{base}/api/v1/payments/{id}");
        wait_until(Duration::from_secs(10), || async {
            get(&c, &url).await.0 == 404
        })
        .await;
        let (_, answer) = get(&c, &url).await;
        common::assert_error_mentions(&answer, "kept for 2 s");
    }
    // A copy of a forgotten payment, as another producer would re-send it.
    let copy = json!({"id": early[0], "from": "alice", "to": "bob", "amount": 100,
                      "accepted_at": accepted_at[0]});
    let record = json!({"key": early[0], "value": copy.to_string()});
    let (_, letter) = dead_lettered(&c, &base, "payment.incoming", "inflight", record).await;
    assert_eq!(letter["class"], "expired", "{letter}");
    assert!(
        letter["reason"].as_str().unwrap().contains("retention"),
        "{letter}"
    );
    let (status, _) = get(&c, &format!("{base}/api/v1/payments/{}", early[0])).await;
    assert_eq!(status, 404);
    let moved = 100 * early.len() as i64 + 10 * late.len() as i64;
    assert_eq!(balance(&c, &base, "bob").await, moved);
    ledger_ok(&c, &base).await;
    server.stop().await;

    let env = [("KPAY_LIMITS__PAYMENT_RETENTION_SECONDS", "2")];
    let (ok, report) = rebuild_with(dir.path(), true, &env);
    assert!(ok && !report.contains("DIFFERENT"), "{report}");

    // After a restart the forgotten stay forgotten and payments flow.
    let server = TestServer::start(config).await;
    let (c, base) = (operator_client(), server.base.clone());
    let (status, _) = get(&c, &format!("{base}/api/v1/payments/{}", early[1])).await;
    assert_eq!(status, 404);
    pay(&c, &base, "after-restart", 1).await;
    assert_eq!(
        terminal(&c, &base, "after-restart").await["status"],
        "confirmed"
    );
    assert_eq!(balance(&c, &base, "bob").await, moved + 1);
    ledger_ok(&c, &base).await;
    server.stop().await;
}

/// Replays dead letter `id` as it was stored.
async fn replay_as_stored(c: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    post(c, &format!("{base}/api/v1/dlq/{id}/replay"), json!({})).await
}

/// The Prometheus exposition at `GET /metrics`.
async fn prometheus_text(base: &str) -> String {
    let response = reqwest::get(format!("{base}/metrics")).await.unwrap();
    response.text().await.unwrap()
}
