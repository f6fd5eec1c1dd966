//! The control plane through the log: pause with drain, resume where intake
//! stopped, and a paused system comes back paused after a restart.

mod common;

use std::time::Duration;

use common::{assert_confirmed, get, kpay_command, post, terminal, TestServer};
use serde_json::{json, Value};

async fn status_of(c: &reqwest::Client, server: &TestServer) -> Value {
    get(c, &server.url("/api/v1/control/status")).await.1
}

async fn payment_status(c: &reqwest::Client, server: &TestServer, id: &str) -> String {
    let (_, p) = get(c, &server.url(&format!("/api/v1/payments/{id}"))).await;
    p["status"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_drains_then_resume_admits_each_waiting_payment_once() {
    // Pause under load drains admitted payments and holds new ones as accepted; resume admits every one of them exactly once.
    let (server, c) = TestServer::with_accounts(&[("a", 1_000_000), ("b", 0)]).await;
    let (_, running) = get(&c, &server.url("/api/v1/control/status")).await;
    assert_eq!(running["state"], "running");
    let batch: Vec<Value> = (0..300)
        .map(|n| json!({"id": format!("c{n}"), "from": "a", "to": "b", "amount": 1}))
        .collect();
    let (status, body) = post(
        &c,
        &server.url("/api/v1/payments/batch"),
        json!({"payments": batch}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, paused) = post(
        &c,
        &server.url("/api/v1/control/pause?wait=true"),
        json!({"reason": "test"}),
    )
    .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(paused["inflight"]["count"], 0);
    for n in 300..320 {
        let body = json!({"id": format!("c{n}"), "from": "a", "to": "b", "amount": 1});
        let (status, answer) = post(&c, &server.url("/api/v1/payments"), body).await;
        assert_eq!((status, answer["status"].as_str()), (202, Some("accepted")));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut waiting = 0;
    for n in 0..320 {
        match payment_status(&c, &server, &format!("c{n}")).await.as_str() {
            "accepted" => waiting += 1,
            "confirmed" => {}
            other => panic!("c{n} is {other} while paused"),
        }
    }
    assert!(waiting >= 20, "the payments sent while paused must wait");
    let status = status_of(&c, &server).await;
    assert_eq!(status["state"], "paused");
    assert_eq!(status["queued"].as_u64().unwrap(), waiting, "{status}");
    let (_, account) = get(&c, &server.url("/api/v1/accounts/b")).await;
    assert_eq!(
        account["balance"].as_u64().unwrap(),
        320 - waiting,
        "money moved while paused"
    );

    let (status, resumed) = post(&c, &server.url("/api/v1/control/resume"), json!({})).await;
    assert_eq!((status, resumed["state"].as_str()), (200, Some("running")));
    for n in 0..320 {
        assert_eq!(
            terminal(&c, &server.base, &format!("c{n}")).await["status"],
            "confirmed"
        );
    }
    let (_, account) = get(&c, &server.url("/api/v1/accounts/b")).await;
    assert_eq!(
        account["balance"], 320,
        "a payment was skipped or admitted twice"
    );
    assert_eq!(server.runtime().confirmed_totals().confirmed_count, 320);
    assert_eq!(status_of(&c, &server).await["commands_applied"], 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_system_comes_back_paused() {
    // The control state is checkpointed from the command log: after a restart the system is still paused until resumed.
    let (server, c) = TestServer::with_accounts(&[("a", 1_000), ("b", 0)]).await;
    let client = c.clone();
    let response = client
        .post(server.url("/api/v1/control/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "pause without a body");
    let server = server.restart().await;
    assert_eq!(status_of(&c, &server).await["state"], "paused");
    let body = json!({"id": "late", "from": "a", "to": "b", "amount": 7});
    assert_eq!(post(&c, &server.url("/api/v1/payments"), body).await.0, 202);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(payment_status(&c, &server, "late").await, "accepted");
    let (status, _) = post(
        &c,
        &server.url("/api/v1/control/pause?timeout_ms=999999"),
        json!({}),
    )
    .await;
    assert_eq!(status, 400, "wait bound is explicit");
    post(
        &c,
        &server.url("/api/v1/control/resume"),
        json!({"reason": "done"}),
    )
    .await;
    assert_confirmed(&c, &server.base, "late").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_admissions_within_ten_percent() {
    // At two limits (200/s and 500/s) with a backlog, payments are admitted at the limit ± 10% (measured from their admission hops).
    let (server, c) = TestServer::with_accounts(&[("a", 1_000_000), ("b", 0)]).await;
    for limit in [200u64, 500] {
        let response = c
            .put(server.url("/api/v1/control/rate-limit"))
            .json(&json!({"payments_per_second": limit}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.json::<Value>().await.unwrap()["rate_limit"], limit);
        let count = limit as usize * 3;
        let ids: Vec<String> = (0..count).map(|n| format!("r{limit}-{n}")).collect();
        let batch: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "from": "a", "to": "b", "amount": 1}))
            .collect();
        for chunk in batch.chunks(1_000) {
            assert_eq!(
                post(
                    &c,
                    &server.url("/api/v1/payments/batch"),
                    json!({"payments": chunk})
                )
                .await
                .0,
                200
            );
        }
        let mut admitted = Vec::new();
        for id in &ids {
            let p = terminal(&c, &server.base, id).await;
            admitted.push(p["lineage"][0]["processed_at"].as_i64().unwrap());
        }
        admitted.sort_unstable();
        // Skip the initial burst (1/5 s of tokens) and measure the steady rate.
        let steady = &admitted[(limit / 10) as usize..];
        let seconds = (steady[steady.len() - 1] - steady[0]) as f64 / 1_000.0;
        let rate = (steady.len() - 1) as f64 / seconds;
        println!("admitted at {rate:.1}/s with a limit of {limit}/s");
        let (low, high) = (limit as f64 * 0.9, limit as f64 * 1.1);
        assert!(
            (low..=high).contains(&rate),
            "admitted at {rate:.1}/s with a limit of {limit}/s"
        );
    }
    let response = c
        .put(server.url("/api/v1/control/rate-limit"))
        .json(&json!({"payments_per_second": 20_000_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_opens_accounts_once_even_when_run_twice() {
    // `kpay serve --bootstrap file.csv` opens every account with its balance; a second run funds nothing twice.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("accounts.csv");
    std::fs::write(
        &csv,
        "id,opening_balance\nboot-1,100\nboot-2,250\nboot-3,0\n",
    )
    .unwrap();
    let c = reqwest::Client::new();
    let data = dir.path().join("data");
    let csv_arg = csv.to_str().unwrap();
    for run in 0..2 {
        let mut server = common::Binary::spawn_with_args(&data, &[], &["--bootstrap", csv_arg]);
        server.wait_ready().await;
        common::wait_until(Duration::from_secs(10), || async {
            let (_, lag) = get(&c, &format!("{}/api/v1/metrics/lag", server.base)).await;
            let (status, _) = get(&c, &format!("{}/api/v1/accounts/boot-3", server.base)).await;
            lag["total_lag_records"] == 0 && status == 200
        })
        .await;
        let (_, one) = get(&c, &format!("{}/api/v1/accounts/boot-2", server.base)).await;
        assert_eq!(one["balance"], 250, "run {run}");
        let (_, ledger) = get(&c, &format!("{}/api/v1/ledger/integrity", server.base)).await;
        assert_eq!(ledger["total_funded"], 350, "run {run}: {ledger}");
        assert_eq!(ledger["accounts"], 3, "run {run}: {ledger}");
        assert!(server.terminate().success());
    }
    std::fs::write(&csv, "boot-4,abc\n").unwrap();
    let output = kpay_command()
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "serve",
            "--bootstrap",
            csv_arg,
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_guard_every_change() {
    // With tokens configured: no or unknown token → 401, a token without the role → 403, the right role acts; reads stay open.
    let (server, c) = TestServer::builder()
        .config(|c| {
            c.tokens = kpay::config::Tokens::parse(
                "operator-secret:operator,teller-secret:teller,viewer-secret:viewer",
            )
            .unwrap()
        })
        .start()
        .await;
    let call = |method: reqwest::Method, path: &str, token: Option<&str>, body: Value| {
        let mut request = c.request(method, server.url(path)).json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    use reqwest::Method;
    let account = json!({"id": "guarded", "opening_balance": 10});
    assert_eq!(
        call(Method::POST, "/api/v1/accounts", None, account.clone()).await,
        401
    );
    assert_eq!(
        call(
            Method::POST,
            "/api/v1/accounts",
            Some("wrong-token"),
            account.clone()
        )
        .await,
        401
    );
    assert_eq!(
        call(
            Method::POST,
            "/api/v1/accounts",
            Some("viewer-secret"),
            account.clone()
        )
        .await,
        403
    );
    assert_eq!(
        call(
            Method::POST,
            "/api/v1/accounts",
            Some("teller-secret"),
            account
        )
        .await,
        201
    );
    assert_eq!(
        call(
            Method::POST,
            "/api/v1/control/pause",
            Some("teller-secret"),
            json!({})
        )
        .await,
        403
    );
    assert_eq!(
        call(Method::POST, "/api/v1/control/pause", None, json!({})).await,
        401
    );
    assert_eq!(
        call(
            Method::POST,
            "/api/v1/control/pause",
            Some("operator-secret"),
            json!({})
        )
        .await,
        200
    );
    assert_eq!(
        call(
            Method::POST,
            "/api/v1/control/resume",
            Some("operator-secret"),
            json!({})
        )
        .await,
        200
    );
    assert_eq!(
        call(Method::GET, "/api/v1/accounts/guarded", None, json!(null)).await,
        200
    );
    assert_eq!(
        call(Method::GET, "/api/v1/control/status", None, json!(null)).await,
        200
    );
    let last = server.runtime().control_state().last_principal;
    assert_eq!(
        last.as_deref(),
        Some("operator#0"),
        "commands carry who gave them"
    );

    // Every state-changing call is in the audit trail, refused ones included:
    // control calls in the default (admin) class, accounts in `submission`.
    let audit_url = server.url("/api/v1/logs/audit?limit=50");
    let submissions_url = server.url("/api/v1/logs/audit?limit=50&class=submission");
    common::wait_until(Duration::from_secs(10), || async {
        let count = |trail: Value| trail["items"].as_array().map(Vec::len);
        count(get(&c, &audit_url).await.1) == Some(4)
            && count(get(&c, &submissions_url).await.1) == Some(4)
    })
    .await;
    let (_, trail) = get(&c, &audit_url).await;
    let (_, submissions) = get(&c, &submissions_url).await;
    let rows: Vec<(String, String, String, u64, String)> = submissions["items"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .chain(trail["items"].as_array().unwrap().iter().rev())
        .map(|e| {
            let text = |k: &str| e[k].as_str().unwrap().to_owned();
            (
                text("action"),
                text("principal"),
                text("role"),
                e["status"].as_u64().unwrap(),
                text("outcome"),
            )
        })
        .collect();
    let expect = |action: &str, principal: &str, role: &str, status: u64, outcome: &str| {
        (
            action.to_owned(),
            principal.to_owned(),
            role.to_owned(),
            status,
            outcome.to_owned(),
        )
    };
    assert_eq!(
        rows,
        vec![
            expect("POST /api/v1/accounts", "anonymous", "none", 401, "refused"),
            expect("POST /api/v1/accounts", "anonymous", "none", 401, "refused"),
            expect(
                "POST /api/v1/accounts",
                "viewer#2",
                "viewer",
                403,
                "refused"
            ),
            expect("POST /api/v1/accounts", "teller#1", "teller", 201, "ok"),
            expect(
                "POST /api/v1/control/pause",
                "teller#1",
                "teller",
                403,
                "refused"
            ),
            expect(
                "POST /api/v1/control/pause",
                "anonymous",
                "none",
                401,
                "refused"
            ),
            expect(
                "POST /api/v1/control/pause",
                "operator#0",
                "operator",
                200,
                "ok"
            ),
            expect(
                "POST /api/v1/control/resume",
                "operator#0",
                "operator",
                200,
                "ok"
            ),
        ]
    );
    let first = &trail["items"][0];
    assert!(
        first["source"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{first}"
    );
    assert_eq!(first["parameters"], "/api/v1/control/resume");
    server.stop().await;
}

#[test]
fn protected_mode_refuses_a_public_address_without_tokens() {
    // With no token configured kpay will not listen beyond loopback, and says why.
    let dir = tempfile::tempdir().unwrap();
    let output = kpay_command()
        .args([
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--listen",
            "0.0.0.0:0",
        ])
        .env_remove("KPAY_TOKENS")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("protected mode") && stderr.contains("server.listen"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_reports_draining_until_admitted_payments_finish() {
    // While admitted payments are still moving, a pause shows `draining`; once they finish it shows `paused`, and money is conserved.
    let (server, c) = TestServer::with_accounts(&[("a", 1_000), ("b", 0)]).await;
    let shared = server.runtime().clone();
    shared.hold_input("account", kpay::model::SourceTopic::Inflight, true);
    for n in 0..10 {
        let body = json!({"id": format!("d{n}"), "from": "a", "to": "b", "amount": 3});
        assert_eq!(post(&c, &server.url("/api/v1/payments"), body).await.0, 202);
    }
    common::wait_until(Duration::from_secs(10), || async {
        server.runtime().inflight_totals().inflight_count == 10
    })
    .await;
    let (_, draining) = post(
        &c,
        &server.url("/api/v1/control/pause?wait=true&timeout_ms=200"),
        json!({}),
    )
    .await;
    assert_eq!(draining["state"], "draining", "{draining}");
    assert_eq!(draining["inflight"], json!({"count": 10, "amount": 30}));
    shared.hold_input("account", kpay::model::SourceTopic::Inflight, false);
    common::wait_until(Duration::from_secs(10), || async {
        status_of(&c, &server).await["state"] == "paused"
    })
    .await;
    let (_, ledger) = get(&c, &server.url("/api/v1/ledger/integrity")).await;
    assert_eq!(ledger["ok"], true, "{ledger}");
    assert_eq!(
        get(&c, &server.url("/api/v1/accounts/b")).await.1["balance"],
        30
    );
    drop(shared);
    server.stop().await;
}
