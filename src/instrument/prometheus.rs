//! Prometheus exposition at `GET /metrics`, through the `metrics` facade and
//! its Prometheus exporter. Counters and gauges that mirror processor
//! statistics are set from them at scrape time; histograms (latency, batch
//! sizes, checkpoint durations) and HTTP request counts are recorded as they
//! happen.

use std::sync::OnceLock;

use metrics::{counter, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::runtime::{dead_letter, Runtime, RuntimeError};

/// Payment latency buckets, seconds: 1 ms to 1 minute.
const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 60.0,
];
/// Checkpoint duration buckets, seconds.
const DURATION_BUCKETS_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
];
/// Records per task batch.
const BATCH_BUCKETS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0];

/// The process-wide recorder; installed once, on the first server start.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once per process) and returns its handle.
pub fn install() -> Result<&'static PrometheusHandle, RuntimeError> {
    // Two servers starting at once in one process (tests) must not both
    // install: the second global recorder would be refused.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("kpay_payment_latency_seconds".into()),
            LATENCY_BUCKETS_SECONDS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("kpay_checkpoint_duration_seconds".into()),
                DURATION_BUCKETS_SECONDS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("kpay_task_batch_records".into()),
                BATCH_BUCKETS,
            )
        })
        .map_err(|e| RuntimeError::Startup(format!("prometheus buckets: {e}")))?;
    let handle = builder
        .install_recorder()
        .map_err(|e| RuntimeError::Startup(format!("prometheus recorder: {e}")))?;
    Ok(HANDLE.get_or_init(|| handle))
}

/// Describes every metric once, so the exposition carries HELP and TYPE lines.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "kpay_payments_total",
        "Payments that reached a terminal state, by status."
    );
    describe_counter!(
        "kpay_confirmed_amount_cents_total",
        "Money moved by confirmed payments, in cents."
    );
    describe_counter!(
        "kpay_intake_no_space_total",
        "Payments refused with 507 because the data directory's device is full or below data.min_free_bytes."
    );
    describe_gauge!(
        "kpay_inflight_payments",
        "Payments admitted and not yet terminal."
    );
    describe_gauge!(
        "kpay_inflight_amount_cents",
        "Money in inflight payments, in cents."
    );
    describe_gauge!(
        "kpay_held_payments",
        "Payments held by screening for review."
    );
    describe_gauge!(
        "kpay_held_amount_cents",
        "Money in payments held for review, in cents."
    );
    describe_histogram!(
        "kpay_payment_latency_seconds",
        Unit::Seconds,
        "Acceptance to terminal state."
    );
    describe_gauge!(
        "kpay_consumer_lag_records",
        "Records behind the high-water mark, per processor and input partition."
    );
    describe_gauge!(
        "kpay_consumer_lag_oldest_seconds",
        "Age of the oldest unprocessed record, per processor and input partition."
    );
    describe_histogram!("kpay_task_batch_records", "Records per task batch.");
    describe_histogram!(
        "kpay_checkpoint_duration_seconds",
        Unit::Seconds,
        "Time to write one task checkpoint."
    );
    describe_gauge!("kpay_dlq_records", "Dead letters waiting for an operator.");
    describe_counter!(
        "kpay_dlq_overflow_total",
        "Dead letters not stored because the DLQ was full (still on the DLQ topic)."
    );
    describe_counter!(
        "kpay_task_restarts_total",
        "Task restarts after a failure other than input, by processor."
    );
    describe_counter!(
        "kpay_audit_dropped_total",
        "Audit entries not written (queue full, writer stopped or write failed), by class."
    );
    describe_counter!(
        "kpay_http_requests_total",
        "HTTP requests by route and status."
    );
    describe_gauge!(
        "kpay_process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of this process."
    );
    describe_gauge!(
        "kpay_ledger_ok",
        "1 when balances plus money in transit equal money funded."
    );
}

/// Brings the scrape-time metrics up to date and renders the exposition.
pub async fn render(runtime: &Runtime) -> Result<String, RuntimeError> {
    let Some(handle) = HANDLE.get() else {
        return Err(RuntimeError::Startup("instrumentation is disabled".into()));
    };
    let totals = runtime.confirmed_totals();
    for (status, value) in [
        ("confirmed", totals.confirmed_count),
        ("rejected", totals.rejected_count),
        ("reversed", totals.reversed_count),
    ] {
        counter!("kpay_payments_total", "status" => status).absolute(value);
    }
    counter!("kpay_confirmed_amount_cents_total")
        .absolute(totals.confirmed_amount_cents.max(0) as u64);
    let inflight = runtime.inflight_totals();
    gauge!("kpay_inflight_payments").set(inflight.inflight_count as f64);
    gauge!("kpay_inflight_amount_cents").set(inflight.inflight_amount_cents as f64);
    gauge!("kpay_held_payments").set(inflight.held_count as f64);
    gauge!("kpay_held_amount_cents").set(inflight.held_amount_cents as f64);
    for lag in super::lag::owned_lag(runtime).await? {
        let labels = [
            ("processor", lag.processor),
            ("topic", lag.topic),
            ("partition", lag.partition.to_string()),
        ];
        gauge!("kpay_consumer_lag_records", &labels).set(lag.lag_records as f64);
        gauge!("kpay_consumer_lag_oldest_seconds", &labels).set(lag.oldest_age_ms as f64 / 1_000.0);
    }
    let dlq = runtime.store().count(dead_letter::TABLE);
    gauge!("kpay_dlq_records").set(dlq as f64);
    gauge!("kpay_process_resident_memory_bytes").set(resident_bytes() as f64);
    let ledger = super::Integrity::from(&runtime.ledger());
    gauge!("kpay_ledger_ok").set(if ledger.ok { 1.0 } else { 0.0 });
    Ok(handle.render())
}

/// Folds recorded histogram samples into their buckets every few seconds,
/// until the processors stop: the exporter keeps raw samples until then,
/// which would grow without bound between scrapes.
pub fn keep_up(runtime: &Runtime) {
    let Some(handle) = HANDLE.get() else {
        return;
    };
    let stop = runtime.clone();
    runtime.spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_secs(5)) => handle.run_upkeep(),
                () = stop.stopped() => break,
            }
        }
    });
}

/// Resident set size from `/proc/self/statm` (pages × page size); 0 elsewhere.
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4_096
}
