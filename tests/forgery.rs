//! What a writer without kpay's authority can do to the ledger: raw record
//! injection is off by default and then for operators only; payments on
//! `payment.incoming` are held to the API's rules whoever wrote them; with a
//! cluster secret, records on the internal topics must carry kpay's HMAC.

mod common;

use std::time::Duration;

use common::{assert_confirmed, get, post, wait_until, TestServer, OPERATOR_TOKEN};
use kpay::model::seal::Sealer;
use kpay::model::{codec, now_ms, ControlAction, ControlCommand, Envelope, Event, Outcome};
use kpay::model::{PaymentRef, Source, SourceTopic};
use kpay::ops::dlq::hex;
use serde_json::{json, Value};

const SECRET: &str = "the-cluster-secret-of-this-test";

/// A payment record in the public JSON format, for `POST /api/v1/ops/records`.
fn incoming(id: &str, from: &str, to: &str, amount: i64) -> Value {
    let payment = json!({"id": id, "from": from, "to": to, "amount": amount});
    json!({"topic": "payment.incoming",
           "records": [{"key": id, "value": payment.to_string()}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_records_are_off_by_default_and_refused_without_tokens() {
    // Off by default: 404 naming the setting; on in protected mode (no tokens): 403; nothing is appended either way.
    let (server, c) = TestServer::with_accounts(&[("alice", 100), ("bob", 0)]).await;
    let url = server.url("/api/v1/ops/records");
    let (status, answer) = post(&c, &url, incoming("p-off", "bob", "alice", 50)).await;
    assert_eq!(status, 404, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("ops.raw_records"), "{answer}");
    let (status, answer) = get(&c, &server.url("/api/v1/payments/p-off")).await;
    assert_eq!(status, 404, "{answer}");
    server.stop().await;

    let (server, c) = TestServer::builder()
        .config(|c| c.ops.raw_records = true)
        .start()
        .await;
    let url = server.url("/api/v1/ops/records");
    let (status, answer) = post(&c, &url, incoming("p-local", "bob", "alice", 50)).await;
    assert_eq!(status, 403, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("protected mode"), "{answer}");
    let tp = kpay::log::TopicPartition::new("payment.incoming", 0);
    for partition in 0..server.config().log.partitions {
        let tp = kpay::log::TopicPartition::new(tp.topic.clone(), partition);
        let end = server.runtime().log().high_watermark(&tp).await.unwrap();
        assert_eq!(end, 0, "{tp}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_records_need_an_operator_and_never_reach_the_journals_or_the_dlq() {
    // With the setting and tokens: a teller gets 403, no token 401; ops.audit, ops.logs and payment.dlq are refused (403) even to an operator, who may write elsewhere.
    let (server, c) = TestServer::builder()
        .raw_records()
        .config(|c| {
            let tokens = format!("{OPERATOR_TOKEN}:operator,teller-token-1:teller");
            c.tokens = kpay::config::Tokens::parse(&tokens).unwrap();
        })
        .accounts(&[("alice", 100), ("bob", 0)])
        .start()
        .await;
    let url = server.url("/api/v1/ops/records");
    let body = incoming("p-teller", "alice", "bob", 10);
    let teller = reqwest::Client::new()
        .post(&url)
        .bearer_auth("teller-token-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(teller.status(), 403);
    let anonymous = reqwest::Client::new().post(&url).json(&body).send().await;
    assert_eq!(anonymous.unwrap().status(), 401);
    let forged = json!({"principal": "operator#0", "role": "operator", "action": "paused",
                        "source": "10.9.9.9", "outcome": "ok"});
    for topic in ["ops.audit", "ops.logs", "payment.dlq"] {
        let body = json!({"topic": topic, "partition": 0,
                          "records": [{"key": "x", "value": forged.to_string()}]});
        let (status, answer) = post(&c, &url, body).await;
        assert_eq!(status, 403, "{topic}: {answer}");
        common::assert_error_mentions(&answer, "never writable");
    }
    let (_, audit) = get(&c, &server.url("/api/v1/logs/audit?limit=1000")).await;
    assert!(!audit.to_string().contains("10.9.9.9"), "{audit}");
    let dlq = kpay::log::TopicPartition::new("payment.dlq", 0);
    assert_eq!(
        server.runtime().log().high_watermark(&dlq).await.unwrap(),
        0
    );
    let (status, answer) = post(&c, &url, incoming("p-operator", "alice", "bob", 10)).await;
    assert_eq!(status, 201, "{answer}");
    // The OpenAPI document says when and why the endpoint refuses.
    let (_, doc) = get(&c, &server.url("/api-docs/openapi.json")).await;
    let responses = &doc["paths"]["/api/v1/ops/records"]["post"]["responses"];
    for code in ["403", "404"] {
        assert!(responses[code]["description"].is_string(), "{responses}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_written_to_the_topic_meet_the_api_rules() {
    // Records on payment.incoming from any writer: over the amount limit or with a bad id → rejected(invalid), no money moves; accepted_at in the future → the append time.
    // Alice holds more than the limit, so only the limit can refuse the large payment.
    let (server, c) = TestServer::builder()
        .raw_records()
        .config(|c| c.limits.max_amount_cents = 1_000_000)
        .accounts(&[("alice", 1_000_000), ("bob", 0)])
        .start()
        .await;
    let deposit = server.url("/api/v1/accounts/alice/deposit");
    let (status, answer) = post(&c, &deposit, json!({"amount": 1_000_000})).await;
    assert_eq!(status, 202, "{answer}");
    common::wait_until(std::time::Duration::from_secs(10), || async {
        get(&c, &server.url("/api/v1/accounts/alice")).await.1["balance"] == 2_000_000
    })
    .await;
    let url = server.url("/api/v1/ops/records");
    let too_much = incoming("p-huge", "alice", "bob", 1_500_000);
    let bad_id = incoming("p-bad-id", "alice", "bob/../carol", 100);
    for body in [too_much, bad_id] {
        let (status, answer) = post(&c, &url, body).await;
        assert_eq!(status, 201, "{answer}");
    }
    for id in ["p-huge", "p-bad-id"] {
        let done = common::terminal(&c, &server.base, id).await;
        assert_eq!(done["status"], "rejected", "{done}");
        assert_eq!(done["reason"], "invalid", "{done}");
    }
    // Stamped in 2036: admitted with the time it reached the log instead.
    let future = json!({"id": "p-2036", "from": "alice", "to": "bob", "amount": 250,
                        "accepted_at": 2_081_000_000_000i64});
    let body = json!({"topic": "payment.incoming",
                      "records": [{"key": "p-2036", "value": future.to_string()}]});
    let before = kpay::model::now_ms();
    let (status, answer) = post(&c, &url, body).await;
    assert_eq!(status, 201, "{answer}");
    let done = common::terminal(&c, &server.base, "p-2036").await;
    assert_eq!(done["status"], "confirmed", "{done}");
    let (accepted, completed) = (
        done["accepted_at"].as_i64().unwrap(),
        done["completed_at"].as_i64().unwrap(),
    );
    assert!(before <= accepted && accepted <= completed, "{done}");
    let (_, bob) = get(&c, &server.url("/api/v1/accounts/bob")).await;
    assert_eq!(bob["balance"], 250, "{bob}");
    let (_, ledger) = get(&c, &server.url("/api/v1/ledger/integrity")).await;
    assert_eq!(ledger["ok"], true, "{ledger}");
    server.stop().await;
}

/// A JSON payment of 5 cents from alice to bob whose record claims `submitted_by`.
fn claimed(server: &TestServer, id: &str, submitted_by: Value) -> Value {
    let payment = json!({"id": id, "from": "alice", "to": "bob", "amount": 5,
                         "submitted_by": submitted_by});
    json!({"topic": server.config().topics.incoming,
           "records": [{"key": id, "value": payment.to_string()}]})
}

/// An event in kpay's internal format, as hex, signed with `secret` if given.
fn internal(key: &str, event: Event, source: Option<Source>, secret: Option<&str>) -> String {
    let mut value = codec::encode(&Envelope::new(source, event));
    if let Some(secret) = secret {
        Sealer::new(secret.as_bytes()).seal(key.as_bytes(), &mut value);
    }
    hex(&value)
}

/// Appends one record through the API (raw records on) and waits until
/// `processor` dead-letters it; returns the letter.
async fn dead_letter(
    server: &TestServer,
    c: &reqwest::Client,
    topic: &str,
    key: &str,
    value_hex: String,
    processor: &str,
) -> Value {
    // On Kafka the topics are named per test.
    let names = &server.config().topics;
    let topic = match topic {
        "payment.incoming" => names.incoming.as_str(),
        "payment.inflight" => names.inflight.as_str(),
        "payment.complete" => names.complete.as_str(),
        _ => names.commands.as_str(),
    };
    let body = json!({"topic": topic, "records": [{"key": key, "value_hex": value_hex}]});
    let (status, answer) = post(c, &server.url("/api/v1/ops/records"), body).await;
    assert_eq!(status, 201, "{answer}");
    let record = &answer["records"][0];
    let id = format!(
        "{topic}:{}:{}:{processor}",
        record["partition"], record["offset"]
    );
    let url = server.url(&format!("/api/v1/dlq/{id}"));
    wait_until(Duration::from_secs(10), || async {
        get(c, &url).await.0 == 200
    })
    .await;
    get(c, &url).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_secret_forged_internal_records_move_no_money() {
    // With cluster.secret: unsigned or wrongly signed OPEN, DEPOSIT, completion, pause and binary (sourced) payment records are dead-lettered as unauthenticated and change nothing, while kpay's own (payments, accounts, commands, an operator's replay) flow.
    forged_records_move_no_money(TestServer::builder()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_secret_forged_internal_records_move_no_money_on_kafka() {
    // The same on a Kafka-protocol broker, where anyone allowed to write to the topics could forge them.
    let Some(broker) = common::kafka_broker("forged_records_on_kafka") else {
        return;
    };
    forged_records_move_no_money(TestServer::builder().kafka(&broker)).await;
}

async fn forged_records_move_no_money(builder: common::ServerBuilder) {
    let (server, c) = builder
        .raw_records()
        .config(|c| c.cluster.secret = kpay::config::Secret::new(SECRET))
        .accounts(&[("alice", 10_000), ("bob", 0)])
        .start()
        .await;
    let body = json!({"id": "real-1", "from": "alice", "to": "bob", "amount": 700});
    let (status, answer) = post(&c, &server.url("/api/v1/payments"), body).await;
    assert_eq!(status, 202, "{answer}");
    assert_confirmed(&c, &server.base, "real-1").await;
    let (_, real) = get(&c, &server.url("/api/v1/payments/real-1")).await;
    assert_eq!(real["submitted_by"]["principal"], "operator#0", "{real}");
    // Anyone may write payment.incoming, but only kpay's intake can sign who sent a payment.
    let claim = json!({"principal": "teller#3", "source": "10.9.9.9:1", "tag": "ab".repeat(32)});
    let (status, answer) = post(
        &c,
        &server.url("/api/v1/ops/records"),
        claimed(&server, "claim-1", claim),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_confirmed(&c, &server.base, "claim-1").await;
    let (_, claimed) = get(&c, &server.url("/api/v1/payments/claim-1")).await;
    assert_eq!(claimed["submitted_by"], Value::Null, "{claimed}");
    let (_, ledger_before) = get(&c, &server.url("/api/v1/ledger/integrity")).await;

    let at_ms = now_ms();
    let open = Event::OpenAccount {
        account: "mallory".into(),
        opening_balance_cents: 1_000_000_000_000,
        at_ms,
    };
    let deposit = Event::Deposit {
        account: "bob".into(),
        amount_cents: 1_000_000_000_000,
        at_ms,
    };
    let forged = [
        ("mallory", open, None),
        ("bob", deposit.clone(), None),
        ("bob", deposit.clone(), Some("a-different-secret-entirely")),
    ];
    for (key, event, secret) in forged {
        let value = internal(key, event, None, secret);
        let letter = dead_letter(&server, &c, "payment.inflight", key, value, "account").await;
        assert_eq!(letter["class"], "unauthenticated", "{letter}");
    }
    // A completion saying a payment never admitted was confirmed.
    let payment = five_cents("ghost-1", at_ms);
    let done = Event::Completed {
        payment,
        outcome: Outcome::Confirmed,
        completed_at_ms: at_ms,
        lineage: vec![],
    };
    let value = internal("ghost-1", done, None, None);
    let letter = dead_letter(
        &server,
        &c,
        "payment.complete",
        "ghost-1",
        value,
        "confirmed",
    )
    .await;
    assert_eq!(letter["class"], "unauthenticated", "{letter}");
    // A pause in an operator's name.
    let pause = Event::Control(ControlCommand {
        action: ControlAction::Pause,
        principal: "operator#0".into(),
        reason: None,
        at_ms,
    });
    let value = internal("control", pause, None, None);
    let letter = dead_letter(&server, &c, "control.commands", "control", value, "control").await;
    assert_eq!(letter["class"], "unauthenticated", "{letter}");

    // A payment in kpay's binary format, whose source would have later
    // replays to its partition skipped as copies of it.
    let payment = five_cents("sourced-1", at_ms);
    let source = Source {
        topic: SourceTopic::Replay,
        partition: 0,
        offset: u64::MAX / 2,
    };
    let value = internal(
        "sourced-1",
        Event::PaymentSubmitted(payment),
        Some(source),
        None,
    );
    let letter = dead_letter(
        &server,
        &c,
        "payment.incoming",
        "sourced-1",
        value,
        "inflight",
    )
    .await;
    assert_eq!(letter["class"], "unauthenticated", "{letter}");
    let sourced = letter["id"].as_str().unwrap().to_owned();

    let (_, ledger) = get(&c, &server.url("/api/v1/ledger/integrity")).await;
    assert_eq!(ledger, ledger_before, "no money moved");
    let (status, _) = get(&c, &server.url("/api/v1/accounts/mallory")).await;
    assert_eq!(status, 404);
    let (_, control) = get(&c, &server.url("/api/v1/control/status")).await;
    assert_eq!(control["state"], "running", "{control}");
    // kpay's own commands are signed and applied.
    let (status, answer) = post(&c, &server.url("/api/v1/control/pause"), json!({})).await;
    assert_eq!(status, 200, "{answer}");
    let (_, control) = get(&c, &server.url("/api/v1/control/status")).await;
    assert_ne!(control["state"], "running", "{control}");
    let (status, _) = post(&c, &server.url("/api/v1/control/resume"), json!({})).await;
    assert_eq!(status, 200);
    // An operator's replay vouches for a record: signed and applied, once.
    let small = Event::Deposit {
        account: "bob".into(),
        amount_cents: 25,
        at_ms,
    };
    let letter = dead_letter(
        &server,
        &c,
        "payment.inflight",
        "bob",
        internal("bob", small, None, None),
        "account",
    )
    .await;
    let id = letter["id"].as_str().unwrap();
    let (status, answer) = post(
        &c,
        &server.url(&format!("/api/v1/dlq/{id}/replay")),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    wait_until(Duration::from_secs(10), || async {
        get(&c, &server.url("/api/v1/accounts/bob")).await.1["balance"] == 730
    })
    .await;
    let (_, ledger) = get(&c, &server.url("/api/v1/ledger/integrity")).await;
    assert_eq!(ledger["ok"], true, "{ledger}");
    assert_eq!(ledger["total_funded"], 10_025, "{ledger}");
    // Replayed to payment.incoming, in kpay's binary format: signed, admitted, confirmed.
    let url = server.url(&format!("/api/v1/dlq/{sourced}/replay"));
    let (status, answer) = post(&c, &url, json!({})).await;
    assert_eq!(status, 200, "{answer}");
    assert_confirmed(&c, &server.base, "sourced-1").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_nothing_is_checked_and_a_tag_is_ignored() {
    // No cluster.secret: an unsigned record and a signed one are both applied (the tag, a suffix, is ignored).
    let (server, c) = TestServer::with_raw_records(&[("alice", 100), ("bob", 0)]).await;
    let at_ms = now_ms();
    for secret in [None, Some(SECRET)] {
        let deposit = Event::Deposit {
            account: "bob".into(),
            amount_cents: 10,
            at_ms,
        };
        let value_hex = internal("bob", deposit, None, secret);
        let body = json!({"topic": "payment.inflight", "records": [{"key": "bob", "value_hex": value_hex}]});
        let (status, answer) = post(&c, &server.url("/api/v1/ops/records"), body).await;
        assert_eq!(status, 201, "{answer}");
    }
    wait_until(Duration::from_secs(10), || async {
        get(&c, &server.url("/api/v1/accounts/bob")).await.1["balance"] == 20
    })
    .await;
    let (_, dlq) = get(&c, &server.url("/api/v1/dlq")).await;
    assert_eq!(dlq["waiting"], 0, "{dlq}");
    // Nor is an attribution: a record says who sent it, and is believed.
    let claim = json!({"principal": "teller#3", "source": "10.9.9.9:1"});
    let (status, answer) = post(
        &c,
        &server.url("/api/v1/ops/records"),
        claimed(&server, "claim-2", claim.clone()),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_confirmed(&c, &server.base, "claim-2").await;
    let (_, payment) = get(&c, &server.url("/api/v1/payments/claim-2")).await;
    assert_eq!(payment["submitted_by"], claim, "{payment}");
    server.stop().await;
}

/// A payment of 5 cents from alice to bob, accepted at `at_ms`.
fn five_cents(id: &str, at_ms: i64) -> PaymentRef {
    PaymentRef {
        id: id.into(),
        from: "alice".into(),
        to: "bob".into(),
        amount_cents: 5,
        accepted_at_ms: at_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_secret_copies_of_kpays_own_records_are_applied_once() {
    // A signed deposit and a signed resume, copied byte for byte and appended again later, change nothing: kpay's own API writes carry a sequenced source, and the copy check skips them.
    copies_are_applied_once(TestServer::builder()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_secret_copies_of_kpays_own_records_are_applied_once_on_kafka() {
    // The same on a Kafka-protocol broker.
    let Some(broker) = common::kafka_broker("copies_on_kafka") else {
        return;
    };
    copies_are_applied_once(TestServer::builder().kafka(&broker)).await;
}

/// The value of the last record of `topic` keyed `key`, as hex.
async fn last_record_hex(server: &TestServer, topic: &str, key: &str, partitions: u32) -> String {
    let partition = kpay::model::partition_for(key, partitions);
    let tp = kpay::log::TopicPartition::new(topic, partition);
    let log = server.runtime().log();
    let (start, end) = (
        log.log_start(&tp).await.unwrap(),
        log.high_watermark(&tp).await.unwrap(),
    );
    let records = log.read(&tp, start, (end - start) as usize).await.unwrap();
    let last = (records.iter().rev())
        .find(|stored| stored.record.key.as_ref() == key.as_bytes())
        .expect("a record with the key");
    hex(&last.record.value)
}

async fn copies_are_applied_once(builder: common::ServerBuilder) {
    let (server, c) = builder
        .raw_records()
        .config(|c| c.cluster.secret = kpay::config::Secret::new(SECRET))
        .accounts(&[("alice", 100)])
        .start()
        .await;
    let names = server.config().topics.clone();
    let partitions = server.config().log.partitions;
    let deposit = |amount: i64| json!({"amount": amount});
    let url = server.url("/api/v1/accounts/alice/deposit");
    let (status, answer) = post(&c, &url, deposit(50)).await;
    assert_eq!(status, 202, "{answer}");
    let balance =
        || async { get(&c, &server.url("/api/v1/accounts/alice")).await.1["balance"].clone() };
    wait_until(Duration::from_secs(10), || async { balance().await == 150 }).await;
    let copy = last_record_hex(&server, &names.inflight, "alice", partitions).await;
    for _ in 0..2 {
        let body =
            json!({"topic": names.inflight, "records": [{"key": "alice", "value_hex": copy}]});
        let (status, answer) = post(&c, &server.url("/api/v1/ops/records"), body).await;
        assert_eq!(status, 201, "{answer}");
    }
    // A later real deposit, behind the copies on the same partition.
    let (status, _) = post(&c, &url, deposit(1)).await;
    assert_eq!(status, 202);
    wait_until(Duration::from_secs(10), || async { balance().await == 151 }).await;

    // A resume, copied, and appended after a pause: the cluster stays paused.
    let (status, _) = post(&c, &server.url("/api/v1/control/resume"), json!({})).await;
    assert_eq!(status, 200);
    let resume = last_record_hex(&server, &names.commands, "control", 1).await;
    let (status, _) = post(&c, &server.url("/api/v1/control/pause"), json!({})).await;
    assert_eq!(status, 200);
    let body =
        json!({"topic": names.commands, "records": [{"key": "control", "value_hex": resume}]});
    let (status, answer) = post(&c, &server.url("/api/v1/ops/records"), body).await;
    assert_eq!(status, 201, "{answer}");
    // A command after the copy, waited for: the copy was read before it.
    let limit = json!({"payments_per_second": 0});
    let response = c
        .put(server.url("/api/v1/control/rate-limit"))
        .json(&limit)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, control) = get(&c, &server.url("/api/v1/control/status")).await;
    assert_ne!(control["state"], "running", "{control}");
    let (_, dlq) = get(&c, &server.url("/api/v1/dlq")).await;
    assert_eq!(
        dlq["waiting"], 0,
        "copies are skipped, not dead-lettered: {dlq}"
    );
    let (_, ledger) = get(&c, &server.url("/api/v1/ledger/integrity")).await;
    assert_eq!(ledger["ok"], true, "{ledger}");
    assert_eq!(ledger["total_funded"], 151, "{ledger}");
    server.stop().await;
}
