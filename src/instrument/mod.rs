//! Pillar 2, the instrumentation plane: are we meeting our business goals?
//! Views over the processors' statistics: money inflight and confirmed,
//! rejections and reversals, and the conservation-of-money check.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::pipeline::account::AccountStats;
use crate::pipeline::confirmed::ConfirmedStats;
use crate::pipeline::inflight::InflightStats;

#[derive(Debug, Serialize, ToSchema)]
pub struct CountAmount {
    pub count: u64,
    /// Cents.
    pub amount: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConfirmedView {
    pub count: u64,
    /// Cents.
    pub amount: i64,
    /// Confirmed during the current UTC day.
    pub today_count: u64,
    pub today_amount: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ByReason {
    pub count: u64,
    pub by_reason: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineMetrics {
    /// Admitted, not yet terminal.
    pub inflight: CountAmount,
    pub confirmed: ConfirmedView,
    pub rejected: ByReason,
    pub reversed: ByReason,
}

impl PipelineMetrics {
    pub fn new(inflight: &InflightStats, confirmed: &ConfirmedStats) -> Self {
        Self {
            inflight: CountAmount {
                count: inflight.inflight_count,
                amount: inflight.inflight_amount_cents,
            },
            confirmed: ConfirmedView {
                count: confirmed.confirmed_count,
                amount: confirmed.confirmed_amount_cents,
                today_count: confirmed.today_count,
                today_amount: confirmed.today_amount_cents,
            },
            rejected: ByReason {
                count: confirmed.rejected_count,
                by_reason: confirmed.rejected_by_reason.clone(),
            },
            reversed: ByReason {
                count: confirmed.reversed_count,
                by_reason: confirmed.reversed_by_reason.clone(),
            },
        }
    }
}

/// The ledger check, from one consistent snapshot of every account partition.
#[derive(Debug, Serialize, ToSchema)]
pub struct Integrity {
    /// Money that entered: opening balances and deposits (cents).
    pub total_funded: i64,
    /// Sum of all balances (cents).
    pub sum_of_balances: i64,
    /// Debited and not yet credited or refunded (cents).
    pub in_transit: i64,
    pub accounts: u64,
    /// `sum_of_balances + in_transit == total_funded` and nothing negative.
    pub ok: bool,
}

impl From<&AccountStats> for Integrity {
    fn from(stats: &AccountStats) -> Self {
        let in_transit = stats.debited_cents - stats.credited_cents - stats.refunded_cents;
        Self {
            total_funded: stats.funded_cents,
            sum_of_balances: stats.balance_sum_cents,
            in_transit,
            accounts: stats.account_count,
            ok: in_transit >= 0
                && stats.balance_sum_cents >= 0
                && stats.balance_sum_cents + in_transit == stats.funded_cents,
        }
    }
}
