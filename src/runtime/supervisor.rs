//! The supervisor of each task: runs it, and when it fails for a reason
//! other than its input (no input can make a task fail: what cannot be
//! processed is dead-lettered), restarts it from its last checkpoint with
//! exponential backoff, counting restarts (`kpay_task_restarts_total`),
//! logging an ERROR each time and marking the task down for `/readyz` until
//! it is through a batch again.
//!
//! Which errors stop kpay instead: a full state store (sled refuses every
//! write after an IO error until it is reopened, so no retry can succeed in
//! this process), any failure while replaying for `kpay rebuild`, and a
//! failure of the final checkpoint while stopping (the log being away
//! then is no failure: what was not appended is produced at the next start). Each records the reason
//! ([`Core::fail`]) and the process exits non-zero with it. Everything else
//! (a log or store error, a corrupt row) is retried: the task's outputs and
//! checkpoint are idempotent, so a restart from the checkpoint applies each
//! record once, and the other tasks keep going meanwhile.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::core::Core;
use super::task::{self, Positions};
use super::task_view::TaskView;
use super::RuntimeError;
use crate::model::SourceTopic;
use crate::pipeline::Processor;
use crate::store::{undo_key, Checkpoint, StoreError};

/// The first pause before a failed task is restarted; it doubles with each
/// failure in a row.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between restarts; a task that ran this long before it
/// failed starts again from the first pause.
const RETRY_MOST: Duration = Duration::from_secs(10);

/// Reads a task's checkpoint from the store again, shaped to the settings.
pub(super) type Reload<S> = Box<dyn Fn() -> Result<Checkpoint<S>, StoreError> + Send + Sync>;

/// Spawns one task under supervision: live (`until` is `None`) or replaying.
pub(super) fn spawn_task<P: Processor>(
    core: &Arc<Core>,
    task: Arc<TaskView<P>>,
    checkpoint: Checkpoint<P::Stats>,
    inputs: Vec<(SourceTopic, u32)>,
    until: Option<Positions>,
    reload: Reload<P::Stats>,
) {
    let core = core.clone();
    let tracker = core.tracker.clone();
    let running = Running::new(&core);
    tracker.spawn(async move {
        let _running = running;
        let mut checkpoint = Some(checkpoint);
        let mut pause = RETRY_FIRST;
        loop {
            let started = Instant::now();
            let attempt = match checkpoint.take() {
                Some(first) => Ok(first),
                None => restart_state(&core, &task, &reload),
            };
            let result = match attempt {
                Ok(checkpoint) => {
                    let (inputs, until) = (inputs.clone(), until.clone());
                    task::run(core.clone(), task.clone(), checkpoint, inputs, until).await
                }
                Err(error) => Err(error),
            };
            let Err(error) = result else { return };
            let log_away = matches!(&error, RuntimeError::Log(e) if e.is_transient());
            if log_away && core.processors_stop.is_cancelled() {
                // Asked to stop while the log was away: what was not appended
                // is produced again at the next start, as after a crash.
                tracing::warn!(processor = P::NAME, partition = task.partition, %error,
                    "task stopped with outputs not appended");
                return;
            }
            if let Some(reason) = fatal(&core, until.is_some(), &error) {
                stop_after_failure(&core, P::NAME, task.partition, reason);
                return;
            }
            if started.elapsed() >= RETRY_MOST {
                pause = RETRY_FIRST;
            }
            let retry_ms = pause.as_millis() as u64;
            tracing::error!(processor = P::NAME, partition = task.partition, %error, retry_ms,
                "task failed; restarting it from its last checkpoint");
            metrics::counter!("kpay_task_restarts_total", "processor" => P::NAME).increment(1);
            task.mark_down(format!(
                "{}/{} failed ({error}); restarting it from its last checkpoint in {retry_ms} ms",
                P::NAME,
                task.partition
            ));
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = core.processors_stop.cancelled() => return,
            }
            pause = (pause * 2).min(RETRY_MOST);
        }
    });
}

/// Counts a processor task in [`Core::tasks_running`] while it lives.
struct Running(Arc<Core>);

impl Running {
    fn new(core: &Arc<Core>) -> Self {
        core.tasks_running.fetch_add(1, Ordering::SeqCst);
        Self(core.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.tasks_running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Puts a failed task's state back to its last checkpoint: the rows of a
/// checkpoint it left half written, its cached rows newer than the store,
/// its statistics. What it did after the checkpoint is done again, and its
/// outputs are skipped downstream as copies, as after a crash.
fn restart_state<P: Processor>(
    core: &Core,
    task: &TaskView<P>,
    reload: &Reload<P::Stats>,
) -> Result<Checkpoint<P::Stats>, RuntimeError> {
    core.store.roll_back(&undo_key(P::NAME, task.partition))?;
    let checkpoint = reload()?;
    task.rows
        .write()
        .expect("rows lock")
        .retain(|_, row| !row.dirty);
    *task.stats.write().expect("stats lock") = checkpoint.stats.clone();
    Ok(checkpoint)
}

/// Why `error` stops kpay rather than restart the task, if it does.
fn fatal(core: &Core, replaying: bool, error: &RuntimeError) -> Option<String> {
    if let RuntimeError::Store(store) = error {
        if store.is_no_space() {
            let reason = format!(
                "the state store in {} ran out of space ({store}); it refuses every write \
                 from now on: kpay stops. Free space and start it again: nothing \
                 acknowledged is lost, the log holds every accepted payment",
                core.config.data.dir.join("state").display()
            );
            // Readiness and intake say so until the process is gone.
            core.space.note_refusal(reason.clone());
            return Some(reason);
        }
    }
    if replaying {
        return Some(format!("a task failed during the replay: {error}"));
    }
    if core.processors_stop.is_cancelled() {
        return Some(format!(
            "a task failed while stopping ({error}); what it had not checkpointed is \
             processed again at the next start"
        ));
    }
    None
}

/// Stops intake and the processors after a task failed for good, saying why.
fn stop_after_failure(core: &Core, processor: &str, partition: u32, reason: String) {
    tracing::error!(processor, partition, %reason, "task failed; shutting down");
    core.fail(format!("{processor}/{partition}: {reason}"));
    core.shutdown.cancel();
    core.processors_stop.cancel();
}
