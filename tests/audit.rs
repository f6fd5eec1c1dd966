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
