//! What a writer without kpay's authority can do to the ledger: raw record
//! injection is off by default and then for operators only; payments on
//! `payment.incoming` are held to the API's rules whoever wrote them; with a
//! cluster secret, records on the internal topics must carry kpay's HMAC.

mod common;

use common::{get, post, TestServer, OPERATOR_TOKEN};
use serde_json::{json, Value};

/// A payment record in the public JSON format, for `POST /api/v1/ops/records`.
fn incoming(id: &str, from: &str, to: &str, amount: i64) -> Value {
    let payment = json!({"id": id, "from": from, "to": to, "amount": amount});
    json!({"topic": "payment.incoming",
           "records": [{"key": id, "value": payment.to_string()}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_records_are_off_by_default_and_refused_without_tokens() {
    // Off by default: 404 naming the setting; on in protected mode (no tokens): 403; nothing is appended either way.
    let (server, c) = TestServer::builder()
        .accounts(&[("alice", 100), ("bob", 0)])
        .start()
        .await;
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
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("never writable"),
            "{answer}"
        );
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
