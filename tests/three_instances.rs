//! Three kpay processes in one group on a real broker, as the issue's
//! acceptance drill: the membership converges with every partition owned
//! once; payments go round-robin to all three; every instance answers every
//! query, forwarded to the key's owner, and the answers agree; the
//! cluster-wide views add up; `kill -9` of one under load hands its
//! partitions to the others within the session timeout plus 5 s, with
//! every payment ending once and every balance exact; it rejoins on
//! restart; a SIGTERM hands over without waiting for a session timeout.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{
    client, cluster_env, env_refs, open_accounts, owned_by_members, terminal_status, ACCOUNTS,
    OPENING,
};
use common::{get, kafka_broker, wait_until, Binary};
use kpay::model::partition_for;
use serde_json::{json, Value};

const PARTITIONS: u32 = 8;
/// As set by `cluster_env`.
const SESSION_TIMEOUT: Duration = Duration::from_secs(4);

/// Whether `base` sees `members` members that own every partition once, and
/// each of them says it is stable.
async fn settled(c: &reqwest::Client, base: &str, members: usize) -> bool {
    let mut owned: Vec<u64> = owned_by_members(c, base).await.concat();
    owned.sort_unstable();
    let (_, view) = get(c, &format!("{base}/api/v1/cluster")).await;
    // Each member says it is stable, and how many payments it completes per second.
    let all_stable = (view["members"].as_array().into_iter().flatten())
        .all(|m| m["state"] == "stable" && m["completed_per_second"].is_number());
    owned == (0..u64::from(PARTITIONS)).collect::<Vec<_>>()
        && owned_by_members(c, base).await.len() == members
        && all_stable
}

/// The URL of the member owning `partition`, as `base` sees the group.
async fn owner_url(c: &reqwest::Client, base: &str, partition: u32) -> String {
    let (_, view) = get(c, &format!("{base}/api/v1/cluster")).await;
    let members = view["members"].as_array().unwrap();
    let owner = members.iter().find(|m| {
        (m["partitions"].as_array().unwrap().iter()).any(|p| p.as_u64() == Some(partition.into()))
    });
    owner.unwrap()["url"].as_str().unwrap().to_owned()
}

/// Submits `tp-{from}`..`tp-{to}` round-robin over `bases`; the ids accepted.
async fn submit(c: &reqwest::Client, bases: &[&str], range: std::ops::Range<usize>) -> Vec<String> {
    let mut accepted = Vec::new();
    for n in range {
        let body = json!({"id": format!("tp-{n}"), "from": format!("so-{}", n % ACCOUNTS),
                          "to": format!("so-{}", (n + 3) % ACCOUNTS), "amount": 100});
        let sent = c.post(format!("{}/api/v1/payments", bases[n % bases.len()]));
        if let Ok(answer) = sent.json(&body).send().await {
            if answer.status() == 202 {
                accepted.push(format!("tp-{n}"));
            }
        }
    }
    accepted
}

/// Waits until every payment in `ids` is terminal as seen from `base`; the
/// balances they imply (`so-N` → expected cents).
async fn settle(c: &reqwest::Client, base: &str, ids: &[String]) -> Vec<Value> {
    let mut expected = vec![OPENING; ACCOUNTS];
    for id in ids {
        let status = terminal_status(c, base, id).await;
        if status == "confirmed" {
            let n: usize = id.trim_start_matches("tp-").parse().unwrap();
            expected[n % ACCOUNTS] -= 100;
            expected[(n + 3) % ACCOUNTS] += 100;
        }
    }
    expected.into_iter().map(Value::from).collect()
}

