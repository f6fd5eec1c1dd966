//! The payment generator, for demos and load: opens (or reuses) accounts
//! `gen-00000`, … with opening balances and submits payments at a set rate
//! through the same ingest path as `POST /api/v1/payments`.
//!
//! Amounts are log-normal around 25.00 (most small, a few large); `from` and
//! `to` are drawn uniformly or, with `skew` > 0, Zipf-distributed so a few
//! hot accounts take most of the traffic. A share of payments comes from an
//! empty account (`gen-empty`: rejected, insufficient funds) and a share goes
//! to one that does not exist (`gen-missing`: reversed), so every path shows.
//!
//! It honours the control plane: nothing is sent while paused, and never
//! faster than the rate limit. It stops on request or at shutdown, after the
//! submissions it started are answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::config::GeneratorConfig;
use crate::model::{now_ms, Event, PaymentRef, Submitter};
use crate::runtime::ingest::{Admission, IngestError};
use crate::runtime::{Runtime, RuntimeError};

/// The account every rejected payment comes from (opened with nothing).
pub const EMPTY_ACCOUNT: &str = "gen-empty";
/// The account every reversed payment goes to (never opened).
pub const MISSING_ACCOUNT: &str = "gen-missing";
/// Highest skew accepted (Zipf exponent).
pub const MAX_SKEW: f64 = 5.0;
/// How often the generator sends what the rate allows.
const TICK: Duration = Duration::from_millis(10);

/// What a start asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub rate_per_second: u64,
    pub accounts: u32,
    pub skew: f64,
}

/// Counters of the current (or last) run.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    behind: AtomicU64,
}

struct Running {
    settings: Settings,
    started_at_ms: i64,
    stop: CancellationToken,
}

/// The generator: the runtime it submits to and the state of its runs.
pub struct Generator {
    /// Where payments go (through the ingest path, as HTTP submissions do).
    runtime: Runtime,
    running: Mutex<Option<Running>>,
    /// Settings of the last run, shown after it stopped.
    last: Mutex<Option<Settings>>,
    counters: Arc<Counters>,
    last_refusal: Arc<Mutex<Option<String>>>,
}

/// What `GET /api/v1/generator` shows.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GeneratorStatus {
    pub running: bool,
    /// Payments per second asked for (of the current or last run).
    pub rate: u64,
    pub accounts: u32,
    pub skew: f64,
    /// Submitted, acknowledged (durable), refused (503: backlog, busy) in this run.
    pub sent: u64,
    pub accepted: u64,
    pub refused: u64,
    /// Payments not sent because `generator.max_in_flight` submissions were
    /// still waiting for their acknowledgement (the machine's limit).
    pub behind: u64,
    /// When this run started, ms since the epoch.
    pub started_at: Option<i64>,
    /// The last refusal's reason.
    pub last_refusal: Option<String>,
}

/// Why a start was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeneratorError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

