//! Property tests over the three processors wired together in memory: any
//! sequence of opens, deposits, closes and payments, delivered in any
//! interleaving, conserves money and never drives a balance negative.

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;

use super::account::{Account, AccountStats, Accounts};
use super::confirmed::{Confirmed, ConfirmedStats};
use super::inflight::{Inflight, InflightStats, PaymentState};
use super::{Ctx, Emit, OutTopic, Processor};
use crate::model::{
    partition_for, Event, PaymentRef, PaymentStatus, ScreeningRules, SourceTopic, Velocity,
};

const PARTITIONS: u32 = 3;

#[derive(Default)]
struct World {
    accounts: HashMap<String, Account>,
    account_stats: Vec<AccountStats>,
    payments: HashMap<String, PaymentState>,
    inflight_stats: Vec<InflightStats>,
    confirmed_stats: ConfirmedStats,
    /// Records waiting on each topic, in the order they were emitted.
    queues: HashMap<SourceTopic, VecDeque<(String, Event)>>,
}

impl World {
    fn new() -> Self {
        Self::screening(ScreeningRules::default())
    }

    /// A world whose account partitions screen with `rules`.
    fn screening(rules: ScreeningRules) -> Self {
        let stats = AccountStats {
            screening: rules,
            ..AccountStats::default()
        };
        Self {
            account_stats: vec![stats; PARTITIONS as usize],
            inflight_stats: vec![InflightStats::default(); PARTITIONS as usize],
            ..Self::default()
        }
    }

    fn push(&mut self, emit: Emit) {
        let topic = match emit.topic {
            OutTopic::Incoming => SourceTopic::Incoming,
            OutTopic::Inflight => SourceTopic::Inflight,
            OutTopic::Complete => SourceTopic::Complete,
            OutTopic::Confirmed => return,
            OutTopic::EveryInflight => unreachable!("no control processor in this world"),
        };
        self.queues
            .entry(topic)
            .or_default()
            .push_back((emit.key, emit.event));
    }

    /// Delivers the oldest record of `topic` to its processor(s).
    fn step(&mut self, topic: SourceTopic) {
        let Some((key, event)) = self.queues.get_mut(&topic).and_then(|q| q.pop_front()) else {
            return;
        };
        let partition = partition_for(&key, PARTITIONS);
        let ctx = Ctx {
            topic,
            partition,
            offset: 0,
            received_at_ms: 0,
            now_ms: 1,
            partitions: PARTITIONS,
            forgotten_before_ms: i64::MIN,
            max_amount_cents: 100_000_000_000,
            submitted_by: None,
        };
        let p = partition as usize;
        match topic {
            SourceTopic::Inflight => {
                let id = Accounts::state_key(&event).unwrap().to_owned();
                let mut row = self.accounts.remove(&id);
                let out =
                    Accounts::handle(&mut row, &mut self.account_stats[p], event, &ctx).unwrap();
                if let Some(row) = row {
                    assert!(row.balance_cents >= 0, "negative balance");
                    self.accounts.insert(id, row);
                }
                out.into_iter().for_each(|e| self.push(e));
            }
            SourceTopic::Control | SourceTopic::Replay | SourceTopic::Api => {
                unreachable!("no control records or replays in this world")
            }
            SourceTopic::Incoming | SourceTopic::Complete => {
                if topic == SourceTopic::Complete {
                    Confirmed::handle(&mut None, &mut self.confirmed_stats, event.clone(), &ctx)
                        .unwrap();
                }
                let id = Inflight::state_key(&event).unwrap().to_owned();
                let mut row = self.payments.remove(&id);
                let out =
                    Inflight::handle(&mut row, &mut self.inflight_stats[p], event, &ctx).unwrap();
                self.payments.extend(row.map(|r| (id, r)));
                out.into_iter().for_each(|e| self.push(e));
            }
        }
    }

