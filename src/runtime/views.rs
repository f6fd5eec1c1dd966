//! What the layers above may read of the running pipeline: readiness, the
//! business totals, the ledger, accounts and payments, windows, and where
//! every task reads (for lag). Each is assembled from the tasks' views.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Runtime, RuntimeError};
use crate::model::{now_ms, partition_for, SourceTopic};
use crate::pipeline::account::{Account, AccountStats, Accounts};
use crate::pipeline::confirmed::{ConfirmedStats, MS_PER_DAY};
use crate::pipeline::inflight::{InflightStats, PaymentState};
use crate::pipeline::windows::WindowStats;
use crate::pipeline::Processor;
use crate::runtime::task_view::TaskView;

/// Where one task reads one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputPosition {
    /// The processor (`inflight`, `account`, `confirmed`, `control`).
    pub processor: &'static str,
    pub topic: SourceTopic,
    pub partition: u32,
    /// The next offset the task will read.
    pub position: u64,
}

impl Runtime {
    /// True once every task has caught up with the log as it was at start.
    pub fn ready(&self) -> bool {
        let s = &self.core;
        s.inflight
            .iter()
            .all(|t| t.caught_up.load(Ordering::Relaxed))
            && s.accounts
                .iter()
                .all(|t| t.caught_up.load(Ordering::Relaxed))
            && s.confirmed
                .iter()
                .all(|t| t.caught_up.load(Ordering::Relaxed))
    }

    /// Why each task that failed and waits to be restarted is down.
    pub fn tasks_down(&self) -> Vec<String> {
        let s = &self.core;
        let down = |t: &std::sync::Mutex<Option<String>>| t.lock().expect("down lock").clone();
        (s.inflight.iter().map(|t| down(&t.down)))
            .chain(s.accounts.iter().map(|t| down(&t.down)))
            .chain(s.confirmed.iter().map(|t| down(&t.down)))
            .chain(std::iter::once(down(&s.control.down)))
            .flatten()
            .collect()
    }

    /// Inflight totals over all partitions.
    pub fn inflight_totals(&self) -> InflightStats {
        fold_stats(
            &self.core.inflight,
            InflightStats::default(),
            InflightStats::add,
        )
    }

    /// Business totals over all partitions; `today_*` for the current UTC day.
    pub fn confirmed_totals(&self) -> ConfirmedStats {
        let today = ConfirmedStats {
            today_day: now_ms().div_euclid(MS_PER_DAY),
            ..ConfirmedStats::default()
        };
        fold_stats(&self.core.confirmed, today, ConfirmedStats::add)
    }

    /// Account totals over all partitions, read as one consistent snapshot.
    pub fn ledger(&self) -> AccountStats {
        let _exclusive = self.core.apply_gate.write().expect("apply gate");
        fold_stats(
            &self.core.accounts,
            AccountStats::default(),
            AccountStats::add,
        )
    }

    pub fn account(&self, id: &str) -> Result<Option<Account>, RuntimeError> {
        let partition = partition_for(id, self.core.config.log.partitions) as usize;
        self.core.accounts[partition].get(&self.core, id)
    }

    /// A page of accounts in id order, of the partitions `keep` admits.
    pub fn accounts_page(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(u32) -> bool,
    ) -> Result<Vec<Account>, RuntimeError> {
        let partitions = self.core.config.log.partitions;
        let mut page: BTreeMap<String, Account> = BTreeMap::new();
        let mut cursor = after.map(str::to_owned);
        let chunk = limit.max(256);
        loop {
            // A stored account's key is a row of its own; its row is in a block.
            let ids = (self.core.store).scan_keys(Accounts::TABLE, cursor.as_deref(), chunk)?;
            let exhausted = ids.len() < chunk;
            cursor = ids.last().cloned();
            for id in ids {
                let partition = partition_for(&id, partitions);
                if !keep(partition) {
                    continue;
                }
                if let Some(account) =
                    self.core.accounts[partition as usize].get(&self.core, &id)?
                {
                    page.insert(id, account);
                }
            }
            // Stored rows up to the cursor fill the page: a row not yet
            // stored that sorts after them would not make it in.
            if exhausted || page.len() >= limit {
                break;
            }
        }
        for (partition, task) in self.core.accounts.iter().enumerate() {
            if keep(partition as u32) {
                page.extend(task.dirty_rows_after(after));
            }
        }
        Ok(page.into_values().take(limit).collect())
    }

    /// The stored row of payment `id`, if any (the inflight processor's state).
    pub fn payment(&self, id: &str) -> Result<Option<PaymentState>, RuntimeError> {
        let partition = partition_for(id, self.core.config.log.partitions) as usize;
        self.core.inflight[partition].get(&self.core, id)
    }

    /// The oldest version of the screening rules (the offset of the command
    /// that set them) the account partitions screen with; `None` while one
    /// has never had rules.
    pub fn screening_applied(&self) -> Option<u64> {
        let versions = self.core.accounts.iter();
        versions
            .map(|t| t.stats.read().expect("stats lock").screening_version)
            .min()
            .flatten()
    }

    /// The throughput and latency windows of all partitions, merged.
    pub fn windows(&self) -> WindowStats {
        self.windows_of(|_| true)
    }

    /// The windows of the partitions `keep` admits, merged.
    pub fn windows_of(&self, keep: impl Fn(u32) -> bool) -> WindowStats {
        let parts: Vec<WindowStats> = (self.core.confirmed.iter().enumerate())
            .filter(|(partition, _)| keep(*partition as u32))
            .map(|(_, task)| task.stats.read().expect("stats lock").windows.clone())
            .collect();
        WindowStats::merge(&parts)
    }

    /// Where every processor task reads, per input, as of its last batch
    /// (the control task too, last).
    pub fn input_positions(&self) -> Vec<InputPosition> {
        let core = &self.core;
        let mut all = Vec::new();
        core.inflight.iter().for_each(|t| positions_of(t, &mut all));
        core.accounts.iter().for_each(|t| positions_of(t, &mut all));
        core.confirmed
            .iter()
            .for_each(|t| positions_of(t, &mut all));
        positions_of(&core.control, &mut all);
        all
    }
}

/// The statistics of every partition of a processor, added up.
fn fold_stats<P: Processor>(
    tasks: &[Arc<TaskView<P>>],
    mut total: P::Stats,
    add: impl Fn(&mut P::Stats, &P::Stats),
) -> P::Stats {
    for task in tasks {
        add(&mut total, &task.stats.read().expect("stats lock"));
    }
    total
}

fn positions_of<P: Processor>(task: &TaskView<P>, into: &mut Vec<InputPosition>) {
    let positions = task.positions.lock().expect("positions lock");
    into.extend(
        positions
            .iter()
            .map(|(&(topic, partition), &position)| InputPosition {
                processor: P::NAME,
                topic,
                partition,
                position,
            }),
    );
}
