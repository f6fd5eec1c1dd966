//! The state the runtime's tasks, sequencers and views share: the backends,
//! each task's view per partition, the gates and the stop signals. Private
//! to the runtime: the layers above see `Runtime`'s named methods.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::own_writes::OwnWrites;
use super::ownership::Ownership;
use super::positions::Board;
use super::space::SpaceGuard;
use super::task_view::TaskView;
use crate::config::Config;
use crate::log::{Log, LogError};
use crate::model::seal::Sealer;
use crate::model::{Envelope, Event, PaymentRef, SourceTopic, Submitter};
use crate::pipeline::account::Accounts;
use crate::pipeline::confirmed::Confirmed;
use crate::pipeline::control::{ControlPlane, ControlState};
use crate::pipeline::inflight::Inflight;
use crate::store::Store;

/// Sees every event the processors that declare [`Processor::OBSERVED`]
/// apply (each completion once), so that the instrumentation plane can keep
/// its live views without a processor doing any IO. Set by the composition
/// root; a replay uses [`NoObserver`].
///
/// [`Processor::OBSERVED`]: crate::pipeline::Processor::OBSERVED
pub trait Observer: Send + Sync + 'static {
    fn observe(&self, event: &Event);
}

/// Observes nothing (replays, benchmarks without instrumentation).
pub struct NoObserver;

impl Observer for NoObserver {
    fn observe(&self, _event: &Event) {}
}

/// Whether a record of `kind` with this value carries the cluster's HMAC
/// (when a secret is set): every record of the internal topics, which move
/// money and control the pipeline, and on `payment.incoming` the records in
/// kpay's binary format. Those are kpay's own (a payment moved to its
/// partition, an operator's replay) and carry a source, which a forger
/// could use to have later records skipped as copies. Payments in the
/// public JSON format are anyone's and are checked by the inflight
/// processor instead.
pub(super) fn authenticated(kind: SourceTopic, value: &[u8]) -> bool {
    match kind {
        SourceTopic::Inflight | SourceTopic::Complete | SourceTopic::Control => true,
        SourceTopic::Incoming => value.first() != Some(&b'{'),
        SourceTopic::Replay | SourceTopic::Api => false,
    }
}

/// Everything the runtime's tasks, sequencers and views share.
pub(super) struct Core {
    /// The settings the runtime was started with (topic names included).
    pub(super) config: Config,
    /// Where every topic lives.
    pub(super) log: Arc<dyn Log>,
    /// The state tables and checkpoints.
    pub(super) store: Store,
    /// Per partition, the tasks' shared views (index = partition).
    pub(super) inflight: Vec<Arc<TaskView<Inflight>>>,
    pub(super) accounts: Vec<Arc<TaskView<Accounts>>>,
    pub(super) confirmed: Vec<Arc<TaskView<Confirmed>>>,
    /// The control processor (pillar 3): paused or not, rate limit.
    pub(super) control: Arc<TaskView<ControlPlane>>,
    /// Tasks hold it shared while applying a batch; readers that need one
    /// consistent view across partitions (the ledger check) hold it exclusively.
    pub(super) apply_gate: RwLock<()>,
    /// Cancelled first: stop intake (HTTP submissions, sequencers).
    pub(super) shutdown: CancellationToken,
    /// Cancelled after the drain: processors checkpoint and stop.
    pub(super) processors_stop: CancellationToken,
    /// Processor tasks not yet ended (each ends with its final checkpoint).
    pub(super) tasks_running: std::sync::atomic::AtomicUsize,
    /// Every spawned task, so shutdown can wait for all of them.
    pub(super) tracker: TaskTracker,
    /// Sees each completion, for the instrumentation plane.
    pub(super) observer: Arc<dyn Observer>,
    /// The admission token bucket, rebuilt when the rate limit changes.
    pub(super) admission: Mutex<Option<(u64, Arc<DefaultDirectRateLimiter>)>>,
    /// The intake's rate when a controller sets one; test slow-downs.
    pub(super) throttle: Arc<super::throttle::Throttle>,
    /// Serialises replays and deletions of dead letters.
    pub(super) dlq_lock: tokio::sync::Mutex<()>,
    /// Dead letters waiting in the store, against `limits.dlq_entries`.
    pub(super) dlq_stored: AtomicU64,
    /// Free space on the data directory's device, and the last write that
    /// met a full device.
    pub(super) space: SpaceGuard,
    /// Why the runtime stopped on an error, if it did: the process then
    /// exits non-zero with it.
    pub(super) failure: Mutex<Option<String>>,
    /// Signs and checks the internal topics' records when `cluster.secret`
    /// is set; `None`: nothing is signed or checked.
    pub(super) sealer: Option<Sealer>,
    /// The sequenced path of kpay's own API writes (accounts, commands).
    pub(super) own_writes: OwnWrites,
    /// Which partitions this instance owns (all of them without a group).
    pub(super) ownership: Ownership,
    /// The owners' published checkpoints, on a cluster (set once at start).
    pub(super) board: std::sync::OnceLock<Board>,
    /// The writer of the owned task partitions' snapshots, on a cluster.
    pub(super) snapshots: std::sync::OnceLock<super::snapshot::Snapshots>,
}

/// The board of an instance that shares nothing.
static NO_BOARD: std::sync::LazyLock<Board> = std::sync::LazyLock::new(Board::off);

