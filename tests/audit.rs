//! The audit trail over HTTP: control and administrative calls kept apart
//! from payment and account submissions, each class with its own bound;
//! the filters; exact paging by seq; awaited entries for control calls.

mod common;

use std::time::Duration;

use common::{get, post, wait_until, TestServer};
use serde_json::{json, Value};

/// Every seq of a query's pages, following `next_before` pages of `limit`.
async fn seqs_by_page(c: &reqwest::Client, base: &str, query: &str, limit: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut before = String::new();
    loop {
        let url = format!("{base}/api/v1/logs/audit?{query}&limit={limit}{before}");
        let (status, page) = get(c, &url).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit, "{page}");
        seqs.extend(items.iter().map(|e| e["seq"].as_u64().unwrap()));
        match page["next_before"].as_u64() {
            Some(next) => {
                assert_eq!(Some(next), seqs.last().copied(), "{page}");
                before = format!("&before={next}");
            }
            None => return seqs,
        }
    }
}

async fn audit(c: &reqwest::Client, base: &str, query: &str) -> Value {
    let (status, page) = get(c, &format!("{base}/api/v1/logs/audit?{query}")).await;
    assert_eq!(status, 200, "{page}");
    page
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_stays_listed_after_submissions_overflow_their_own_bound() {
    // Proves: the pause's entry is stored before its 200 (read at once, no
    // waiting), and 150 submissions through a bound of 40 push none of the
    // control entries out, while the submission class keeps exactly 40.
    let (server, c) = TestServer::builder()
        .config(|c| c.limits.audit_submission_entries = 40)
        .accounts(&[("alice", 1_000_000), ("bob", 0)])
        .start()
        .await;
    let base = server.base.clone();
    let (status, _) = post(&c, &format!("{base}/api/v1/control/pause"), json!({})).await;
    assert_eq!(status, 200);
    let page = audit(&c, &base, "limit=1").await;
    assert_eq!(page["class"], "admin");
    assert_eq!(page["items"][0]["action"], "POST /api/v1/control/pause");
    let (status, _) = post(&c, &format!("{base}/api/v1/control/resume"), json!({})).await;
    assert_eq!(status, 200);
    for n in 0..150 {
        let body = json!({"id": format!("p{n}"), "from": "alice", "to": "bob", "amount": 1});
        let (status, answer) = post(&c, &format!("{base}/api/v1/payments"), body).await;
        assert_eq!(status, 202, "{answer}");
    }
    wait_until(Duration::from_secs(10), || async {
        let page = audit(&c, &base, "class=submission&limit=1").await;
        page["items"][0]["parameters"] == "/api/v1/payments"
            && seqs_by_page(&c, &base, "class=submission", 1000)
                .await
                .len()
                == 40
    })
    .await;
    let submissions = audit(&c, &base, "class=submission&limit=1000").await;
    let items = submissions["items"].as_array().unwrap();
    assert_eq!(items.len(), 40, "the submission class keeps its own bound");
    assert!(items.iter().all(|e| e["action"] == "POST /api/v1/payments"));
    let admin = audit(&c, &base, "limit=1000").await;
    let actions: Vec<&str> = admin["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["POST /api/v1/control/resume", "POST /api/v1/control/pause"]
    );
    // p0's audit entry is gone from its class; the payment still says who sent it.
    let (_, p0) = get(&c, &format!("{base}/api/v1/payments/p0")).await;
    assert_eq!(p0["submitted_by"]["principal"], "local", "{p0}");
    let source = p0["submitted_by"]["source"].as_str().unwrap();
    assert!(source.starts_with("127.0.0.1:"), "{p0}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_combine_and_paging_by_seq_has_no_overlap_and_no_gap() {
    // Proves: each filter selects exactly the entries it names, filters
    // combine, pages of any size put together equal the whole list, and
    // malformed queries get 400 with a reason.
    let (server, c) = TestServer::builder().start().await;
    let base = server.base.clone();
    let rate = format!("{base}/api/v1/control/rate-limit");
    for n in 0..9 {
        let response = c
            .put(&rate)
            .json(&json!({"payments_per_second": n}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let refused = c
        .put(&rate)
        .json(&json!({"bogus": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16() / 100, 4);
    let (status, _) = post(&c, &format!("{base}/api/v1/control/pause"), json!({})).await;
    assert_eq!(status, 200);
    let all = audit(&c, &base, "limit=1000").await;
    let all = all["items"].as_array().unwrap().clone();
    let whole: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(whole.len(), 11);
    assert!(
        whole.windows(2).all(|w| w[0] > w[1]),
        "newest first: {whole:?}"
    );
    for limit in [1, 2, 3, 10, 11] {
        assert_eq!(seqs_by_page(&c, &base, "class=admin", limit).await, whole);
    }
    // The seqs of `all` whose entry satisfies `keep`.
    let expect = |keep: &dyn Fn(&Value) -> bool| -> Vec<u64> {
        let kept = all.iter().filter(|e| keep(e));
        kept.map(|e| e["seq"].as_u64().unwrap()).collect()
    };
    let action = |e: &Value| e["action"].as_str().unwrap().to_owned();
    let middle = all[5]["at_ms"].as_i64().unwrap();
    let cases: Vec<(String, Vec<u64>)> = vec![
        (
            "action=rate-limit".into(),
            expect(&|e| action(e).contains("rate-limit")),
        ),
        (
            "action=pause".into(),
            expect(&|e| action(e).contains("pause")),
        ),
        (
            "outcome=refused".into(),
            expect(&|e| e["outcome"] == "refused"),
        ),
        (
            "action=PUT&outcome=ok".into(),
            expect(&|e| action(e).starts_with("PUT") && e["outcome"] == "ok"),
        ),
        ("principal=local&role=local".into(), whole.clone()),
        ("principal=nobody".into(), vec![]),
        ("role=operator".into(), vec![]),
        (
            format!("since={middle}"),
            expect(&|e| e["at_ms"].as_i64().unwrap() >= middle),
        ),
        (
            format!("until={middle}"),
            expect(&|e| e["at_ms"].as_i64().unwrap() <= middle),
        ),
        (
            format!("since={middle}&until={middle}&action=rate"),
            expect(&|e| e["at_ms"].as_i64().unwrap() == middle && action(e).contains("rate")),
        ),
    ];
    assert_eq!(cases[0].1.len(), 10);
    assert_eq!(cases[1].1.len(), 1);
    assert_eq!(cases[2].1.len(), 1);
    assert_eq!(cases[3].1.len(), 9);
    for (query, expected) in &cases {
        for limit in [2, 1000] {
            let got = seqs_by_page(&c, &base, query, limit).await;
            assert_eq!(&got, expected, "{query} in pages of {limit}");
        }
    }
    for bad in [
        "class=everything",
        "outcome=fine",
        "role=king",
        "since=5&until=1",
        "actoin=pause",
        "before=yesterday",
        "before=9223372036854775808",
        "limit=0",
    ] {
        let (status, body) = get(&c, &format!("{base}/api/v1/logs/audit?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{bad}: {body}"
        );
    }
    server.stop().await;
}

/// The SHA-256 of `text` in lowercase hex, as `sha256sum` prints it.
fn sha256_hex(text: &str) -> String {
    let output = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8(output.stdout).unwrap()[..64].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_response_log_line_error_entry_or_audit_entry_contains_a_token() {
    // Proves: with tokens configured (one as its hash), calls that succeed,
    // are refused, carry a wrong or a misplaced token (in the query) leave
    // no configured token in any response, stdout or stderr line, error log
    // entry or audit entry; and the hashed token works.
    let (operator, teller, viewer) = ("op-secret-7f3a9c", "tl-secret-b81d2e", "vw-secret-44c0aa");
    let tokens = format!(
        "{operator}:operator,sha256:{}:teller,{viewer}:viewer",
        sha256_hex(teller)
    );
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("output.log");
    let env = [
        ("KPAY_TOKENS", tokens.as_str()),
        ("KPAY_SERVER__PROTECT_READS", "true"),
        // The operator's raw record below goes through, so its answer is seen too.
        ("KPAY_OPS__RAW_RECORDS", "true"),
        ("RUST_LOG", "debug"),
    ];
    let server = common::Binary::spawn_logged(&dir.path().join("data"), &env, &output);
    let (c, base) = (reqwest::Client::new(), server.base.clone());
    let ready = format!("{base}/readyz");
    wait_until(Duration::from_secs(30), || async {
        let probe = c.get(&ready).bearer_auth(viewer).send().await;
        matches!(probe, Ok(r) if r.status() == 200)
    })
    .await;
    // Every answer's status line, headers and body.
    let mut seen = String::new();
    let calls: Vec<(reqwest::Method, String, Option<String>, Value, u16)> = vec![
        (
            reqwest::Method::GET,
            "/api/v1/control/status".into(),
            Some(viewer.into()),
            Value::Null,
            200,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/accounts".into(),
            Some(teller.into()),
            json!({"id": "a1", "opening_balance": 5}),
            201,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/control/pause".into(),
            Some(teller.into()),
            json!({}),
            403,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/control/pause".into(),
            Some(format!("{operator}x")),
            json!({}),
            401,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/control/pause".into(),
            Some(sha256_hex(teller)),
            json!({}),
            401,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/control/pause".into(),
            Some(operator.into()),
            json!({}),
            200,
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/control/resume?token={operator}"),
            Some(operator.into()),
            json!({}),
            200,
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/control/resume?token={viewer}"),
            None,
            json!({}),
            401,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/ops/records".into(),
            Some(operator.into()),
            json!({"topic": "payment.incoming", "records": [{"key": "k", "value": "garbage"}]}),
            201,
        ),
    ];
    for (method, path, token, body, expected) in calls {
        let mut request = c.request(method, format!("{base}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), expected, "{path}");
        seen.push_str(&format!(
            "{:?}\n{:?}\n",
            response.status(),
            response.headers()
        ));
        seen.push_str(&response.text().await.unwrap());
    }
    let read = |path: &'static str| {
        let (c, url) = (c.clone(), format!("{base}{path}"));
        async move {
            let response = c.get(url).bearer_auth(viewer).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            response.json::<Value>().await.unwrap()
        }
    };
    wait_until(Duration::from_secs(10), || async {
        let errors = read("/api/v1/logs/errors").await;
        let submissions = read("/api/v1/logs/audit?class=submission").await;
        !errors["items"].as_array().unwrap().is_empty()
            && !submissions["items"].as_array().unwrap().is_empty()
    })
    .await;
    let admin = read("/api/v1/logs/audit").await;
    assert_eq!(admin["items"].as_array().unwrap().len(), 7, "{admin}");
    let stored = [
        admin,
        read("/api/v1/logs/audit?class=submission").await,
        read("/api/v1/logs/errors").await,
    ];
    assert!(server_stopped(server).await);
    let printed = std::fs::read_to_string(&output).unwrap();
    assert!(
        !printed.is_empty(),
        "the server printed nothing at debug level"
    );
    let stored: Vec<String> = stored.iter().map(Value::to_string).collect();
    for token in [operator, teller, viewer] {
        assert!(!seen.contains(token), "a response holds {token}");
        assert!(!printed.contains(token), "the output holds {token}");
        for text in &stored {
            assert!(!text.contains(token), "{token} in {text}");
        }
    }
    assert!(stored[0].contains("token=<redacted>"), "{}", stored[0]);
}

/// Stops the binary with SIGTERM; whether it exited cleanly.
async fn server_stopped(server: common::Binary) -> bool {
    server.stop().await.success()
}
