//! The account processor: owns balances. Reads `payment.inflight`, keyed by
//! account id. DEBIT checks and takes the money and asks for the CREDIT; CREDIT
//! gives it and completes the payment; a CREDIT that cannot land asks for a
//! REFUND to `from` (the saga), which gives the money back and completes the
//! payment as reversed. A balance never goes below zero. Closing an account
//! with money in it moves the money out first (`closing`).

use serde::{Deserialize, Serialize};

mod closing;

pub use closing::Closing;

use super::screening::{self, Payer, Verdict, WaitingPayment, MAX_WAITING_PER_PAYER};
use super::{
    checked_add, checked_sub, completed, hop, Ctx, Emit, OutTopic, ProcessError, Processor,
};
use crate::model::{Event, Hop, Outcome, PaymentRef, Reason, ScreeningRules, Stage};

/// Whether an account can move money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    Open,
    Closed,
    /// Its balance is moving out; it closes when that payment is confirmed.
    Closing,
}

/// One row of the `accounts` state table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The account id, also the row key.
    pub id: String,
    /// Money held, in cents; never negative.
    pub balance_cents: i64,
    /// Open accounts send and receive; closed and closing ones refuse both.
    pub status: AccountStatus,
    /// When the account was opened.
    pub opened_at_ms: i64,
    /// When its balance or status last changed.
    pub updated_at_ms: i64,
    /// The last payment that debited or credited it.
    pub last_payment_id: Option<String>,
    /// What screening keeps of it as a payer (`None`: nothing).
    pub payer: Option<Box<Payer>>,
    /// Deposits made with an id, for as long as payments are kept, so that
    /// one made again is not applied again (`None`: none).
    pub deposits: Option<Box<Vec<KeptDeposit>>>,
    /// While closing: the payment moving its balance out.
    pub closing: Option<Box<Closing>>,
    /// When it closed (`None`: never).
    pub closed_at_ms: Option<i64>,
    /// The payment that emptied it as it closed (`None`: it closed empty).
    pub emptied_by: Option<String>,
}

/// A deposit made with an id: its amount, and when it was appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptDeposit {
    pub id: String,
    pub amount_cents: i64,
    pub at_ms: i64,
}

/// Most deposits with an id an account keeps; beyond, the oldest go first.
pub const MAX_KEPT_DEPOSITS: usize = 1_000;

/// Money totals of one partition; with all partitions they prove conservation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountStats {
    /// Accounts opened on this partition.
    pub account_count: u64,
    /// Money that entered the system here: opening balances and deposits.
    pub funded_cents: i64,
    /// Sum of this partition's balances.
    pub balance_sum_cents: i64,
    /// Money taken by debits here.
    pub debited_cents: i64,
    /// Money given by credits here.
    pub credited_cents: i64,
    /// Money given back by refunds here.
    pub refunded_cents: i64,
    /// The screening rules in force on this partition.
    pub screening: ScreeningRules,
    /// The offset in `control.commands` of the command that set them.
    pub screening_version: Option<u64>,
}

impl AccountStats {
    /// Adds another partition's totals (for the ledger over all partitions).
    pub fn add(&mut self, other: &Self) {
        self.account_count += other.account_count;
        self.funded_cents += other.funded_cents;
        self.balance_sum_cents += other.balance_sum_cents;
        self.debited_cents += other.debited_cents;
        self.credited_cents += other.credited_cents;
        self.refunded_cents += other.refunded_cents;
    }
}

pub struct Accounts;

impl Processor for Accounts {
    type State = Account;
    type Stats = AccountStats;
    const NAME: &'static str = "account";
    const TABLE: &'static str = "a";
    const PACKED: bool = true;

    fn state_key(event: &Event) -> Option<&str> {
        match event {
            Event::OpenAccount { account, .. }
            | Event::Deposit { account, .. }
            | Event::KeyedDeposit { account, .. }
            | Event::CloseAccount { account, .. }
            | Event::CloseAccountTo { account, .. } => Some(account),
            Event::Debit { payment, .. }
            | Event::Refund { payment, .. }
            | Event::Release { payment } => Some(&payment.from),
            Event::Credit { payment, .. } => Some(&payment.to),
            _ => None,
        }
    }

