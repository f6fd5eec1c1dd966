//! Where a task reads: start positions, holds and the pause gate, the rate
//! limit, catching up to a prerequisite, and waiting for new records.

use std::time::Duration;

use futures::future::select_all;

use super::{TaskLoop, THROTTLE_POLL};
use crate::log::StoredRecord;
use crate::model::SourceTopic;
use crate::pipeline::Processor;
use crate::runtime::RuntimeError;

impl<P: Processor> TaskLoop<P> {
    /// Moves a start position below the log start up to it (records removed
    /// by retention were consumed by a checkpoint that a crash may have lost
    /// only if retention ran ahead of the store, which it never does).
    pub(super) async fn start_positions(&mut self) -> Result<(), RuntimeError> {
        for (_, tp, next) in &mut self.inputs {
            let start = self.core.log.log_start(tp).await?;
            if *next < start {
                tracing::warn!(%tp, next = *next, start, "start offset below log start");
                *next = start;
            }
        }
        Ok(())
    }

    /// Inputs not read for now: held by hand, or new payments while paused
    /// (the pause gate: admitted payments still drain through the rest).
    /// A replay reads everything up to its positions.
    pub(super) fn is_held(&self, kind: SourceTopic) -> bool {
        self.until.is_none()
            && self.owner
            && (self.task.is_held(kind)
                || (kind == SourceTopic::Incoming && self.core.admission_paused()))
    }

    /// Whether a replay has read every input up to its positions.
    pub(super) fn replayed_all(&self) -> bool {
        self.until.as_ref().is_some_and(|until| {
            self.inputs.iter().all(|(kind, tp, next)| {
                *next >= until.get(&(*kind, tp.partition)).copied().unwrap_or(0)
            })
        })
    }

    /// Shows where this task reads, for lag.
    pub(super) fn publish_positions(&self) {
        let positions = self
            .inputs
            .iter()
            .map(|(kind, tp, next)| ((*kind, tp.partition), *next));
        *self.task.positions.lock().expect("positions lock") = positions.collect();
    }

    pub(super) async fn high_watermarks(&self) -> Result<Vec<u64>, RuntimeError> {
        let mut marks = Vec::with_capacity(self.inputs.len());
        for (_, tp, _) in &self.inputs {
            marks.push(self.core.log.high_watermark(tp).await?);
        }
        Ok(marks)
    }

    /// Whether every input has been read up to `marks`; a held input (new
    /// payments while paused) waits on purpose and counts as read.
    pub(super) fn reached(&self, marks: &[u64]) -> bool {
        self.inputs
            .iter()
            .zip(marks)
            .all(|((kind, tp, next), mark)| {
                next >= mark
                    || self.is_held(*kind)
                    || matches!(self.follow_bound(*kind, tp.partition), Some(bound) if bound <= *next)
            })
    }

    pub(super) async fn read_batch(&mut self) -> Result<Vec<(usize, StoredRecord)>, RuntimeError> {
        let max = (self.core.config.pipeline.batch_records / self.inputs.len()).max(1);
        self.throttled = false;
        if let Some((index, offset)) = self.catch_up {
            let (_, tp, next) = &self.inputs[index];
            if *next <= offset {
                if offset < self.core.log.high_watermark(tp).await? {
                    let take = max.min((offset + 1 - *next) as usize);
                    let records = self.core.log.read(tp, *next, take).await?;
                    return Ok(records.into_iter().map(|r| (index, r)).collect());
                }
                // A prerequisite that was never written (a foreign record).
                self.orphan = self.deferred;
            }
            self.catch_up = None;
        }
        let mut batch = Vec::new();
        for index in 0..self.inputs.len() {
            let (kind, tp, next) = &self.inputs[index];
            if self.is_held(*kind) {
                continue;
            }
            let mut take = max;
            if let Some(end) = self.read_bound(*kind, tp.partition) {
                take = take.min(end.saturating_sub(*next) as usize);
                if take == 0 {
                    continue;
                }
            } else if *kind == SourceTopic::Incoming && self.core.admission_limited() {
                // The rate limit counts admissions: only records that are
                // there take tokens.
                let waiting = self
                    .core
                    .log
                    .high_watermark(tp)
                    .await?
                    .saturating_sub(*next);
                take = self.core.admission_tokens(max.min(waiting as usize));
                if take == 0 {
                    self.throttled = waiting > 0;
                    continue;
                }
            }
            let records = self.core.log.read(tp, *next, take).await?;
            batch.extend(records.into_iter().map(|record| (index, record)));
        }
        Ok(batch)
    }

    pub(super) async fn wait_for_input(&self, timeout: Duration) -> Result<(), RuntimeError> {
        let log = &self.core.log;
        // Rate-limited with records waiting: look again when tokens refill,
        // not when the (already full) input wakes us, nor when a broker
        // answers a short wait (Kafka brokers may hold it much longer).
        let throttled = self.throttled;
        if throttled {
            tokio::select! {
                () = tokio::time::sleep(THROTTLE_POLL) => {}
                () = self.core.processors_stop.cancelled() => {}
            }
            return Ok(());
        }
        let timeout = if throttled {
            timeout.min(THROTTLE_POLL)
        } else {
            timeout
        };
        let waits: Vec<_> = self
            .inputs
            .iter()
            .filter(|(kind, _, _)| !self.is_held(*kind))
            .filter(|(kind, tp, next)| {
                self.follow_bound(*kind, tp.partition) > Some(*next) || self.owner
            })
            .filter(|(kind, _, _)| !(throttled && *kind == SourceTopic::Incoming))
            .map(|(_, tp, next)| Box::pin(log.wait_for(tp, *next, timeout)))
            .collect();
        // On a cluster, a new assignment wakes the task at once, so that it
        // hands over (or takes over) without waiting for input or the timeout.
        let clustered = self.core.board().is_on();
        let reassigned = async {
            match clustered {
                true => drop(self.core.ownership.changes().changed().await),
                false => std::future::pending().await,
            }
        };
        if waits.is_empty() {
            // Every input is held, or a follower is at its owner's position:
            // look again after the timeout.
            let timeout = if self.owner {
                timeout
            } else {
                super::role::FOLLOW_POLL
            };
            tokio::select! {
                () = tokio::time::sleep(timeout) => {}
                () = self.core.processors_stop.cancelled() => {}
                () = reassigned => {}
            }
            return Ok(());
        }
        tokio::select! {
            (result, _, _) = select_all(waits) => { result?; }
            () = self.core.processors_stop.cancelled() => {}
            () = reassigned => {}
        }
        Ok(())
    }
}
