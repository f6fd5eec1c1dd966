//! Which partitions this instance owns, and which ones its tasks act for.
//!
//! On the embedded log an instance owns every partition. On Kafka the
//! group membership decides (`app` feeds it in through [`Ownership::set`]).
//! The tasks of an owned partition process and append, as on one instance.
//! The tasks of every other partition *follow*: they apply the same input
//! up to where the partition's owner last checkpointed (see `positions`),
//! and append nothing. So every instance keeps every table, answers from
//! it, and can take a partition over at once: its follower's state is never
//! ahead of the owner's durable outputs, so what it emits as the new owner
//! starts no later than where the old owner's outputs end, and the copies
//! in between are skipped downstream by their sources, as after a crash.
//!
//! The control task reads `control.commands` on every instance (pause and
//! rate limit apply cluster-wide) and appends nothing, so it always acts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use tokio::sync::watch;

/// The partitions owned, in a generation of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    /// The group generation that assigned them (0: no group).
    pub generation: i32,
    /// `None`: every partition (no group).
    pub partitions: Option<BTreeSet<u32>>,
}

impl Owned {
    pub fn owns(&self, partition: u32) -> bool {
        self.partitions
            .as_ref()
            .is_none_or(|owned| owned.contains(&partition))
    }
}

/// What this instance owns, and what each of its tasks acts as.
pub struct Ownership {
    owned: watch::Sender<Owned>,
    /// Per (processor, partition): whether the task acts as owner now.
    acting: Mutex<BTreeMap<(&'static str, u32), bool>>,
}

impl Ownership {
    /// Owner of everything: one instance, no group.
    pub fn everything() -> Self {
        let owned = Owned {
            generation: 0,
            partitions: None,
        };
        Self {
            owned: watch::Sender::new(owned),
            acting: Mutex::new(BTreeMap::new()),
        }
    }

    /// The current assignment.
    pub fn owned(&self) -> Owned {
        self.owned.borrow().clone()
    }

    /// Whether `partition` is owned now (without copying the assignment).
    pub fn owns(&self, partition: u32) -> bool {
        self.owned.borrow().owns(partition)
    }

    /// A new assignment (empty while the group rebalances).
    pub fn set(&self, generation: i32, partitions: BTreeSet<u32>) {
        self.owned.send_replace(Owned {
            generation,
            partitions: Some(partitions),
        });
    }

    /// Wakes when the assignment changes.
    pub fn changes(&self) -> watch::Receiver<Owned> {
        self.owned.subscribe()
    }

    /// A task says what it acts as, after it checkpointed for the change.
    pub(super) fn acting(&self, processor: &'static str, partition: u32, owner: bool) {
        let mut acting = self.acting.lock().expect("acting lock");
        acting.insert((processor, partition), owner);
    }

    /// Whether no task acts as owner of a partition that is not owned: all
    /// it appended is checkpointed, and the partition may move.
    pub fn released(&self) -> bool {
        let acting = self.acting.lock().expect("acting lock");
        acting
            .iter()
            .all(|((_, partition), owner)| !owner || self.owns(*partition))
    }

    /// Whether `processor`'s task of `partition` acts as owner now (and the
    /// partition is still owned): its state is the partition's current one.
    pub fn acts_for(&self, processor: &'static str, partition: u32) -> bool {
        let acting = self.acting.lock().expect("acting lock");
        acting.get(&(processor, partition)) == Some(&true) && self.owns(partition)
    }

    /// The partitions some task acts as owner for.
    pub fn acting_partitions(&self) -> BTreeSet<u32> {
        let acting = self.acting.lock().expect("acting lock");
        (acting.iter())
            .filter(|(_, owner)| **owner)
            .map(|((_, partition), _)| *partition)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // No group: everything is owned. A new assignment moves ownership; a task still acting as owner of a partition taken away holds the release until it says it follows.
    #[test]
    fn release_waits_for_every_task() {
        let ownership = Ownership::everything();
        assert!(ownership.owned().owns(7));
        ownership.acting("inflight", 1, true);
        ownership.acting("accounts", 1, true);
        ownership.acting("accounts", 2, true);
        ownership.set(3, BTreeSet::from([2]));
        assert!(!ownership.owned().owns(1));
        assert!(!ownership.released());
        ownership.acting("inflight", 1, false);
        assert!(!ownership.released());
        ownership.acting("accounts", 1, false);
        assert!(ownership.released());
        assert_eq!(ownership.acting_partitions(), BTreeSet::from([2]));
        assert!(ownership.acts_for("accounts", 2) && !ownership.acts_for("inflight", 2));
    }
}