    fn handle(
        state: &mut Option<Account>,
        stats: &mut AccountStats,
        event: Event,
        ctx: &Ctx,
    ) -> Result<Option<Emit>, ProcessError> {
        match event {
            Event::OpenAccount {
                account,
                opening_balance_cents,
                ..
            } => open(state, stats, account, opening_balance_cents, ctx).map(|()| None),
            Event::Deposit { amount_cents, .. } => deposit(state, stats, amount_cents, ctx),
            Event::KeyedDeposit {
                amount_cents, id, ..
            } => keyed_deposit(state, stats, id, amount_cents, ctx),
            Event::CloseAccount { .. } => {
                closing::close(state, ctx);
                Ok(None)
            }
            Event::CloseAccountTo { to, payment_id, .. } => {
                closing::close_to(state, to, payment_id, ctx)
            }
            Event::Debit { payment, lineage } => debit(state, stats, payment, lineage, ctx),
            Event::Release { payment } => {
                unchanged_on_error(state, |state| release(state, stats, &payment, ctx))
            }
            Event::ScreeningRules { rules, version } => {
                stats.screening = rules;
                stats.screening_version = Some(version);
                Ok(None)
            }
            Event::Credit { payment, lineage } => credit(state, stats, payment, lineage, ctx),
            Event::Refund {
                payment,
                reason,
                lineage,
            } => refund(state, stats, payment, reason, lineage, ctx),
            other => Err(ProcessError::UnexpectedEvent { kind: other.kind() }),
        }
    }
}

fn open(
    state: &mut Option<Account>,
    stats: &mut AccountStats,
    id: String,
    opening_balance_cents: i64,
    ctx: &Ctx,
) -> Result<(), ProcessError> {
    if state.is_some() {
        // Opening is idempotent: a second open changes nothing.
        return Ok(());
    }
    if opening_balance_cents < 0 {
        return Err(ProcessError::ImpossibleState(format!(
            "account {id} opened with negative balance {opening_balance_cents}"
        )));
    }
    let funded = checked_add(stats.funded_cents, opening_balance_cents, "funded")?;
    let sum = checked_add(stats.balance_sum_cents, opening_balance_cents, "balances")?;
    stats.funded_cents = funded;
    stats.balance_sum_cents = sum;
    stats.account_count += 1;
    *state = Some(Account {
        id,
        balance_cents: opening_balance_cents,
        status: AccountStatus::Open,
        opened_at_ms: ctx.now_ms,
        updated_at_ms: ctx.now_ms,
        last_payment_id: None,
        payer: None,
        deposits: None,
        closing: None,
        closed_at_ms: None,
        emptied_by: None,
    });
    Ok(())
}

fn deposit(
    state: &mut Option<Account>,
    stats: &mut AccountStats,
    amount_cents: i64,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    let Some(account) = state.as_mut().filter(|a| a.status == AccountStatus::Open) else {
        return Err(ProcessError::ImpossibleState(
            "deposit to a missing or closed account".into(),
        ));
    };
    if amount_cents <= 0 {
        return Err(ProcessError::ImpossibleState(format!(
            "deposit of {amount_cents} cents"
        )));
    }
    let balance = checked_add(account.balance_cents, amount_cents, "balance")?;
    let funded = checked_add(stats.funded_cents, amount_cents, "funded")?;
    let sum = checked_add(stats.balance_sum_cents, amount_cents, "balances")?;
    account.balance_cents = balance;
    account.updated_at_ms = ctx.now_ms;
    stats.funded_cents = funded;
    stats.balance_sum_cents = sum;
    Ok(None)
}

/// A deposit with an id: applied once; the same id again changes nothing,
/// with another amount it is an error (the API refuses it with 409 first).
fn keyed_deposit(
    state: &mut Option<Account>,
    stats: &mut AccountStats,
    id: String,
    amount_cents: i64,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    let kept = state.as_ref().and_then(|a| a.deposits.as_deref());
    if let Some(before) = kept.and_then(|d| d.iter().find(|k| k.id == id)) {
        if before.amount_cents == amount_cents {
            return Ok(None);
        }
        return Err(ProcessError::ImpossibleState(format!(
            "deposit {id} made again with {amount_cents} cents, first with {}",
            before.amount_cents
        )));
    }
    deposit(state, stats, amount_cents, ctx)?;
    let account = state.as_mut().expect("deposited");
    let deposits = account.deposits.get_or_insert_with(Box::default);
    deposits.retain(|k| k.at_ms >= ctx.forgotten_before_ms);
    if deposits.len() >= MAX_KEPT_DEPOSITS {
        deposits.remove(0);
    }
    deposits.push(KeptDeposit {
        id,
        amount_cents,
        at_ms: ctx.received_at_ms,
    });
    Ok(None)
}

