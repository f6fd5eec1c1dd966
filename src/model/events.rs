//! Events: what processors tell each other through topics.

use serde::{Deserialize, Serialize};

use super::{Reason, ScreeningRules};

/// The processing step that read a record; names hops in lineage and the
/// sources of derived records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Durable append to `payment.incoming` by the ingest path.
    Submitted,
    /// The inflight processor admitted the payment and asked for the debit.
    Admitted,
    /// The account processor debited `from`.
    Debited,
    /// The account processor credited `to`.
    Credited,
    /// The account processor credited the debit back to `from`.
    Refunded,
    /// The account processor refused the debit.
    Rejected,
    /// The inflight processor recorded the terminal state.
    Completed,
    /// The account processor screened the payment before its debit.
    Screened,
    /// The inflight processor recorded that screening held the payment for
    /// an operator's review.
    Held,
    /// An operator approved the held payment (the inflight processor sent
    /// its debit again).
    Approved,
    /// An operator declined the held payment.
    Declined,
    /// The payer's previous payment is not terminal yet: this one waits.
    Waiting,
    /// The payment moves a closing account's whole balance to the account
    /// named at the close (the account processor debits it as its last).
    Closing,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::Admitted => "admitted",
            Self::Debited => "debited",
            Self::Credited => "credited",
            Self::Refunded => "refunded",
            Self::Rejected => "rejected",
            Self::Completed => "completed",
            Self::Screened => "screened",
            Self::Held => "held",
            Self::Approved => "approved",
            Self::Declined => "declined",
            Self::Waiting => "waiting",
            Self::Closing => "closing",
        }
    }

    /// The processor that takes this step.
    pub fn processor(self) -> &'static str {
        match self {
            Self::Submitted => "ingest",
            Self::Admitted | Self::Completed | Self::Held | Self::Approved | Self::Declined => {
                "inflight"
            }
            Self::Debited
            | Self::Credited
            | Self::Refunded
            | Self::Rejected
            | Self::Screened
            | Self::Waiting
            | Self::Closing => "account",
        }
    }

    /// The topic of the record this step reads (`Submitted` writes it).
    pub fn input(self) -> SourceTopic {
        match self {
            Self::Submitted | Self::Admitted | Self::Approved | Self::Declined => {
                SourceTopic::Incoming
            }
            Self::Debited
            | Self::Credited
            | Self::Refunded
            | Self::Rejected
            | Self::Screened
            | Self::Waiting
            | Self::Closing => SourceTopic::Inflight,
            Self::Completed | Self::Held => SourceTopic::Complete,
        }
    }
}

/// Which input topic a derived record came from; with partition and offset it
/// names the record exactly, so consumers can skip copies after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SourceTopic {
    Incoming,
    Inflight,
    Complete,
    /// `control.commands` (added after the first three: the index is on disk).
    Control,
    /// Not a topic: an operator's replay of a dead letter; its "offset" is
    /// the replay's sequence number.
    Replay,
    /// Not a topic: kpay's own writes from its API (account events, control
    /// commands); its "partition" is the writer, its "offset" the writer's
    /// sequence number, growing in append order.
    Api,
}

/// The input record an output record was derived from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Source {
    /// Topic of the input record.
    pub topic: SourceTopic,
    /// Partition of the input record.
    pub partition: u32,
    /// Offset of the input record; a producer emits in increasing offset order.
    pub offset: u64,
}

/// One step of a payment's path through the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// What happened at this step.
    pub stage: Stage,
    /// Partition of the record that was processed.
    pub partition: u32,
    /// Offset of the record that was processed.
    pub offset: u64,
    /// Time out: wall-clock time of processing, ms since the epoch.
    pub at_ms: i64,
    /// Time in: when the processed record was appended to its topic.
    pub received_at_ms: i64,
}

/// The facts of a payment that every stage needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRef {
    /// Idempotency key chosen by the client or generated (UUID v7).
    pub id: String,
    /// Account debited.
    pub from: String,
    /// Account credited.
    pub to: String,
    /// Amount in minor units; always > 0 once admitted.
    pub amount_cents: i64,
    /// When the ingest path made it durable; latency is measured from here.
    pub accepted_at_ms: i64,
}

impl PaymentRef {
    /// The parts a client chose; two submissions with one id must agree on these.
    pub fn same_request(&self, other: &PaymentRef) -> bool {
        self.id == other.id
            && self.from == other.from
            && self.to == other.to
            && self.amount_cents == other.amount_cents
    }
}

/// Who submitted a payment: kept with it for as long as it is kept, so that
/// every payment stays attributable after the audit trail moved on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitter {
    /// The principal as in the audit trail: `local`, `teller#0`, `generator`, …
    pub principal: String,
    /// Where it came from: the caller's address, or the component's name.
    pub source: String,
    /// With a cluster secret: the HMAC that binds this attribution to its
    /// payment, as hex (see `seal::Sealer::attribution_tag`). Checked when the
    /// record is read, never stored.
    #[serde(skip)]
    pub tag: Option<String>,
}

impl Submitter {
    /// An attribution not signed (yet).
    pub fn new(principal: impl Into<String>, source: impl Into<String>) -> Self {
        Self {
            principal: principal.into(),
            source: source.into(),
            tag: None,
        }
    }
}

/// How a payment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Confirmed,
    Rejected(Reason),
    Reversed(Reason),
}

impl Outcome {
    pub fn status(self) -> super::PaymentStatus {
        match self {
            Self::Confirmed => super::PaymentStatus::Confirmed,
            Self::Rejected(_) => super::PaymentStatus::Rejected,
            Self::Reversed(_) => super::PaymentStatus::Reversed,
        }
    }