/// Every account as `base` answers it, and who answered.
async fn accounts_from(c: &reqwest::Client, base: &str) -> Vec<(Value, String)> {
    let mut all = Vec::new();
    for n in 0..ACCOUNTS {
        let answer = c
            .get(format!("{base}/api/v1/accounts/so-{n}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "so-{n} from {base}");
        let by = answer.headers()["x-kpay-answered-by"]
            .to_str()
            .unwrap()
            .to_owned();
        all.push((answer.json().await.unwrap(), by));
    }
    all
}

/// Every instance answers every account the same, each answer from the owner.
async fn assert_queries_agree(c: &reqwest::Client, bases: &[&str], expected: &[Value]) {
    for base in bases {
        wait_until(Duration::from_secs(30), || async {
            let seen = accounts_from(c, base).await;
            seen.iter()
                .map(|(a, _)| a["balance"].clone())
                .collect::<Vec<_>>()
                == expected
        })
        .await;
        for (n, (_, by)) in accounts_from(c, base).await.into_iter().enumerate() {
            let partition = partition_for(&format!("so-{n}"), PARTITIONS);
            assert_eq!(
                by,
                owner_url(c, base, partition).await,
                "so-{n} asked at {base}"
            );
        }
        let (status, page) = get(c, &format!("{base}/api/v1/accounts?limit=4")).await;
        assert_eq!(status, 200, "{page}");
        let (_, rest) = get(
            c,
            &format!(
                "{base}/api/v1/accounts?limit=100&after={}",
                page["next"].as_str().unwrap()
            ),
        )
        .await;
        let listed: Vec<Value> = (page["items"].as_array().unwrap().iter())
            .chain(rest["items"].as_array().unwrap())
            .map(|a| a["balance"].clone())
            .collect();
        assert_eq!(listed, expected, "the merged list at {base}");
        // Followed partitions stand at their owners' last checkpoints, taken
        // at different moments: exact once every owner has checkpointed.
        wait_until(Duration::from_secs(10), || async {
            let (_, ledger) = get(c, &format!("{base}/api/v1/ledger/integrity")).await;
            ledger["ok"] == true
        })
        .await;
    }
}

/// Every instance lists every payment once, newest first, in merged pages.
async fn assert_payments_listed(c: &reqwest::Client, bases: &[&str], accepted: &[String]) {
    let mut expected = accepted.to_vec();
    expected.sort();
    for base in bases {
        let mut listed: Vec<(i64, String)> = Vec::new();
        let mut after = String::new();
        loop {
            let url = format!("{base}/api/v1/payments?limit=9{after}");
            let (status, page) = get(c, &url).await;
            assert_eq!(status, 200, "{page}");
            listed.extend(page["items"].as_array().unwrap().iter().map(|p| {
                (
                    p["accepted_at"].as_i64().unwrap(),
                    p["id"].as_str().unwrap().to_owned(),
                )
            }));
            match page["next_after"].as_str() {
                Some(next) => after = format!("&after={next}"),
                None => break,
            }
        }
        assert!(
            listed.windows(2).all(|w| w[0] > w[1]),
            "not newest first at {base}: {listed:?}"
        );
        let mut ids: Vec<String> = listed.into_iter().map(|(_, id)| id).collect();
        ids.sort();
        assert_eq!(ids, expected, "the merged payment list at {base}");
    }
}

/// How long until `base` sees `members` settled members, from `since`.
async fn settled_after(
    c: &reqwest::Client,
    base: &str,
    members: usize,
    since: Instant,
) -> Duration {
    wait_until(Duration::from_secs(60), || async {
        settled(c, base, members).await
    })
    .await;
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_divide_the_work_answer_every_query_and_survive_a_loss() {
    let Some(broker) = kafka_broker("three_instances_divide_the_work") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let env = cluster_env(&broker, dir.path());
    let env = env_refs(&env);
    let a = Binary::start(&dir.path().join("a"), &env).await;
    let b = Binary::start(&dir.path().join("b"), &env).await;
    let mut third = Binary::start(&dir.path().join("c"), &env).await;
    let c = client(10);
    let started = Instant::now();
    for base in [&a.base, &b.base, &third.base] {
        settled_after(&c, base, 3, started).await;
    }
    open_accounts(&c, &a.base).await;
    let bases = [a.base.as_str(), b.base.as_str(), third.base.as_str()];
    let mut accepted = submit(&c, &bases, 0..60).await;
    assert_eq!(accepted.len(), 60);
    let expected = settle(&c, &b.base, &accepted).await;
    assert_queries_agree(&c, &bases, &expected).await;
    assert_payments_listed(&c, &bases, &accepted).await;

    // The views that span the cluster: every partition's lag once, from its owner.
    for base in bases {
        let (status, lag) = get(&c, &format!("{base}/api/v1/metrics/lag")).await;
        assert_eq!(status, 200, "{lag}");
        let mut inflight: Vec<u64> = (lag["items"].as_array().unwrap().iter())
            .filter(|i| {
                i["processor"] == "inflight" && i["topic"].as_str().unwrap().contains("incoming")
            })
            .map(|i| i["partition"].as_u64().unwrap())
            .collect();
        inflight.sort_unstable();
        assert_eq!(
            inflight,
            (0..u64::from(PARTITIONS)).collect::<Vec<_>>(),
            "{lag}"
        );
        let (_, status) = get(&c, &format!("{base}/api/v1/control/status")).await;
        assert_eq!(
            (status["state"].as_str(), status["queued"].as_u64()),
            (Some("running"), Some(0)),
            "{status}"
        );
    }

    // kill -9 one under load: the others take its partitions in time.
    let load = {
        let (c, bases) = (c.clone(), [a.base.clone(), b.base.clone()]);
        tokio::spawn(async move {
            let bases: Vec<&str> = bases.iter().map(String::as_str).collect();
            submit(&c, &bases, 60..180).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    third.kill9();
    let killed = Instant::now();
    let takeover = settled_after(&c, &a.base, 2, killed).await;
    println!("takeover after kill -9: {} ms", takeover.as_millis());
    assert!(
        takeover <= SESSION_TIMEOUT + Duration::from_secs(5),
        "took {takeover:?}"
    );
    accepted.extend(load.await.unwrap());
    let expected = settle(&c, &a.base, &accepted).await;
    assert_queries_agree(&c, &[&a.base, &b.base], &expected).await;

    // Restarted, it rejoins and gets partitions back.
    let third = Binary::start(&dir.path().join("c"), &env).await;
    let rejoined = Instant::now();
    settled_after(&c, &third.base, 3, rejoined).await;
    let rejoin = settled_after(&c, &a.base, 3, rejoined).await;
    println!("rejoin: {} ms", rejoin.as_millis());
    assert!(!owned_by_members(&c, &third.base)
        .await
        .iter()
        .any(Vec::is_empty));

    // A SIGTERM leaves the group: the others take over without a session timeout.
    let stopping = Instant::now();
    b.stop().await;
    let handover = settled_after(&c, &a.base, 2, stopping).await;
    println!("handover after SIGTERM: {} ms", handover.as_millis());
    // Faster than a takeover after a crash, which waits for the session to end.
    assert!(
        handover < takeover,
        "took {handover:?}, a takeover {takeover:?}"
    );
    accepted.extend(submit(&c, &[&a.base, &third.base], 180..220).await);
    let expected = settle(&c, &third.base, &accepted).await;
    assert_queries_agree(&c, &[&a.base, &third.base], &expected).await;
    a.stop().await;
    third.stop().await;
}