/// Screens a debit (when rules are on), lets it wait for the payer's
/// previous payment (when that rule is on), else debits. With no rule on
/// and nothing kept for the payer, it is the debit alone.
fn debit(
    state: &mut Option<Account>,
    stats: &mut AccountStats,
    payment: PaymentRef,
    lineage: Vec<Hop>,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    let screened = match state.as_ref() {
        Some(a) if a.status == AccountStatus::Open => {
            stats.screening.any() || a.payer.as_ref().is_some_and(|p| p.current.is_some())
        }
        _ => false,
    };
    if !screened {
        return debit_now(state, stats, payment, lineage, ctx);
    }
    unchanged_on_error(state, |state| {
        screen_then_debit(state, stats, payment, lineage, ctx)
    })
}

/// Runs `change` on the row, and puts the row back as it was when it
/// fails: the processor's contract, for the steps that change the payer's
/// part of the row before the debit may fail.
fn unchanged_on_error(
    state: &mut Option<Account>,
    change: impl FnOnce(&mut Option<Account>) -> Result<Option<Emit>, ProcessError>,
) -> Result<Option<Emit>, ProcessError> {
    let before = state.clone();
    let result = change(state);
    if result.is_err() {
        *state = before;
    }
    result
}

fn screen_then_debit(
    state: &mut Option<Account>,
    stats: &mut AccountStats,
    payment: PaymentRef,
    mut lineage: Vec<Hop>,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    let rules = &stats.screening;
    let account = state.as_mut().expect("screened accounts exist");
    let payer = account.payer.get_or_insert_with(Box::default);
    let approved = lineage.iter().any(|h| h.stage == Stage::Approved);
    if rules.any() && !approved {
        lineage.push(hop(Stage::Screened, ctx));
        match screening::screen(rules, Some(payer), &payment) {
            Verdict::Reject(reason) => {
                drop_if_empty(account);
                let outcome = Outcome::Rejected(reason);
                return Ok(Some(completed(payment, outcome, lineage, ctx)));
            }
            Verdict::Hold => {
                screening::count_admitted(rules, payer, payment.accepted_at_ms);
                drop_if_empty(account);
                let key = payment.id.clone();
                let event = Event::Held { payment, lineage };
                let topic = OutTopic::Complete;
                return Ok(Some(Emit { topic, key, event }));
            }
            Verdict::Pass => screening::count_admitted(rules, payer, payment.accepted_at_ms),
        }
    }
    match payer.current.clone() {
        Some(before) if before != payment.id => {
            if payer.waiting.len() >= MAX_WAITING_PER_PAYER {
                let outcome = Outcome::Rejected(Reason::QueueFull);
                return Ok(Some(completed(payment, outcome, lineage, ctx)));
            }
            lineage.push(hop(Stage::Waiting, ctx));
            payer.waiting.push_back(WaitingPayment {
                payment: payment.clone(),
                lineage: lineage.clone(),
            });
            let key = payment.id.clone();
            let event = Event::Waiting {
                payment,
                waiting_for: before,
                lineage,
            };
            let topic = OutTopic::Complete;
            return Ok(Some(Emit { topic, key, event }));
        }
        _ if rules.single_inflight() => payer.current = Some(payment.id.clone()),
        _ => {}
    }
    drop_if_empty(account);
    debit_now(state, stats, payment, lineage, ctx)
}

/// Keeps no payer part in a row that has nothing in it.
fn drop_if_empty(account: &mut Account) {
    if account.payer.as_ref().is_some_and(|p| p.is_empty()) {
        account.payer = None;
    }
}

/// A screened payment of this payer is terminal: if it was the one the
/// payer's next payment waits for, that one goes now.
fn release(
    state: &mut Option<Account>,
    stats: &mut AccountStats,
    payment: &PaymentRef,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    if closing::confirmed(state, &payment.id, ctx) {
        return Ok(None);
    }
    let Some(payer) = state.as_mut().and_then(|a| a.payer.as_mut()) else {
        return Ok(None);
    };
    if payer.current.as_deref() != Some(payment.id.as_str()) {
        return Ok(None);
    }
    payer.current = None;
    let Some(next) = payer.waiting.pop_front() else {
        drop_if_empty(state.as_mut().expect("has a payer"));
        return Ok(None);
    };
    payer.current = Some(next.payment.id.clone());
    debit_now(state, stats, next.payment, next.lineage, ctx)
}

