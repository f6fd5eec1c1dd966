//! Screening before the debit, over HTTP: each rule and each outcome, held
//! payments reviewed (and a pause holding the review), one debit in flight
//! per payer, rules kept through a restart and from the `[screening]`
//! settings, and `kpay rebuild` equal after all of it.

mod common;

use std::time::Duration;

use common::{get, kpay_command, lineage_stages, post, terminal, Binary, TestServer};
use serde_json::{json, Value};

async fn put_rules(c: &reqwest::Client, server: &TestServer, rules: Value) -> (u16, Value) {
    let response = c
        .put(server.url("/api/v1/screening/rules"))
        .json(&rules)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn pay(
    c: &reqwest::Client,
    server: &TestServer,
    id: &str,
    from: &str,
    to: &str,
    amount: i64,
) {
    let body = json!({"id": id, "from": from, "to": to, "amount": amount});
    let (status, answer) = post(c, &server.url("/api/v1/payments"), body).await;
    assert_eq!(status, 202, "{id}: {answer}");
}

/// Waits until payment `id` has `status` (a non-terminal one too).
async fn until_status(c: &reqwest::Client, server: &TestServer, id: &str, status: &str) -> Value {
    let url = server.url(&format!("/api/v1/payments/{id}"));
    let start = std::time::Instant::now();
    loop {
        let (_, body) = get(c, &url).await;
        if body["status"] == status {
            return body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{id} never {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn balance(c: &reqwest::Client, server: &TestServer, id: &str) -> i64 {
    let (_, account) = get(c, &server.url(&format!("/api/v1/accounts/{id}"))).await;
    account["balance"]
        .as_i64()
        .unwrap_or_else(|| panic!("{account}"))
}

async fn review(c: &reqwest::Client, server: &TestServer, id: &str, verdict: &str) -> (u16, Value) {
    let url = server.url(&format!("/api/v1/payments/{id}/{verdict}"));
    post(c, &url, json!({})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_read_set_validated_and_kept_through_a_restart() {
    let (server, c) = TestServer::with_accounts(&[]).await;
    let (status, rules) = get(&c, &server.url("/api/v1/screening/rules")).await;
    assert_eq!(status, 200);
    assert_eq!(rules["version"], Value::Null, "{rules}");
    assert_eq!(rules["rules"]["max_amount"], Value::Null, "{rules}");
    let bad = [
        (json!({"max_amount": 0}), "max_amount"),
        (
            json!({"velocity": {"max_payments": 0, "window_seconds": 60}}),
            "velocity.max_payments",
        ),
        (json!({"velocity": {"max_payments": 5}}), "window_seconds"),
        (
            json!({"blocked_accounts": ["no spaces"]}),
            "blocked_accounts",
        ),
        (json!({"review_above": 10, "colour": "red"}), "colour"),
    ];
    for (body, field) in bad {
        let (status, answer) = put_rules(&c, &server, body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        common::assert_error_mentions(&answer, field);
    }
    let rules = json!({"max_amount": 50000, "review_above": 20000,
        "velocity": {"max_payments": 5, "window_seconds": 60},
        "blocked_accounts": ["acct-x"], "single_inflight_debit": false});
    let (status, set) = put_rules(&c, &server, rules.clone()).await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(
        (&set["rules"], &set["in_force"]),
        (&rules, &json!(true)),
        "{set}"
    );
    let server = server.restart().await;
    let (_, after) = get(&c, &server.url("/api/v1/screening/rules")).await;
    assert_eq!(after["rules"], rules, "{after}");
    assert_eq!(after["version"], set["version"]);
    // The change is a control command in the audit trail.
    let (_, audit) = get(&c, &server.url("/api/v1/logs/audit?limit=50")).await;
    assert!(
        audit.to_string().contains("/api/v1/screening/rules"),
        "{audit}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_rejects_holds_or_passes_with_a_screened_hop() {
    let accounts = [
        ("payer", 1_000_000),
        ("payee", 0),
        ("acct-x", 1_000),
        ("fast", 10_000),
    ];
    let (server, c) = TestServer::with_accounts(&accounts).await;
    let rules = json!({"max_amount": 50000, "review_above": 20000,
        "velocity": {"max_payments": 3, "window_seconds": 60},
        "blocked_accounts": ["acct-x"]});
    assert_eq!(put_rules(&c, &server, rules).await.0, 200);
    pay(&c, &server, "big", "payer", "payee", 50_001).await;
    pay(&c, &server, "to-blocked", "payer", "acct-x", 10).await;
    pay(&c, &server, "from-blocked", "acct-x", "payee", 10).await;
    pay(&c, &server, "fine", "payer", "payee", 20_000).await;
    for (id, reason) in [
        ("big", "limit_exceeded"),
        ("to-blocked", "blocked"),
        ("from-blocked", "blocked"),
    ] {
        let payment = terminal(&c, &server.base, id).await;
        assert_eq!(
            (payment["status"].as_str(), payment["reason"].as_str()),
            (Some("rejected"), Some(reason)),
            "{payment}"
        );
        assert_eq!(
            lineage_stages(&payment),
            ["admitted", "screened", "completed"],
            "{payment}"
        );
    }
    let fine = terminal(&c, &server.base, "fine").await;
    assert_eq!(fine["status"], "confirmed", "{fine}");
    assert_eq!(
        lineage_stages(&fine),
        ["admitted", "screened", "debited", "credited", "completed"]
    );
    // Velocity: the fourth payment of one payer within the window.
    for n in 0..4 {
        pay(&c, &server, &format!("v{n}"), "fast", "payee", 1).await;
        terminal(&c, &server.base, &format!("v{n}")).await;
    }
    for n in 0..3 {
        assert_eq!(
            terminal(&c, &server.base, &format!("v{n}")).await["status"],
            "confirmed"
        );
    }
    let fourth = terminal(&c, &server.base, "v3").await;
    assert_eq!(
        (fourth["status"].as_str(), fourth["reason"].as_str()),
        (Some("rejected"), Some("velocity")),
        "{fourth}"
    );
    // Off again: the same payments pass unscreened.
    assert_eq!(put_rules(&c, &server, json!({})).await.0, 200);
    pay(&c, &server, "big-later", "payer", "payee", 50_001).await;
    let later = terminal(&c, &server.base, "big-later").await;
    assert_eq!(later["status"], "confirmed");
    assert_eq!(
        lineage_stages(&later),
        ["admitted", "debited", "credited", "completed"]
    );
    let (_, metrics) = get(&c, &server.url("/api/v1/metrics/pipeline")).await;
    assert_eq!(metrics["rejected"]["by_reason"]["blocked"], 2, "{metrics}");
    assert_eq!(metrics["rejected"]["by_reason"]["velocity"], 1, "{metrics}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_payments_are_listed_counted_and_approved_or_declined_once() {
    let (server, c) = TestServer::with_accounts(&[("payer", 1_000_000), ("payee", 0)]).await;
    assert_eq!(
        put_rules(&c, &server, json!({"review_above": 20000}))
            .await
            .0,
        200
    );
    for id in ["h1", "h2", "h3"] {
        pay(&c, &server, id, "payer", "payee", 25_000).await;
    }
    pay(&c, &server, "small", "payer", "payee", 100).await;
    for id in ["h1", "h2", "h3"] {
        let held = until_status(&c, &server, id, "held").await;
        assert_eq!(
            lineage_stages(&held),
            ["admitted", "screened", "held"],
            "{held}"
        );
    }
    // Held payments never block the payments behind them.
    assert_eq!(
        terminal(&c, &server.base, "small").await["status"],
        "confirmed"
    );
    assert_eq!(balance(&c, &server, "payer").await, 1_000_000 - 100);
    let (_, list) = get(&c, &server.url("/api/v1/payments?status=held")).await;
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["h3", "h2", "h1"], "newest first: {list}");
    let (_, metrics) = get(&c, &server.url("/api/v1/metrics/pipeline")).await;
    assert_eq!(
        metrics["held"],
        json!({"count": 3, "amount": 75_000}),
        "{metrics}"
    );
    assert_eq!(metrics["inflight"]["count"], 0, "{metrics}");

    let (status, approved) = review(&c, &server, "h1", "approve").await;
    assert_eq!(status, 200, "{approved}");
    let h1 = terminal(&c, &server.base, "h1").await;
    assert_eq!(h1["status"], "confirmed", "{h1}");
    assert_eq!(
        lineage_stages(&h1),
        [
            "admitted",
            "screened",
            "held",
            "approved",
            "debited",
            "credited",
            "completed"
        ]
    );
    // Idempotent; the other verdict is a conflict.
    assert_eq!(review(&c, &server, "h1", "approve").await.0, 200);
    let (status, answer) = review(&c, &server, "h1", "decline").await;
    assert_eq!(status, 409, "{answer}");
    let (status, declined) = review(&c, &server, "h2", "decline").await;
    assert_eq!(
        (status, declined["status"].as_str()),
        (200, Some("rejected")),
        "{declined}"
    );
    let h2 = terminal(&c, &server.base, "h2").await;
    assert_eq!(h2["reason"], "declined", "{h2}");
    assert_eq!(review(&c, &server, "h2", "decline").await.0, 200);
    assert_eq!(review(&c, &server, "h2", "approve").await.0, 409);
    // Not held at all, or unknown.
    assert_eq!(review(&c, &server, "small", "approve").await.0, 409);
    assert_eq!(review(&c, &server, "nobody", "approve").await.0, 404);

    // Pause holds approvals: recorded now, admitted on resume.
    let (status, _) = post(
        &c,
        &server.url("/api/v1/control/pause?wait=true"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, later) = review(&c, &server, "h3", "approve").await;
    assert_eq!(
        (status, later["status"].as_str()),
        (202, Some("held")),
        "{later}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        until_status(&c, &server, "h3", "held").await["status"],
        "held"
    );
    assert_eq!(
        post(&c, &server.url("/api/v1/control/resume"), json!({}))
            .await
            .0,
        200
    );
    assert_eq!(
        terminal(&c, &server.base, "h3").await["status"],
        "confirmed"
    );
    let (_, metrics) = get(&c, &server.url("/api/v1/metrics/pipeline")).await;
    assert_eq!(
        metrics["held"],
        json!({"count": 0, "amount": 0}),
        "{metrics}"
    );
    assert_eq!(balance(&c, &server, "payee").await, 100 + 2 * 25_000);
    let (_, list) = get(&c, &server.url("/api/v1/payments?status=held")).await;
    assert_eq!(list["items"], json!([]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_debit_in_flight_per_payer_waits_in_order() {
    let (server, c) = TestServer::with_accounts(&[("one", 1_000), ("two", 0)]).await;
    let rules = json!({"single_inflight_debit": true});
    assert_eq!(put_rules(&c, &server, rules).await.0, 200);
    // The first payment's completion is not read yet: the second waits
    // for it (the inflight processor shows that as `accepted`, see its
    // unit tests; a wait this short is over before a poll could see it).
    let batch = json!({"payments": [
        {"id": "first", "from": "one", "to": "two", "amount": 100},
        {"id": "second", "from": "one", "to": "two", "amount": 100}]});
    let (status, _) = post(&c, &server.url("/api/v1/payments/batch"), batch).await;
    assert_eq!(status, 200);
    let first = terminal(&c, &server.base, "first").await;
    let second = terminal(&c, &server.base, "second").await;
    let (waited, before) = if lineage_stages(&second).contains(&"waiting") {
        (&second, &first)
    } else {
        (&first, &second)
    };
    assert_eq!(
        lineage_stages(waited),
        [
            "admitted",
            "screened",
            "waiting",
            "debited",
            "credited",
            "completed"
        ],
        "{waited}"
    );
    assert_eq!(waited["waiting_for"], before["id"], "{waited}");
    assert_sequential(&[first.clone(), second.clone()], 2);

    // 30 at once from an account funded for 10 (8 left of 10 × 100).
    let deposit = json!({"amount": 200});
    let (status, _) = post(&c, &server.url("/api/v1/accounts/one/deposit"), deposit).await;
    assert_eq!(status, 202);
    common::wait_until(Duration::from_secs(10), || async {
        balance(&c, &server, "one").await == 1_000
    })
    .await;
    let payments: Vec<Value> = (0..30)
        .map(|n| json!({"id": format!("s{n:02}"), "from": "one", "to": "two", "amount": 100}))
        .collect();
    let (status, _) = post(
        &c,
        &server.url("/api/v1/payments/batch"),
        json!({"payments": payments}),
    )
    .await;
    assert_eq!(status, 200);
    let mut ends = Vec::new();
    for n in 0..30 {
        ends.push(terminal(&c, &server.base, &format!("s{n:02}")).await);
    }
    assert_sequential(&ends, 10);
    assert_eq!(balance(&c, &server, "one").await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_debit_in_flight_per_payer_is_the_same_after_kill_9_mid_run() {
    // 30 at once from an account funded for 10, the real binary killed
    // while they go through one by one: after the restart, 10 confirmed,
    // 20 rejected, each debit after the previous payment was terminal.
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("KPAY_SCREENING__SINGLE_INFLIGHT_DEBIT", "true"),
        ("KPAY_DEMO__ACCOUNTS", "0"),
    ];
    let mut kpay = Binary::start(dir.path(), &env).await;
    let c = reqwest::Client::new();
    let base = kpay.base.clone();
    common::open_account(&c, &base, "one", 1_000).await;
    common::open_account(&c, &base, "two", 0).await;
    let payments: Vec<Value> = (0..30)
        .map(|n| json!({"id": format!("k{n:02}"), "from": "one", "to": "two", "amount": 100}))
        .collect();
    let (status, answer) = post(
        &c,
        &format!("{base}/api/v1/payments/batch"),
        json!({"payments": payments}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status_code"] == 202),
        "{answer}"
    );
    // Some done, most still queued behind each other.
    common::wait_until(Duration::from_secs(10), || async {
        let (_, metrics) = get(&c, &format!("{base}/api/v1/metrics/pipeline")).await;
        metrics["confirmed"]["count"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    let (_, before) = get(&c, &format!("{base}/api/v1/metrics/pipeline")).await;
    kpay.kill9();
    let ended = |m: &Value| {
        m["confirmed"]["count"].as_u64().unwrap_or(0) + m["rejected"]["count"].as_u64().unwrap_or(0)
    };
    println!("killed with {} of 30 terminal", ended(&before));
    let kpay = Binary::start(dir.path(), &env).await;
    let mut ends = Vec::new();
    for n in 0..30 {
        ends.push(terminal(&c, &kpay.base, &format!("k{n:02}")).await);
    }
    assert_sequential(&ends, 10);
    let (_, account) = get(&c, &format!("{}/api/v1/accounts/one", kpay.base)).await;
    assert_eq!(account["balance"], 0, "{account}");
    let (_, integrity) = get(&c, &format!("{}/api/v1/ledger/integrity", kpay.base)).await;
    assert_eq!(integrity["ok"], true, "{integrity}");
    kpay.stop().await;
}

/// What the API says of the accounts, these payments (without the times
/// hops were processed at) and the totals.
async fn api_state(c: &reqwest::Client, base: &str, payments: &[&str]) -> Value {
    let (_, accounts) = get(c, &format!("{base}/api/v1/accounts?limit=100")).await;
    let mut views = Vec::new();
    for id in payments {
        let (_, mut view) = get(c, &format!("{base}/api/v1/payments/{id}")).await;
        for hop in view["lineage"].as_array_mut().unwrap() {
            hop["processed_at"] = Value::Null;
        }
        views.push(view);
    }
    let (_, metrics) = get(c, &format!("{base}/api/v1/metrics/pipeline")).await;
    let balances: Vec<Value> = (accounts["items"].as_array().unwrap().iter())
        .map(|a| json!([a["id"], a["balance"]]))
        .collect();
    json!({"accounts": balances, "payments": views, "held": metrics["held"],
        "rejected": metrics["rejected"], "confirmed": metrics["confirmed"]["count"]})
}

/// Exactly `confirmed` of the payments are confirmed and the rest rejected
/// for funds; each debit (or refusal) came after the previous payment of
/// the payer was terminal: its step was processed after that payment's
/// completion was appended (times of the lineage; the append time of a
/// record is kept through a crash, where a replay may process it again).
fn assert_sequential(ends: &[Value], confirmed: usize) {
    let count = ends.iter().filter(|p| p["status"] == "confirmed").count();
    assert_eq!(count, confirmed, "{ends:?}");
    for p in ends.iter().filter(|p| p["status"] != "confirmed") {
        assert_eq!(p["reason"], "insufficient_funds", "{p}");
    }
    let hop = |p: &Value, stage: &str| -> Value {
        let hops = p["lineage"].as_array().unwrap();
        let found = hops.iter().rev().find(|h| h["stage"] == stage);
        found.unwrap_or_else(|| panic!("no {stage}: {p}")).clone()
    };
    let step = |p: &Value| {
        hop(
            p,
            if p["status"] == "confirmed" {
                "debited"
            } else {
                "rejected"
            },
        )
    };
    // The order the debits were decided in: by the account partition's offset.
    let mut decided: Vec<&Value> = ends.iter().collect();
    decided.sort_by_key(|p| step(p)["offset"].as_u64().unwrap());
    for pair in decided.windows(2) {
        let (before, after) = (pair[0], pair[1]);
        let terminal = hop(before, "completed")["received_at"].as_i64().unwrap();
        assert!(
            step(after)["processed_at"].as_i64().unwrap() >= terminal,
            "{} debited before {} was terminal",
            after["id"],
            before["id"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_equals_the_live_state_after_screening() {
    let accounts = [("payer", 1_000_000), ("payee", 0), ("fast", 1_000)];
    let (server, c) = TestServer::with_accounts(&accounts).await;
    let rules = json!({"review_above": 20000, "velocity": {"max_payments": 3, "window_seconds": 600},
        "single_inflight_debit": true});
    assert_eq!(put_rules(&c, &server, rules).await.0, 200);
    for id in ["held-a", "held-d", "held-k"] {
        pay(&c, &server, id, "payer", "payee", 30_000).await;
        until_status(&c, &server, id, "held").await;
    }
    assert_eq!(review(&c, &server, "held-a", "approve").await.0, 200);
    assert_eq!(review(&c, &server, "held-d", "decline").await.0, 200);
    for n in 0..4 {
        pay(&c, &server, &format!("v{n}"), "fast", "payee", 10).await;
    }
    let mut ids = vec!["held-a", "held-d", "v0", "v1", "v2", "v3"];
    for id in &ids {
        terminal(&c, &server.base, id).await;
    }
    assert_eq!(terminal(&c, &server.base, "v3").await["reason"], "velocity");
    ids.push("held-k");
    let before = api_state(&c, &server.base, &ids).await;
    let dir = server.dir();
    server.stop().await;
    let output = kpay_command()
        .arg("--data-dir")
        .arg(dir.path())
        .arg("rebuild")
        .arg("--dry-run")
        .env("KPAY_LOG__PARTITIONS", "4")
        // One record per input per read: the replay meets completions and
        // reviews before what they follow from unless it orders them.
        .env("KPAY_PIPELINE__BATCH_RECORDS", "2")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && !report.contains("DIFFERENT"),
        "{report}"
    );
    let config = common::test_config(dir.path());
    let server = TestServer::start(config).await;
    let after = api_state(&c, &server.base, &ids).await;
    assert_eq!(before, after);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screening_settings_apply_at_the_first_start_only() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("KPAY_SCREENING__MAX_AMOUNT", "700"),
        ("KPAY_DEMO__ACCOUNTS", "0"),
    ];
    let kpay = Binary::start(dir.path(), &env).await;
    let c = reqwest::Client::new();
    let (_, rules) = get(&c, &format!("{}/api/v1/screening/rules", kpay.base)).await;
    assert_eq!(rules["rules"]["max_amount"], 700, "{rules}");
    assert_eq!(rules["set_by"], "config", "{rules}");
    // An operator's change outlives the settings across a restart.
    let response = c
        .put(format!("{}/api/v1/screening/rules", kpay.base))
        .json(&json!({"max_amount": 900}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    kpay.stop().await;
    let kpay = Binary::start(dir.path(), &env).await;
    let (_, rules) = get(&c, &format!("{}/api/v1/screening/rules", kpay.base)).await;
    assert_eq!(rules["rules"]["max_amount"], 900, "{rules}");
    kpay.stop().await;
}
