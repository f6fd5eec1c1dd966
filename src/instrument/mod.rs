//! Pillar 2, the instrumentation plane: are we meeting our business goals?
//! Views over the processors' statistics: money inflight and confirmed,
//! rejections and reversals, and the conservation-of-money check; tumbling
//! windows of throughput and latency.

pub mod lag;
pub mod live;
pub mod prometheus;
pub mod slo;

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;

use crate::pipeline::account::AccountStats;
use crate::pipeline::confirmed::ConfirmedStats;
use crate::pipeline::inflight::InflightStats;
use crate::pipeline::windows::WindowStats;

pub use crate::model::CountAmount;

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
    /// Admitted, not yet terminal (held ones apart).
    pub inflight: CountAmount,
    /// Held by screening for review: no money moved yet.
    pub held: CountAmount,
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
            held: CountAmount {
                count: inflight.held_count,
                amount: inflight.held_amount_cents,
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

/// Latency of a window, in milliseconds, within the histogram's precision (1%).
#[derive(Debug, Serialize, ToSchema)]
pub struct LatencyView {
    pub min: u64,
    pub mean: f64,
    pub max: u64,
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WindowView {
    /// Window start, ms since the epoch.
    pub start: i64,
    /// Window end (exclusive), ms since the epoch.
    pub end: i64,
    /// Payments that reached a terminal state in the window.
    pub count: u64,
    /// Their total amount, cents.
    pub amount: i64,
    /// Average terminal payments per second over the window.
    pub per_second: f64,
    pub latency_ms: LatencyView,
    /// The largest payment, cents.
    pub largest: i64,
    /// Count per terminal status (`confirmed`, `rejected`, `reversed`).
    pub by_status: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ThroughputView {
    pub window_seconds: i64,
    /// Oldest first; the last one may still be filling.
    pub windows: Vec<WindowView>,
    /// Completions older than every kept window.
    pub late_dropped: u64,
}

impl From<&WindowStats> for ThroughputView {
    fn from(stats: &WindowStats) -> Self {
        let seconds = stats.window_ms / 1_000;
        let windows = stats
            .windows
            .iter()
            .map(|w| {
                let h = &w.latency.0;
                WindowView {
                    start: w.start_ms,
                    end: w.start_ms + stats.window_ms,
                    count: w.count,
                    amount: w.amount_cents,
                    per_second: w.count as f64 * 1_000.0 / stats.window_ms as f64,
                    latency_ms: LatencyView {
                        min: if h.is_empty() { 0 } else { h.min() },
                        mean: h.mean(),
                        max: h.max(),
                        p50: h.value_at_quantile(0.50),
                        p95: h.value_at_quantile(0.95),
                        p99: h.value_at_quantile(0.99),
                    },
                    largest: w.largest_cents,
                    by_status: w.by_status.clone(),
                }
            })
            .collect();
        Self {
            window_seconds: seconds,
            windows,
            late_dropped: stats.late_dropped,
        }
    }
}
