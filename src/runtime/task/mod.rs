//! One task per (processor, partition): read a batch from each input, apply it
//! through the pure processor, append the outputs (durably), and every commit
//! interval write changed rows, dead letters, input offsets and statistics to
//! the store in one atomic batch.
//!
//! Exactly-once effect: after a crash a task restarts from its last checkpoint
//! and reprocesses what followed, emitting copies of outputs it already wrote.
//! Every output carries its source (topic, partition, offset), and every task
//! checkpoints the highest source offset it applied per upstream partition, so
//! a copy is recognised and skipped. Processing is deterministic given the
//! state and the input order, so the skipped copy says what the first did.

mod apply;
mod checkpoint;
mod collect;
mod input;
mod role;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::Core;
use super::dead_letter::DeadLetter;
use super::task_view::TaskView;
use super::RuntimeError;
use crate::failpoint::{self, Point};
use crate::log::TopicPartition;
use crate::model::SourceTopic;
use crate::pipeline::Processor;
use crate::store::{AppliedKey, Checkpoint};

/// The running state of one task, owned by its loop.
struct TaskLoop<P: Processor> {
    core: Arc<Core>,
    task: Arc<TaskView<P>>,
    /// Each input: kind, topic-partition and the next offset to read.
    inputs: Vec<(SourceTopic, TopicPartition, u64)>,
    /// Highest source offset applied per upstream partition.
    applied_sources: BTreeMap<AppliedKey, u64>,
    /// Dead letters waiting for the next checkpoint.
    dead_letters: Vec<DeadLetter>,
    /// When the last checkpoint was written.
    last_commit: Instant,
    /// Whether anything changed since the last checkpoint.
    uncommitted: bool,
    /// Rows changed since the last checkpoint (upper bound).
    dirty_rows: usize,
    /// The last read found new payments but no admission tokens.
    throttled: bool,
    /// Replaying (`kpay rebuild`): read every input up to these positions,
    /// ignoring pause and rate limit, append nothing, then stop.
    until: Option<Positions>,
    /// A record waits for its prerequisite: read this input up to this
    /// offset first (pause and rate limit do not apply: it was admitted
    /// before the restart).
    catch_up: Option<(usize, u64)>,
    /// The record (input, offset) waiting for the catch-up.
    deferred: Option<(usize, u64)>,
    /// The record (input, offset) whose prerequisite does not exist; it is
    /// processed without it (and dead-lettered by the processor).
    orphan: Option<(usize, u64)>,
    /// The retention's clock: the newest append time of a
    /// `payment.incoming` record read.
    clock_ms: i64,
    /// How long rows that may be forgotten are kept (`limits.payment_retention_seconds`).
    retention_ms: i64,
    /// Acting as the partition's owner (appends), or following its owner
    /// (appends nothing); see `role.rs`.
    owner: bool,
    /// The positions last published (owners on a cluster publish each
    /// checkpoint that moved).
    last_published: Option<Positions>,
    /// When this task last took a snapshot (owners on a cluster).
    last_snapshot: Option<Instant>,
}

/// Next offset to read per input (topic kind, partition).
pub type Positions = BTreeMap<(SourceTopic, u32), u64>;

/// Pause before calling the log again after it was unavailable.
const LOG_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How often a rate-limited task looks for new admission tokens.
const THROTTLE_POLL: Duration = Duration::from_millis(5);