    fn assert_conserved(&self) {
        let sum = |f: fn(&AccountStats) -> i64| self.account_stats.iter().map(f).sum::<i64>();
        let balances: i64 = self.accounts.values().map(|a| a.balance_cents).sum();
        assert_eq!(balances, sum(|s| s.balance_sum_cents));
        let in_transit =
            sum(|s| s.debited_cents) - sum(|s| s.credited_cents) - sum(|s| s.refunded_cents);
        assert!(in_transit >= 0);
        assert_eq!(
            balances + in_transit,
            sum(|s| s.funded_cents),
            "money not conserved"
        );
    }
}

#[derive(Debug, Clone)]
enum Op {
    Open(u8, i64),
    Close(u8),
    CloseTo(u8, u8),
    Pay(u8, u8, i64),
    Deliver(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 0i64..1_000).prop_map(|(a, b)| Op::Open(a, b)),
        (0u8..6).prop_map(Op::Close),
        (0u8..6, 0u8..7).prop_map(|(a, t)| Op::CloseTo(a, t)),
        (0u8..7, 0u8..7, -5i64..600).prop_map(|(f, t, c)| Op::Pay(f, t, c)),
        (0u8..3).prop_map(Op::Deliver),
    ]
}

proptest! {
    // Any sequence of events, in any interleaving across topics, conserves money and
    // ends every payment in exactly one terminal state once all records are delivered.
    #[test]
    fn money_is_conserved(ops in proptest::collection::vec(op(), 1..120)) {
        let mut world = World::new();
        let topics = [SourceTopic::Incoming, SourceTopic::Inflight, SourceTopic::Complete];
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Open(a, cents) => world.push(Emit { topic: OutTopic::Inflight, key: format!("a{a}"),
                    event: Event::OpenAccount { account: format!("a{a}"), opening_balance_cents: cents, at_ms: 0 } }),
                Op::Close(a) => world.push(Emit { topic: OutTopic::Inflight, key: format!("a{a}"),
                    event: Event::CloseAccount { account: format!("a{a}"), at_ms: 0 } }),
                Op::CloseTo(a, to) => world.close_to(a, to, n),
                Op::Pay(from, to, cents) => {
                    let payment = PaymentRef { id: format!("p{n}"), from: format!("a{from}"),
                        to: format!("a{to}"), amount_cents: cents, accepted_at_ms: 0 };
                    world.queues.entry(SourceTopic::Incoming).or_default()
                        .push_back((payment.id.clone(), Event::PaymentSubmitted(payment)));
                }
                Op::Deliver(t) => world.step(topics[t as usize]),
            }
            world.assert_conserved();
        }
        while world.queues.values().any(|q| !q.is_empty()) {
            for topic in topics { world.step(topic); }
            world.assert_conserved();
        }
        let terminal = world.payments.values().filter(|p| p.status.is_terminal()).count();
        prop_assert_eq!(terminal, world.payments.len());
        prop_assert!(world.payments.values().all(|p| p.status != PaymentStatus::Inflight));
        let s = &world.confirmed_stats;
        prop_assert_eq!((s.confirmed_count + s.rejected_count + s.reversed_count) as usize, world.payments.len());
        prop_assert_eq!(world.inflight_stats.iter().map(|s| s.inflight_count).sum::<u64>(), 0);
        prop_assert!(!world.closing(), "an account is still closing");
    }
}

fn rules() -> impl Strategy<Value = ScreeningRules> {
    (
        proptest::option::of(100i64..600),
        proptest::option::of(50i64..400),
        proptest::option::of((1u32..4, 1u32..3)),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(max, review, velocity, blocked, single)| ScreeningRules {
            max_amount: max,
            review_above: review,
            velocity: velocity.map(|(max_payments, window_seconds)| Velocity {
                max_payments,
                window_seconds,
            }),
            blocked_accounts: blocked.then(|| vec!["a5".to_owned()]),
            single_inflight_debit: Some(single),
        })
}

#[derive(Debug, Clone)]
enum Screened {
    Op(Op),
    Review(u8, bool),
}

fn screened_op() -> impl Strategy<Value = Screened> {
    prop_oneof![
        4 => op().prop_map(Screened::Op),
        1 => (0u8..120, any::<bool>()).prop_map(|(n, approve)| Screened::Review(n, approve)),
    ]
}

