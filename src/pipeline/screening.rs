//! Screening: the step before the debit, in the account processor, where
//! the payer's history is (its row). Pure logic over the payment, the rules
//! in force on the partition and what the payer's row keeps:
//! - `blocked_accounts`, `max_amount` and `velocity` reject;
//! - `review_above` holds the payment until an operator approves it (the
//!   inflight processor then sends the debit again) or declines it;
//! - `single_inflight_debit` makes a payment wait, in order, until the
//!   payer's previous payment is terminal (the inflight processor sends a
//!   `Release` to the payer when a screened payment completes).
//!
//! Velocity counts the payer's admitted payments by their own acceptance
//! times, so a replay or `kpay rebuild` decides the same.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::model::{Hop, PaymentRef, Reason, ScreeningRules};

/// Most payments of one payer waiting for their turn; one more is rejected
/// (`queue_full`), so a payer's row stays bounded.
pub const MAX_WAITING_PER_PAYER: usize = 1_000;

/// A payment waiting for its payer's previous one, with its lineage so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingPayment {
    pub payment: PaymentRef,
    #[serde(with = "crate::model::lineage")]
    pub lineage: Vec<Hop>,
}

/// What screening keeps of a payer, in its account row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payer {
    /// Acceptance times of the payer's latest admitted payments, in the
    /// order they were screened (at most the velocity count).
    pub recent_ms: VecDeque<i64>,
    /// The payment whose terminal state the next one waits for.
    pub current: Option<String>,
    /// Payments waiting for their turn, in order.
    pub waiting: VecDeque<WaitingPayment>,
}

impl Payer {
    /// Whether nothing is kept (the row then carries no payer part).
    pub fn is_empty(&self) -> bool {
        self.recent_ms.is_empty() && self.current.is_none() && self.waiting.is_empty()
    }
}

/// What screening decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Hold,
    Reject(Reason),
}

/// Screens `payment` from a payer whose row keeps `payer`.
pub fn screen(rules: &ScreeningRules, payer: Option<&Payer>, payment: &PaymentRef) -> Verdict {
    if rules.blocks(&payment.from) || rules.blocks(&payment.to) {
        return Verdict::Reject(Reason::Blocked);
    }
    if rules
        .max_amount
        .is_some_and(|max| payment.amount_cents > max)
    {
        return Verdict::Reject(Reason::LimitExceeded);
    }
    if let Some(velocity) = rules.velocity {
        let window_ms = i64::from(velocity.window_seconds) * 1_000;
        let since = payment.accepted_at_ms.saturating_sub(window_ms);
        let within = payer.map_or(0, |p| {
            p.recent_ms
                .iter()
                .filter(|at| **at > since && **at <= payment.accepted_at_ms)
                .count()
        });
        if within >= velocity.max_payments as usize {
            return Verdict::Reject(Reason::Velocity);
        }
    }
    if rules
        .review_above
        .is_some_and(|limit| payment.amount_cents > limit)
    {
        return Verdict::Hold;
    }
    Verdict::Pass
}

/// Counts an admitted payment (passed or held) for the velocity rule,
/// keeping only as many times as the rule counts.
pub fn count_admitted(rules: &ScreeningRules, payer: &mut Payer, accepted_at_ms: i64) {
    let Some(velocity) = rules.velocity else {
        payer.recent_ms.clear();
        return;
    };
    payer.recent_ms.push_back(accepted_at_ms);
    while payer.recent_ms.len() > velocity.max_payments as usize {
        payer.recent_ms.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Velocity;

    fn pay(id: &str, amount_cents: i64, accepted_at_ms: i64) -> PaymentRef {
        PaymentRef {
            id: id.into(),
            from: "a".into(),
            to: "b".into(),
            amount_cents,
            accepted_at_ms,
        }
    }

    // Each rule's outcome, in the documented order; no rules pass everything.
    #[test]
    fn rules_reject_hold_or_pass() {
        let off = ScreeningRules::default();
        assert_eq!(screen(&off, None, &pay("p", 1_000_000, 1)), Verdict::Pass);
        let rules = ScreeningRules {
            max_amount: Some(50_000),
            review_above: Some(20_000),
            blocked_accounts: Some(vec!["b".into()]),
            ..ScreeningRules::default()
        };
        assert_eq!(
            screen(&rules, None, &pay("p", 10, 1)),
            Verdict::Reject(Reason::Blocked)
        );
        let open = ScreeningRules {
            blocked_accounts: None,
            ..rules
        };
        let cases = [
            (50_001, Verdict::Reject(Reason::LimitExceeded)),
            (50_000, Verdict::Hold),
            (20_001, Verdict::Hold),
            (20_000, Verdict::Pass),
        ];
        for (amount, verdict) in cases {
            assert_eq!(
                screen(&open, None, &pay("p", amount, 1)),
                verdict,
                "{amount}"
            );
        }
    }

    // Velocity counts admitted payments by acceptance time within the window, and keeps no more times than it counts.
    #[test]
    fn velocity_counts_by_acceptance_time() {
        let rules = ScreeningRules {
            velocity: Some(Velocity {
                max_payments: 2,
                window_seconds: 10,
            }),
            ..ScreeningRules::default()
        };
        let mut payer = Payer::default();
        for at in [1_000, 2_000] {
            assert_eq!(
                screen(&rules, Some(&payer), &pay("p", 5, at)),
                Verdict::Pass
            );
            count_admitted(&rules, &mut payer, at);
        }
        let third = pay("p3", 5, 3_000);
        assert_eq!(
            screen(&rules, Some(&payer), &third),
            Verdict::Reject(Reason::Velocity)
        );
        // The first is out of the window 10 s after it.
        assert_eq!(
            screen(&rules, Some(&payer), &pay("p4", 5, 11_000)),
            Verdict::Pass
        );
        count_admitted(&rules, &mut payer, 11_000);
        assert_eq!(payer.recent_ms, VecDeque::from([2_000, 11_000]));
    }
}
