//! Safe retries: `Idempotency-Key` on every state-changing call, and
//! deposits with an id. A retry gets the first answer (marked
//! `Idempotent-Replayed: true`) and moves no money twice; the key with
//! another call is a conflict.

mod common;

use std::time::Duration;

use common::{get, terminal, TestServer};
use serde_json::{json, Value};

/// POSTs `body` to `path` with `key`: (status, replayed, body).
async fn keyed(
    c: &reqwest::Client,
    server: &TestServer,
    path: &str,
    key: &str,
    body: Value,
) -> (u16, bool, Value) {
    let response = c
        .post(server.url(path))
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    (
        status,
        replayed,
        response.json().await.unwrap_or(Value::Null),
    )
}

async fn balance(c: &reqwest::Client, server: &TestServer, id: &str) -> i64 {
    get(c, &server.url(&format!("/api/v1/accounts/{id}")))
        .await
        .1["balance"]
        .as_i64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposit_retried_with_its_key_or_id_credits_once() {
    let (server, c) = TestServer::with_accounts(&[("a", 1_000)]).await;
    let path = "/api/v1/accounts/a/deposit";
    let (status, replayed, first) = keyed(&c, &server, path, "dep-1", json!({"amount": 500})).await;
    assert_eq!((status, replayed), (202, false), "{first}");
    for _ in 0..4 {
        let (status, replayed, again) =
            keyed(&c, &server, path, "dep-1", json!({"amount": 500})).await;
        assert_eq!((status, replayed, &again), (202, true, &first));
    }
    let (status, _, other) = keyed(&c, &server, path, "dep-1", json!({"amount": 600})).await;
    assert_eq!(status, 409, "{other}");
    common::assert_error_mentions(&other, "another call");
    // Ten at once with one key: one credit.
    let tries = (0..10).map(|_| keyed(&c, &server, path, "dep-2", json!({"amount": 7})));
    let answers = futures::future::join_all(tries).await;
    assert!(
        answers.iter().all(|(s, _, body)| *s == 202
            || (*s == 409 && body["error"]["code"] == "idempotency_key_in_use")),
        "{answers:?}"
    );
    // A deposit's own id, without a key: applied once, then answered as a replay.
    let body = json!({"amount": 100, "id": "bank-ref-77"});
    let (status, _, _) = keyed(&c, &server, path, "dep-3", body.clone()).await;
    assert_eq!(status, 202);
    common::wait_until(Duration::from_secs(10), || async {
        balance(&c, &server, "a").await == 1_607
    })
    .await;
    let plain = c.post(server.url(path)).json(&body).send().await.unwrap();
    assert_eq!(plain.status(), 202);
    assert_eq!(plain.headers()["idempotent-replayed"], "true");
    let other = c
        .post(server.url(path))
        .json(&json!({"amount": 101, "id": "bank-ref-77"}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 409);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(balance(&c, &server, "a").await, 1_000 + 500 + 7 + 100);
    // The keys outlive a restart.
    let server = server.restart().await;
    let (status, replayed, _) = keyed(&c, &server, path, "dep-1", json!({"amount": 500})).await;
    assert_eq!((status, replayed), (202, true));
    assert_eq!(balance(&c, &server, "a").await, 1_607);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_or_batch_retried_with_its_key_pays_once() {
    let (server, c) = TestServer::with_accounts(&[("a", 10_000), ("b", 0)]).await;
    let body = json!({"from": "a", "to": "b", "amount": 250});
    let (status, _, first) = keyed(&c, &server, "/api/v1/payments", "order-9", body.clone()).await;
    assert_eq!(
        (status, first["id"].as_str()),
        (202, Some("order-9")),
        "{first}"
    );
    for _ in 0..3 {
        let (status, replayed, again) =
            keyed(&c, &server, "/api/v1/payments", "order-9", body.clone()).await;
        assert_eq!((status, replayed, &again), (202, true, &first));
    }
    let (status, _, _) = keyed(
        &c,
        &server,
        "/api/v1/payments",
        "order-9",
        json!({"from": "a", "to": "b", "amount": 251}),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(
        terminal(&c, &server.base, "order-9").await["status"],
        "confirmed"
    );
    let batch = json!({"payments": [
        {"from": "a", "to": "b", "amount": 10},
        {"id": "own-id", "from": "a", "to": "b", "amount": 20},
        {"from": "a", "to": "a", "amount": 30},
    ]});
    let (status, _, first) = keyed(
        &c,
        &server,
        "/api/v1/payments/batch",
        "batch-1",
        batch.clone(),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let ids: Vec<&str> = first["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["batch-1.0", "own-id", "batch-1.2"]);
    let (status, replayed, again) =
        keyed(&c, &server, "/api/v1/payments/batch", "batch-1", batch).await;
    assert_eq!((status, replayed, &again), (200, true, &first));
    terminal(&c, &server.base, "batch-1.0").await;
    terminal(&c, &server.base, "own-id").await;
    assert_eq!(balance(&c, &server, "b").await, 250 + 10 + 20);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_and_closing_retried_with_a_key_get_their_first_answer() {
    let (server, c) = TestServer::with_accounts(&[]).await;
    let open = json!({"id": "new", "opening_balance": 0});
    let (status, _, first) = keyed(&c, &server, "/api/v1/accounts", "open-1", open.clone()).await;
    assert_eq!(status, 201, "{first}");
    let (status, replayed, again) =
        keyed(&c, &server, "/api/v1/accounts", "open-1", open.clone()).await;
    assert_eq!((status, replayed, &again), (201, true, &first));
    // Without the key, opening it again is a conflict, as before.
    assert_eq!(
        common::post(&c, &server.url("/api/v1/accounts"), open)
            .await
            .0,
        409
    );
    let (status, _, _) = keyed(
        &c,
        &server,
        "/api/v1/accounts/new/close",
        "close-1",
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, replayed, _) = keyed(
        &c,
        &server,
        "/api/v1/accounts/new/close",
        "close-1",
        json!({}),
    )
    .await;
    assert_eq!((status, replayed), (200, true));
    for bad in ["", "has space", &"k".repeat(41)] {
        let (status, _, body) =
            keyed(&c, &server, "/api/v1/accounts/new/close", bad, json!({})).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        common::assert_error_mentions(&body, "Idempotency-Key");
    }
    server.stop().await;
}
