//! Consumer-group membership (`kpay::cluster`) against a real
//! Kafka-protocol broker (Tansu in CI): members divide the partitions,
//! rebalance when one joins, leaves or stops heartbeating, and a dropped
//! member learns it was fenced. Each test has a group of its own.
//!
//! Needs `KPAY_TEST_KAFKA=host:port`; without it these print why they are
//! skipped (and fail in CI, which starts a broker). The rebalance times are
//! printed (`--nocapture`): Tansu holds every JoinGroup for about half the
//! session timeout, so they scale with it.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{free_port, kafka_broker};
use kpay::cluster::{Assignment, ClusterError, Member, MemberConfig, MemberState};

const PARTITIONS: u32 = 8;

/// A member's settings: `session` timeout, heartbeats at a sixth of it.
fn config(broker: &str, group: &str, name: &str, session: Duration) -> MemberConfig {
    MemberConfig {
        brokers: vec![broker.to_owned()],
        group: group.to_owned(),
        url: format!("http://{name}.test:8080"),
        partitions: PARTITIONS,
        session_timeout: session,
        heartbeat_interval: session / 6,
        rebalance_timeout: session * 2,
        call_timeout: Duration::from_secs(5),
    }
}

/// A group name no other test (or run) shares.
fn unique_group(test: &str) -> String {
    format!("kpay-test-{test}-{}", uuid::Uuid::now_v7().simple())
}

async fn start(broker: &str, group: &str, name: &str, session: Duration) -> Member {
    start_on(config(broker, group, name, session)).await
}

async fn start_on(config: MemberConfig) -> Member {
    Member::start(config).await.expect("start a member")
}

