//! The intake's rate when a controller sets one (`control.adaptive`): a
//! token bucket in front of the ingest sequencers, so that payments beyond
//! the rate are refused at the door (503, retry) instead of waiting in
//! `payment.incoming`, where their latency would count against the goal
//! the controller is protecting. It is an operational setting of this
//! instance, kept in memory: a restart starts without it.
//!
//! Test hooks slow a processor down per record, to show the controller at
//! work against a pipeline that cannot keep up.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The rate in force and why: `rate` 0 means the intake is not limited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntakeRate {
    pub rate: u64,
    pub reason: String,
}

#[derive(Default)]
pub struct Throttle {
    rate: AtomicU64,
    reason: Mutex<String>,
    limiter: Mutex<Option<Arc<DefaultDirectRateLimiter>>>,
    /// Extra time per record applied, µs, per processor (test hooks).
    account_delay_us: AtomicU64,
}

impl Throttle {
    /// Sets the intake rate (0: no limit) and why.
    pub fn set(&self, rate: u64, reason: String) {
        let limiter = NonZeroU32::new(rate.min(u64::from(u32::MAX)) as u32).map(|per_second| {
            // Bursts up to a tenth of a second of the rate.
            let burst = NonZeroU32::new((per_second.get() / 10).max(1)).expect("at least 1");
            Arc::new(RateLimiter::direct(
                Quota::per_second(per_second).allow_burst(burst),
            ))
        });
        *self.limiter.lock().expect("limiter lock") = limiter;
        *self.reason.lock().expect("reason lock") = reason;
        self.rate.store(rate, Ordering::Relaxed);
    }

    pub fn get(&self) -> IntakeRate {
        IntakeRate {
            rate: self.rate.load(Ordering::Relaxed),
            reason: self.reason.lock().expect("reason lock").clone(),
        }
    }

    /// Whether one more payment may come in now; `Err(rate)` when not.
    pub fn admit(&self) -> Result<(), u64> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return Ok(());
        }
        let limiter = self.limiter.lock().expect("limiter lock").clone();
        match limiter {
            Some(limiter) if limiter.check().is_err() => Err(rate),
            _ => Ok(()),
        }
    }

    /// Test hook: the account processor takes `per_record` longer per
    /// record it applies (zero: as fast as it is).
    pub fn slow_accounts(&self, per_record: Duration) {
        let us = u64::try_from(per_record.as_micros()).unwrap_or(u64::MAX);
        self.account_delay_us.store(us, Ordering::Relaxed);
    }

    /// The extra time for `records` records of `processor`.
    pub fn delay(&self, processor: &str, records: usize) -> Option<Duration> {
        if processor != "account" {
            return None;
        }
        let us = self.account_delay_us.load(Ordering::Relaxed);
        (us > 0).then(|| Duration::from_micros(us.saturating_mul(records as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // No rate admits everything; a rate admits its burst, then refuses with the rate.
    #[test]
    fn a_rate_admits_its_burst_then_refuses() {
        let throttle = Throttle::default();
        assert!((0..10_000).all(|_| throttle.admit().is_ok()));
        throttle.set(100, "test".into());
        let admitted = (0..1_000).take_while(|_| throttle.admit().is_ok()).count();
        assert!((10..=11).contains(&admitted), "{admitted}");
        assert_eq!(throttle.admit(), Err(100));
        assert_eq!(
            throttle.get(),
            IntakeRate {
                rate: 100,
                reason: "test".into()
            }
        );
        throttle.set(0, String::new());
        assert!(throttle.admit().is_ok());
    }
}