/// Takes the money, or rejects the payment when it cannot be taken.
fn debit_now(
    state: &mut Option<Account>,
    stats: &mut AccountStats,
    payment: PaymentRef,
    mut lineage: Vec<Hop>,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    let refusal = match state {
        None => Some(Reason::UnknownAccount),
        Some(a) if !a.may_debit(&payment.id) => Some(Reason::AccountClosed),
        Some(a) if a.balance_cents < payment.amount_cents => Some(Reason::InsufficientFunds),
        Some(_) => None,
    };
    if let Some(reason) = refusal.or((payment.amount_cents <= 0).then_some(Reason::Invalid)) {
        lineage.push(hop(Stage::Rejected, ctx));
        let outcome = Outcome::Rejected(reason);
        return Ok(Some(completed(payment, outcome, lineage, ctx)));
    }
    let account = state.as_mut().expect("checked above");
    let debited = checked_add(stats.debited_cents, payment.amount_cents, "debited")?;
    stats.balance_sum_cents = checked_sub(stats.balance_sum_cents, payment.amount_cents, "sum")?;
    stats.debited_cents = debited;
    account.balance_cents -= payment.amount_cents;
    assert!(account.balance_cents >= 0, "balance below zero after debit");
    account.updated_at_ms = ctx.now_ms;
    account.last_payment_id = Some(payment.id.clone());
    if account.status == AccountStatus::Closing {
        // The inflight processor sends a `Release` when it completes.
        lineage.push(hop(Stage::Closing, ctx));
    }
    lineage.push(hop(Stage::Debited, ctx));
    Ok(Some(Emit {
        topic: OutTopic::Inflight,
        key: payment.to.clone(),
        event: Event::Credit { payment, lineage },
    }))
}

fn credit(
    state: &mut Option<Account>,
    stats: &mut AccountStats,
    payment: PaymentRef,
    mut lineage: Vec<Hop>,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    let amount = payment.amount_cents;
    let landing = match state {
        None => Err(Reason::UnknownAccount),
        Some(a) if a.status != AccountStatus::Open => Err(Reason::AccountClosed),
        Some(a) => a
            .balance_cents
            .checked_add(amount)
            .ok_or(Reason::BalanceOverflow),
    };
    let balance = match landing {
        Ok(balance) => balance,
        Err(reason) => {
            // The saga's compensation: the money goes back to `from`.
            lineage.push(hop(Stage::Rejected, ctx));
            return Ok(Some(Emit {
                topic: OutTopic::Inflight,
                key: payment.from.clone(),
                event: Event::Refund {
                    payment,
                    reason,
                    lineage,
                },
            }));
        }
    };
    let credited = checked_add(stats.credited_cents, amount, "credited")?;
    let sum = checked_add(stats.balance_sum_cents, amount, "balances")?;
    let account = state.as_mut().expect("checked above");
    stats.credited_cents = credited;
    stats.balance_sum_cents = sum;
    account.balance_cents = balance;
    account.updated_at_ms = ctx.now_ms;
    account.last_payment_id = Some(payment.id.clone());
    lineage.push(hop(Stage::Credited, ctx));
    Ok(Some(completed(payment, Outcome::Confirmed, lineage, ctx)))
}

fn refund(
    state: &mut Option<Account>,
    stats: &mut AccountStats,
    payment: PaymentRef,
    reason: Reason,
    mut lineage: Vec<Hop>,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    // The refund goes to the account that was debited, open or closed since:
    // money is never dropped.
    let Some(account) = state.as_mut() else {
        return Err(ProcessError::ImpossibleState(format!(
            "refund of payment {} to missing account {}",
            payment.id, payment.from
        )));
    };
    let balance = checked_add(account.balance_cents, payment.amount_cents, "balance")?;
    let refunded = checked_add(stats.refunded_cents, payment.amount_cents, "refunded")?;
    let sum = checked_add(stats.balance_sum_cents, payment.amount_cents, "balances")?;
    account.balance_cents = balance;
    account.updated_at_ms = ctx.now_ms;
    stats.refunded_cents = refunded;
    stats.balance_sum_cents = sum;
    closing::reversed(account, &payment.id);
    lineage.push(hop(Stage::Refunded, ctx));
    Ok(Some(completed(
        payment,
        Outcome::Reversed(reason),
        lineage,
        ctx,
    )))
}

#[cfg(test)]
mod tests;
