//! Tests of the log as a whole, through the `Log` trait: appends and reads
//! across topics, reopening, waiting for the high-water mark and the limits
//! checked before an append is queued. Tests of one concern live beside it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::test_support::{read_all, record, records, segment_files, small_segments, values};
use super::{EmbeddedLog, EmbeddedLogConfig};
use crate::log::{Log, LogError, Record, TopicPartition};

// Appends to several topics and partitions read back intact, with dense offsets from 0.
#[tokio::test]
async fn round_trip_across_topics_and_partitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EmbeddedLog::open(EmbeddedLogConfig::with_dir(dir.path())).expect("open");
    log.ensure_topic("payment.incoming", 3)
        .await
        .expect("topic");
    log.ensure_topic("ledger", 2).await.expect("topic");
    let mut expected: BTreeMap<TopicPartition, Vec<Record>> = BTreeMap::new();
    for round in 0..4 {
        for (topic, partitions) in [("payment.incoming", 3), ("ledger", 2)] {
            for partition in 0..partitions {
                let tp = TopicPartition::new(topic, partition);
                let batch = records(&format!("{tp}-{round}"), round + 1);
                let first = log.append(&tp, batch.clone()).await.expect("append");
                let appended = expected.entry(tp).or_default();
                assert_eq!(first, appended.len() as u64);
                appended.extend(batch);
            }
        }
    }
    for (tp, appended) in &expected {
        assert_eq!(
            log.high_watermark(tp).await.expect("hwm"),
            appended.len() as u64
        );
        assert_eq!(log.log_start(tp).await.expect("start"), 0);
        let stored = log.read(tp, 0, 1000).await.expect("read");
        let offsets: Vec<u64> = stored.iter().map(|s| s.offset).collect();
        assert_eq!(offsets, (0..appended.len() as u64).collect::<Vec<_>>());
        assert_eq!(&values(&stored), appended);
        let middle = log.read(tp, 3, 2).await.expect("read middle");
        assert_eq!(values(&middle), appended[3..5].to_vec());
        let at_end = log
            .read(tp, appended.len() as u64, 10)
            .await
            .expect("read end");
        assert!(at_end.is_empty());
    }
    let empty = log
        .append(&TopicPartition::new("ledger", 1), Vec::new())
        .await;
    assert_eq!(empty.expect("empty append"), 10);
}

// Closing and reopening keeps records, topics and the next offsets.
#[tokio::test]
async fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_segments(dir.path(), 300);
    let tp0 = TopicPartition::new("a", 0);
    let tp1 = TopicPartition::new("a", 1);
    {
        let log = EmbeddedLog::open(config.clone()).expect("open");
        log.ensure_topic("a", 2).await.expect("topic");
        log.append(&tp0, records("x", 20)).await.expect("append");
        log.append(&tp1, records("y", 5)).await.expect("append");
        log.close();
        let closed = log.append(&tp0, records("z", 1)).await;
        assert!(matches!(closed, Err(LogError::Closed)), "{closed:?}");
    }
    assert!(
        segment_files(dir.path()).len() > 1,
        "the test should span segments"
    );
    let log = EmbeddedLog::open(config).expect("reopen");
    assert_eq!(log.high_watermark(&tp0).await.expect("hwm"), 20);
    assert_eq!(values(&read_all(&log, &tp0).await), records("x", 20));
    assert_eq!(values(&read_all(&log, &tp1).await), records("y", 5));
    assert_eq!(log.append(&tp1, records("w", 2)).await.expect("append"), 5);
    log.ensure_topic("a", 2).await.expect("same count is fine");
    assert!(log.ensure_topic("a", 3).await.is_err(), "topic remembered");
}

// wait_for returns when another task appends and gives up after the timeout otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_wakes_and_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EmbeddedLog::open(EmbeddedLogConfig::with_dir(dir.path())).expect("open");
    log.ensure_topic("w", 1).await.expect("topic");
    let tp = TopicPartition::new("w", 0);
    let writer = {
        let (log, tp) = (Arc::clone(&log), tp.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            log.append(&tp, records("a", 2)).await.expect("append");
        })
    };
    let started = Instant::now();
    let seen = log
        .wait_for(&tp, 0, Duration::from_secs(10))
        .await
        .expect("wait");
    assert_eq!(seen, 2);
    assert!(started.elapsed() < Duration::from_secs(5));
    writer.await.expect("writer");
    let immediate = log
        .wait_for(&tp, 1, Duration::from_secs(10))
        .await
        .expect("wait");
    assert_eq!(immediate, 2);
    let started = Instant::now();
    let timed_out = log
        .wait_for(&tp, 2, Duration::from_millis(100))
        .await
        .expect("wait");
    assert_eq!(timed_out, 2);
    assert!(started.elapsed() >= Duration::from_millis(100));
}

