//! The account processor's rules, one event at a time.

use super::*;

fn debit(cents: i64) -> Event {
    Event::Debit {
        payment: pay(cents),
        lineage: vec![],
    }
}

fn credit(cents: i64) -> Event {
    Event::Credit {
        payment: pay(cents),
        lineage: vec![],
    }
}
use crate::model::SourceTopic;

fn ctx() -> Ctx<'static> {
    Ctx {
        topic: SourceTopic::Inflight,
        partition: 1,
        offset: 9,
        received_at_ms: 0,
        now_ms: 5,
        partitions: 1,
        forgotten_before_ms: i64::MIN,
        max_amount_cents: 100_000_000_000,
        submitted_by: None,
    }
}

fn pay(amount_cents: i64) -> PaymentRef {
    PaymentRef {
        id: "p".into(),
        from: "a".into(),
        to: "b".into(),
        amount_cents,
        accepted_at_ms: 1,
    }
}

fn opened(balance_cents: i64) -> (Option<Account>, AccountStats) {
    let (mut state, mut stats) = (None, AccountStats::default());
    let open = Event::OpenAccount {
        account: "a".into(),
        opening_balance_cents: balance_cents,
        at_ms: 0,
    };
    Accounts::handle(&mut state, &mut stats, open, &ctx()).unwrap();
    (state, stats)
}

fn outcome(emit: Option<Emit>) -> Outcome {
    match emit.unwrap().event {
        Event::Completed { outcome, .. } => outcome,
        other => panic!("expected a completion, got {other:?}"),
    }
}

// A debit with funds takes the money and asks for the credit keyed by `to`.
#[test]
fn debit_moves_money_and_asks_for_credit() {
    let (mut state, mut stats) = opened(1_000);
    let debit = debit(400);
    let emit = Accounts::handle(&mut state, &mut stats, debit, &ctx())
        .unwrap()
        .unwrap();
    assert_eq!((emit.topic, emit.key.as_str()), (OutTopic::Inflight, "b"));
    assert_eq!(state.unwrap().balance_cents, 600);
    assert_eq!((stats.debited_cents, stats.balance_sum_cents), (400, 600));
}

// Insufficient funds, unknown and closed accounts are rejections, and no money moves.
#[test]
fn debit_refusals() {
    let (mut state, mut stats) = opened(100);
    let got = Accounts::handle(&mut state, &mut stats, debit(101), &ctx()).unwrap();
    assert_eq!(outcome(got), Outcome::Rejected(Reason::InsufficientFunds));
    assert_eq!(state.as_ref().unwrap().balance_cents, 100);
    let got = Accounts::handle(&mut None, &mut stats, debit(1), &ctx()).unwrap();
    assert_eq!(outcome(got), Outcome::Rejected(Reason::UnknownAccount));
    state.as_mut().unwrap().status = AccountStatus::Closed;
    let got = Accounts::handle(&mut state, &mut stats, debit(1), &ctx()).unwrap();
    assert_eq!(outcome(got), Outcome::Rejected(Reason::AccountClosed));
    assert_eq!(stats.debited_cents, 0);
}

// A credit to a missing account becomes a refund to `from`, which completes as reversed.
#[test]
fn failed_credit_is_refunded() {
    let mut stats = AccountStats::default();
    let credit = credit(50);
    let emit = Accounts::handle(&mut None, &mut stats, credit, &ctx())
        .unwrap()
        .unwrap();
    assert_eq!((emit.topic, emit.key.as_str()), (OutTopic::Inflight, "a"));
    let (mut state, mut stats) = opened(0);
    let got = Accounts::handle(&mut state, &mut stats, emit.event, &ctx()).unwrap();
    assert_eq!(outcome(got), Outcome::Reversed(Reason::UnknownAccount));
    assert_eq!(state.unwrap().balance_cents, 50);
    assert_eq!(stats.refunded_cents, 50);
}

// Opening twice changes nothing; a deposit adds to balance and funded money.
#[test]
fn open_is_idempotent_and_deposit_funds() {
    let (mut state, mut stats) = opened(10);
    let again = Event::OpenAccount {
        account: "a".into(),
        opening_balance_cents: 99,
        at_ms: 0,
    };
    Accounts::handle(&mut state, &mut stats, again, &ctx()).unwrap();
    let deposit = Event::Deposit {
        account: "a".into(),
        amount_cents: 5,
        at_ms: 0,
    };
    Accounts::handle(&mut state, &mut stats, deposit, &ctx()).unwrap();
    assert_eq!(state.unwrap().balance_cents, 15);
    assert_eq!((stats.funded_cents, stats.account_count), (15, 1));
}