/// Waits (acting as the members' owner: every `Joining` is answered with
/// `released` at once) until every member is stable in one generation and
/// `done` holds for their assignments; returns them, in the order given.
async fn settle(
    members: &[&Member],
    within: Duration,
    done: impl Fn(&[Assignment]) -> bool,
) -> Vec<Assignment> {
    let started = Instant::now();
    loop {
        let mut stable = Vec::new();
        for member in members {
            match &*member.state().borrow() {
                MemberState::Stable(assignment) => stable.push(assignment.clone()),
                MemberState::Joining => member.released(),
                MemberState::Stopped(why) => panic!("a member stopped: {why}"),
            }
        }
        let same_generation = stable
            .windows(2)
            .all(|w| w[0].generation == w[1].generation);
        if stable.len() == members.len() && same_generation && done(&stable) {
            return stable;
        }
        assert!(
            started.elapsed() < within,
            "not settled within {within:?}: {stable:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each partition exactly once over `assignments`, and every member's view
/// agrees with what each member owns.
fn assert_exactly_once(assignments: &[Assignment]) {
    let mut all: Vec<u32> = assignments
        .iter()
        .flat_map(|a| a.partitions.clone())
        .collect();
    all.sort_unstable();
    assert_eq!(all, (0..PARTITIONS).collect::<Vec<_>>(), "{assignments:#?}");
    for assignment in assignments {
        for other in assignments {
            let view = assignment.members.iter().find(|m| m.id == other.member_id);
            assert_eq!(view.map(|m| &m.partitions), Some(&other.partitions));
        }
    }
}

fn counts(assignments: &[Assignment]) -> Vec<usize> {
    assignments.iter().map(|a| a.partitions.len()).collect()
}

/// The counts, largest first (for members that joined at once, in any order).
fn sorted_counts(assignments: &[Assignment]) -> Vec<usize> {
    let mut counts = counts(assignments);
    counts.sort_unstable_by(|a, b| b.cmp(a));
    counts
}

fn all_partitions(assignments: &[Assignment]) -> bool {
    assignments
        .iter()
        .map(|a| a.partitions.len())
        .sum::<usize>()
        == PARTITIONS as usize
}

fn kept(before: &Assignment, after: &Assignment) -> usize {
    let before: BTreeSet<u32> = before.partitions.iter().copied().collect();
    after
        .partitions
        .iter()
        .filter(|p| before.contains(p))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_the_partitions() {
    let Some(broker) = kafka_broker("two_members_split_the_partitions") else {
        return;
    };
    let group = unique_group("split");
    let session = Duration::from_secs(4);
    let started = Instant::now();
    let a = start(&broker, &group, "a", session).await;
    let first = settle(&[&a], session * 3, |s| s[0].partitions.len() == 8).await;
    eprintln!("cluster: first member stable after {:?}", started.elapsed());
    assert_eq!(first[0].members.len(), 1);

    let joined = Instant::now();
    let b = start(&broker, &group, "b", session).await;
    let both = settle(&[&a, &b], session * 4, |s| counts(s) == [4, 4]).await;
    eprintln!(
        "cluster: rebalance on join (2nd member) took {:?}",
        joined.elapsed()
    );
    assert_exactly_once(&both);
    assert!(both[0].generation > first[0].generation);
    for assignment in &both {
        let urls: BTreeSet<&str> = assignment.members.iter().map(|m| m.url.as_str()).collect();
        assert_eq!(
            urls,
            BTreeSet::from(["http://a.test:8080", "http://b.test:8080"])
        );
        assert_eq!(
            assignment.owner_url(both[1].partitions[0]),
            Some("http://b.test:8080")
        );
    }
    a.leave().await;
    b.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_member_takes_its_share_and_the_others_keep_theirs() {
    let Some(broker) = kafka_broker("a_third_member_takes_its_share_and_the_others_keep_theirs")
    else {
        return;
    };
    let group = unique_group("third");
    let session = Duration::from_secs(4);
    let a = start(&broker, &group, "a", session).await;
    let b = start(&broker, &group, "b", session).await;
    let before = settle(&[&a, &b], session * 5, |s| counts(s) == [4, 4]).await;

    let joined = Instant::now();
    let c = start(&broker, &group, "c", session).await;
    let after = settle(&[&a, &b, &c], session * 5, |s| s[2].partitions.len() == 2).await;
    eprintln!(
        "cluster: rebalance on join (3rd member) took {:?}",
        joined.elapsed()
    );
    assert_exactly_once(&after);
    assert_eq!(counts(&after), [3, 3, 2]);
    // One rebalance: the generation moved on once.
    assert_eq!(after[0].generation, before[0].generation + 1);
    for (old, new) in before.iter().zip(&after) {
        assert!(kept(old, new) >= 2, "{old:?} → {new:?}");
    }
    for member in [a, b, c] {
        member.leave().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_leaves_is_replaced_at_once() {
    let Some(broker) = kafka_broker("a_member_that_leaves_is_replaced_at_once") else {
        return;
    };
    let group = unique_group("leave");
    // The default settings: the others must not wait for this session to expire.
    let session = Duration::from_secs(10);
    let defaults = |name| MemberConfig {
        heartbeat_interval: Duration::from_secs(1),
        rebalance_timeout: Duration::from_secs(30),
        ..config(&broker, &group, name, session)
    };
    let a = start_on(defaults("a")).await;
    let b = start_on(defaults("b")).await;
    let c = start_on(defaults("c")).await;
    let before = settle(&[&a, &b, &c], session * 4, |s| {
        sorted_counts(s) == [3, 3, 2]
    })
    .await;

    // The first member, the leader, leaves.
    let left = Instant::now();
    let state = a.state();
    a.leave().await;
    assert_eq!(
        *state.borrow(),
        MemberState::Stopped("left the group".into())
    );
    let after = settle(&[&b, &c], session * 2, all_partitions).await;
    let took = left.elapsed();
    eprintln!("cluster: rebalance on leave took {took:?}");
    assert!(took < session, "{took:?} is not under the session timeout");
    assert_exactly_once(&after);
    assert_eq!(counts(&after), [4, 4]);
    assert_eq!(after[0].members.len(), 2);
    for (old, new) in before[1..].iter().zip(&after) {
        assert_eq!(kept(old, new), old.partitions.len(), "{old:?} → {new:?}");
    }
    b.leave().await;
    c.leave().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_member_is_dropped_and_learns_it_was_fenced() {
    let Some(broker) = kafka_broker("a_silent_member_is_dropped_and_learns_it_was_fenced") else {
        return;
    };
    let group = unique_group("zombie");
    let session = Duration::from_secs(3);
    let a = start(&broker, &group, "a", session).await;
    let b = start(&broker, &group, "b", session).await;
    let before = settle(&[&a, &b], session * 6, |s| counts(s) == [4, 4]).await;

    let paused = Instant::now();
    b.pause_heartbeats(true);
    let alone = settle(&[&a], session * 4, |s| s[0].partitions.len() == 8).await;
    let took = paused.elapsed();
    eprintln!("cluster: a silent member's partitions moved after {took:?} (session {session:?})");
    assert!(took < session + Duration::from_secs(5), "{took:?}");
    assert_eq!(alone[0].members.len(), 1);
    // The silent member knows nothing yet: it still believes what it had.
    assert_eq!(b.state().borrow().partitions(), &before[1].partitions[..]);

    let mut state = b.state();
    b.pause_heartbeats(false);
    let resumed = Instant::now();
    tokio::time::timeout(session, state.wait_for(|s| *s == MemberState::Joining))
        .await
        .expect("the dropped member goes Joining on its first heartbeat")
        .unwrap();
    eprintln!(
        "cluster: the dropped member learnt it was fenced after {:?}",
        resumed.elapsed()
    );
    let back = settle(&[&a, &b], session * 6, |s| counts(s) == [4, 4]).await;
    eprintln!(
        "cluster: ... and was back with partitions after {:?}",
        resumed.elapsed()
    );
    assert_exactly_once(&back);
    assert_ne!(
        back[1].member_id, before[1].member_id,
        "rejoined as a new member"
    );
    a.leave().await;
    b.leave().await;
}

#[tokio::test]
async fn an_unreachable_broker_fails_the_start_within_the_call_timeout() {
    // No broker needed: nothing listens on this port.
    let broker = format!("127.0.0.1:{}", free_port());
    let mut config = config(&broker, "g", "a", Duration::from_secs(3));
    config.call_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let error = Member::start(config.clone())
        .await
        .err()
        .expect("no broker");
    assert!(matches!(error, ClusterError::Unavailable(_)), "{error}");
    assert!(error.to_string().contains(&broker), "{error}");
    assert!(started.elapsed() < Duration::from_secs(3));
    config.heartbeat_interval = config.session_timeout;
    let error = Member::start(config).await.err().expect("bad settings");
    assert!(matches!(error, ClusterError::Config(_)), "{error}");
}
