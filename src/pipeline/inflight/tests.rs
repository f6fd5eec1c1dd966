//! The inflight processor's rules, one event at a time.

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

fn hop_at(stage: Stage) -> Hop {
    Hop {
        stage,
        partition: 0,
        offset: 0,
        at_ms: 1,
        received_at_ms: 1,
    }
}

// A waiting payment shows as accepted with the id it waits for; once a
// screened payment completes, its payer is told (a release).
#[test]
fn a_waiting_payment_is_accepted_and_a_screened_one_releases_its_payer() {
    let (mut state, mut stats) = (None, InflightStats::default());
    let p = payment("p2", 5);
    let incoming = ctx(SourceTopic::Incoming, 0);
    Inflight::handle(
        &mut state,
        &mut stats,
        Event::PaymentSubmitted(p.clone()),
        &incoming,
    )
    .unwrap();
    let lineage = vec![
        hop_at(Stage::Admitted),
        hop_at(Stage::Screened),
        hop_at(Stage::Waiting),
    ];
    let waiting = Event::Waiting {
        payment: p.clone(),
        waiting_for: "p1".into(),
        lineage: lineage.clone(),
    };
    let complete = ctx(SourceTopic::Complete, 1);
    assert_eq!(
        Inflight::handle(&mut state, &mut stats, waiting, &complete),
        Ok(None)
    );
    let row = state.clone().unwrap();
    assert_eq!(
        (row.status, row.waiting_for.as_deref()),
        (PaymentStatus::Accepted, Some("p1"))
    );
    assert_eq!(stats.inflight_count, 1, "still counted in flight");
    let done = Event::Completed {
        payment: p.clone(),
        outcome: Outcome::Confirmed,
        completed_at_ms: 5,
        lineage,
    };
    let emit = Inflight::handle(&mut state, &mut stats, done, &ctx(SourceTopic::Complete, 2));
    let emit = emit.unwrap().unwrap();
    assert_eq!((emit.topic, emit.key.as_str()), (OutTopic::Inflight, "a"));
    assert_eq!(emit.event, Event::Release { payment: p });
    assert_eq!(stats.inflight_count, 0);
}

// Held payments leave the inflight totals; approval sends the debit
// again, a decline completes the payment as rejected; a second review
// changes nothing.
#[test]
fn held_payments_are_approved_or_declined_once() {
    for approve in [true, false] {
        let (mut state, mut stats) = (None, InflightStats::default());
        let p = payment("p1", 500);
        let incoming = ctx(SourceTopic::Incoming, 0);
        Inflight::handle(
            &mut state,
            &mut stats,
            Event::PaymentSubmitted(p.clone()),
            &incoming,
        )
        .unwrap();
        let held = Event::Held {
            payment: p.clone(),
            lineage: vec![hop_at(Stage::Admitted), hop_at(Stage::Screened)],
        };
        Inflight::handle(&mut state, &mut stats, held, &ctx(SourceTopic::Complete, 0)).unwrap();
        assert_eq!(state.as_ref().unwrap().status, PaymentStatus::Held);
        assert_eq!(
            (
                stats.inflight_count,
                stats.held_count,
                stats.held_amount_cents
            ),
            (0, 1, 500)
        );
        assert!(stats.held_ids.contains("p1"));
        let review = Event::Review {
            payment_id: "p1".into(),
            approve,
            principal: "ops".into(),
            at_ms: 2,
            held_partition: 0,
            held_offset: 0,
        };
        let c = ctx(SourceTopic::Incoming, 1);
        let emit = Inflight::handle(&mut state, &mut stats, review.clone(), &c)
            .unwrap()
            .unwrap();
        assert!(stats.held_ids.is_empty() && stats.held_count == 0);
        let row = state.clone().unwrap();
        if approve {
            assert!(matches!(emit.event, Event::Debit { .. }), "{emit:?}");
            assert_eq!(
                (row.status, stats.inflight_count),
                (PaymentStatus::Inflight, 1)
            );
            assert_eq!(row.lineage.last().unwrap().stage, Stage::Approved);
        } else {
            assert_eq!(emit.topic, OutTopic::Complete);
            assert_eq!(
                (row.status, row.reason),
                (PaymentStatus::Rejected, Some(Reason::Declined))
            );
            assert_eq!(stats.inflight_count, 0);
        }
        assert_eq!(
            Inflight::handle(&mut state, &mut stats, review, &c),
            Ok(None)
        );
        assert_eq!(state.unwrap(), row);
    }
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
