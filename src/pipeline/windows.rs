//! Tumbling windows over completed payments, by completion time: count,
//! amount, largest payment, counts by terminal status and an HDR histogram of
//! latency (acceptance → terminal state, from the timestamps the events carry,
//! so a replay after a restart rebuilds the same numbers).
//!
//! The confirmed processor keeps one set per partition in its statistics
//! (checkpointed with its offsets), since it already decodes every completion;
//! queries merge the partitions (HDR histograms add exactly).

use std::collections::{BTreeMap, VecDeque};

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::model::{Outcome, PaymentRef};

/// Largest latency tracked exactly; longer ones (a paused system) count as this.
pub const LATENCY_MAX_MS: u64 = 3_600_000;
/// Significant decimal digits of the latency histogram: values are within 1%.
pub const LATENCY_SIGNIFICANT_DIGITS: u8 = 2;

/// An HDR latency histogram in milliseconds, stored in its V2 encoding.
#[derive(Debug, Clone)]
pub struct Latency(pub Histogram<u32>);

impl Default for Latency {
    fn default() -> Self {
        Self(
            Histogram::new_with_bounds(1, LATENCY_MAX_MS, LATENCY_SIGNIFICANT_DIGITS)
                .expect("static histogram bounds are valid"),
        )
    }
}

impl PartialEq for Latency {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut bytes)
            .map_err(serde::ser::Error::custom)?;
        serializer.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: Vec<u8> = serde_bytes_vec(deserializer)?;
        let histogram: Histogram<u32> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(serde::de::Error::custom)?;
        Ok(Self(histogram))
    }
}

fn serde_bytes_vec<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    struct Bytes;
    impl<'de> serde::de::Visitor<'de> for Bytes {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("histogram bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_bytes(Bytes)
}

/// One tumbling window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Start, ms since the epoch, a multiple of the window length.
    pub start_ms: i64,
    /// Payments that reached a terminal state in the window.
    pub count: u64,
    /// Their total amount (saturating: a metric never fails a payment).
    pub amount_cents: i64,
    /// The largest of them.
    pub largest_cents: i64,
    /// Count per terminal status.
    pub by_status: BTreeMap<String, u64>,
    /// Acceptance → terminal latency, ms.
    pub latency: Latency,
}

/// The windows kept, oldest first, and how they are cut.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowStats {
    /// Window length; windows built with another length are dropped on start.
    pub window_ms: i64,
    /// How many windows are kept.
    pub keep: usize,
    /// Oldest first; at most `keep`.
    pub windows: VecDeque<Window>,
    /// Completions too old for any kept window.
    pub late_dropped: u64,
}

impl WindowStats {
    /// Windows of `window_ms`, the newest `keep` kept (0: record nothing).
    pub fn new(window_ms: i64, keep: usize) -> Self {
        Self {
            window_ms: window_ms.max(1),
            keep,
            ..Self::default()
        }
    }

    /// Takes the configured shape; windows cut another way are dropped.
    pub fn configure(&mut self, window_ms: i64, keep: usize) {
        if self.window_ms != window_ms.max(1) {
            *self = Self::new(window_ms, keep);
        }
        self.keep = keep;
        while self.windows.len() > self.keep {
            self.windows.pop_front();
        }
    }

    /// Counts one completed payment in the window of its completion time.
    pub fn record(&mut self, payment: &PaymentRef, outcome: Outcome, completed_at_ms: i64) {
        if self.keep == 0 {
            return;
        }
        let latency_ms = (completed_at_ms - payment.accepted_at_ms).max(0) as u64;
        let Some(window) = self.window_for(completed_at_ms) else {
            self.late_dropped += 1;
            return;
        };
        window.count += 1;
        window.amount_cents = window.amount_cents.saturating_add(payment.amount_cents);
        window.largest_cents = window.largest_cents.max(payment.amount_cents);
        let status = outcome.status().as_str();
        match window.by_status.get_mut(status) {
            Some(count) => *count += 1,
            None => {
                window.by_status.insert(status.to_owned(), 1);
            }
        }
        window.latency.0.saturating_record(latency_ms.max(1));
    }

