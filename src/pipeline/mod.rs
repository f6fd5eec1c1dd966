//! Pillar 1, the business function: three stream processors as pure logic.
//!
//! A processor sees one decoded event at a time with the state of the one key
//! that event touches and its partition's statistics; it returns at most one
//! event to emit. It never sees a channel, a socket, sled or the log: the
//! runtime (`runtime::task`) owns those, so these rules test in microseconds.

pub mod account;
pub mod confirmed;
pub mod control;
pub mod inflight;
pub mod screening;
pub mod windows;

use serde::{de::DeserializeOwned, Serialize};

use crate::model::{Event, Hop, Outcome, PaymentRef, SourceTopic, Stage, Submitter};

/// Topics a processor writes to (names come from config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OutTopic {
    /// Back to `payment.incoming`, on the partition the key belongs to.
    Incoming,
    Inflight,
    /// A copy on every partition of `payment.inflight` (the key is only a label).
    EveryInflight,
    Complete,
    Confirmed,
}

/// One record a processor wants appended, keyed for partitioning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    /// Where it goes.
    pub topic: OutTopic,
    /// Partitioning key: account id on `payment.inflight`, payment id elsewhere.
    pub key: String,
    /// What it says.
    pub event: Event,
}

/// Where the record being handled sits, and the time the runtime read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ctx<'a> {
    pub topic: SourceTopic,
    pub partition: u32,
    pub offset: u64,
    /// When the record was appended to its topic (the hop's time in).
    pub received_at_ms: i64,
    /// When the runtime read it (the hop's time out).
    pub now_ms: i64,
    /// Partitions of every topic (where a key belongs).
    pub partitions: u32,
    /// Rows carrying a time before this may have been forgotten (see
    /// [`Processor::retention`]): the newest append time of a
    /// `payment.incoming` record read on this partition, this one included,
    /// less the retention. It depends only on that topic's order, so a
    /// replay of the log decides the same.
    pub forgotten_before_ms: i64,
    /// Largest amount of one payment (`limits.max_amount_cents`): records
    /// other producers wrote are held to the API's bound.
    pub max_amount_cents: i64,
    /// Who submitted the payment the record carries, when the record says
    /// so believably (see `model::Submitter`).
    pub submitted_by: Option<&'a Submitter>,
}

/// A record the processor cannot act on. The runtime dead-letters it and goes
/// on; a business refusal is never one of these (it is an `Outcome`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    #[error("event {kind} does not belong on this processor's input")]
    UnexpectedEvent { kind: &'static str },
    #[error("impossible transition: {0}")]
    ImpossibleState(String),
    #[error("arithmetic overflow: {0}")]
    Overflow(String),
    /// Older than the retention: it could be a copy of a forgotten row, so
    /// applying it could apply it twice.
    #[error("expired: {0}")]
    Expired(String),
}

/// The contract between pure logic and the runtime.
pub trait Processor: Send + Sync + 'static {
    /// Per-key state (a row of a state table).
    type State: Clone + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Per-partition statistics, kept in memory and checkpointed with offsets.
    type Stats: Clone + Default + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Name used for task ids, metrics and the DLQ.
    const NAME: &'static str;
    /// Prefix of this processor's state rows in the store.
    const TABLE: &'static str;

    /// The state key `event` reads and writes, if any (none: a processor
    /// that keeps totals only).
    fn state_key(_event: &Event) -> Option<&str> {
        None
    }

    /// Whether the runtime shows this processor's input events (those not
    /// already applied) to the instrumentation plane's observer before
    /// `handle`. The processor itself stays pure: it never records anything.
    const OBSERVED: bool = false;

    /// The record of another input that must be applied before `event`, as
    /// (input, partition, offset): a completion needs its payment's
    /// admission. After a restart the inputs are re-read from a checkpoint,
    /// and a derived record can be read before the one it derives from.
    fn prerequisite(_event: &Event) -> Option<(SourceTopic, u32, u64)> {
        None
    }

    /// Whether a row is unlikely to be touched again, so the runtime may drop
    /// it from memory as soon as the store has it (a terminal payment).
    fn is_settled(_state: &Self::State) -> bool {
        false
    }

    /// Whether this table's rows change often and are all kept for good
    /// (accounts): the runtime then writes a row's key alone, once, when
    /// it is new (so that listings find it in key order), and every version
    /// of the row into blocks of rows (`store/blocks/`), where sled's cost
    /// is per block, not per row.
    const PACKED: bool = false;

    /// For a row the runtime may forget (a payment that is over): the time
    /// it carries; the row goes once that is before
    /// [`Ctx::forgotten_before_ms`]. `None`: the row is kept for good.
    fn retention(_state: &Self::State) -> Option<i64> {
        None
    }

    /// Applies `event`. On `Err`, `state` and `stats` must be left unchanged.
    fn handle(
        state: &mut Option<Self::State>,
        stats: &mut Self::Stats,
        event: Event,
        ctx: &Ctx,
    ) -> Result<Option<Emit>, ProcessError>;
}

/// The hop of `stage` for the record `ctx` describes.
pub(crate) fn hop(stage: Stage, ctx: &Ctx) -> Hop {
    Hop {
        stage,
        partition: ctx.partition,
        offset: ctx.offset,
        at_ms: ctx.now_ms,
        received_at_ms: ctx.received_at_ms,
    }
}

/// The completion of `payment` with `outcome`, keyed by the payment id, as
/// the processor handling `ctx` decides it.
pub(crate) fn completed(
    payment: PaymentRef,
    outcome: Outcome,
    lineage: Vec<Hop>,
    ctx: &Ctx,
) -> Emit {
    Emit {
        topic: OutTopic::Complete,
        key: payment.id.clone(),
        event: Event::Completed {
            payment,
            outcome,
            completed_at_ms: ctx.now_ms,
            lineage,
        },
    }
}

/// Adds with overflow as an error naming what overflowed.
pub(crate) fn checked_add(left: i64, right: i64, what: &str) -> Result<i64, ProcessError> {
    left.checked_add(right)
        .ok_or_else(|| ProcessError::Overflow(format!("{what}: {left} + {right}")))
}

/// Subtracts with overflow as an error naming what overflowed.
pub(crate) fn checked_sub(left: i64, right: i64, what: &str) -> Result<i64, ProcessError> {
    left.checked_sub(right)
        .ok_or_else(|| ProcessError::Overflow(format!("{what}: {left} - {right}")))
}

#[cfg(test)]
mod conservation_tests;
