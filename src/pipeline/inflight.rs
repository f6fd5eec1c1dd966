//! The inflight processor: owns each payment's state (dedup, status, lineage)
//! and the inflight count and value. Reads `payment.incoming` (admits new
//! payments, emits DEBIT keyed by `from`) and `payment.complete` (records the
//! terminal state).

use serde::{Deserialize, Serialize};

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
}

impl InflightStats {
    /// Adds another partition's statistics (for totals over all partitions).
    pub fn add(&mut self, other: &Self) {
        self.inflight_count += other.inflight_count;
        self.inflight_amount_cents += other.inflight_amount_cents;
        self.admitted_count += other.admitted_count;
        self.duplicate_count += other.duplicate_count;
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
            Event::PaymentSubmitted(payment) | Event::Completed { payment, .. } => {
                Some(&payment.id)
            }
            _ => None,
        }
    }

    fn prerequisite(event: &Event) -> Option<(SourceTopic, u32, u64)> {
        let Event::Completed { lineage, .. } = event else {
            return None;
        };
        let admitted = lineage.iter().find(|hop| hop.stage == Stage::Admitted)?;
        Some((SourceTopic::Incoming, admitted.partition, admitted.offset))
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
                complete(state, stats, completion, ctx).map(|()| None)
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
) -> Result<(), ProcessError> {
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
        return Ok(());
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payment(id: &str, amount_cents: i64) -> PaymentRef {
        PaymentRef {
            id: id.into(),
            from: "a".into(),
            to: "b".into(),
            amount_cents,
            accepted_at_ms: 1,
        }
    }

    fn ctx(topic: SourceTopic, offset: u64) -> Ctx<'static> {
        Ctx {
            topic,
            partition: 0,
            offset,
            received_at_ms: 0,
            now_ms: 10,
            partitions: 1,
            forgotten_before_ms: i64::MIN,
            max_amount_cents: 100_000_000_000,
            submitted_by: None,
        }
    }

    // Admission emits one DEBIT keyed by `from` and counts the payment inflight.
    #[test]
    fn admits_and_debits() {
        let (mut state, mut stats) = (None, InflightStats::default());
        let emit = Inflight::handle(
            &mut state,
            &mut stats,
            Event::PaymentSubmitted(payment("p1", 500)),
            &ctx(SourceTopic::Incoming, 3),
        )
        .unwrap()
        .unwrap();
        assert_eq!((emit.topic, emit.key.as_str()), (OutTopic::Inflight, "a"));
        assert!(matches!(emit.event, Event::Debit { .. }));
        assert_eq!(state.unwrap().status, PaymentStatus::Inflight);
        assert_eq!(
            (stats.inflight_count, stats.inflight_amount_cents),
            (1, 500)
        );
    }

    // A second copy of the same payment is ignored; a different body under the same id is dead-lettered.
    #[test]
    fn dedups_copies() {
        let (mut state, mut stats) = (None, InflightStats::default());
        let c = ctx(SourceTopic::Incoming, 0);
        let submit = |p| Event::PaymentSubmitted(p);
        Inflight::handle(&mut state, &mut stats, submit(payment("p1", 5)), &c).unwrap();
        let again = Inflight::handle(&mut state, &mut stats, submit(payment("p1", 5)), &c);
        assert_eq!(again, Ok(None));
        let before = (state.clone(), stats.clone());
        let other = Inflight::handle(&mut state, &mut stats, submit(payment("p1", 6)), &c);
        assert!(matches!(other, Err(ProcessError::ImpossibleState(_))));
        assert_eq!((state, stats.clone()), before);
        assert_eq!(stats.inflight_count, 1);
    }

    // A payment on another partition than its id's moves there, untouched and unrecorded here.
    #[test]
    fn misplaced_payment_moves_to_its_partition() {
        let (mut state, mut stats) = (None, InflightStats::default());
        let p = payment("p1", 5);
        let home = partition_for("p1", 8);
        let ctx = Ctx {
            partition: (home + 1) % 8,
            partitions: 8,
            ..ctx(SourceTopic::Incoming, 0)
        };
        let emit = Inflight::handle(
            &mut state,
            &mut stats,
            Event::PaymentSubmitted(p.clone()),
            &ctx,
        )
        .unwrap()
        .unwrap();
        assert_eq!((emit.topic, emit.key.as_str()), (OutTopic::Incoming, "p1"));
        assert_eq!(emit.event, Event::PaymentSubmitted(p));
        assert!(state.is_none());
        assert_eq!(stats, InflightStats::default());
    }

    // Invalid payments from other producers end as rejected(invalid), never inflight.
    #[test]
    fn invalid_payment_is_rejected() {
        let (mut state, mut stats) = (None, InflightStats::default());
        let emit = Inflight::handle(
            &mut state,
            &mut stats,
            Event::PaymentSubmitted(payment("p1", -5)),
            &ctx(SourceTopic::Incoming, 0),
        )
        .unwrap()
        .unwrap();
        assert_eq!(emit.topic, OutTopic::Complete);
        assert_eq!(state.unwrap().reason, Some(Reason::Invalid));
        assert_eq!(stats.inflight_count, 0);
    }

    // Records from any producer meet the API's rules: above the amount limit or a bad id is rejected(invalid).
    #[test]
    fn the_api_rules_hold_for_every_producer() {
        let mut bad_id = payment("p 2", 5);
        bad_id.from = "a/../b".into();
        for p in [payment("p1", 1_500_000_000_000), bad_id] {
            let (mut state, mut stats) = (None, InflightStats::default());
            let c = ctx(SourceTopic::Incoming, 0);
            let event = Event::PaymentSubmitted(p);
            let emit = Inflight::handle(&mut state, &mut stats, event, &c).unwrap();
            assert_eq!(emit.unwrap().topic, OutTopic::Complete);
            assert_eq!(state.unwrap().reason, Some(Reason::Invalid));
            assert_eq!((stats.inflight_count, stats.admitted_count), (0, 0));
        }
    }

    // An acceptance time after the append (beyond the skew) becomes the append time; within the skew it stays.
    #[test]
    fn a_future_acceptance_time_is_replaced_by_the_append_time() {
        let c = Ctx {
            received_at_ms: 5_000,
            ..ctx(SourceTopic::Incoming, 0)
        };
        for (claimed, kept) in [
            (2_081_000_000_000, 5_000),
            (5_000 + ACCEPTED_AT_SKEW_MS, 6_000),
        ] {
            let (mut state, mut stats) = (None, InflightStats::default());
            let mut p = payment("p1", 5);
            p.accepted_at_ms = claimed;
            let emit = Inflight::handle(&mut state, &mut stats, Event::PaymentSubmitted(p), &c);
            let Some(Event::Debit { payment, .. }) = emit.unwrap().map(|e| e.event) else {
                panic!("no debit");
            };
            assert_eq!(payment.accepted_at_ms, kept);
            assert_eq!(state.unwrap().payment.accepted_at_ms, kept);
        }
    }

    // Completion sets the terminal state once and releases the inflight value.
    #[test]
    fn completion_is_terminal_once() {
        let (mut state, mut stats) = (None, InflightStats::default());
        let p = payment("p1", 700);
        Inflight::handle(
            &mut state,
            &mut stats,
            Event::PaymentSubmitted(p.clone()),
            &ctx(SourceTopic::Incoming, 0),
        )
        .unwrap();
        let done = Event::Completed {
            payment: p,
            outcome: Outcome::Reversed(Reason::UnknownAccount),
            completed_at_ms: 20,
            lineage: vec![],
        };
        let c = ctx(SourceTopic::Complete, 4);
        Inflight::handle(&mut state, &mut stats, done.clone(), &c).unwrap();
        Inflight::handle(&mut state, &mut stats, done, &c).unwrap();
        let row = state.unwrap();
        assert_eq!(row.status, PaymentStatus::Reversed);
        assert_eq!(row.lineage.last().unwrap().stage, Stage::Completed);
        assert_eq!((stats.inflight_count, stats.inflight_amount_cents), (0, 0));
    }

    // A completion for a payment never admitted is an impossible state.
    #[test]
    fn unknown_completion_is_an_error() {
        let (mut state, mut stats) = (None, InflightStats::default());
        let done = Event::Completed {
            payment: payment("nope", 1),
            outcome: Outcome::Confirmed,
            completed_at_ms: 1,
            lineage: vec![],
        };
        let result = Inflight::handle(&mut state, &mut stats, done, &ctx(SourceTopic::Complete, 0));
        assert!(matches!(result, Err(ProcessError::ImpossibleState(_))));
    }

    // A payment older than the retention is an error for the operator,
    // known id or not (so a replay decides the same whether or not the row
    // was forgotten yet). One just inside it is admitted.
    #[test]
    fn a_payment_older_than_the_retention_is_refused_known_or_not() {
        let old = Ctx {
            forgotten_before_ms: 2,
            ..ctx(SourceTopic::Incoming, 0)
        };
        let (mut state, mut stats) = (None, InflightStats::default());
        let submit = Event::PaymentSubmitted(payment("p1", 5));
        let result = Inflight::handle(&mut state, &mut stats, submit.clone(), &old);
        assert!(
            matches!(result, Err(ProcessError::Expired(_))),
            "{result:?}"
        );
        assert_eq!((state, stats.admitted_count), (None, 0));
        let (mut state, mut stats) = (None, InflightStats::default());
        Inflight::handle(
            &mut state,
            &mut stats,
            submit.clone(),
            &ctx(SourceTopic::Incoming, 0),
        )
        .unwrap();
        let known = state.clone();
        let result = Inflight::handle(&mut state, &mut stats, submit, &old);
        assert!(
            matches!(result, Err(ProcessError::Expired(_))),
            "{result:?}"
        );
        assert_eq!((state, stats.duplicate_count), (known, 0));
        let (mut state, mut stats) = (None, InflightStats::default());
        let recent = Ctx {
            forgotten_before_ms: 1,
            ..ctx(SourceTopic::Incoming, 0)
        };
        let p = payment("p1", 5);
        Inflight::handle(&mut state, &mut stats, Event::PaymentSubmitted(p), &recent).unwrap();
        assert_eq!(state.unwrap().status, PaymentStatus::Inflight);
    }

    // Only a payment whose completion was read may be forgotten: a payment
    // rejected at admission waits for its own completion to come back.
    #[test]
    fn a_payment_may_be_forgotten_once_its_completion_is_read() {
        let (mut state, mut stats) = (None, InflightStats::default());
        let p = payment("p1", -5);
        let submit = Event::PaymentSubmitted(p.clone());
        let emit = Inflight::handle(
            &mut state,
            &mut stats,
            submit,
            &ctx(SourceTopic::Incoming, 0),
        )
        .unwrap()
        .unwrap();
        assert_eq!(Inflight::retention(state.as_ref().unwrap()), None);
        let c = ctx(SourceTopic::Complete, 9);
        Inflight::handle(&mut state, &mut stats, emit.event.clone(), &c).unwrap();
        let row = state.clone().unwrap();
        assert_eq!(Inflight::retention(&row), Some(p.accepted_at_ms));
        assert_eq!(row.lineage.last().unwrap().offset, 9);
        // Its completion read again changes nothing.
        Inflight::handle(&mut state, &mut stats, emit.event, &c).unwrap();
        assert_eq!(state.unwrap(), row);

        let (mut state, mut stats) = (None, InflightStats::default());
        let p = payment("p2", 5);
        let submit = Event::PaymentSubmitted(p.clone());
        Inflight::handle(
            &mut state,
            &mut stats,
            submit,
            &ctx(SourceTopic::Incoming, 0),
        )
        .unwrap();
        assert_eq!(Inflight::retention(state.as_ref().unwrap()), None);
        let done = Event::Completed {
            payment: p,
            outcome: Outcome::Confirmed,
            completed_at_ms: 20,
            lineage: vec![],
        };
        Inflight::handle(&mut state, &mut stats, done, &c).unwrap();
        assert_eq!(Inflight::retention(state.as_ref().unwrap()), Some(1));
    }
}
