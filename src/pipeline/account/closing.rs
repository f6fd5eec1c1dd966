//! Closing an account. One with money in it closes only by moving the money
//! out: the close names where it goes, the account turns `closing` (no other
//! payment leaves or enters, so the balance stays what it was), and its whole
//! balance leaves as an ordinary payment, submitted to `payment.incoming`.
//! The account closes when that payment is confirmed (the inflight processor
//! sends the payer a `Release`, as for a screened payment); if it is reversed,
//! the refund reopens it.

use serde::{Deserialize, Serialize};

use super::{Account, AccountStatus};
use crate::model::{Event, PaymentRef};
use crate::pipeline::inflight::validate_payment;
use crate::pipeline::{Ctx, Emit, OutTopic, ProcessError};

/// What a closing account waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closing {
    /// The payment that moves the balance out.
    pub payment_id: String,
    /// Where the balance goes.
    pub to: String,
    /// Its status before (`open`, or `closed` when a late refund had put
    /// money back in a closed account): where a reversal returns it.
    pub was: AccountStatus,
}

impl Account {
    /// Whether payment `id` may take money from it: any, while open; only
    /// the one that empties it, while closing.
    pub fn may_debit(&self, id: &str) -> bool {
        match self.status {
            AccountStatus::Open => true,
            AccountStatus::Closing => self.closing.as_ref().is_some_and(|c| c.payment_id == id),
            AccountStatus::Closed => false,
        }
    }

    fn close_now(&mut self, emptied_by: Option<String>, ctx: &Ctx) {
        self.status = AccountStatus::Closed;
        self.closing = None;
        self.closed_at_ms = Some(ctx.now_ms);
        self.emptied_by = emptied_by;
        self.updated_at_ms = ctx.now_ms;
    }
}

/// A close without a transfer: an open account with nothing in it closes;
/// one with money in it stays open (the API answers `balance_not_zero`).
pub fn close(state: &mut Option<Account>, ctx: &Ctx) {
    if let Some(account) = state.as_mut() {
        if account.status == AccountStatus::Open && account.balance_cents == 0 {
            account.close_now(None, ctx);
        }
    }
}

/// A close that moves the balance to `to` as payment `payment_id`. Empty,
/// it closes at once; closing already, it changes nothing.
pub fn close_to(
    state: &mut Option<Account>,
    to: String,
    payment_id: String,
    ctx: &Ctx,
) -> Result<Option<Emit>, ProcessError> {
    let Some(account) = state.as_mut() else {
        return Ok(None);
    };
    if account.status == AccountStatus::Closing {
        return Ok(None);
    }
    if account.balance_cents == 0 {
        if account.status == AccountStatus::Open {
            account.close_now(None, ctx);
        }
        return Ok(None);
    }
    let payment = PaymentRef {
        id: payment_id.clone(),
        from: account.id.clone(),
        to: to.clone(),
        amount_cents: account.balance_cents,
        accepted_at_ms: ctx.received_at_ms,
    };
    // A transfer the inflight processor would refuse at admission would
    // leave the account closing for ever: such a close is not applied.
    validate_payment(&payment, ctx.max_amount_cents).map_err(|why| {
        ProcessError::ImpossibleState(format!(
            "closing account {} by payment {payment_id}: {why}",
            account.id
        ))
    })?;
    account.closing = Some(Box::new(Closing {
        payment_id: payment_id.clone(),
        to,
        was: account.status,
    }));
    account.status = AccountStatus::Closing;
    account.updated_at_ms = ctx.now_ms;
    Ok(Some(Emit {
        topic: OutTopic::Incoming,
        key: payment_id,
        event: Event::PaymentSubmitted(payment),
    }))
}

/// Payment `id` is confirmed: if it emptied this closing account, the
/// account is closed now. Returns whether it did.
pub fn confirmed(state: &mut Option<Account>, id: &str, ctx: &Ctx) -> bool {
    let Some(account) = state.as_mut() else {
        return false;
    };
    if account.status != AccountStatus::Closing || !account.may_debit(id) {
        return false;
    }
    account.close_now(Some(id.to_owned()), ctx);
    true
}

/// Payment `id` came back (its credit failed): if it was to empty this
/// closing account, the account is what it was before the close.
pub fn reversed(account: &mut Account, id: &str) {
    if account.status == AccountStatus::Closing && account.may_debit(id) {
        account.status = account
            .closing
            .take()
            .map_or(AccountStatus::Open, |c| c.was);
    }
}
