//! The REST surface: validation, business rules, idempotency, accounts,
//! batches, queries and the OpenAPI document, against a real in-process server
//! over the embedded log and sled.

mod common;

use common::{get, open_account, post, terminal, TestServer};
use kpay::log::TopicPartition;
use serde_json::{json, Value};

async fn incoming_records(server: &TestServer) -> u64 {
    let shared = server.runtime();
    let mut total = 0;
    for p in 0..shared.config().log.partitions {
        let tp = TopicPartition::new(shared.topics().incoming.clone(), p);
        total += shared.log().high_watermark(&tp).await.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_reason_and_write_nothing() {
    // Each kind of bad payment gets a 4xx with a clear message and nothing reaches the log.
    let (server, client) = TestServer::with_accounts(&[("a", 1_000), ("b", 0)]).await;
    let url = server.url("/api/v1/payments");
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"from":"a","to":"b","amount":0}),
            400,
            "amount 0 must be > 0",
        ),
        (json!({"from":"a","to":"b","amount":-5}), 400, "must be > 0"),
        (
            json!({"from":"a","to":"b","amount":12.5}),
            400,
            "amount: expected an integer, got the number 12.5",
        ),
        (
            json!({"from":"a","to":"b","amount":"12"}),
            400,
            "amount: expected an integer, got a string \"12\"",
        ),
        (
            json!({"from":"a","to":"b","amount":200_000_000_000i64}),
            400,
            "above the limit",
        ),
        (json!({"from":"a","to":"a","amount":5}), 400, "same account"),
        (
            json!({"from":"a","to":"b","amount":5,"memo":"x"}),
            400,
            "unknown field",
        ),
        (
            json!({"from":"a b","to":"b","amount":5}),
            400,
            "from contains",
        ),
        (
            json!({"id":"","from":"a","to":"b","amount":5}),
            400,
            "id must not be empty",
        ),
        (
            json!({"id":"x".repeat(65),"from":"a","to":"b","amount":5}),
            400,
            "limit is 64",
        ),
        (json!({"to":"b","amount":5}), 400, "`from` is required"),
        // An array is not a payment, whatever it holds.
        (
            json!(["p1", "a", "b", 5]),
            400,
            "must be a JSON object, got an array",
        ),
        (json!("p1"), 400, "must be a JSON object, got a string"),
    ];
    for (body, status, needle) in cases {
        let (got, answer) = post(&client, &url, body.clone()).await;
        assert_eq!(got, status, "{body} → {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{body}: {message:?} lacks {needle:?}"
        );
        assert_eq!(answer["error"]["code"], "invalid_request");
        // Said in the API's terms, never the Rust types behind it.
        for rust in [
            "struct ",
            "i64",
            "u32",
            "u64",
            "PaymentRequest",
            " at line ",
        ] {
            assert!(
                !message.contains(rust),
                "{body}: {message:?} names {rust:?}"
            );
        }
    }
    let raw = client
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"from\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let text = client.post(&url).body("{}").send().await.unwrap();
    assert_eq!(text.status(), 415);
    let huge = json!({"payments": vec![json!({"from":"a","to":"b","amount":1}); 5_000]});
    let (status, body) = post(&client, &server.url("/api/v1/payments/batch"), huge).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        incoming_records(&server).await,
        0,
        "a refused request reached the log"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_rules_end_in_the_right_terminal_state() {
    // Confirmed, rejected (funds, unknown, closed) and reversed (unknown or closed `to`) payments, with balances never negative.
    let (server, c) =
        TestServer::with_accounts(&[("alice", 10_000), ("bob", 500), ("carol", 0)]).await;
    let base = server.base.clone();
    let (status, _) = post(
        &c,
        &format!("{base}/api/v1/accounts/carol/close"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    common::wait_until(std::time::Duration::from_secs(5), || async {
        get(&c, &format!("{base}/api/v1/accounts/carol")).await.1["status"] == "closed"
    })
    .await;
    let pay = |id: &str, from: &str, to: &str, amount: i64| json!({"id": id, "from": from, "to": to, "amount": amount});
    let cases = [
        (pay("ok", "alice", "bob", 2_500), "confirmed", None),
        (
            pay("poor", "bob", "alice", 5_000),
            "rejected",
            Some("insufficient_funds"),
        ),
        (
            pay("ghost-from", "nobody", "alice", 1),
            "rejected",
            Some("unknown_account"),
        ),
        (
            pay("closed-from", "carol", "alice", 1),
            "rejected",
            Some("account_closed"),
        ),
        (
            pay("ghost-to", "alice", "nobody", 700),
            "reversed",
            Some("unknown_account"),
        ),
        (
            pay("closed-to", "alice", "carol", 300),
            "reversed",
            Some("account_closed"),
        ),
    ];
    for (body, _, _) in &cases {
        let (status, answer) = post(&c, &format!("{base}/api/v1/payments"), body.clone()).await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["status"], "accepted");
    }
    for (body, status, reason) in &cases {
        let id = body["id"].as_str().unwrap();
        let payment = terminal(&c, &base, id).await;
        assert_eq!(payment["status"], *status, "{payment}");
        assert_eq!(payment["reason"].as_str(), *reason, "{payment}");
        let stages = common::lineage_stages(&payment);
        assert_eq!(stages, common::expected_stages(status), "{payment}");
        let hops = payment["lineage"].as_array().unwrap();
        let topics = server.runtime().topics();
        for hop in hops {
            let (processor, topic) = match hop["stage"].as_str().unwrap() {
                "admitted" => ("inflight", &topics.incoming),
                "completed" => ("inflight", &topics.complete),
                _ => ("account", &topics.inflight),
            };
            assert_eq!(hop["processor"], processor, "{hop}");
            assert_eq!(hop["topic"].as_str(), Some(topic.as_str()), "{hop}");
            let (time_in, time_out) = (hop["received_at"].as_i64(), hop["processed_at"].as_i64());
            assert!(time_in.unwrap() > 0 && time_in <= time_out, "{hop}");
        }
        // Each hop read the record the previous one wrote: time moves forward.
        for pair in hops.windows(2) {
            assert!(pair[0]["processed_at"].as_i64() <= pair[1]["received_at"].as_i64());
        }
        assert_eq!(
            payment["completed_at"],
            hops[hops.len() - 2]["processed_at"]
        );
    }
    let balance = |v: Value| v["balance"].as_i64().unwrap();
    assert_eq!(
        balance(get(&c, &format!("{base}/api/v1/accounts/alice")).await.1),
        7_500
    );
    assert_eq!(
        balance(get(&c, &format!("{base}/api/v1/accounts/bob")).await.1),
        3_000
    );
    assert_eq!(
        balance(get(&c, &format!("{base}/api/v1/accounts/carol")).await.1),
        0
    );
    let (_, metrics) = get(&c, &format!("{base}/api/v1/metrics/pipeline")).await;
    assert_eq!(metrics["confirmed"]["count"], 1);
    assert_eq!(metrics["confirmed"]["amount"], 2_500);
    assert_eq!(metrics["confirmed"]["today_count"], 1);
    assert_eq!(metrics["rejected"]["count"], 3);
    assert_eq!(metrics["rejected"]["by_reason"]["insufficient_funds"], 1);
    assert_eq!(metrics["reversed"]["count"], 2);
    assert_eq!(metrics["inflight"]["count"], 0);
    let (_, ledger) = get(&c, &format!("{base}/api/v1/ledger/integrity")).await;
    assert_eq!(ledger["ok"], true, "{ledger}");
    assert_eq!(ledger["total_funded"], 10_500);
    assert_eq!(ledger["sum_of_balances"], 10_500);
    let (_, confirmed) = get(&c, &format!("{base}/api/v1/payments?status=confirmed")).await;
    assert_eq!(confirmed["items"].as_array().unwrap().len(), 1);
    assert_eq!(confirmed["items"][0]["id"], "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_same_body_same_answer_other_body_conflict() {
    // A repeated id with the same body is accepted once; with another body it is refused with 409, even when raced.
    let (server, c) = TestServer::with_accounts(&[("a", 1_000), ("b", 0)]).await;
    let base = server.base.clone();
    let url = format!("{base}/api/v1/payments");
    let body = json!({"id": "dup", "from": "a", "to": "b", "amount": 100});
    let racers = (0..20).map(|_| post(&c, &url, body.clone()));
    let answers = futures::future::join_all(racers).await;
    assert!(answers.iter().all(|(s, b)| *s == 202 && b["id"] == "dup"));
    let fresh = answers
        .iter()
        .filter(|(_, b)| b["status"] == "accepted")
        .count();
    assert!(fresh >= 1);
    terminal(&c, &base, "dup").await;
    let (status, again) = post(&c, &url, body.clone()).await;
    assert_eq!((status, again["status"].as_str()), (202, Some("confirmed")));
    let (status, conflict) = post(
        &c,
        &url,
        json!({"id":"dup","from":"a","to":"b","amount":101}),
    )
    .await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "conflict");
    let (_, account) = get(&c, &format!("{base}/api/v1/accounts/b")).await;
    assert_eq!(account["balance"], 100, "money moved more than once");
    assert_eq!(
        incoming_records(&server).await,
        1,
        "the id was appended more than once"
    );
    let (_, generated) = post(&c, &url, json!({"from":"a","to":"b","amount":1})).await;
    assert_eq!(
        generated["id"].as_str().unwrap().len(),
        36,
        "UUID v7 expected: {generated}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_open_deposit_close_and_page() {
    // Accounts open once (409 after), take deposits, close, and list in id order across partitions.
    let (server, c) = TestServer::builder().start().await;
    let base = server.base.clone();
    for n in 0..25 {
        open_account(&c, &base, &format!("acct-{n:02}"), n * 100).await;
    }
    let (status, body) = post(
        &c,
        &format!("{base}/api/v1/accounts"),
        json!({"id":"acct-00","opening_balance":1}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let cases = [
        (
            "/api/v1/accounts",
            json!({"id":"neg","opening_balance":-1}),
            400,
        ),
        (
            "/api/v1/accounts/acct-01/deposit",
            json!({"amount":50}),
            202,
        ),
        ("/api/v1/accounts/nobody/deposit", json!({"amount":50}), 404),
        ("/api/v1/accounts/acct-01/deposit", json!({"amount":0}), 400),
        ("/api/v1/accounts/nobody/close", json!({}), 404),
    ];
    for (path, body, expected) in cases {
        let (status, answer) = post(&c, &format!("{base}{path}"), body.clone()).await;
        assert_eq!(status, expected, "{path} {body}: {answer}");
    }
    common::wait_until(std::time::Duration::from_secs(5), || async {
        get(&c, &format!("{base}/api/v1/accounts/acct-01")).await.1["balance"] == 150
    })
    .await;
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let query = match &after {
            Some(a) => format!("{base}/api/v1/accounts?limit=7&after={a}"),
            None => format!("{base}/api/v1/accounts?limit=7"),
        };
        let (status, page) = get(&c, &query).await;
        assert_eq!(status, 200);
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["id"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|n| format!("acct-{n:02}")).collect();
    assert_eq!(seen, expected);
    let (status, _) = get(&c, &format!("{base}/api/v1/accounts?limit=0")).await;
    assert_eq!(status, 400);
    let (status, _) = get(&c, &format!("{base}/api/v1/accounts/missing")).await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reports_each_item() {
    // A batch answers per payment: accepted ones are durable, bad ones carry their own error.
    let (server, c) = TestServer::with_accounts(&[("a", 1_000), ("b", 0)]).await;
    let base = server.base.clone();
    let batch = json!({"payments": [
        {"id": "b1", "from": "a", "to": "b", "amount": 10},
        {"id": "b2", "from": "a", "to": "a", "amount": 10},
        {"id": "b3", "from": "a", "to": "b", "amount": 20},
    ]});
    let (status, body) = post(&c, &format!("{base}/api/v1/payments/batch"), batch).await;
    assert_eq!(status, 200, "{body}");
    let codes: Vec<i64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, vec![202, 400, 202]);
    // Every result carries its item's id, refused ones too.
    let ids: Vec<&str> = (body["results"].as_array().unwrap().iter())
        .map(|r| r["id"].as_str().unwrap_or("null"))
        .collect();
    assert_eq!(ids, ["b1", "b2", "b3"], "{body}");
    terminal(&c, &base, "b1").await;
    terminal(&c, &base, "b3").await;
    let (status, _) = post(
        &c,
        &format!("{base}/api/v1/payments/batch"),
        json!({"payments": []}),
    )
    .await;
    assert_eq!(status, 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_clean_restart() {
    // After a graceful stop and a restart on the same data, balances, payments and totals are all still there.
    let (server, c) = TestServer::with_accounts(&[("a", 1_000), ("b", 0)]).await;
    for n in 0..20 {
        let body = json!({"id": format!("r{n}"), "from": "a", "to": "b", "amount": 10});
        assert_eq!(post(&c, &server.url("/api/v1/payments"), body).await.0, 202);
    }
    terminal(&c, &server.base, "r19").await;
    let server = server.restart().await;
    for n in 0..20 {
        assert_eq!(
            terminal(&c, &server.base, &format!("r{n}")).await["status"],
            "confirmed"
        );
    }
    assert_eq!(
        get(&c, &server.url("/api/v1/accounts/b")).await.1["balance"],
        200
    );
    let (_, metrics) = get(&c, &server.url("/api/v1/metrics/pipeline")).await;
    assert_eq!(metrics["confirmed"]["count"], 20);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_endpoint_and_swagger_serves() {
    // The OpenAPI document lists every route and Swagger UI and the health probes answer.
    let (server, c) = TestServer::builder().start().await;
    let (status, doc) = get(&c, &server.url("/api-docs/openapi.json")).await;
    assert_eq!(status, 200);
    // Found by API fuzzing: every operation documents the errors any
    // request can get, and a bad query string answers in the error shape.
    for status in ["400", "401", "403", "413", "415", "503"] {
        let response = &doc["paths"]["/api/v1/payments"]["post"]["responses"][status];
        assert!(
            response["content"]["application/json"].is_object(),
            "{status}"
        );
    }
    // Writes document 507 (no space on the data directory's device); reads do not.
    for (path, method) in [
        ("/api/v1/payments", "post"),
        ("/api/v1/accounts", "post"),
        ("/api/v1/accounts/{id}/deposit", "post"),
    ] {
        let response = &doc["paths"][path][method]["responses"]["507"];
        assert!(
            response["content"]["application/json"].is_object(),
            "{method} {path}"
        );
    }
    assert!(doc["paths"]["/api/v1/payments"]["get"]["responses"]["507"].is_null());
    for query in ["/api/v1/dlq?limit=abc", "/api/v1/payments?limit=-1"] {
        let response = c.get(server.url(query)).send().await.unwrap();
        assert_eq!(response.status(), 400, "{query}");
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    }
    for path in [
        "/api/v1/accounts",
        "/api/v1/accounts/{id}",
        "/api/v1/accounts/{id}/deposit",
        "/api/v1/accounts/{id}/close",
        "/api/v1/payments",
        "/api/v1/payments/batch",
        "/api/v1/payments/{id}",
        "/api/v1/metrics/pipeline",
        "/api/v1/ledger/integrity",
        "/api/v1/metrics/throughput",
        "/api/v1/metrics/slo",
        "/api/v1/metrics/lag",
        "/api/v1/control/status",
        "/api/v1/control/pause",
        "/api/v1/control/resume",
        "/metrics",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    let swagger = c.get(server.url("/swagger-ui/")).send().await.unwrap();
    assert_eq!(swagger.status(), 200);
    assert_eq!(get(&c, &server.url("/healthz")).await.0, 200);
    assert_eq!(get(&c, &server.url("/readyz")).await.0, 200);
    assert_eq!(get(&c, &server.url("/api/v1/payments/nope")).await.0, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_wrong_methods_answer_in_the_error_shape() {
    // 404 and 405 (OPTIONS too) carry {"error":{"code","message"}} as JSON;
    // 405 says which methods the route takes, in Allow and in words.
    let (server, c) = TestServer::with_accounts(&[]).await;
    let cases = [
        ("GET", "/api/v1/nope", 404, "not_found"),
        ("GET", "/nothing-here.txt", 404, "not_found"),
        ("DELETE", "/api/v1/payments", 405, "method_not_allowed"),
        ("PATCH", "/api/v1/control/pause", 405, "method_not_allowed"),
        ("OPTIONS", "/api/v1/payments", 405, "method_not_allowed"),
    ];
    for (method, path, status, code) in cases {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = c
            .request(method.clone(), server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            content_type.as_deref(),
            Some("application/json"),
            "{method} {path}"
        );
        let allow = response
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(path), "{message}");
        if status == 405 {
            let allow = allow.unwrap_or_else(|| panic!("{method} {path}: no Allow"));
            assert!(allow.contains("GET") || allow.contains("POST"), "{allow}");
            assert!(message.contains("Allow"), "{message}");
        }
    }
    // A known route still answers its own 404 with its own message.
    let (status, body) = common::get(&c, &server.url("/api/v1/payments/none")).await;
    assert_eq!(status, 404);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("payment none not found"),
        "{body}"
    );
    // An array where a command's optional body belongs is refused, not applied.
    let response = c
        .post(server.url("/api/v1/control/resume"))
        .json(&json!(["\u{ed}"]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_filters_are_validated_like_status() {
    let (server, c) = TestServer::with_accounts(&[]).await;
    // Topic names are settings (prefixed on the Kafka backend's test topics).
    let topics = &server.config().topics;
    let incoming = format!("topic \"bogus\" is not one of {}", topics.incoming);
    for (query, needle) in [
        (
            "class=bogus",
            "class \"bogus\" is not one of decode, unauthenticated",
        ),
        ("topic=bogus", incoming.as_str()),
        (
            "processor=bogus",
            "processor \"bogus\" is not one of inflight, account",
        ),
        (
            "status=bogus",
            "status \"bogus\" is not one of waiting, replayed",
        ),
    ] {
        let (status, body) = common::get(&c, &server.url(&format!("/api/v1/dlq?{query}"))).await;
        assert_eq!(status, 400, "{query}: {body}");
        common::assert_error_mentions(&body, needle);
    }
    let inflight = format!("topic={}", topics.inflight);
    for query in [
        "class=decode",
        inflight.as_str(),
        "processor=account",
        "status=replayed",
    ] {
        let (status, body) = common::get(&c, &server.url(&format!("/api/v1/dlq?{query}"))).await;
        assert_eq!(
            (status, &body["items"]),
            (200, &json!([])),
            "{query}: {body}"
        );
    }
    server.stop().await;
}