impl Generator {
    pub fn new(runtime: Runtime) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            running: Mutex::default(),
            last: Mutex::default(),
            counters: Arc::default(),
            last_refusal: Arc::default(),
        })
    }

    pub fn status(&self) -> GeneratorStatus {
        let running = self.running.lock().expect("generator lock");
        let settings = running
            .as_ref()
            .map(|r| r.settings.clone())
            .or_else(|| self.last.lock().expect("generator lock").clone());
        let c = &self.counters;
        GeneratorStatus {
            running: running.is_some(),
            rate: settings.as_ref().map_or(0, |s| s.rate_per_second),
            accounts: settings.as_ref().map_or(0, |s| s.accounts),
            skew: settings.as_ref().map_or(0.0, |s| s.skew),
            sent: c.sent.load(Ordering::Relaxed),
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            behind: c.behind.load(Ordering::Relaxed),
            started_at: running.as_ref().map(|r| r.started_at_ms),
            last_refusal: self.last_refusal.lock().expect("generator lock").clone(),
        }
    }

    /// Checks `settings` against the configured bounds.
    pub fn validate(&self, settings: &Settings) -> Result<(), GeneratorError> {
        let config = &self.runtime.config().generator;
        let invalid = |m: String| Err(GeneratorError::Invalid(m));
        if !(1..=config.max_rate_per_second).contains(&settings.rate_per_second) {
            return invalid(format!(
                "rate must be between 1 and {} payments per second",
                config.max_rate_per_second
            ));
        }
        if !(2..=config.max_accounts).contains(&settings.accounts) {
            return invalid(format!(
                "accounts must be between 2 and {}",
                config.max_accounts
            ));
        }
        if !settings.skew.is_finite() || !(0.0..=MAX_SKEW).contains(&settings.skew) {
            return invalid(format!("skew must be between 0 and {MAX_SKEW}"));
        }
        Ok(())
    }

    /// Opens the accounts (idempotently) and starts sending; a running
    /// generator is stopped first and its counters start again.
    pub async fn start(
        self: &Arc<Self>,
        settings: Settings,
    ) -> Result<GeneratorStatus, GeneratorError> {
        self.validate(&settings)?;
        let generator = self;
        generator.stop();
        open_accounts(&self.runtime, settings.accounts).await?;
        let stop = CancellationToken::new();
        {
            let mut running = generator.running.lock().expect("generator lock");
            let c = &generator.counters;
            for counter in [&c.sent, &c.accepted, &c.refused, &c.behind] {
                counter.store(0, Ordering::Relaxed);
            }
            *generator.last_refusal.lock().expect("generator lock") = None;
            *running = Some(Running {
                settings: settings.clone(),
                started_at_ms: now_ms(),
                stop: stop.clone(),
            });
        }
        *generator.last.lock().expect("generator lock") = Some(settings.clone());
        tracing::info!(
            rate = settings.rate_per_second,
            accounts = settings.accounts,
            skew = settings.skew,
            "generator started"
        );
        self.runtime.spawn(run(self.clone(), settings, stop));
        Ok(generator.status())
    }

    /// Stops sending (submissions already made are still answered).
    pub fn stop(&self) -> GeneratorStatus {
        if let Some(running) = self.running.lock().expect("generator lock").take() {
            running.stop.cancel();
            tracing::info!("generator stopped");
        }
        self.status()
    }
}

/// The id of generator account `n`.
pub fn account_id(n: u32) -> String {
    format!("gen-{n:05}")
}

async fn open_accounts(runtime: &Runtime, accounts: u32) -> Result<(), RuntimeError> {
    let balance = runtime.config().generator.opening_balance_cents;
    let at_ms = now_ms();
    let open = |account: String, opening_balance_cents| Event::OpenAccount {
        account,
        opening_balance_cents,
        at_ms,
    };
    let mut events = vec![open(EMPTY_ACCOUNT.to_owned(), 0)];
    events.extend((0..accounts).map(|n| open(account_id(n), balance)));
    for chunk in events.chunks(10_000) {
        runtime.append_account_events(chunk.to_vec()).await?;
    }
    Ok(())
}

/// Draws account indexes: uniform, or Zipf with exponent `skew`.
struct Picker {
    accounts: u32,
    /// Cumulative weights for Zipf; empty for uniform.
    cumulative: Vec<f64>,
}