    pub fn reason(self) -> Option<Reason> {
        match self {
            Self::Confirmed => None,
            Self::Rejected(reason) | Self::Reversed(reason) => Some(reason),
        }
    }
}

/// Every event of the pipeline. New variants go at the end: the variant index
/// is part of the wire format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// `payment.incoming`: a client's payment, durable and acknowledged.
    PaymentSubmitted(PaymentRef),
    /// `payment.inflight`: open an account with an opening balance.
    OpenAccount {
        account: String,
        opening_balance_cents: i64,
        at_ms: i64,
    },
    /// `payment.inflight`: add money from outside the system.
    Deposit {
        account: String,
        amount_cents: i64,
        at_ms: i64,
    },
    /// `payment.inflight`: close an account whose balance is zero; later
    /// debits and credits fail. One with money in it stays open.
    CloseAccount { account: String, at_ms: i64 },
    /// `payment.inflight`, keyed by `from`: take the money.
    Debit {
        payment: PaymentRef,
        #[serde(with = "super::lineage")]
        lineage: Vec<Hop>,
    },
    /// `payment.inflight`, keyed by `to`: give the money.
    Credit {
        payment: PaymentRef,
        #[serde(with = "super::lineage")]
        lineage: Vec<Hop>,
    },
    /// `payment.inflight`, keyed by `from`: the credit failed, give it back.
    Refund {
        payment: PaymentRef,
        reason: Reason,
        #[serde(with = "super::lineage")]
        lineage: Vec<Hop>,
    },
    /// `payment.complete` and `payment.confirmed`, keyed by payment id.
    Completed {
        payment: PaymentRef,
        outcome: Outcome,
        completed_at_ms: i64,
        #[serde(with = "super::lineage")]
        lineage: Vec<Hop>,
    },
    /// `control.commands`: an operator's command, applied in order.
    Control(ControlCommand),
    /// `payment.inflight`, one copy on every partition (from the control
    /// processor): the screening rules in force from here on, and the
    /// offset of the command in `control.commands` that set them.
    ScreeningRules { rules: ScreeningRules, version: u64 },
    /// `payment.complete`, keyed by payment id: screening held the payment
    /// for review; nothing was debited.
    Held {
        payment: PaymentRef,
        #[serde(with = "super::lineage")]
        lineage: Vec<Hop>,
    },
    /// `payment.complete`, keyed by payment id: the payment waits for the
    /// payer's payment `waiting_for` to be terminal.
    Waiting {
        payment: PaymentRef,
        waiting_for: String,
        #[serde(with = "super::lineage")]
        lineage: Vec<Hop>,
    },
    /// `payment.incoming`, keyed by payment id (kpay's API): an operator
    /// approves or declines a held payment.
    Review {
        payment_id: String,
        approve: bool,
        principal: String,
        at_ms: i64,
        /// Where the inflight processor read the hold (`payment.complete`,
        /// the `held` hop): a replay applies the review after it.
        held_partition: u32,
        held_offset: u64,
    },
    /// `payment.inflight`, keyed by `from`: a screened payment is terminal,
    /// so the payer's next waiting payment may go.
    Release { payment: PaymentRef },
    /// `payment.inflight`: add money from outside the system, once per `id`
    /// (a deposit with an id or an `Idempotency-Key`).
    KeyedDeposit {
        account: String,
        amount_cents: i64,
        at_ms: i64,
        id: String,
    },
    /// `payment.inflight`, keyed by the account: close it and move its
    /// balance to `to` as payment `payment_id` (the account processor
    /// submits it to `payment.incoming`); it closes once that is confirmed.
    CloseAccountTo {
        account: String,
        to: String,
        payment_id: String,
        at_ms: i64,
    },
}

impl Event {
    /// A short name for logs, the DLQ and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PaymentSubmitted(_) => "payment_submitted",
            Self::OpenAccount { .. } => "open_account",
            Self::Deposit { .. } => "deposit",
            Self::CloseAccount { .. } => "close_account",
            Self::Debit { .. } => "debit",
            Self::Credit { .. } => "credit",
            Self::Refund { .. } => "refund",
            Self::Completed { .. } => "completed",
            Self::Control(_) => "control",
            Self::ScreeningRules { .. } => "screening_rules",
            Self::Held { .. } => "held",
            Self::Waiting { .. } => "waiting",
            Self::Review { .. } => "review",
            Self::Release { .. } => "release",
            Self::KeyedDeposit { .. } => "deposit",
            Self::CloseAccountTo { .. } => "close_account",
        }
    }
}

/// What an operator asked the control plane to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlAction {
    /// Stop admitting new payments; admitted ones drain.
    Pause,
    /// Admit again, from where intake stopped.
    Resume,
    /// Admissions per second (0 = unlimited).
    SetRateLimit(u64),
    /// The screening rules from here on (handed to every account partition).
    SetScreeningRules(ScreeningRules),
}

/// A control command as it travels through `control.commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlCommand {
    pub action: ControlAction,
    /// Who asked (the authenticated principal, or `local`).
    pub principal: String,
    /// Why, in the operator's words.
    pub reason: Option<String>,
    /// When it was asked, ms since the epoch.
    pub at_ms: i64,
}

/// What travels in a record's value: the event and, for derived records,
/// the input it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// `None` for records from outside the pipeline (HTTP, tools).
    pub source: Option<Source>,
    /// The event itself.
    pub event: Event,
    /// Who submitted it, for a payment whose record says so. The codec
    /// writes it after the envelope (see `codec`), not as a field of it.
    #[serde(skip)]
    pub submitted_by: Option<Submitter>,
}

impl Envelope {
    /// An event with where it came from, submitted by no one in particular.
    pub fn new(source: Option<Source>, event: Event) -> Self {
        Self {
            source,
            event,
            submitted_by: None,
        }
    }
}
