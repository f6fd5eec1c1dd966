//! Closing an account over HTTP: one with money in it is refused unless the
//! close names where the money goes; then the balance moves as an ordinary
//! payment, and the account closes once it is confirmed, showing when and by
//! which payment.

mod common;

use std::time::Duration;

use common::{get, post, terminal, wait_until, TestServer};
use serde_json::{json, Value};

async fn account(c: &reqwest::Client, server: &TestServer, id: &str) -> Value {
    get(c, &server.url(&format!("/api/v1/accounts/{id}")))
        .await
        .1
}

async fn close(c: &reqwest::Client, server: &TestServer, id: &str, body: Value) -> (u16, Value) {
    post(
        c,
        &server.url(&format!("/api/v1/accounts/{id}/close")),
        body,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_is_refused_without_a_destination_and_moved_with_one() {
    let accounts = [("alice", 5_000), ("bob", 100), ("shut", 0)];
    let (server, c) = TestServer::with_accounts(&accounts).await;
    let (status, body) = close(&c, &server, "alice", json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "balance_not_zero", "{body}");
    common::assert_error_mentions(&body, "5000 cents");
    // No body at all is the same close.
    let bare = c
        .post(server.url("/api/v1/accounts/alice/close"))
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 409);
    assert_eq!(account(&c, &server, "alice").await["status"], "open");

    assert_eq!(close(&c, &server, "shut", json!({})).await.0, 200);
    for (to, status, text) in [
        ("alice", 400, "being closed"),
        ("no body", 400, "transfer_to"),
        ("nobody", 409, "does not exist"),
        ("shut", 409, "is closed"),
    ] {
        let (got, body) = close(&c, &server, "alice", json!({"transfer_to": to})).await;
        assert_eq!(got, status, "{to}: {body}");
        common::assert_error_mentions(&body, text);
    }
    let (status, body) = close(&c, &server, "alice", json!({"transfer_to": "bob"})).await;
    assert!(status == 202 || status == 200, "{status} {body}");
    wait_until(Duration::from_secs(10), || async {
        account(&c, &server, "alice").await["status"] == "closed"
    })
    .await;
    let alice = account(&c, &server, "alice").await;
    let moved_by = alice["emptied_by"].as_str().expect("emptied_by").to_owned();
    if status == 202 {
        assert_eq!(body["status"], "closing", "{body}");
        assert_eq!(body["payment_id"], moved_by.as_str(), "{body}");
    }
    assert_eq!(alice["balance"], 0, "{alice}");
    assert!(alice["closed_at"].as_i64().unwrap() >= alice["opened_at"].as_i64().unwrap());
    assert!(alice["closing"].is_null(), "{alice}");
    let payment = terminal(&c, &server.base, &moved_by).await;
    assert_eq!(
        (
            &payment["status"],
            &payment["from"],
            &payment["to"],
            &payment["amount"]
        ),
        (
            &json!("confirmed"),
            &json!("alice"),
            &json!("bob"),
            &json!(5_000)
        ),
        "{payment}"
    );
    let stages: Vec<&str> = (payment["lineage"].as_array().unwrap().iter())
        .filter_map(|hop| hop["stage"].as_str())
        .collect();
    assert!(stages.contains(&"closing"), "{stages:?}");
    assert_eq!(account(&c, &server, "bob").await["balance"], 5_100);

    // Closed: no money in or out, and the account is not opened again.
    let deposit = json!({"amount": 10});
    let (status, body) = post(&c, &server.url("/api/v1/accounts/alice/deposit"), deposit).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = close(&c, &server, "alice", json!({"transfer_to": "bob"})).await;
    assert_eq!(status, 409, "{body}");
    common::assert_error_mentions(&body, "already closed");
    let pay = json!({"id": "after", "from": "alice", "to": "bob", "amount": 1});
    assert_eq!(post(&c, &server.url("/api/v1/payments"), pay).await.0, 202);
    let after = terminal(&c, &server.base, "after").await;
    assert_eq!(
        (&after["status"], &after["reason"]),
        (&json!("rejected"), &json!("account_closed"))
    );
    let (_, ledger) = get(&c, &server.url("/api/v1/ledger/integrity")).await;
    assert_eq!(ledger["ok"], true, "{ledger}");
    assert_eq!(ledger["sum_of_balances"], 5_100, "{ledger}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_account_closes_at_once_and_says_when() {
    let (server, c) = TestServer::with_accounts(&[("empty", 0)]).await;
    let (status, body) = close(&c, &server, "empty", json!({"transfer_to": "nobody"})).await;
    // Nothing to move: where it would go does not matter, but must exist.
    assert_eq!(status, 409, "{body}");
    let (status, body) = close(&c, &server, "empty", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "closed", "{body}");
    assert!(body["closed_at"].is_i64(), "{body}");
    assert!(body["emptied_by"].is_null(), "{body}");
    assert_eq!(account(&c, &server, "empty").await["status"], "closed");
    let (status, body) = close(&c, &server, "empty", json!({})).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (409, &json!("conflict")),
        "{body}"
    );
    let (status, body) = close(&c, &server, "empty", json!({"transfer_to": 5})).await;
    assert_eq!(status, 400, "{body}");
    common::assert_error_mentions(&body, "transfer_to");
    server.stop().await;
}