// A credit that would overflow the balance is refunded, not wrapped.
#[test]
fn overflowing_credit_is_refunded() {
    let (mut state, mut stats) = opened(i64::MAX);
    let credit = Event::Credit {
        payment: PaymentRef {
            to: "a".into(),
            from: "x".into(),
            ..pay(1)
        },
        lineage: vec![],
    };
    let emit = Accounts::handle(&mut state, &mut stats, credit, &ctx())
        .unwrap()
        .unwrap();
    assert!(matches!(
        emit.event,
        Event::Refund {
            reason: Reason::BalanceOverflow,
            ..
        }
    ));
    assert_eq!(state.unwrap().balance_cents, i64::MAX);
}

fn keyed(id: &str, amount_cents: i64, at_ms: i64) -> Event {
    Event::KeyedDeposit {
        account: "a".into(),
        amount_cents,
        at_ms,
        id: id.into(),
    }
}

// A deposit with an id is applied once; the id again with another amount
// is an error that changes nothing; ids older than the retention are let go.
#[test]
fn a_keyed_deposit_is_applied_once() {
    let (mut state, mut stats) = opened(100);
    let c = ctx();
    for _ in 0..3 {
        Accounts::handle(&mut state, &mut stats, keyed("d1", 50, 0), &c).unwrap();
    }
    assert_eq!(state.as_ref().unwrap().balance_cents, 150);
    assert_eq!(stats.funded_cents, 150);
    let before = (state.clone(), stats.clone());
    let other = Accounts::handle(&mut state, &mut stats, keyed("d1", 60, 0), &c);
    assert!(
        matches!(other, Err(ProcessError::ImpossibleState(_))),
        "{other:?}"
    );
    assert_eq!((state.clone(), stats.clone()), before);
    // Once older than the retention, a kept id goes with the next deposit.
    let later = Ctx {
        received_at_ms: 10,
        forgotten_before_ms: 5,
        ..ctx()
    };
    Accounts::handle(&mut state, &mut stats, keyed("d2", 1, 10), &later).unwrap();
    let kept: Vec<&str> = (state.as_ref().unwrap().deposits.as_deref().unwrap().iter())
        .map(|k| k.id.as_str())
        .collect();
    assert_eq!(kept, ["d2"]);
}

fn close_to(to: &str) -> Event {
    Event::CloseAccountTo {
        account: "a".into(),
        to: to.into(),
        payment_id: "move".into(),
        at_ms: 0,
    }
}

/// Closes "a" (balance 700) toward "b": the transfer it submits and the
/// debit that carries it out.
fn closing() -> (Option<Account>, AccountStats, PaymentRef) {
    let (mut state, mut stats) = opened(700);
    let emit = Accounts::handle(&mut state, &mut stats, close_to("b"), &ctx())
        .unwrap()
        .unwrap();
    let Event::PaymentSubmitted(transfer) = emit.event else {
        panic!("expected a payment, got {:?}", emit.event);
    };
    assert_eq!(
        (emit.topic, emit.key.as_str()),
        (OutTopic::Incoming, "move")
    );
    assert_eq!((transfer.from.as_str(), transfer.to.as_str()), ("a", "b"));
    assert_eq!(transfer.amount_cents, 700);
    assert_eq!(state.as_ref().unwrap().status, AccountStatus::Closing);
    let debit = Event::Debit {
        payment: transfer.clone(),
        lineage: vec![],
    };
    let emit = Accounts::handle(&mut state, &mut stats, debit, &ctx())
        .unwrap()
        .unwrap();
    let Event::Credit { lineage, .. } = emit.event else {
        panic!("expected a credit, got {:?}", emit.event);
    };
    assert!(lineage.iter().any(|h| h.stage == Stage::Closing));
    assert_eq!(state.as_ref().unwrap().balance_cents, 0);
    (state, stats, transfer)
}

// Without a destination, an account with money stays open; an empty one closes.
#[test]
fn a_plain_close_needs_an_empty_account() {
    let close = || Event::CloseAccount {
        account: "a".into(),
        at_ms: 0,
    };
    let (mut state, mut stats) = opened(1);
    Accounts::handle(&mut state, &mut stats, close(), &ctx()).unwrap();
    assert_eq!(state.as_ref().unwrap().status, AccountStatus::Open);
    let (mut state, mut stats) = opened(0);
    Accounts::handle(&mut state, &mut stats, close(), &ctx()).unwrap();
    let account = state.unwrap();
    assert_eq!(account.status, AccountStatus::Closed);
    assert_eq!((account.closed_at_ms, account.emptied_by), (Some(5), None));
}

