//! Held payments: screening holds a payment for review (a `Held` event on
//! `payment.complete`), and an operator's review (a `Review` record on
//! `payment.incoming`, so that pause holds it too) approves it, which sends
//! its debit again past screening, or declines it, which ends it as
//! rejected. A held payment is counted apart from the inflight ones: it
//! moves no money until approved, and a pause drains without it.

use super::{InflightStats, PaymentState, MAX_HELD_PER_PARTITION};
use crate::model::{Event, Hop, Outcome, PaymentRef, PaymentStatus, Reason, Stage};
use crate::pipeline::ProcessError;
use crate::pipeline::{checked_add, checked_sub, completed, hop, Ctx, Emit, OutTopic};

/// Screening held the payment: it leaves the inflight totals for the held
/// ones, or is rejected when the partition holds as many as it keeps.
pub(super) fn held(
    state: &mut Option<PaymentState>,
    stats: &mut InflightStats,
    payment: &PaymentRef,
    lineage: Vec<Hop>,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    let Some(row) = state.as_mut().filter(|r| r.payment.same_request(payment)) else {
        return Err(ProcessError::ImpossibleState(format!(
            "hold of payment {} that was not admitted",
            payment.id
        )));
    };
    if row.status != PaymentStatus::Inflight {
        return Ok(None);
    }
    if stats.held_ids.len() >= MAX_HELD_PER_PARTITION {
        // Stays inflight until its completion comes back.
        row.lineage = lineage;
        let outcome = Outcome::Rejected(Reason::QueueFull);
        return Ok(Some(completed(
            row.payment.clone(),
            outcome,
            row.lineage.clone(),
            ctx,
        )));
    }
    let amount = row.payment.amount_cents;
    let inflight = checked_sub(stats.inflight_amount_cents, amount, "inflight")?;
    let held = checked_add(stats.held_amount_cents, amount, "held")?;
    assert!(stats.inflight_count > 0, "inflight count below zero");
    stats.inflight_count -= 1;
    stats.inflight_amount_cents = inflight;
    stats.held_count += 1;
    stats.held_amount_cents = held;
    stats.held_ids.insert(row.payment.id.clone());
    row.status = PaymentStatus::Held;
    row.lineage = lineage;
    row.lineage.push(hop(Stage::Held, ctx));
    Ok(None)
}

/// An operator's review. A payment that is not held (any more) is left
/// as it is: the API answered the operator before appending.
pub(super) fn review(
    state: &mut Option<PaymentState>,
    stats: &mut InflightStats,
    approve: bool,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    let Some(row) = state.as_mut().filter(|r| r.status == PaymentStatus::Held) else {
        return Ok(None);
    };
    let amount = row.payment.amount_cents;
    let held = checked_sub(stats.held_amount_cents, amount, "held")?;
    let inflight = checked_add(stats.inflight_amount_cents, amount, "inflight")?;
    assert!(stats.held_count > 0, "held count below zero");
    stats.held_count -= 1;
    stats.held_amount_cents = held;
    stats.held_ids.remove(&row.payment.id);
    if approve {
        stats.inflight_count += 1;
        stats.inflight_amount_cents = inflight;
        row.status = PaymentStatus::Inflight;
        row.lineage.push(hop(Stage::Approved, ctx));
        return Ok(Some(Emit {
            topic: OutTopic::Inflight,
            key: row.payment.from.clone(),
            event: Event::Debit {
                payment: row.payment.clone(),
                lineage: row.lineage.clone(),
            },
        }));
    }
    // Ended when the operator's decline was appended: the same in a replay.
    let ctx = &Ctx {
        now_ms: ctx.received_at_ms,
        ..*ctx
    };
    row.status = PaymentStatus::Rejected;
    row.reason = Some(Reason::Declined);
    row.completed_at_ms = Some(ctx.now_ms);
    row.lineage.push(hop(Stage::Declined, ctx));
    let outcome = Outcome::Rejected(Reason::Declined);
    Ok(Some(completed(
        row.payment.clone(),
        outcome,
        row.lineage.clone(),
        ctx,
    )))
}