    /// Adds partitions' windows together, window by window.
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a WindowStats>) -> WindowStats {
        let mut merged = WindowStats::default();
        let mut by_start: BTreeMap<i64, Window> = BTreeMap::new();
        for part in parts {
            merged.window_ms = part.window_ms;
            merged.keep = merged.keep.max(part.keep);
            merged.late_dropped += part.late_dropped;
            for window in &part.windows {
                let into = by_start
                    .entry(window.start_ms)
                    .or_insert_with(|| new_window(window.start_ms));
                into.count += window.count;
                into.amount_cents = into.amount_cents.saturating_add(window.amount_cents);
                into.largest_cents = into.largest_cents.max(window.largest_cents);
                for (status, n) in &window.by_status {
                    *into.by_status.entry(status.clone()).or_default() += n;
                }
                // Same bounds everywhere, so adding cannot fail.
                let _ = into.latency.0.add(&window.latency.0);
            }
        }
        let skip = by_start.len().saturating_sub(merged.keep);
        merged.windows = by_start.into_values().skip(skip).collect();
        merged
    }

    /// The window a completion time falls in, created if needed; `None` if
    /// it is older than every kept window.
    fn window_for(&mut self, completed_at_ms: i64) -> Option<&mut Window> {
        let start_ms = completed_at_ms.div_euclid(self.window_ms) * self.window_ms;
        let position = self.windows.iter().position(|w| w.start_ms >= start_ms);
        let index = match position {
            Some(i) if self.windows[i].start_ms == start_ms => i,
            Some(0) if self.windows.len() >= self.keep => return None,
            Some(i) => {
                self.windows.insert(i, new_window(start_ms));
                i
            }
            None => {
                self.windows.push_back(new_window(start_ms));
                self.windows.len() - 1
            }
        };
        if self.windows.len() > self.keep {
            self.windows.pop_front();
            return (index > 0).then(|| &mut self.windows[index - 1]);
        }
        Some(&mut self.windows[index])
    }
}

