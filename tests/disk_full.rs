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
//! - A state store whose device fills up stops kpay with a non-zero exit
//!   status and the reason on stderr (sled refuses every write after that).
//!
//! Mounting needs root (CI runs as root). Without it the tests say they are
//! skipped and why; in CI that is a failure.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::traffic::{self, random_payment, submit, Driver, Ledger};
use common::{get, post, skip_or_fail_in_ci, Binary};
use kpay::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
use kpay::log::{Log, LogError, Record, TopicPartition};
use serde_json::json;

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

/// Free space below which the server refuses new payments (data.min_free_bytes).
const FLOOR_BYTES: u64 = 8 << 20;

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
    let server = Binary::start(&data, &env).await;
    traffic::open_accounts(&client, &server.base).await;
    // Leave a few MiB above the floor: some payments fit, then the floor is reached.
    let filler = tmpfs.fill_leaving(FLOOR_BYTES + (3 << 20));

    // Traffic until a hundred payments have been refused, or for 25 s.
    let ledger = Arc::new(Mutex::new(Ledger::with_refusals()));
    let driver = Driver::start(&server.base, &ledger, 0);
    let refused = || ledger.lock().unwrap().refused.len();
    let driving = Instant::now();
    while refused() < 100 && driving.elapsed() < Duration::from_secs(25) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    driver.stop().await;
    let (acknowledged_full, sample) = {
        let ledger = ledger.lock().unwrap();
        let sample = ledger.refused.values().next().cloned();
        (ledger.acknowledged.len(), sample)
    };
    assert!(
        acknowledged_full > 0,
        "nothing was accepted before the disk filled"
    );
    let sample = sample.expect("no 507 although the disk is full");
    assert_eq!(sample["error"]["code"], "insufficient_storage", "{sample}");
    let message = sample["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("insufficient storage") && message.contains(&data.display().to_string()),
        "the reason names the condition and the place: {message}"
    );

    // A batch is refused item by item with the same status.
    let (from, to) = (traffic::account(0), traffic::account(1));
    let batch = json!({"payments": [{"id": "full-batch-1", "from": from, "to": to, "amount": 5}]});
    let (status, body) = post(
        &client,
        &format!("{}/api/v1/payments/batch", server.base),
        batch,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let item = &body["results"][0];
    assert_eq!(item["status_code"], 507, "{body}");
    let refusal = item.clone();
    ledger
        .lock()
        .unwrap()
        .book("full-batch-1".into(), (from, to, 5), 507, refusal);

    // Readiness says why, and processing of what was accepted goes on.
    let (status, ready) = get(&client, &format!("{}/readyz", server.base)).await;
    assert_eq!(status, 503, "{ready}");
    common::assert_error_mentions(&ready, "insufficient storage");
    let accepted: Vec<String> = ledger
        .lock()
        .unwrap()
        .acknowledged
        .keys()
        .cloned()
        .collect();
    for id in &accepted {
        common::terminal(&client, &server.base, id).await;
    }

    // Space freed: intake works again without a restart.
    std::fs::remove_file(&filler).expect("delete the filler");
    let freed = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("freed-{n}");
        if submit(&client, &server.base, &ledger, id, random_payment()).await == 202 {
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
        let id = format!("after-{n}");
        let status = submit(&client, &server.base, &ledger, id, random_payment()).await;
        assert_eq!(status, 202, "payment after recovery");
    }
    let (status, ready) = get(&client, &format!("{}/readyz", server.base)).await;
    assert_eq!(status, 200, "{ready}");

    // Restart, then check every payment.
    let exit = server.stop().await;
    assert!(exit.success(), "SIGTERM exit: {exit:?}");
    let server = Binary::start(&data, &env).await;
    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    assert!(
        ledger.answers.keys().all(|s| matches!(s, 202 | 503 | 507)),
        "only 202, 503 and 507 (and every request answered): {:?}",
        ledger.answers
    );
    // Each acknowledged payment terminal once (none lost, none doubled), no
    // refused one, balances, counts and the ledger.
    let outcome = traffic::check(&client, &server.base, &ledger).await;
    assert!(
        outcome.every_path_taken(),
        "confirmed, rejected and reversed all taken"
    );
    drop(server);
    println!(
        "\ndisk full drill: {} acknowledged ({acknowledged_full} before the disk filled), {} refused \
         with 507, {} answered 503, lost 0, duplicates 0, recovered: yes, {} ms after freeing \
         space; ledger intact; {:.1} s in all",
        ledger.acknowledged.len(),
        ledger.refused.len(),
        ledger.answers.get(&503).copied().unwrap_or(0),
        recovery.as_millis(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_store_stops_the_binary_with_a_non_zero_exit_and_the_reason() {
    // With only the state store on a tmpfs that fills up (the log has room), kpay cannot go on: it stops by itself, exits non-zero and says why on stderr.
    let test = "a_full_state_store_stops_the_binary_with_a_non_zero_exit_and_the_reason";
    let Some(tmpfs) = mount_or_skip(test, 8) else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmpfs.path().join("state")).unwrap();
    std::os::unix::fs::symlink(tmpfs.path().join("state"), data.path().join("state")).unwrap();
    let env = [
        ("KPAY_PIPELINE__COMMIT_INTERVAL_MS", "100"),
        ("KPAY_PIPELINE__FLUSH_INTERVAL_MS", "100"),
    ];
    let output = data.path().join("output.txt");
    let mut server = Binary::spawn_logged(data.path(), &env, &output);
    server.wait_ready().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    traffic::open_accounts(&client, &server.base).await;
    let _filler = tmpfs.fill_leaving(0);
    let ledger = Arc::new(Mutex::new(Ledger::with_refusals()));
    let driver = Driver::start(&server.base, &ledger, 0);
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still running with a full state store"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    driver.stop().await;
    let said = std::fs::read_to_string(&output).unwrap();
    assert!(!exit.success(), "exit: {exit:?}\n{said}");
    assert!(said.contains("kpay: stopped on an error"), "{said}");
    assert!(said.contains("ran out of space"), "{said}");
}
