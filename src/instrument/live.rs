//! The live view: one-second buckets of the last two minutes by completion
//! time (count, amount, latency histogram), for the dashboard's charts.
//! In memory only: the durable, per-partition windows are
//! `pipeline::windows`; this is what "right now" looks like. The runtime
//! hands it every completion as the confirmed processor applies it
//! (`runtime::Observer`), together with the Prometheus latency histogram.

use std::sync::{Mutex, OnceLock};

use hdrhistogram::Histogram;
use serde::Serialize;
use utoipa::ToSchema;

use crate::model::Event;
use crate::runtime::Observer;

/// Seconds kept.
pub const SECONDS: usize = 120;

struct Bucket {
    /// The second (since the epoch) this bucket counts; another means empty.
    second: i64,
    count: u64,
    amount_cents: i64,
    latency_ms: Histogram<u32>,
}

/// The last [`SECONDS`] seconds of completions, one bucket per second.
#[derive(Default)]
pub struct LiveView {
    buckets: Mutex<Vec<Bucket>>,
}

fn histogram() -> Histogram<u32> {
    // 1 ms to 1 h at 2 significant digits, as the durable windows.
    Histogram::new_with_bounds(1, 3_600_000, 2).expect("valid bounds")
}

impl Observer for LiveView {
    fn observe(&self, event: &Event) {
        let Event::Completed {
            payment,
            completed_at_ms,
            ..
        } = event
        else {
            return;
        };
        // The handle is looked up once; the recorder is installed before
        // the runtime starts.
        static LATENCY: OnceLock<metrics::Histogram> = OnceLock::new();
        let latency_ms = (completed_at_ms - payment.accepted_at_ms).max(0);
        LATENCY
            .get_or_init(|| metrics::histogram!("kpay_payment_latency_seconds"))
            .record(latency_ms as f64 / 1_000.0);
        self.record(*completed_at_ms, latency_ms, payment.amount_cents);
    }
}

/// One second of completions.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct LivePoint {
    /// Start of the second, ms since the epoch.
    pub at: i64,
    /// Payments that reached a terminal state in it (= per second).
    pub count: u64,
    /// Their amount, cents.
    pub amount: i64,
    /// Latency acceptance → terminal; absent when nothing completed.
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
}

impl LiveView {
    /// Counts one completion (called for every payment that reaches a terminal state).
    pub fn record(&self, completed_at_ms: i64, latency_ms: i64, amount_cents: i64) {
        let second = completed_at_ms.div_euclid(1_000);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.is_empty() {
            buckets.extend((0..SECONDS).map(|_| Bucket {
                second: i64::MIN,
                count: 0,
                amount_cents: 0,
                latency_ms: histogram(),
            }));
        }
        let bucket = &mut buckets[second.rem_euclid(SECONDS as i64) as usize];
        if bucket.second != second {
            if bucket.second > second {
                return; // older than the ring
            }
            bucket.second = second;
            bucket.count = 0;
            bucket.amount_cents = 0;
            bucket.latency_ms.reset();
        }
        bucket.count += 1;
        bucket.amount_cents = bucket.amount_cents.saturating_add(amount_cents);
        let _ = bucket
            .latency_ms
            .record(latency_ms.clamp(1, 3_600_000) as u64);
    }

    /// The complete seconds before `now_ms`, oldest first (at most [`SECONDS`] − 1).
    pub fn points(&self, now_ms: i64) -> Vec<LivePoint> {
        let current = now_ms.div_euclid(1_000);
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        (current - SECONDS as i64 + 1..current)
            .map(|second| {
                let bucket = buckets
                    .get(second.rem_euclid(SECONDS as i64) as usize)
                    .filter(|b| b.second == second && b.count > 0);
                LivePoint {
                    at: second * 1_000,
                    count: bucket.map_or(0, |b| b.count),
                    amount: bucket.map_or(0, |b| b.amount_cents),
                    p50_ms: bucket.map(|b| b.latency_ms.value_at_quantile(0.5)),
                    p99_ms: bucket.map(|b| b.latency_ms.value_at_quantile(0.99)),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Completions land in their second; the current second is left out; old seconds fall off the ring.
    #[test]
    fn seconds_count_and_roll() {
        let live = LiveView::default();
        let base = 1_000_000_000_000; // a whole second
        for n in 0..10 {
            live.record(base + 100 + n, 5, 100);
        }
        live.record(base + 1_500, 50, 7);
        let now = base + 2_000;
        let seen = live.points(now);
        assert_eq!(seen.len(), SECONDS - 1);
        let last = seen.last().unwrap();
        assert_eq!((last.at, last.count, last.amount), (base + 1_000, 1, 7));
        let before = &seen[seen.len() - 2];
        assert_eq!((before.at, before.count, before.amount), (base, 10, 1_000));
        assert_eq!(before.p50_ms, Some(5));
        assert_eq!(seen[0].count, 0);
        assert!(seen[0].p99_ms.is_none());
        // Much later: the old seconds are gone, and a late record is ignored.
        let later = base + 1_000 * SECONDS as i64 * 3;
        live.record(later, 1, 1);
        live.record(base, 1, 1);
        assert!(live
            .points(later + 1_000)
            .iter()
            .all(|p| p.at > base + 1_000));
        assert_eq!(live.points(later + 1_000).last().unwrap().count, 1);
    }
}
