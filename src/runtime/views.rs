//! What the layers above may read of the running pipeline: readiness, the
//! business totals, the ledger, accounts and payments, windows, and where
//! every task reads (for lag). Each is assembled from the tasks' views.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

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

    pub fn inflight_totals(&self) -> InflightStats {
        let mut total = InflightStats::default();
        for task in &self.core.inflight {
            let stats = task.stats.read().expect("stats lock");
            total.inflight_count += stats.inflight_count;
            total.inflight_amount_cents += stats.inflight_amount_cents;
            total.admitted_count += stats.admitted_count;
            total.duplicate_count += stats.duplicate_count;
        }
        total
    }

    pub fn confirmed_totals(&self) -> ConfirmedStats {
        let mut total = ConfirmedStats::default();
        let today = now_ms().div_euclid(MS_PER_DAY);
        for task in &self.core.confirmed {
            let stats = task.stats.read().expect("stats lock");
            total.confirmed_count += stats.confirmed_count;
            total.confirmed_amount_cents += stats.confirmed_amount_cents;
            if stats.today_day == today {
                total.today_count += stats.today_count;
                total.today_amount_cents += stats.today_amount_cents;
            }
            total.rejected_count += stats.rejected_count;
            total.reversed_count += stats.reversed_count;
            for (reason, n) in &stats.rejected_by_reason {
                *total.rejected_by_reason.entry(reason.clone()).or_default() += n;
            }
            for (reason, n) in &stats.reversed_by_reason {
                *total.reversed_by_reason.entry(reason.clone()).or_default() += n;
            }
        }
        total.today_day = today;
        total
    }

    /// Account totals over all partitions, read as one consistent snapshot.
    pub fn ledger(&self) -> AccountStats {
        let _exclusive = self.core.apply_gate.write().expect("apply gate");
        let mut total = AccountStats::default();
        for task in &self.core.accounts {
            let s = task.stats.read().expect("stats lock");
            total.account_count += s.account_count;
            total.funded_cents += s.funded_cents;
            total.balance_sum_cents += s.balance_sum_cents;
            total.debited_cents += s.debited_cents;
            total.credited_cents += s.credited_cents;
            total.refunded_cents += s.refunded_cents;
        }
        total
    }

    pub fn account(&self, id: &str) -> Result<Option<Account>, RuntimeError> {
        let partition = partition_for(id, self.core.config.log.partitions) as usize;
        self.core.accounts[partition].get(&self.core, id)
    }

    /// A page of accounts in id order across all partitions.
    pub fn accounts_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Account>, RuntimeError> {
        let mut page: BTreeMap<String, Account> = self
            .core
            .store
            .scan::<Account>(Accounts::TABLE, after, limit)?
            .into_iter()
            .collect();
        for task in &self.core.accounts {
            page.extend(task.dirty_rows_after(after));
        }
        Ok(page.into_values().take(limit).collect())
    }

    /// The stored row of payment `id`, if any (the inflight processor's state).
    pub fn payment(&self, id: &str) -> Result<Option<PaymentState>, RuntimeError> {
        let partition = partition_for(id, self.core.config.log.partitions) as usize;
        self.core.inflight[partition].get(&self.core, id)
    }

    /// The throughput and latency windows of all partitions, merged.
    pub fn windows(&self) -> WindowStats {
        let parts: Vec<WindowStats> = (self.core.confirmed.iter())
            .map(|task| task.stats.read().expect("stats lock").windows.clone())
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