fn new_window(start_ms: i64) -> Window {
    Window {
        start_ms,
        ..Window::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Reason;

    /// A completion: (accepted at, completed at, amount, outcome).
    type Done = (i64, i64, i64, Outcome);

    fn done(
        accepted_at_ms: i64,
        completed_at_ms: i64,
        amount_cents: i64,
        outcome: Outcome,
    ) -> Done {
        (accepted_at_ms, completed_at_ms, amount_cents, outcome)
    }

    fn apply(
        stats: &mut WindowStats,
        (accepted_at_ms, completed_at_ms, amount_cents, outcome): Done,
    ) {
        let payment = PaymentRef {
            id: "p".into(),
            from: "a".into(),
            to: "b".into(),
            amount_cents,
            accepted_at_ms,
        };
        stats.record(&payment, outcome, completed_at_ms);
    }

    // Completions land in the window of their completion time, across boundaries, with counts, sums and largest.
    #[test]
    fn completions_fill_tumbling_windows() {
        let mut stats = WindowStats::new(60_000, 3);
        apply(&mut stats, done(59_990, 59_999, 100, Outcome::Confirmed));
        apply(&mut stats, done(59_990, 60_000, 250, Outcome::Confirmed));
        apply(
            &mut stats,
            done(
                60_000,
                60_010,
                7,
                Outcome::Rejected(Reason::InsufficientFunds),
            ),
        );
        let starts: Vec<i64> = stats.windows.iter().map(|w| w.start_ms).collect();
        assert_eq!(starts, vec![0, 60_000]);
        let (first, second) = (&stats.windows[0], &stats.windows[1]);
        assert_eq!(
            (first.count, first.amount_cents, first.largest_cents),
            (1, 100, 100)
        );
        assert_eq!(
            (second.count, second.amount_cents, second.largest_cents),
            (2, 257, 250)
        );
        assert_eq!(second.by_status["rejected"], 1);
        assert_eq!(second.latency.0.max(), 10);
    }

    // Late events join their (kept) window in order; events older than every kept window are counted as dropped.
    #[test]
    fn late_events() {
        let mut stats = WindowStats::new(1_000, 2);
        apply(&mut stats, done(0, 5_500, 1, Outcome::Confirmed));
        apply(&mut stats, done(0, 3_200, 1, Outcome::Confirmed));
        let starts: Vec<i64> = stats.windows.iter().map(|w| w.start_ms).collect();
        assert_eq!(starts, vec![3_000, 5_000]);
        apply(&mut stats, done(0, 4_100, 1, Outcome::Confirmed));
        let starts: Vec<i64> = stats.windows.iter().map(|w| w.start_ms).collect();
        assert_eq!(starts, vec![4_000, 5_000], "the oldest window makes room");
        apply(&mut stats, done(0, 1_000, 1, Outcome::Confirmed));
        assert_eq!(stats.late_dropped, 1);
        let total: u64 = stats.windows.iter().map(|w| w.count).sum();
        assert_eq!(total, 2);
    }

    // Windows survive the checkpoint encoding exactly (a restart mid-window keeps its numbers).
    #[test]
    fn windows_round_trip_through_the_store_encoding() {
        let mut stats = WindowStats::new(60_000, 60);
        for n in 0..1_000 {
            apply(&mut stats, done(n, n + (n % 97) + 1, n, Outcome::Confirmed));
        }
        let bytes = crate::store::encode_row(&stats);
        let back: WindowStats = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, stats);
        assert_eq!(back.windows[0].latency.0.len(), 1_000);
    }

    // Partitions merge window by window: counts and amounts add, histograms add exactly, only `keep` windows remain.
    #[test]
    fn partitions_merge() {
        let (mut left, mut right) = (WindowStats::new(1_000, 2), WindowStats::new(1_000, 2));
        apply(&mut left, done(0, 500, 10, Outcome::Confirmed));
        apply(&mut left, done(0, 1_500, 20, Outcome::Confirmed));
        apply(
            &mut right,
            done(
                1_000,
                1_900,
                30,
                Outcome::Rejected(Reason::InsufficientFunds),
            ),
        );
        apply(&mut right, done(2_000, 2_100, 40, Outcome::Confirmed));
        let merged = WindowStats::merge([&left, &right]);
        let starts: Vec<i64> = merged.windows.iter().map(|w| w.start_ms).collect();
        assert_eq!(starts, vec![1_000, 2_000]);
        let middle = &merged.windows[0];
        assert_eq!(
            (middle.count, middle.amount_cents, middle.largest_cents),
            (2, 50, 30)
        );
        assert_eq!(middle.latency.0.len(), 2);
        assert!(middle.latency.0.equivalent(middle.latency.0.max(), 1_500));
        assert_eq!(middle.by_status["rejected"], 1);
    }

    // Zero windows kept means nothing is recorded (instrumentation off).
    #[test]
    fn zero_keep_records_nothing() {
        let mut stats = WindowStats::new(1_000, 0);
        apply(&mut stats, done(0, 5, 1, Outcome::Confirmed));
        assert!(stats.windows.is_empty() && stats.late_dropped == 0);
    }

    // A new window length drops windows cut the old way; a smaller count trims the oldest.
    #[test]
    fn configure_reshapes() {
        let mut stats = WindowStats::new(1_000, 5);
        for t in 0..5 {
            apply(&mut stats, done(0, t * 1_000, 1, Outcome::Confirmed));
        }
        stats.configure(1_000, 2);
        assert_eq!(stats.windows.len(), 2);
        assert_eq!(stats.windows[0].start_ms, 3_000);
        stats.configure(10_000, 2);
        assert!(stats.windows.is_empty());
    }
}