// While its balance moves out, a closing account takes no other payment in
// or out and ignores another close; confirmed, it closes.
#[test]
fn a_closing_account_is_frozen_until_its_transfer_is_confirmed() {
    let (mut state, mut stats, transfer) = closing();
    let other = Event::Debit {
        payment: PaymentRef {
            id: "other".into(),
            ..pay(0)
        },
        lineage: vec![],
    };
    let got = Accounts::handle(&mut state, &mut stats, other, &ctx()).unwrap();
    assert_eq!(outcome(got), Outcome::Rejected(Reason::AccountClosed));
    let into = Event::Credit {
        payment: PaymentRef {
            from: "x".into(),
            to: "a".into(),
            ..pay(5)
        },
        lineage: vec![],
    };
    let emit = Accounts::handle(&mut state, &mut stats, into, &ctx());
    assert!(matches!(emit.unwrap().unwrap().event, Event::Refund { .. }));
    let again = Accounts::handle(&mut state, &mut stats, close_to("c"), &ctx()).unwrap();
    assert!(again.is_none());
    let release = Event::Release { payment: transfer };
    Accounts::handle(&mut state, &mut stats, release, &ctx()).unwrap();
    let account = state.unwrap();
    assert_eq!(account.status, AccountStatus::Closed);
    assert_eq!(account.emptied_by.as_deref(), Some("move"));
    assert!(account.closing.is_none());
}

// A transfer that cannot land comes back and reopens the account, money and all.
#[test]
fn a_reversed_transfer_reopens_the_account() {
    let (mut state, mut stats, transfer) = closing();
    let refund = Event::Refund {
        payment: transfer.clone(),
        reason: Reason::AccountClosed,
        lineage: vec![],
    };
    let got = Accounts::handle(&mut state, &mut stats, refund, &ctx()).unwrap();
    assert_eq!(outcome(got), Outcome::Reversed(Reason::AccountClosed));
    // The completion's release then changes nothing.
    let release = Event::Release { payment: transfer };
    Accounts::handle(&mut state, &mut stats, release, &ctx()).unwrap();
    let account = state.unwrap();
    assert_eq!(
        (account.status, account.balance_cents),
        (AccountStatus::Open, 700)
    );
    assert!(account.closing.is_none() && account.closed_at_ms.is_none());
}

// A close whose transfer admission would refuse (to itself) is not applied.
#[test]
fn a_transfer_admission_would_refuse_is_a_dead_letter() {
    let (mut state, mut stats) = opened(700);
    let before = state.clone();
    let got = Accounts::handle(&mut state, &mut stats, close_to("a"), &ctx());
    assert!(
        matches!(got, Err(ProcessError::ImpossibleState(_))),
        "{got:?}"
    );
    assert_eq!(state, before);
}

// Money a late refund put back in a closed account leaves by another close
// with a destination; if that transfer comes back, the account is closed again.
#[test]
fn a_closed_account_with_money_is_emptied_by_another_close() {
    let (mut state, mut stats) = opened(0);
    let close = Event::CloseAccount {
        account: "a".into(),
        at_ms: 0,
    };
    Accounts::handle(&mut state, &mut stats, close, &ctx()).unwrap();
    state.as_mut().unwrap().balance_cents = 40; // as a late refund leaves it
    stats.balance_sum_cents = 40;
    let emit = Accounts::handle(&mut state, &mut stats, close_to("b"), &ctx());
    let Event::PaymentSubmitted(transfer) = emit.unwrap().unwrap().event else {
        panic!("expected the transfer");
    };
    assert_eq!(transfer.amount_cents, 40);
    let debit = Event::Debit {
        payment: transfer.clone(),
        lineage: vec![],
    };
    Accounts::handle(&mut state, &mut stats, debit, &ctx()).unwrap();
    let refund = Event::Refund {
        payment: transfer,
        reason: Reason::AccountClosed,
        lineage: vec![],
    };
    Accounts::handle(&mut state, &mut stats, refund, &ctx()).unwrap();
    let account = state.unwrap();
    assert_eq!(
        (account.status, account.balance_cents),
        (AccountStatus::Closed, 40)
    );
}
