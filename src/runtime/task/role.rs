//! Owner or follower (see `runtime::ownership`): a task of a partition this
//! instance owns processes and appends; any other follows the owner's
//! published checkpoints, applying without appending. The switch is made
//! between batches: to follow, the task first checkpoints (and so
//! publishes where it stands); to own, it first catches up with the last
//! position the previous owner published.

use std::time::Duration;

use super::TaskLoop;
use crate::log::TopicPartition;
use crate::model::SourceTopic;
use crate::pipeline::control::ControlPlane;
use crate::pipeline::Processor;
use crate::runtime::RuntimeError;

/// How long a follower at its owner's position waits before looking again.
pub(super) const FOLLOW_POLL: Duration = Duration::from_millis(50);

impl<P: Processor> TaskLoop<P> {
    /// Whether this task always acts: no cluster, a replay, or the control
    /// task (every instance applies the commands; it appends nothing).
    pub(super) fn always_acts(&self) -> bool {
        self.until.is_some() || !self.core.board().is_on() || P::NAME == ControlPlane::NAME
    }

    /// Follows or owns, as the assignment says, once it safely can.
    pub(super) async fn settle_role(&mut self) -> Result<(), RuntimeError> {
        if self.always_acts() {
            return Ok(());
        }
        let partition = self.task.partition;
        let owns = self.core.ownership.owns(partition);
        if self.owner && !owns {
            self.checkpoint()?;
            self.owner = false;
            self.core.ownership.acting(P::NAME, partition, false);
            tracing::info!(
                processor = P::NAME,
                partition,
                "following: partition moved away"
            );
        } else if !self.owner && owns && self.caught_up_with_owner().await? {
            self.owner = true;
            self.core.ownership.acting(P::NAME, partition, true);
            tracing::info!(processor = P::NAME, partition, "owning: partition assigned");
        }
        Ok(())
    }

    /// Whether every position the previous owner published before now has
    /// been read, and this task's inputs are at it.
    async fn caught_up_with_owner(&self) -> Result<bool, RuntimeError> {
        let partition = self.task.partition;
        let board = self.core.board();
        let tp = TopicPartition::new(self.core.config.topics.positions.clone(), partition);
        if board.read_to(partition) < self.core.log.high_watermark(&tp).await? {
            return Ok(false);
        }
        Ok((self.inputs.iter())
            .all(|(kind, tp, next)| *next >= self.follow_bound(*kind, tp.partition).unwrap_or(0)))
    }

    /// The offset a follower reads an input up to: the owner's last
    /// published position (0 before any). `None` for a task that acts.
    pub(super) fn follow_bound(&self, kind: SourceTopic, partition: u32) -> Option<u64> {
        if self.owner {
            return None;
        }
        let bound = self.core.board().bound(P::NAME, self.task.partition);
        Some(
            bound
                .and_then(|b| b.get(&(kind, partition)).copied())
                .unwrap_or(0),
        )
    }

    /// Where a task reads an input up to: a replay's target, a follower's
    /// owner position, or (`None`) as far as there are records.
    pub(super) fn read_bound(&self, kind: SourceTopic, partition: u32) -> Option<u64> {
        match &self.until {
            Some(until) => Some(until.get(&(kind, partition)).copied().unwrap_or(0)),
            None => self.follow_bound(kind, partition),
        }
    }
}
