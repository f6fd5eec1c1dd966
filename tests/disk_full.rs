//! The disk full drill: the data directory on a small tmpfs, filled by another
//! file until kpay runs out of room.
//!
//! - The embedded log on a full device refuses appends with `NoSpace`, cuts
//!   back what it could not keep (no torn frame on disk), stays usable, and
//!   appends again once space is freed; a reopen reads exactly what was
//!   acknowledged.
//! - The real binary answers 507 with the reason, keeps processing what it
//!   accepted, reports the condition on `/readyz`, takes payments again by
//!   itself once the filler is deleted, and after a restart every acknowledged
//!   payment has exactly one terminal state, no refused payment exists, every
//!   balance matches the confirmed payments and the ledger holds.
//!
//! Mounting needs root (CI runs as root). Without it the tests say they are
//! skipped and why; in CI that is a failure.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{get, post, skip_or_fail_in_ci, Binary};
use kpay::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
use kpay::log::{Log, LogError, Record, TopicPartition};
use serde_json::{json, Value};

/// A size-limited tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB, or says why it cannot.
    fn mount(test: &str, mib: u64) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("kpay-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    /// Bytes still free on the tmpfs.
    fn free_bytes(&self) -> u64 {
        fs2::available_space(&self.dir).expect("statvfs")
    }

    /// Writes a filler file so that about `leave` bytes stay free.
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("create filler");
        let chunk = vec![0xAB; 64 << 10];
        while self.free_bytes() > leave + chunk.len() as u64 {
            file.write_all(&chunk).expect("write filler");
        }
        let rest = self.free_bytes().saturating_sub(leave) as usize;
        file.write_all(&chunk[..rest.min(chunk.len())])
            .expect("write filler");
        file.sync_all().expect("sync filler");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds it (a child not reaped yet): detach it now.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Mounts the tmpfs or reports the test skipped; in CI a skip is a failure.
fn mount_or_skip(test: &str, mib: u64) -> Option<Tmpfs> {
    match Tmpfs::mount(test, mib) {
        Ok(tmpfs) => Some(tmpfs),
        Err(why) => {
            let why = format!(
                "cannot mount a size-limited tmpfs ({why}); run as root to drill a full disk"
            );
            skip_or_fail_in_ci(test, &why);
            None
        }
    }
}

fn record(n: usize) -> Record {
    Record {
        key: Bytes::from(format!("k{n:06}")),
        value: Bytes::from(vec![(n % 251) as u8; 1000]),
        timestamp_ms: n as i64,
    }
}

/// Sum of the sizes of the log's segment files.
fn segment_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_device_leaves_no_torn_frame_and_the_log_appends_again_once_freed() {
    // Appends on a full device fail with NoSpace naming the segment, nothing partial stays on disk,
    // the writer keeps working once space is freed, and a reopen reads exactly the acknowledged records.
    let test = "full_device_leaves_no_torn_frame_and_the_log_appends_again_once_freed";
    let Some(tmpfs) = mount_or_skip(test, 4) else {
        return;
    };
    let dir = tmpfs.path().join("log");
    let config = EmbeddedLogConfig {
        segment_bytes: 1 << 20,
        ..EmbeddedLogConfig::with_dir(&dir)
    };
    let log = EmbeddedLog::open(config.clone()).expect("open");
    log.ensure_topic("t", 2).await.expect("topic");
    let tps = [TopicPartition::new("t", 0), TopicPartition::new("t", 1)];
    let filler = tmpfs.fill_leaving(300 << 10);
    let mut acknowledged: Vec<Vec<Record>> = vec![Vec::new(), Vec::new()];
    let mut refusals = Vec::new();
    for n in 0..2_000 {
        let tp = &tps[n % 2];
        // Batches of 1 to 7 records, so a refused write is often a partial one.
        let batch: Vec<Record> = (0..1 + n % 7).map(|i| record(n * 10 + i)).collect();
        match log.append(tp, batch.clone()).await {
            Ok(first) => {
                assert_eq!(first, acknowledged[n % 2].len() as u64, "dense offsets");
                acknowledged[n % 2].extend(batch);
            }
            Err(error) => {
                assert!(
                    matches!(&error, LogError::NoSpace { path, .. } if path.contains(".wal")),
                    "{error}"
                );
                refusals.push(error.to_string());
                if refusals.len() == 20 {
                    break;
                }
            }
        }
        // What is on disk is exactly what was acknowledged, after every call.
        assert_eq!(segment_bytes(&dir), log.disk_bytes(), "after append {n}");
    }
    assert_eq!(refusals.len(), 20, "the device never filled up");
    assert!(
        refusals[0].contains("no space left on the device holding the log"),
        "{}",
        refusals[0]
    );
    assert!(acknowledged.iter().all(|a| !a.is_empty()));
    assert_eq!(log.no_space_count(), 20);
    std::fs::remove_file(&filler).expect("free space");
    for (p, tp) in tps.iter().enumerate() {
        let batch = vec![record(1_000_000 + p)];
        let first = log
            .append(tp, batch.clone())
            .await
            .expect("append once freed");
        assert_eq!(first, acknowledged[p].len() as u64);
        acknowledged[p].extend(batch);
    }
    log.close();
    drop(log);
    let bytes_before = segment_bytes(&dir);
    let log = EmbeddedLog::open(config).expect("reopen");
    assert_eq!(
        segment_bytes(&dir),
        bytes_before,
        "recovery had a torn tail to cut"
    );
    for (p, tp) in tps.iter().enumerate() {
        let read = log.read(tp, 0, 100_000).await.expect("read");
        let values: Vec<Record> = read.into_iter().map(|r| r.record).collect();
        assert_eq!(values, acknowledged[p], "partition {p}");
    }
    log.close();
}

const ACCOUNTS: usize = 6;
const OPENING_CENTS: i64 = 10_000_000;
/// Free space below which the server refuses new payments (data.min_free_bytes).
const FLOOR_BYTES: u64 = 8 << 20;

fn account(n: usize) -> String {
    format!("acc-{n:02}")
}

/// What the drivers learned.
#[derive(Default)]
struct Book {
    /// Answered 202: must end terminal, once.
    acknowledged: HashMap<String, (String, String, i64)>,
    /// Answered 507: must not exist.
    refused: Vec<String>,
    /// No answer (a transport error): may or may not exist.
    unknown: HashMap<String, (String, String, i64)>,
    /// Every answer by status.
    statuses: BTreeMap<u16, u64>,
    /// A 507 body, to check its reason.
    sample_507: Option<Value>,
}

/// Payment `n` of `worker`: mostly between the accounts, some to a missing
/// account (reversed), some too large (rejected).
fn payment(tag: &str, worker: usize, n: usize) -> (String, String, String, i64) {
    let from = account((worker + n) % ACCOUNTS);
    let to = match n % 13 {
        0 => "ghost".to_owned(),
        _ => account((worker + n + 1 + n % 3) % ACCOUNTS),
    };
    let amount = if n.is_multiple_of(17) {
        OPENING_CENTS * 10
    } else {
        1 + (n % 500) as i64
    };
    (format!("{tag}-w{worker}-{n:05}"), from, to, amount)
}

/// Submits one payment and books the answer; returns its status (0: no answer).
async fn submit(
    client: &reqwest::Client,
    base: &str,
    book: &Mutex<Book>,
    (id, from, to, amount): (String, String, String, i64),
) -> u16 {
    let body = json!({"id": id, "from": from, "to": to, "amount": amount});
    let sent = client
        .post(format!("{base}/api/v1/payments"))
        .json(&body)
        .send()
        .await;
    let (status, answer) = match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
        Err(_) => (0, Value::Null),
    };
    let mut book = book.lock().unwrap();
    *book.statuses.entry(status).or_default() += 1;
    match status {
        202 => {
            book.acknowledged.insert(id, (from, to, amount));
        }
        507 => {
            book.refused.push(id);
            book.sample_507.get_or_insert(answer);
        }
        // Backpressure: nothing was written.
        503 => {}
        0 => {
            book.unknown.insert(id, (from, to, amount));
        }
        other => panic!("unexpected answer {other} for {body}: {answer}"),
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_on_a_full_disk_get_507_lose_nothing_and_intake_recovers_by_itself() {
    // With the data directory on a small tmpfs filled by another file: 507s with the reason,
    // no other 5xx than 503, processing of accepted payments goes on, /readyz reports it,
    // intake resumes without a restart once the filler is deleted; after a restart every
    // acknowledged payment is terminal once, no refused one exists, balances and the ledger hold.
    let test = "payments_on_a_full_disk_get_507_lose_nothing_and_intake_recovers_by_itself";
    let Some(tmpfs) = mount_or_skip(test, 64) else {
        return;
    };
    let started = Instant::now();
    let data = tmpfs.path().join("data");
    let floor = FLOOR_BYTES.to_string();
    let env = [
        ("KPAY_DATA__MIN_FREE_BYTES", floor.as_str()),
        ("KPAY_LOG__SEGMENT_BYTES", "1048576"),
        ("KPAY_PIPELINE__COMMIT_INTERVAL_MS", "100"),
        ("KPAY_PIPELINE__FLUSH_INTERVAL_MS", "100"),
    ];
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut server = Binary::start(&data, &env).await;
    for n in 0..ACCOUNTS {
        common::open_account(&client, &server.base, &account(n), OPENING_CENTS).await;
    }
    // Leave a few MiB above the floor: some payments fit, then the floor is reached.
    let filler = tmpfs.fill_leaving(FLOOR_BYTES + (3 << 20));

    let book = Arc::new(Mutex::new(Book::default()));
    let mut workers = Vec::new();
    for worker in 0..4 {
        let (client, base, book) = (client.clone(), server.base.clone(), book.clone());
        workers.push(tokio::spawn(async move {
            let drive_started = Instant::now();
            let mut refused = 0;
            for n in 0.. {
                if submit(&client, &base, &book, payment("full", worker, n)).await == 507 {
                    refused += 1;
                }
                if refused >= 25 || drive_started.elapsed() > Duration::from_secs(25) {
                    break;
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let (acknowledged_full, refused_full) = {
        let book = book.lock().unwrap();
        (book.acknowledged.len(), book.refused.len())
    };
    assert!(
        acknowledged_full > 0,
        "nothing was accepted before the disk filled"
    );
    assert!(refused_full > 0, "no 507 although the disk is full");
    let sample = book.lock().unwrap().sample_507.clone().unwrap();
    assert_eq!(sample["error"]["code"], "insufficient_storage", "{sample}");
    let message = sample["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("insufficient storage") && message.contains(&data.display().to_string()),
        "the reason names the condition and the place: {message}"
    );

    // A batch is refused item by item with the same status.
    let batch = json!({"payments": [{"id": "full-batch-1", "from": account(0), "to": account(1), "amount": 5}]});
    let (status, body) = post(
        &client,
        &format!("{}/api/v1/payments/batch", server.base),
        batch,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status_code"], 507, "{body}");
    {
        let mut book = book.lock().unwrap();
        book.refused.push("full-batch-1".into());
        *book.statuses.entry(507).or_default() += 1;
    }

    // Readiness says why, and processing of what was accepted goes on.
    let (status, ready) = get(&client, &format!("{}/readyz", server.base)).await;
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready["error"]["message"]
            .as_str()
            .unwrap()
            .contains("insufficient storage"),
        "{ready}"
    );
    let accepted: Vec<String> = book.lock().unwrap().acknowledged.keys().cloned().collect();
    for id in &accepted {
        common::terminal(&client, &server.base, id).await;
    }

    // Space freed: intake works again without a restart.
    std::fs::remove_file(&filler).expect("delete the filler");
    let freed = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        if submit(&client, &server.base, &book, payment("freed", 9, n)).await == 202 {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(10),
            "intake did not recover within 10 s of freeing space"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovery = freed.elapsed();
    for n in 0..100 {
        let status = submit(&client, &server.base, &book, payment("after", 0, n)).await;
        assert_eq!(status, 202, "payment after recovery");
    }
    let (status, ready) = get(&client, &format!("{}/readyz", server.base)).await;
    assert_eq!(status, 200, "{ready}");

    // Restart, then check every payment.
    let exit = tokio::task::spawn_blocking(move || {
        let exit = server.terminate();
        (server, exit)
    });
    let (server, exit) = exit.await.unwrap();
    drop(server);
    assert!(exit.success(), "SIGTERM exit: {exit:?}");
    let server = Binary::start(&data, &env).await;
    let book = Arc::try_unwrap(book).ok().unwrap().into_inner().unwrap();
    assert!(
        book.statuses.keys().all(|s| matches!(s, 202 | 503 | 507)),
        "only 202, 503 and 507 (and every request answered): {:?}",
        book.statuses
    );
    let mut balances = [OPENING_CENTS; ACCOUNTS];
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut lost = 0;
    let everything = (book.acknowledged.iter().map(|p| (p, true)))
        .chain(book.unknown.iter().map(|p| (p, false)));
    for ((id, (from, to, amount)), acknowledged) in everything {
        let url = format!("{}/api/v1/payments/{id}", server.base);
        let (status, _) = get(&client, &url).await;
        if status == 404 {
            lost += u64::from(acknowledged);
            continue;
        }
        let payment = common::terminal(&client, &server.base, id).await;
        assert_eq!(
            (&payment["from"], &payment["to"], &payment["amount"]),
            (&json!(from), &json!(to), &json!(amount))
        );
        let status = payment["status"].as_str().unwrap().to_owned();
        if status == "confirmed" {
            let index = |name: &str| name[4..].parse::<usize>().unwrap();
            balances[index(from)] -= amount;
            balances[index(to)] += amount;
        }
        *counts.entry(status).or_default() += 1;
    }
    assert_eq!(lost, 0, "acknowledged payments lost");
    for id in &book.refused {
        let (status, body) = get(&client, &format!("{}/api/v1/payments/{id}", server.base)).await;
        assert_eq!(
            status, 404,
            "payment {id} was refused with 507 but exists: {body}"
        );
    }
    for (n, expected) in balances.iter().enumerate() {
        let (_, body) = get(
            &client,
            &format!("{}/api/v1/accounts/{}", server.base, account(n)),
        )
        .await;
        assert_eq!(
            body["balance"].as_i64().unwrap(),
            *expected,
            "{}: money moved more or less than once",
            account(n)
        );
    }
    // Each payment counted once: the processors' totals equal the payments found.
    let (_, metrics) = get(&client, &format!("{}/api/v1/metrics/pipeline", server.base)).await;
    let mut duplicates = 0;
    for status in ["confirmed", "rejected", "reversed"] {
        let counted = metrics[status]["count"].as_u64().unwrap();
        let found = counts.get(status).copied().unwrap_or(0);
        duplicates += counted.abs_diff(found);
    }
    assert_eq!(duplicates, 0, "{metrics} against {counts:?}");
    assert!(
        counts.len() == 3,
        "confirmed, rejected and reversed all taken: {counts:?}"
    );
    let (_, integrity) = get(&client, &format!("{}/api/v1/ledger/integrity", server.base)).await;
    assert_eq!(integrity["ok"], true, "{integrity}");
    assert_eq!(integrity["in_transit"], 0, "{integrity}");
    assert_eq!(
        integrity["total_funded"].as_i64().unwrap(),
        OPENING_CENTS * ACCOUNTS as i64
    );
    drop(server);
    println!(
        "\ndisk full drill: {} acknowledged ({acknowledged_full} before the disk filled), {} refused \
         with 507, {} unanswered, lost {lost}, duplicates {duplicates}, recovered: yes, {} ms \
         after freeing space; ledger intact; {:.1} s in all",
        book.acknowledged.len(),
        book.statuses.get(&507).copied().unwrap_or(0),
        book.unknown.len(),
        recovery.as_millis(),
        started.elapsed().as_secs_f64()
    );
}