// Size limits, retention limit and partition count mismatches are refused with clear errors.
#[tokio::test]
async fn limits_are_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = EmbeddedLogConfig {
        max_record_bytes: 100,
        max_retained_bytes: 1000,
        ..EmbeddedLogConfig::with_dir(dir.path())
    };
    let log = EmbeddedLog::open(config).expect("open");
    log.ensure_topic("l", 2).await.expect("topic");
    let tp = TopicPartition::new("l", 0);
    let big = record("key", &"v".repeat(98), 0);
    let too_large = log.append(&tp, vec![big]).await;
    assert!(
        matches!(
            too_large,
            Err(LogError::RecordTooLarge {
                size_bytes: 101,
                limit_bytes: 100
            })
        ),
        "{too_large:?}"
    );
    let mut appended = 0;
    let full = loop {
        match log.append(&tp, vec![record("k", &"v".repeat(90), 0)]).await {
            Ok(_) => appended += 1,
            Err(error) => break error,
        }
    };
    assert!(
        matches!(
            full,
            LogError::Full {
                limit_bytes: 1000,
                ..
            }
        ),
        "{full}"
    );
    // A frame of this record takes 108 bytes, at most 139 whatever its offset:
    // appends go on while the most it can take still fits.
    assert!(appended >= 7, "{appended} appended");
    assert!(log.disk_bytes() <= 1000);
    assert!(log.disk_bytes() + 139 > 1000, "{}", log.disk_bytes());
    let mismatch = log.ensure_topic("l", 3).await.expect_err("count mismatch");
    assert!(
        mismatch
            .to_string()
            .contains("topic l has 2 partitions, config asks for 3"),
        "{mismatch}"
    );
    let unknown = log
        .append(&TopicPartition::new("l", 2), records("u", 1))
        .await;
    assert!(
        matches!(unknown, Err(LogError::UnknownPartition(_))),
        "{unknown:?}"
    );
    let unknown = log.read(&TopicPartition::new("nope", 0), 0, 1).await;
    assert!(
        matches!(unknown, Err(LogError::UnknownPartition(_))),
        "{unknown:?}"
    );
    assert!(log.ensure_topic(&"n".repeat(256), 1).await.is_err());
    assert!(log.ensure_topic(&"n".repeat(255), 1).await.is_ok());
}

fn append_ops() -> impl Strategy<Value = Vec<(u32, usize, usize)>> {
    prop::collection::vec((0u32..4, 1usize..5, 0usize..40), 1..40)
}

/// Applies `ops` (partition, batch size, value size) to a fresh log, reopens
/// it and returns what was appended and what was read back per partition.
fn append_reopen_read(ops: &[(u32, usize, usize)]) -> (Vec<Vec<Record>>, Vec<Vec<Record>>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = EmbeddedLogConfig {
        segment_bytes: 600,
        tail_cache_records: 3,
        ..EmbeddedLogConfig::with_dir(dir.path())
    };
    let mut appended: Vec<Vec<Record>> = vec![Vec::new(); 4];
    runtime.block_on(async {
        let log = EmbeddedLog::open(config.clone()).expect("open");
        log.ensure_topic("p", 4).await.expect("topic");
        for (index, (partition, count, value_bytes)) in ops.iter().enumerate() {
            let value = "x".repeat(*value_bytes);
            let batch: Vec<Record> = (0..*count)
                .map(|i| record(&format!("{index}"), &value, (index * 10 + i) as i64))
                .collect();
            let tp = TopicPartition::new("p", *partition);
            let first = log.append(&tp, batch.clone()).await.expect("append");
            assert_eq!(first, appended[*partition as usize].len() as u64);
            appended[*partition as usize].extend(batch);
        }
        log.close();
    });
    let reread = runtime.block_on(async {
        let log = EmbeddedLog::open(config).expect("reopen");
        let mut reread = Vec::new();
        for partition in 0..4 {
            let tp = TopicPartition::new("p", partition);
            reread.push(values(&read_all(&log, &tp).await));
        }
        reread
    });
    (appended, reread)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    // Any sequence of appends to any partitions reads back identically after reopen.
    #[test]
    fn appends_survive_reopen(ops in append_ops()) {
        let (appended, reread) = append_reopen_read(&ops);
        prop_assert_eq!(reread, appended);
    }
}

// Frames name their topic by a 32-bit id: a second topic with the id of another is refused by name, and the first keeps working.
#[tokio::test]
async fn a_topic_whose_frame_id_is_taken_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = EmbeddedLog::open(EmbeddedLogConfig::with_dir(dir.path())).expect("open");
    log.ensure_topic("costarring", 1).await.expect("topic");
    // "costarring" and "liquid" have the same FNV-1a hash.
    let error = log.ensure_topic("liquid", 1).await.expect_err("clash");
    assert!(
        error.to_string().contains("same frame id") && error.to_string().contains("costarring"),
        "{error}"
    );
    let tp = TopicPartition::new("costarring", 0);
    log.append(&tp, records("c", 2)).await.expect("append");
    log.close();
    let log = EmbeddedLog::open(EmbeddedLogConfig::with_dir(dir.path())).expect("reopen");
    assert_eq!(values(&read_all(&log, &tp).await), records("c", 2));
    assert!(log.ensure_topic("liquid", 1).await.is_err());
}