impl World {
    /// Closes account `a` toward `to` (a transfer to itself is left out: the
    /// API refuses it, and the processor dead-letters it).
    fn close_to(&mut self, a: u8, to: u8, n: usize) {
        if a == to {
            return;
        }
        self.push(Emit {
            topic: OutTopic::Inflight,
            key: format!("a{a}"),
            event: Event::CloseAccountTo {
                account: format!("a{a}"),
                to: format!("a{to}"),
                payment_id: format!("close{n}"),
                at_ms: 0,
            },
        });
    }

    /// Whether some account still waits for its closing transfer.
    fn closing(&self) -> bool {
        (self.accounts.values())
            .any(|a| a.status == crate::pipeline::account::AccountStatus::Closing)
    }

    fn review(&mut self, id: String, approve: bool) {
        let event = Event::Review {
            payment_id: id.clone(),
            approve,
            principal: "ops".into(),
            at_ms: 0,
            held_partition: 0,
            held_offset: 0,
        };
        self.queues
            .entry(SourceTopic::Incoming)
            .or_default()
            .push_back((id, event));
    }

    fn drain(&mut self) {
        let topics = [
            SourceTopic::Incoming,
            SourceTopic::Inflight,
            SourceTopic::Complete,
        ];
        while self.queues.values().any(|q| !q.is_empty()) {
            for topic in topics {
                self.step(topic);
            }
            self.assert_conserved();
        }
    }
}

proptest! {
    // With any screening rules, reviews in any order and single debits in
    // flight, money is conserved; once every held payment is reviewed,
    // every payment is terminal, nothing is held, inflight or waiting.
    #[test]
    fn money_is_conserved_with_screening(rules in rules(), ops in proptest::collection::vec(screened_op(), 1..120)) {
        let mut world = World::screening(rules);
        let topics = [SourceTopic::Incoming, SourceTopic::Inflight, SourceTopic::Complete];
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Screened::Op(Op::Open(a, cents)) => world.push(Emit { topic: OutTopic::Inflight, key: format!("a{a}"),
                    event: Event::OpenAccount { account: format!("a{a}"), opening_balance_cents: cents, at_ms: 0 } }),
                Screened::Op(Op::Close(a)) => world.push(Emit { topic: OutTopic::Inflight, key: format!("a{a}"),
                    event: Event::CloseAccount { account: format!("a{a}"), at_ms: 0 } }),
                Screened::Op(Op::CloseTo(a, to)) => world.close_to(a, to, n),
                Screened::Op(Op::Pay(from, to, cents)) => {
                    let payment = PaymentRef { id: format!("p{n}"), from: format!("a{from}"),
                        to: format!("a{to}"), amount_cents: cents, accepted_at_ms: 1_000 * n as i64 };
                    world.queues.entry(SourceTopic::Incoming).or_default()
                        .push_back((payment.id.clone(), Event::PaymentSubmitted(payment)));
                }
                Screened::Op(Op::Deliver(t)) => world.step(topics[t as usize]),
                Screened::Review(p, approve) => world.review(format!("p{p}"), approve),
            }
            world.assert_conserved();
        }
        world.drain();
        let held: Vec<String> = world.payments.values()
            .filter(|p| p.status == PaymentStatus::Held).map(|p| p.payment.id.clone()).collect();
        let held_ids: usize = world.inflight_stats.iter().map(|s| s.held_ids.len()).sum();
        prop_assert_eq!(held_ids, held.len());
        for (i, id) in held.into_iter().enumerate() { world.review(id, i % 2 == 0); }
        world.drain();
        prop_assert!(world.payments.values().all(|p| p.status.is_terminal()), "a payment is not terminal");
        let s = &world.confirmed_stats;
        prop_assert_eq!((s.confirmed_count + s.rejected_count + s.reversed_count) as usize, world.payments.len());
        for stats in &world.inflight_stats {
            prop_assert_eq!((stats.inflight_count, stats.held_count, stats.held_amount_cents), (0, 0, 0));
        }
        prop_assert!(world.accounts.values().all(|a| a.payer.as_ref().is_none_or(|p| p.waiting.is_empty() && p.current.is_none())),
            "a payment still waits");
        prop_assert!(!world.closing(), "an account is still closing");
    }
}