impl Picker {
    fn new(accounts: u32, skew: f64) -> Self {
        let cumulative = if skew > 0.0 {
            let mut total = 0.0;
            (1..=accounts)
                .map(|rank| {
                    total += 1.0 / f64::from(rank).powf(skew);
                    total
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            accounts,
            cumulative,
        }
    }

    fn pick(&self, rng: &mut StdRng) -> u32 {
        match self.cumulative.last() {
            None => rng.gen_range(0..self.accounts),
            Some(total) => {
                let target = rng.gen::<f64>() * total;
                let index = self.cumulative.partition_point(|c| *c < target);
                (index as u32).min(self.accounts - 1)
            }
        }
    }
}

/// A log-normal amount in cents: median 25.00, most between 5.00 and 130.00,
/// bounded to 1.00 ..= 10,000.00.
fn amount(rng: &mut StdRng) -> i64 {
    // Box–Muller: a standard normal from two uniforms.
    let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
    let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    let cents = (2_500f64.ln() + normal).exp();
    (cents.round() as i64).clamp(100, 1_000_000)
}

type Pending = Pin<Box<dyn Future<Output = Result<Admission, IngestError>> + Send>>;

async fn run(generator: Arc<Generator>, settings: Settings, stop: CancellationToken) {
    let runtime = generator.runtime.clone();
    let config = runtime.config().generator.clone();
    let counters = generator.counters.clone();
    let intake_closing = runtime.intake_closing();
    let picker = Picker::new(settings.accounts, settings.skew);
    let mut rng = StdRng::from_entropy();
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let run_id = now_ms();
    let (mut sequence, mut budget, mut last) = (0u64, 0.0f64, Instant::now());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(answer) = pending.next(), if !pending.is_empty() => {
                count(&generator, answer);
                continue;
            }
            () = stop.cancelled() => break,
            () = intake_closing.cancelled() => break,
        }
        let now = Instant::now();
        let dt = now.duration_since(last).as_secs_f64();
        last = now;
        if runtime.admission_paused() {
            budget = 0.0;
            continue;
        }
        let limit = runtime.control_state().rate_limit_per_second;
        let rate = match limit {
            0 => settings.rate_per_second,
            limit => settings.rate_per_second.min(limit),
        } as f64;
        // At most a tenth of a second's worth at once: no burst after a stall.
        budget = (budget + rate * dt).min(rate / 10.0 + 1.0);
        let wanted = budget as usize;
        budget -= wanted as f64;
        let room = config.max_in_flight.saturating_sub(pending.len());
        let send = wanted.min(room);
        counters
            .behind
            .fetch_add((wanted - send) as u64, Ordering::Relaxed);
        for _ in 0..send {
            sequence += 1;
            let id = format!("gen-{run_id}-{sequence}");
            let payment = next_payment(id, &config, &settings, &picker, &mut rng);
            counters.sent.fetch_add(1, Ordering::Relaxed);
            let generator = generator.clone();
            pending.push(Box::pin(async move {
                let by = Submitter::new("generator", "generator");
                generator.runtime.ingest().submit(payment, by).await
            }));
        }
    }
    // Every submission made is answered before the generator is gone.
    while let Some(answer) = pending.next().await {
        count(&generator, answer);
    }
}

/// A payment between two generator accounts (never the same one), from
/// the empty account or to the missing one in the configured shares.
fn next_payment(
    id: String,
    config: &GeneratorConfig,
    settings: &Settings,
    picker: &Picker,
    rng: &mut StdRng,
) -> PaymentRef {
    let share = rng.gen_range(0..100);
    let rejected = share < config.rejected_percent;
    let reversed = !rejected && share < config.rejected_percent + config.reversed_percent;
    let from_index = picker.pick(rng);
    let mut to_index = picker.pick(rng);
    if to_index == from_index {
        // The next account: never the same one (there are at least two).
        to_index = (to_index + 1) % settings.accounts;
    }
    let from = match rejected {
        true => EMPTY_ACCOUNT.to_owned(),
        false => account_id(from_index),
    };
    let to = match reversed {
        true => MISSING_ACCOUNT.to_owned(),
        false => account_id(to_index),
    };
    PaymentRef {
        id,
        from,
        to,
        amount_cents: amount(rng),
        accepted_at_ms: 0,
    }
}

fn count(generator: &Generator, answer: Result<Admission, IngestError>) {
    let counters = &generator.counters;
    match answer {
        Ok(_) => counters.accepted.fetch_add(1, Ordering::Relaxed),
        Err(error) => {
            *generator.last_refusal.lock().expect("generator lock") = Some(error.to_string());
            counters.refused.fetch_add(1, Ordering::Relaxed)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    // Uniform picks cover every account; Zipf picks favour the first ranks; picks stay in range.
    #[test]
    fn picker_is_uniform_or_skewed() {
        let mut rng = StdRng::seed_from_u64(7);
        let uniform = Picker::new(10, 0.0);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[uniform.pick(&mut rng) as usize] += 1;
        }
        assert!(seen.iter().all(|n| (800..1_200).contains(n)), "{seen:?}");
        let skewed = Picker::new(1_000, 1.2);
        let mut top = 0;
        for _ in 0..10_000 {
            let pick = skewed.pick(&mut rng);
            assert!(pick < 1_000);
            top += u32::from(pick < 10);
        }
        assert!(top > 5_000, "top 1% of accounts took {top} of 10000");
    }

    // Amounts are bounded, with a median near 25.00 and a long right tail.
    #[test]
    fn amounts_are_log_normal_and_bounded() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut amounts: Vec<i64> = (0..10_001).map(|_| amount(&mut rng)).collect();
        amounts.sort();
        assert!(amounts.iter().all(|a| (100..=1_000_000).contains(a)));
        let median = amounts[5_000];
        assert!((2_000..3_100).contains(&median), "median {median}");
        assert!(amounts[9_900] > 5 * median, "p99 {}", amounts[9_900]);
    }
}
