//! The inflight processor: owns each payment's state (dedup, status, lineage)
//! and the inflight count and value. Reads `payment.incoming` (admits new
//! payments, emits DEBIT keyed by `from`) and `payment.complete` (records the
//! terminal state).

use serde::{Deserialize, Serialize};

mod review;
mod row;

use super::{
    checked_add, checked_sub, completed, hop, Ctx, Emit, OutTopic, ProcessError, Processor,
};
use crate::model::{
    partition_for, validate_id, Event, Hop, Outcome, PaymentRef, PaymentStatus, Reason,
    SourceTopic, Stage, Submitter,
};

/// A payment as the inflight processor knows it: the `payments` state table row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaymentState {
    /// The request as accepted.
    pub payment: PaymentRef,
    /// Where it is now.
    pub status: PaymentStatus,
    /// Why it was rejected or reversed.
    pub reason: Option<Reason>,
    /// When it reached its terminal state.
    pub completed_at_ms: Option<i64>,
    /// Every hop it took, in order.
    #[serde(serialize_with = "crate::model::lineage::serialize")]
    pub lineage: Vec<Hop>,
    /// Who submitted it; `None` for records other producers wrote (see
    /// `model::Submitter`). Last, so rows written before it read as `None`.
    pub submitted_by: Option<Submitter>,
    /// The payer's payment this one waits (or waited) for
    /// (`single_inflight_debit`).
    pub waiting_for: Option<String>,
}

/// Inflight statistics of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InflightStats {
    /// Payments admitted and not yet terminal.
    pub inflight_count: u64,
    /// Their total amount.
    pub inflight_amount_cents: i64,
    /// Payments admitted since the start of the log.
    pub admitted_count: u64,
    /// Copies of an already known payment id that were ignored.
    pub duplicate_count: u64,
    /// Payments held by screening for review (not counted as inflight).
    pub held_count: u64,
    /// Their total amount.
    pub held_amount_cents: i64,
    /// Their ids (at most [`MAX_HELD_PER_PARTITION`]); totals over
    /// partitions leave them out.
    pub held_ids: std::collections::BTreeSet<String>,
}

/// Most payments held for review on one partition; one more is rejected
/// (`queue_full`) instead of held, so the held list stays bounded.
pub const MAX_HELD_PER_PARTITION: usize = 10_000;

impl InflightStats {
    /// Adds another partition's statistics (for totals over all partitions).
    pub fn add(&mut self, other: &Self) {
        self.inflight_count += other.inflight_count;
        self.inflight_amount_cents += other.inflight_amount_cents;
        self.admitted_count += other.admitted_count;
        self.duplicate_count += other.duplicate_count;
        self.held_count += other.held_count;
        self.held_amount_cents += other.held_amount_cents;
    }
}

pub struct Inflight;

impl Processor for Inflight {
    type State = PaymentState;
    type Stats = InflightStats;
    const NAME: &'static str = "inflight";
    const TABLE: &'static str = "p";

    fn state_key(event: &Event) -> Option<&str> {
        match event {
            Event::PaymentSubmitted(payment)
            | Event::Completed { payment, .. }
            | Event::Held { payment, .. }
            | Event::Waiting { payment, .. } => Some(&payment.id),
            Event::Review { payment_id, .. } => Some(payment_id),
            _ => None,
        }
    }

    fn prerequisite(event: &Event) -> Option<(SourceTopic, u32, u64)> {
        if let Event::Review {
            held_partition,
            held_offset,
            ..
        } = event
        {
            return Some((SourceTopic::Complete, *held_partition, *held_offset));
        }
        let (Event::Completed { lineage, .. }
        | Event::Held { lineage, .. }
        | Event::Waiting { lineage, .. }) = event
        else {
            return None;
        };
        // The newest record of `payment.incoming` it follows from: the
        // admission, or an operator's review of a held payment.
        let read = lineage.iter().rev().find(|hop| {
            matches!(
                hop.stage,
                Stage::Admitted | Stage::Approved | Stage::Declined
            )
        })?;
        Some((SourceTopic::Incoming, read.partition, read.offset))
    }

    fn is_settled(state: &PaymentState) -> bool {
        state.status.is_terminal()
    }

    /// A payment is over once terminal and its completion read (a payment
    /// rejected at admission still has its completion coming back); it is
    /// kept for the retention from its acceptance.
    fn retention(state: &PaymentState) -> Option<i64> {
        let over = state.status.is_terminal()
            && state.lineage.last().map(|h| h.stage) == Some(Stage::Completed);
        over.then_some(state.payment.accepted_at_ms)
    }

