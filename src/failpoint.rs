//! Crash points for reliability drills: `KPAY_CRASH_AT=<point>[:<nth>]` makes
//! the process abort (`std::process::abort()`: no destructors, no flush, no
//! graceful anything, like `kill -9`) the `nth` time (default 1) it passes the
//! named point. `kpay serve` reads the variable once at start
//! ([`arm_from_env`]) and refuses a name it does not know, listing the valid
//! ones. Unset, a point costs one atomic load. Before aborting the process
//! writes `kpay: crash drill: aborting at <point> (pass <nth>)` to stderr, so
//! a drill can tell its crash from any other. `tests/crash_matrix.rs` runs
//! every point on both backends.
//!
//! The points, in a payment's path (the IO layers only; the processors in
//! `pipeline` stay pure logic):
//!
//! | point | where |
//! |---|---|
//! | `ingest.before_append` | intake: a group of new payments decided, not yet appended to `payment.incoming` |
//! | `ingest.after_append` | intake: the group durable in the log, no 202 sent yet |
//! | `log.mid_write` | embedded log: a group commit of 2+ records written up to the middle of its last frame, not synced (a torn write) |
//! | `kafka.mid_append` | Kafka log: one append split in several produce requests, the first acknowledged, the rest not sent |
//! | `task.mid_produce` | task: one topic-partition of a batch's outputs appended, the others maybe not (2+ partitions) |
//! | `task.after_produce` | task: every output of a batch appended, no checkpoint yet |
//! | `task.before_commit` | task: a checkpoint (rows, offsets, dead letters, stats) built, not written |
//! | `store.mid_commit` | store: a checkpoint of several chunks cut after the undo record and its first chunk, those flushed |
//! | `task.after_commit` | task: the checkpoint written and flushed, before the next read |
//! | `dlq.after_reserve` | DLQ replay: the sequence number reserved and flushed, nothing appended |
//! | `dlq.after_append` | DLQ replay: the record appended, the letter not yet settled |
//!
//! A task's state rows, input offsets, applied sources, statistics and dead
//! letters go to the store in one atomic sled batch ([`crate::store::Store::commit`]),
//! so there is no moment between "state written" and "offsets committed":
//! the drill crashes on both sides of that batch (`task.before_commit`,
//! `task.after_commit`) and, for a checkpoint larger than one batch, between
//! its chunks (`store.mid_commit`, which the undo record rolls back).
//!
//! The two points after a store write (`store.mid_commit`, `task.after_commit`)
//! flush the store before aborting: sled writes in the background, so a real
//! crash may come after any flush, and the drill takes the case where the
//! partial (or complete) checkpoint is on disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A named place where a drill can crash the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    IngestBeforeAppend,
    IngestAfterAppend,
    LogMidWrite,
    KafkaMidAppend,
    TaskMidProduce,
    TaskAfterProduce,
    TaskBeforeCommit,
    StoreMidCommit,
    TaskAfterCommit,
    DlqAfterReserve,
    DlqAfterAppend,
}

impl Point {
    /// Every point, in a payment's path.
    pub const ALL: [Point; 11] = [
        Point::IngestBeforeAppend,
        Point::IngestAfterAppend,
        Point::LogMidWrite,
        Point::KafkaMidAppend,
        Point::TaskMidProduce,
        Point::TaskAfterProduce,
        Point::TaskBeforeCommit,
        Point::StoreMidCommit,
        Point::TaskAfterCommit,
        Point::DlqAfterReserve,
        Point::DlqAfterAppend,
    ];