impl Core {
    /// The owners' published checkpoints (an empty board without a cluster).
    pub(super) fn board(&self) -> &Board {
        self.board.get().unwrap_or(&NO_BOARD)
    }

    /// Drops a payment's `submitted_by` that a cluster secret does not
    /// vouch for: with a secret, only kpay's intake can attribute a payment
    /// (any producer may write `payment.incoming`, and claim anything).
    pub(super) fn check_attribution(&self, envelope: &mut Envelope) {
        let (Some(sealer), Some(by), Event::PaymentSubmitted(payment)) =
            (&self.sealer, &envelope.submitted_by, &envelope.event)
        else {
            return;
        };
        if !sealer.attribution_holds(payment, by) {
            metrics::counter!("kpay_unverified_attributions_total").increment(1);
            envelope.submitted_by = None;
        }
    }

    /// Signs `by` for `payment` with the cluster secret, when there is one:
    /// the attribution kpay's intake writes.
    pub(super) fn sign_attribution(&self, payment: &PaymentRef, by: &mut Submitter) {
        by.tag = (self.sealer.as_ref()).map(|sealer| sealer.attribution_tag(payment, by));
    }

    /// `value` with the cluster's HMAC tag when such a record is
    /// [`authenticated`] and a secret is set; otherwise unchanged.
    pub(super) fn seal(&self, kind: SourceTopic, key: &[u8], mut value: Vec<u8>) -> Vec<u8> {
        if let Some(sealer) = self.sealer.as_ref().filter(|_| authenticated(kind, &value)) {
            sealer.seal(key, &mut value);
        }
        value
    }

    /// Notes the outcome of an append for readiness: a full device is
    /// reported by `/readyz` until an append succeeds again.
    pub(super) fn note_append<T>(&self, result: &Result<T, LogError>) {
        match result {
            Ok(_) => self.space.note_success(),
            Err(error) if error.is_no_space() => self.space.note_refusal(error.to_string()),
            Err(_) => {}
        }
    }

    /// Records why the runtime stops on an error (the first reason wins).
    pub(super) fn fail(&self, reason: String) {
        self.failure
            .lock()
            .expect("failure lock")
            .get_or_insert(reason);
    }

    /// Takes a place for one more stored dead letter; false when the DLQ is
    /// full (the letter then only goes to the DLQ topic).
    pub(super) fn dlq_admit(&self) -> bool {
        let limit = self.config.limits.dlq_entries as u64;
        self.dlq_stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back places of dead letters replayed or deleted.
    pub(super) fn dlq_released(&self, count: u64) {
        let _ = self
            .dlq_stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(count))
            });
    }

    /// The control state as applied so far.
    pub(super) fn control_state(&self) -> ControlState {
        self.control.stats.read().expect("stats lock").clone()
    }

    /// Whether the inflight processor must leave `payment.incoming` alone:
    /// paused by command, or shutting down (a stop is pause + drain, but
    /// not a command: the next start runs as before).
    pub(super) fn admission_paused(&self) -> bool {
        self.shutdown.is_cancelled() || self.control.stats.read().expect("stats lock").paused
    }

    /// This instance's part of the cluster's rate limit: the share of the
    /// partitions it owns, since only owners admit (all of it on one
    /// instance; at least 1 while it owns any).
    fn rate_share(&self, rate: u64) -> u64 {
        let owned = self.ownership.owned();
        match owned.partitions {
            Some(partitions) if rate > 0 && self.board().is_on() => {
                let total = u64::from(self.config.log.partitions);
                (rate.saturating_mul(partitions.len() as u64) / total).max(1)
            }
            _ => rate,
        }
    }

    /// This instance's part of the operator's rate limit (0: none).
    pub(super) fn rate_limit_share(&self) -> u64 {
        let rate = self
            .control
            .stats
            .read()
            .expect("stats lock")
            .rate_limit_per_second;
        self.rate_share(rate)
    }

    /// Whether a rate limit is set.
    pub(super) fn admission_limited(&self) -> bool {
        self.control
            .stats
            .read()
            .expect("stats lock")
            .rate_limit_per_second
            > 0
    }

    /// How many of `wanted` new payments may be admitted now under the rate
    /// limit (a token bucket; bursts up to 1/5 s of the rate, so a task
    /// loop that takes that long, as one round trip to a Kafka broker may,
    /// still admits the full rate).
    pub(super) fn admission_tokens(&self, wanted: usize) -> usize {
        let cluster_rate = self
            .control
            .stats
            .read()
            .expect("stats lock")
            .rate_limit_per_second;
        let rate = self.rate_share(cluster_rate);
        let Some(per_second) = NonZeroU32::new(rate.min(u64::from(u32::MAX)) as u32) else {
            return wanted;
        };
        let limiter = {
            let mut current = self.admission.lock().expect("admission lock");
            match current.as_ref() {
                Some((r, limiter)) if *r == rate => limiter.clone(),
                _ => {
                    let burst = NonZeroU32::new((per_second.get() / 5).max(1)).expect("at least 1");
                    let quota = Quota::per_second(per_second).allow_burst(burst);
                    let limiter = Arc::new(RateLimiter::direct(quota));
                    *current = Some((rate, limiter.clone()));
                    limiter
                }
            }
        };
        (0..wanted).take_while(|_| limiter.check().is_ok()).count()
    }
}