    fn handle(
        state: &mut Option<PaymentState>,
        stats: &mut InflightStats,
        event: Event,
        ctx: &Ctx,
    ) -> Result<Option<Emit>, ProcessError> {
        match (ctx.topic, event) {
            (SourceTopic::Incoming, Event::PaymentSubmitted(payment)) => {
                admit(state, stats, payment, ctx)
            }
            (
                SourceTopic::Complete,
                Event::Completed {
                    payment,
                    outcome,
                    completed_at_ms,
                    lineage,
                },
            ) => {
                let completion = Completion {
                    payment,
                    outcome,
                    completed_at_ms,
                    lineage,
                };
                complete(state, stats, completion, ctx)
            }
            (SourceTopic::Incoming, Event::Review { approve, .. }) => {
                review::review(state, stats, approve, ctx)
            }
            (SourceTopic::Complete, Event::Held { payment, lineage }) => {
                review::held(state, stats, &payment, lineage, ctx)
            }
            (
                SourceTopic::Complete,
                Event::Waiting {
                    payment,
                    waiting_for,
                    lineage,
                },
            ) => {
                if let Some(row) = state.as_mut().filter(|r| r.payment.same_request(&payment)) {
                    if row.status == PaymentStatus::Inflight {
                        row.status = PaymentStatus::Accepted;
                        row.waiting_for = Some(waiting_for);
                        row.lineage = lineage;
                    }
                }
                Ok(None)
            }
            (_, other) => Err(ProcessError::UnexpectedEvent { kind: other.kind() }),
        }
    }
}

/// How far a payment's `accepted_at` may lie after its record's append
/// time: clocks of other producers drift a little. Beyond it the append
/// time is used, so that a payment stamped in the future can neither
/// complete before it was accepted nor distort the latency windows.
pub const ACCEPTED_AT_SKEW_MS: i64 = 1_000;

/// Whether a payment may move money at all: the checks that need no balance,
/// the same for the API and for records any producer wrote.
pub fn validate_payment(payment: &PaymentRef, max_amount_cents: i64) -> Result<(), String> {
    validate_id(&payment.id).map_err(|e| format!("id {e}"))?;
    validate_id(&payment.from).map_err(|e| format!("from {e}"))?;
    validate_id(&payment.to).map_err(|e| format!("to {e}"))?;
    if payment.amount_cents <= 0 {
        return Err(format!("amount {} must be > 0", payment.amount_cents));
    }
    if payment.amount_cents > max_amount_cents {
        return Err(format!(
            "amount {} is above the limit of {max_amount_cents} cents",
            payment.amount_cents
        ));
    }
    if payment.from == payment.to {
        return Err("from and to are the same account".into());
    }
    Ok(())
}

fn admit(
    state: &mut Option<PaymentState>,
    stats: &mut InflightStats,
    mut payment: PaymentRef,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    if partition_for(&payment.id, ctx.partitions) != ctx.partition {
        // Written by another producer on the wrong partition (Kafka clients
        // partition by their own hash): every copy of an id must meet on
        // one partition, so it moves there and is processed there.
        let key = payment.id.clone();
        return Ok(Some(Emit {
            topic: OutTopic::Incoming,
            key,
            event: Event::PaymentSubmitted(payment),
        }));
    }
    if payment.accepted_at_ms == 0
        || payment.accepted_at_ms > ctx.received_at_ms.saturating_add(ACCEPTED_AT_SKEW_MS)
    {
        // A payment without its acceptance time, or one that claims to have
        // been accepted after it reached the log: the record's time.
        payment.accepted_at_ms = ctx.received_at_ms;
    }
    if payment.accepted_at_ms < ctx.forgotten_before_ms {
        // A copy of a payment already forgotten would look new and move its
        // money again. Whether this id is still known or not, the record
        // goes to the operator: the same decision live and in a replay.
        return Err(ProcessError::Expired(format!(
            "payment {} was accepted at {} ms, before {} ms: older than the \
             retention (limits.payment_retention_seconds), it could be a copy \
             of a payment already forgotten; replay it without accepted_at to \
             submit it as new",
            payment.id, payment.accepted_at_ms, ctx.forgotten_before_ms
        )));
    }
    if let Some(existing) = state {
        // Every copy of an id lands on this partition, so this is the safety
        // net behind the ingest path's own dedup.
        if existing.payment.same_request(&payment) {
            stats.duplicate_count += 1;
            return Ok(None);
        }
        return Err(ProcessError::ImpossibleState(format!(
            "payment {} submitted again with a different body",
            payment.id
        )));
    }
    let admitted = hop(Stage::Admitted, ctx);
    if validate_payment(&payment, ctx.max_amount_cents).is_err() {
        // Records written by other producers skip the HTTP checks; they end
        // as a business rejection, not a dead letter.
        return Ok(Some(reject_invalid(state, payment, admitted, ctx)));
    }
    let amount = checked_add(
        stats.inflight_amount_cents,
        payment.amount_cents,
        "inflight",
    )?;
    stats.inflight_amount_cents = amount;
    stats.inflight_count += 1;
    stats.admitted_count += 1;
    *state = Some(PaymentState {
        payment: payment.clone(),
        status: PaymentStatus::Inflight,
        reason: None,
        completed_at_ms: None,
        lineage: vec![admitted.clone()],
        submitted_by: submitter(ctx),
        waiting_for: None,
    });
    Ok(Some(Emit {
        topic: OutTopic::Inflight,
        key: payment.from.clone(),
        event: Event::Debit {
            payment,
            lineage: vec![admitted],
        },
    }))
}