    /// The name used in `KPAY_CRASH_AT`.
    pub fn name(self) -> &'static str {
        match self {
            Point::IngestBeforeAppend => "ingest.before_append",
            Point::IngestAfterAppend => "ingest.after_append",
            Point::LogMidWrite => "log.mid_write",
            Point::KafkaMidAppend => "kafka.mid_append",
            Point::TaskMidProduce => "task.mid_produce",
            Point::TaskAfterProduce => "task.after_produce",
            Point::TaskBeforeCommit => "task.before_commit",
            Point::StoreMidCommit => "store.mid_commit",
            Point::TaskAfterCommit => "task.after_commit",
            Point::DlqAfterReserve => "dlq.after_reserve",
            Point::DlqAfterAppend => "dlq.after_append",
        }
    }

    pub fn from_name(name: &str) -> Option<Point> {
        Point::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// The armed point: where, on which pass, and the passes so far.
#[derive(Debug)]
struct Armed {
    point: Point,
    nth: u64,
    passes: AtomicU64,
}

/// Set once at start; empty (never set) in every process that is not a drill.
static ARMED: OnceLock<Armed> = OnceLock::new();

/// The environment variable naming the crash point.
pub const ENV: &str = "KPAY_CRASH_AT";

/// Parses `<point>[:<nth>]`; `nth` counts from 1.
pub fn parse(spec: &str) -> Result<(Point, u64), String> {
    let (name, nth) = match spec.split_once(':') {
        Some((name, nth)) => {
            let nth = nth.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                format!("{ENV}={spec}: the pass after ':' must be a number from 1 up")
            })?;
            (name, nth)
        }
        None => (spec, 1),
    };
    let point = Point::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Point::ALL.iter().map(|p| p.name()).collect();
        format!(
            "{ENV}={spec}: unknown crash point {name:?}; valid points: {}",
            names.join(", ")
        )
    })?;
    Ok((point, nth))
}

/// Arms the point named by `KPAY_CRASH_AT`, if set (once per process; later
/// calls keep the first). Returns the armed point, or an error naming the
/// valid points.
pub fn arm_from_env() -> Result<Option<(Point, u64)>, String> {
    let spec = match std::env::var(ENV) {
        Ok(spec) if !spec.trim().is_empty() => spec,
        Ok(_) | Err(std::env::VarError::NotPresent) => return Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => return Err(format!("{ENV} is not UTF-8")),
    };
    let (point, nth) = parse(spec.trim())?;
    let armed = ARMED.get_or_init(|| Armed {
        point,
        nth,
        passes: AtomicU64::new(0),
    });
    tracing::warn!(
        point = armed.point.name(),
        nth = armed.nth,
        "crash drill armed: the process will abort at this point"
    );
    Ok(Some((armed.point, armed.nth)))
}

/// Counts a pass at `point`; true when it is the armed point's nth pass (the
/// caller then finishes setting the scene and calls [`crash`]).
#[inline]
pub fn reached(point: Point) -> bool {
    match ARMED.get() {
        None => false,
        Some(armed) => {
            armed.point == point && armed.passes.fetch_add(1, Ordering::Relaxed) + 1 == armed.nth
        }
    }
}

/// Aborts the process at `point`, saying so on stderr first.
#[cold]
pub fn crash(point: Point) -> ! {
    let nth = ARMED.get().map_or(0, |a| a.nth);
    eprintln!(
        "kpay: crash drill: aborting at {} (pass {nth})",
        point.name()
    );
    std::process::abort()
}

/// A crash point: aborts the process on the armed point's nth pass.
#[inline]
pub fn pass(point: Point) {
    if reached(point) {
        crash(point);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Names round-trip; a pass defaults to 1; unknown names and bad passes are refused with the valid names listed.
    #[test]
    fn specs_parse_and_unknown_names_are_refused() {
        for point in Point::ALL {
            assert_eq!(Point::from_name(point.name()), Some(point));
            assert_eq!(parse(point.name()).unwrap(), (point, 1));
        }
        assert_eq!(
            parse("task.after_commit:7").unwrap(),
            (Point::TaskAfterCommit, 7)
        );
        let error = parse("task.after_comit:3").unwrap_err();
        assert!(
            error.contains("unknown crash point \"task.after_comit\""),
            "{error}"
        );
        for point in Point::ALL {
            assert!(error.contains(point.name()), "{error}");
        }
        for bad in [
            "ingest.before_append:0",
            "ingest.before_append:x",
            "ingest.before_append:",
        ] {
            assert!(parse(bad).unwrap_err().contains("number from 1"), "{bad}");
        }
    }

    // Unarmed (as in every test process), a point is never reached.
    #[test]
    fn unarmed_points_pass() {
        for point in Point::ALL {
            assert!(!reached(point));
            pass(point);
        }
    }
}
