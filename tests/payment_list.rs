//! `GET /api/v1/payments`: newest first by acceptance time, in pages with a
//! cursor, filtered by status, payer, payee and time, across the rows in
//! memory, the stored rows and the blocks of settled payments, and the
//! payments accepted and not admitted yet.

mod common;

use std::collections::HashSet;

use common::{get, post, terminal, TestServer};
use serde_json::{json, Value};

/// Every page of `query` with pages of `limit`: the items, in order.
async fn all_pages(
    c: &reqwest::Client,
    server: &TestServer,
    query: &str,
    limit: usize,
) -> Vec<Value> {
    let mut items = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..1_000 {
        let cursor = after
            .as_ref()
            .map(|a| format!("&after={a}"))
            .unwrap_or_default();
        let url = server.url(&format!("/api/v1/payments?limit={limit}{query}{cursor}"));
        let (status, page) = get(c, &url).await;
        assert_eq!(status, 200, "{page}");
        let got = page["items"].as_array().unwrap();
        assert!(got.len() <= limit, "{page}");
        items.extend(got.iter().cloned());
        match page["next_after"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return items,
        }
    }
    panic!("paging did not end");
}

/// Which payments of the full list a filter admits.
type Admits = Box<dyn Fn(&Value) -> bool>;

fn order_key(item: &Value) -> (i64, String) {
    (
        item["accepted_at"].as_i64().unwrap(),
        item["id"].as_str().unwrap().to_owned(),
    )
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts `items` are newest first without repeats.
fn assert_newest_first(items: &[Value]) {
    let keys: Vec<(i64, String)> = items.iter().map(order_key).collect();
    assert!(
        keys.windows(2).all(|w| w[0] > w[1]),
        "not newest first: {keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_cover_every_payment_once_newest_first_and_filter() {
    let (server, c) = TestServer::with_accounts(&[("a", 1_000), ("b", 1_000), ("c", 0)]).await;
    let mut submitted = Vec::new();
    for n in 0..90 {
        // Every third one asks more than the payer has: rejected.
        let (from, to) = if n % 2 == 0 { ("a", "b") } else { ("b", "c") };
        let amount = if n % 3 == 0 { 1_000_000 } else { 10 };
        let id = format!("p{n:03}");
        let body = json!({"id": id, "from": from, "to": to, "amount": amount});
        assert_eq!(post(&c, &server.url("/api/v1/payments"), body).await.0, 202);
        submitted.push(id);
        if n % 10 == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        }
    }
    for id in &submitted {
        terminal(&c, &server.base, id).await;
    }
    // After a restart the settled payments are in blocks, not in memory.
    let server = server.restart().await;
    for n in 90..95 {
        let body = json!({"id": format!("p{n:03}"), "from": "a", "to": "b", "amount": 1});
        assert_eq!(post(&c, &server.url("/api/v1/payments"), body).await.0, 202);
        submitted.push(format!("p{n:03}"));
        terminal(&c, &server.base, &format!("p{n:03}")).await;
    }

    let everything = all_pages(&c, &server, "", 7).await;
    assert_newest_first(&everything);
    let listed: HashSet<String> = ids(&everything).into_iter().collect();
    assert_eq!(listed, submitted.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(everything.len(), submitted.len());
    assert_eq!(
        ids(&all_pages(&c, &server, "", 200).await),
        ids(&everything)
    );

    // Each filter gives exactly the payments of the full list it admits, in order.
    let (since, until) = (order_key(&everything[70]).0, order_key(&everything[20]).0);
    let cases: Vec<(String, Admits)> = vec![
        (
            "&status=rejected".into(),
            Box::new(|i: &Value| i["status"] == "rejected"),
        ),
        (
            "&status=confirmed&from=b".into(),
            Box::new(|i: &Value| i["status"] == "confirmed" && i["from"] == "b"),
        ),
        ("&to=c".into(), Box::new(|i: &Value| i["to"] == "c")),
        (
            format!("&since={since}&until={until}"),
            Box::new(move |i: &Value| {
                let at = i["accepted_at"].as_i64().unwrap();
                at >= since && at <= until
            }),
        ),
    ];
    for (query, admits) in cases {
        let expected: Vec<String> = ids(&everything
            .iter()
            .filter(|i| admits(i))
            .cloned()
            .collect::<Vec<_>>());
        assert!(!expected.is_empty(), "{query}");
        assert_eq!(
            ids(&all_pages(&c, &server, &query, 4).await),
            expected,
            "{query}"
        );
    }

    // Accepted and not admitted yet (paused): listed too, newest first.
    let (status, _) = post(
        &c,
        &server.url("/api/v1/control/pause?wait=true"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    for n in 0..3 {
        let body = json!({"id": format!("waits{n}"), "from": "a", "to": "b", "amount": 1});
        assert_eq!(post(&c, &server.url("/api/v1/payments"), body).await.0, 202);
    }
    let accepted = all_pages(&c, &server, "&status=accepted", 2).await;
    let mut waiting = ids(&accepted);
    waiting.sort();
    assert_eq!(waiting, ["waits0", "waits1", "waits2"]);
    assert_newest_first(&accepted);
    let (_, first) = get(&c, &server.url("/api/v1/payments?limit=3")).await;
    assert!(
        ids(first["items"].as_array().unwrap())
            .iter()
            .all(|id| id.starts_with("waits")),
        "{first}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_list_queries_are_refused_with_a_reason() {
    let (server, c) = TestServer::with_accounts(&[]).await;
    for (query, mentions) in [
        ("after=garbage", "next_after"),
        ("after=-5.x", "next_after"),
        ("status=bogus", "status"),
        ("since=-1", "since"),
        ("until=soon", "until"),
        ("from=has%20space", "from"),
        ("limit=0", "limit"),
        ("colour=red", "colour"),
    ] {
        let (status, body) = get(&c, &server.url(&format!("/api/v1/payments?{query}"))).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{query}: {body}");
        common::assert_error_mentions(&body, mentions);
    }
    let (status, body) = get(&c, &server.url("/api/v1/payments")).await;
    assert_eq!(
        (status, &body["items"], &body["next_after"]),
        (200, &json!([]), &Value::Null)
    );
    server.stop().await;
}