/// Who submitted the payment being admitted, as kept in its row.
fn submitter(ctx: &Ctx) -> Option<Submitter> {
    ctx.submitted_by.map(|by| Submitter {
        tag: None,
        ..by.clone()
    })
}

/// Ends an invalid payment as rejected at admission.
fn reject_invalid(
    state: &mut Option<PaymentState>,
    payment: PaymentRef,
    admitted: Hop,
    ctx: &Ctx,
) -> Emit {
    let outcome = Outcome::Rejected(Reason::Invalid);
    *state = Some(PaymentState {
        payment: payment.clone(),
        status: PaymentStatus::Rejected,
        reason: Some(Reason::Invalid),
        completed_at_ms: Some(ctx.now_ms),
        lineage: vec![admitted.clone()],
        submitted_by: submitter(ctx),
        waiting_for: None,
    });
    completed(payment, outcome, vec![admitted], ctx)
}

/// The parts of a `Completed` event.
struct Completion {
    payment: PaymentRef,
    outcome: Outcome,
    completed_at_ms: i64,
    lineage: Vec<Hop>,
}

fn complete(
    state: &mut Option<PaymentState>,
    stats: &mut InflightStats,
    completion: Completion,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    let id = &completion.payment.id;
    let Some(current) = state else {
        return Err(ProcessError::ImpossibleState(format!(
            "completion for unknown payment {id}"
        )));
    };
    if !current.payment.same_request(&completion.payment) {
        return Err(ProcessError::ImpossibleState(format!(
            "completion for payment {id} disagrees with the admitted payment"
        )));
    }
    if current.status.is_terminal() {
        // Rejected at admission: the completion only feeds the confirmed
        // processor's counts. Its hop marks the payment as over.
        if current.lineage.last().map(|h| h.stage) != Some(Stage::Completed) {
            current.lineage.push(hop(Stage::Completed, ctx));
        }
        return Ok(None);
    }
    if current.status == PaymentStatus::Held {
        // Only a decline ends a held payment, and it made it terminal.
        return Err(ProcessError::ImpossibleState(format!(
            "completion for payment {id} while it is held for review"
        )));
    }
    let amount = checked_sub(
        stats.inflight_amount_cents,
        current.payment.amount_cents,
        "inflight",
    )?;
    assert!(stats.inflight_count > 0, "inflight count below zero");
    stats.inflight_count -= 1;
    stats.inflight_amount_cents = amount;
    current.status = completion.outcome.status();
    current.reason = completion.outcome.reason();
    current.completed_at_ms = Some(completion.completed_at_ms);
    current.lineage = completion.lineage;
    current.lineage.push(hop(Stage::Completed, ctx));
    // A screened payment is over: the payer's next waiting one may go; a
    // closing account's last one is: it may close.
    let release =
        (current.lineage.iter()).any(|h| matches!(h.stage, Stage::Screened | Stage::Closing));
    Ok(release.then(|| Emit {
        topic: OutTopic::Inflight,
        key: current.payment.from.clone(),
        event: Event::Release {
            payment: current.payment.clone(),
        },
    }))
}

#[cfg(test)]
mod tests;