/// Runs one task until shutdown; writes a final checkpoint on the way out.
pub async fn run<P: Processor>(
    core: Arc<Core>,
    task: Arc<TaskView<P>>,
    checkpoint: Checkpoint<P::Stats>,
    input_partitions: Vec<(SourceTopic, u32)>,
    until: Option<Positions>,
) -> Result<(), RuntimeError> {
    let mut state = TaskLoop::new(core.clone(), task, checkpoint, input_partitions, until);
    state.owner = state.always_acts();
    if !state.owner {
        (core.ownership).acting(P::NAME, state.task.partition, false);
    }
    state.start_positions().await?;
    state.publish_positions();
    let start_hw = state.high_watermarks().await?;
    let commit_every = Duration::from_millis(core.config.pipeline.commit_interval_ms);
    loop {
        if core.processors_stop.is_cancelled() || state.replayed_all() {
            break;
        }
        state.settle_role().await?;
        let batch = match state.read_batch().await {
            Ok(batch) => batch,
            Err(RuntimeError::Log(error)) if error.is_transient() => {
                state.pause_for_log(&error).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        if !state.task.caught_up.load(Ordering::Relaxed) && state.reached(&start_hw) {
            state.task.caught_up.store(true, Ordering::Relaxed);
        }
        if batch.is_empty() {
            // Through a read with nothing to do: up again after a restart.
            state.task.mark_up();
            // Idle with changes: checkpoint once the commit interval is up
            // (not at every pause, which would write busy rows per batch).
            let since = state.last_commit.elapsed();
            if state.uncommitted && since >= commit_every {
                state.checkpoint()?;
            }
            // Until the next checkpoint is due, or one interval when none is.
            let wait = if state.uncommitted {
                commit_every
                    .saturating_sub(since)
                    .max(Duration::from_millis(1))
            } else {
                commit_every
            };
            match state.wait_for_input(wait).await {
                Err(RuntimeError::Log(error)) if error.is_transient() => {
                    state.pause_for_log(&error).await;
                }
                other => other?,
            }
            continue;
        }
        let records = batch.len();
        let outputs = state.apply(batch)?;
        if let Some(delay) = core.throttle.delay(P::NAME, records) {
            tokio::time::sleep(delay).await;
        }
        if state.until.is_none() && state.owner {
            let records = state.encode_outputs(outputs);
            state.produce_until_durable(&records).await?;
            failpoint::pass(Point::TaskAfterProduce);
        }
        state.task.mark_up();
        let rows = state.dirty_rows;
        if rows >= core.config.pipeline.checkpoint_max_rows
            || state.last_commit.elapsed() >= commit_every
        {
            state.checkpoint()?;
        }
    }
    state.checkpoint()
}

impl<P: Processor> TaskLoop<P> {
    fn new(
        core: Arc<Core>,
        task: Arc<TaskView<P>>,
        checkpoint: Checkpoint<P::Stats>,
        input_partitions: Vec<(SourceTopic, u32)>,
        until: Option<Positions>,
    ) -> Self {
        let inputs = input_partitions
            .into_iter()
            .map(|(kind, partition)| {
                let tp = TopicPartition::new(core.config.topics.name(kind), partition);
                let next = checkpoint.next_offsets.get(&(kind, partition)).copied();
                (kind, tp, next.unwrap_or(0))
            })
            .collect();
        let retention_ms = i64::try_from(core.config.limits.payment_retention_seconds)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        Self {
            core,
            task,
            inputs,
            applied_sources: checkpoint.applied_sources,
            dead_letters: Vec::new(),
            last_commit: Instant::now(),
            uncommitted: false,
            dirty_rows: 0,
            throttled: false,
            until,
            catch_up: None,
            deferred: None,
            orphan: None,
            clock_ms: checkpoint.clock_ms,
            retention_ms,
            owner: true,
            last_published: None,
            last_snapshot: None,
        }
    }

    /// Appends a batch's outputs, retrying while the log is unavailable or
    /// its device full, until they are durable or the processors stop.
    async fn produce_until_durable(&mut self, outputs: &apply::Groups) -> Result<(), RuntimeError> {
        let core = self.core.clone();
        loop {
            match self.produce(outputs).await {
                Ok(()) => {
                    if !outputs.is_empty() {
                        core.space.note_success();
                    }
                    return Ok(());
                }
                // The outputs are appended again whole: copies of those that
                // did land are skipped downstream like any replayed record.
                // A full device is retried the same way: the log cut back
                // what it could not keep, and appends succeed once space is freed.
                Err(RuntimeError::Log(error))
                    if error.is_transient() && !core.processors_stop.is_cancelled() =>
                {
                    if error.is_no_space() {
                        core.space.note_refusal(error.to_string());
                    }
                    self.pause_for_log(&error).await;
                }
                // Stopping with outputs not appended: no checkpoint past
                // them; the next start processes this batch again.
                Err(error) => return Err(error),
            }
        }
    }
}

fn error_class(error: &crate::pipeline::ProcessError) -> &'static str {
    use crate::pipeline::ProcessError;
    match error {
        ProcessError::UnexpectedEvent { .. } => "unexpected_event",
        ProcessError::ImpossibleState(_) => "impossible_state",
        ProcessError::Overflow(_) => "overflow",
        ProcessError::Expired(_) => "expired",
    }
}

#[cfg(test)]
mod error_class_tests {
    use crate::pipeline::ProcessError;

    // Every class a processor's error maps to is one the DLQ filter accepts.
    #[test]
    fn every_error_class_is_listed() {
        let errors = [
            ProcessError::UnexpectedEvent { kind: "x" },
            ProcessError::ImpossibleState(String::new()),
            ProcessError::Overflow(String::new()),
            ProcessError::Expired(String::new()),
        ];
        for error in errors {
            let class = super::error_class(&error);
            assert!(
                crate::runtime::dead_letter::CLASSES.contains(&class),
                "{class}"
            );
        }
    }
}
