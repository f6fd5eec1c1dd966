//! The confirmed processor: reads `payment.complete`, keeps the business
//! totals (confirmed count and value, also for the current UTC day; rejected
//! and reversed counts by reason) and forwards confirmed payments to
//! `payment.confirmed`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::windows::WindowStats;
use super::{checked_add, Ctx, Emit, OutTopic, ProcessError, Processor};
use crate::model::{Event, Outcome};

/// Milliseconds in a UTC day; "today" is `completed_at_ms / MS_PER_DAY`.
pub const MS_PER_DAY: i64 = 86_400_000;

/// Business totals of one partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfirmedStats {
    /// Payments that moved money.
    pub confirmed_count: u64,
    /// Money they moved.
    pub confirmed_amount_cents: i64,
    /// The UTC day (days since the epoch) `today_*` counts.
    pub today_day: i64,
    /// Confirmed payments completed on `today_day`.
    pub today_count: u64,
    /// Their value.
    pub today_amount_cents: i64,
    /// Payments refused before money moved.
    pub rejected_count: u64,
    /// Rejections per reason code.
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Payments whose credit failed and whose debit was refunded.
    pub reversed_count: u64,
    /// Reversals per reason code.
    pub reversed_by_reason: BTreeMap<String, u64>,
    /// Throughput and latency windows of this partition (pillar 2); kept
    /// here because this processor already reads every completion.
    pub windows: WindowStats,
}

impl ConfirmedStats {
    /// Adds another partition's totals; its `today_*` count only when it
    /// counts the day `self.today_day` names (windows are not added).
    pub fn add(&mut self, other: &Self) {
        self.confirmed_count += other.confirmed_count;
        self.confirmed_amount_cents += other.confirmed_amount_cents;
        if other.today_day == self.today_day {
            self.today_count += other.today_count;
            self.today_amount_cents += other.today_amount_cents;
        }
        self.rejected_count += other.rejected_count;
        self.reversed_count += other.reversed_count;
        for (reason, n) in &other.rejected_by_reason {
            *self.rejected_by_reason.entry(reason.clone()).or_default() += n;
        }
        for (reason, n) in &other.reversed_by_reason {
            *self.reversed_by_reason.entry(reason.clone()).or_default() += n;
        }
    }
}

pub struct Confirmed;

impl Processor for Confirmed {
    /// No per-key state: totals only.
    type State = ();
    type Stats = ConfirmedStats;
    const NAME: &'static str = "confirmed";
    const TABLE: &'static str = "-";
    /// Every completion passes here once: the live view and the latency
    /// histogram observe them.
    const OBSERVED: bool = true;

    fn handle(
        _state: &mut Option<()>,
        stats: &mut ConfirmedStats,
        event: Event,
        _ctx: &Ctx,
    ) -> Result<Option<Emit>, ProcessError> {
        let Event::Completed {
            payment,
            outcome,
            completed_at_ms,
            lineage,
        } = event
        else {
            return match event {
                // Steps on the way, for the inflight processor: not an end.
                Event::Held { .. } | Event::Waiting { .. } => Ok(None),
                _ => Err(ProcessError::UnexpectedEvent { kind: event.kind() }),
            };
        };
        stats.windows.record(&payment, outcome, completed_at_ms);
        match outcome {
            Outcome::Confirmed => {
                let amount = payment.amount_cents;
                let total = checked_add(stats.confirmed_amount_cents, amount, "confirmed")?;
                let day = completed_at_ms.div_euclid(MS_PER_DAY);
                if day > stats.today_day {
                    stats.today_day = day;
                    stats.today_count = 0;
                    stats.today_amount_cents = 0;
                }
                if day == stats.today_day {
                    stats.today_amount_cents =
                        checked_add(stats.today_amount_cents, amount, "today")?;
                    stats.today_count += 1;
                }
                stats.confirmed_amount_cents = total;
                stats.confirmed_count += 1;
                Ok(Some(Emit {
                    topic: OutTopic::Confirmed,
                    key: payment.id.clone(),
                    event: Event::Completed {
                        payment,
                        outcome,
                        completed_at_ms,
                        lineage,
                    },
                }))
            }
            Outcome::Rejected(reason) => {
                stats.rejected_count += 1;
                *stats
                    .rejected_by_reason
                    .entry(reason.as_str().to_owned())
                    .or_default() += 1;
                Ok(None)
            }
            Outcome::Reversed(reason) => {
                stats.reversed_count += 1;
                *stats
                    .reversed_by_reason
                    .entry(reason.as_str().to_owned())
                    .or_default() += 1;
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PaymentRef, Reason, SourceTopic};

    fn done(amount_cents: i64, outcome: Outcome, completed_at_ms: i64) -> Event {
        Event::Completed {
            payment: PaymentRef {
                id: "p".into(),
                from: "a".into(),
                to: "b".into(),
                amount_cents,
                accepted_at_ms: 0,
            },
            outcome,
            completed_at_ms,
            lineage: vec![],
        }
    }

    // Totals count each outcome; "today" restarts when a new UTC day begins; only confirmed payments are forwarded.
    #[test]
    fn totals_and_today() {
        let mut stats = ConfirmedStats::default();
        let ctx = Ctx {
            topic: SourceTopic::Complete,
            partition: 0,
            offset: 0,
            received_at_ms: 0,
            now_ms: 0,
            partitions: 1,
            forgotten_before_ms: i64::MIN,
            max_amount_cents: 100_000_000_000,
            submitted_by: None,
        };
        let mut apply = |event| Confirmed::handle(&mut None, &mut stats, event, &ctx).unwrap();
        assert!(apply(done(100, Outcome::Confirmed, MS_PER_DAY + 5)).is_some());
        assert!(apply(done(7, Outcome::Rejected(Reason::InsufficientFunds), 0)).is_none());
        apply(done(9, Outcome::Reversed(Reason::UnknownAccount), 0));
        apply(done(50, Outcome::Confirmed, 2 * MS_PER_DAY + 1));
        assert_eq!(
            (stats.confirmed_count, stats.confirmed_amount_cents),
            (2, 150)
        );
        assert_eq!((stats.today_count, stats.today_amount_cents), (1, 50));
        assert_eq!(stats.rejected_by_reason["insufficient_funds"], 1);
        assert_eq!(stats.reversed_count, 1);
    }
}
