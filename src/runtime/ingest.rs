//! The ingest path: one sequencer per `payment.incoming` partition checks a
//! payment id against everything already accepted and appends the new ones in
//! one durable group commit. Check and append are one sequenced step, so two
//! submissions of one id can never both be appended as new.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Core, RuntimeError};
use crate::failpoint::{self, Point};
use crate::log::{LogError, Record, TopicPartition};
use crate::model::{
    codec, now_ms, partition_for, Envelope, Event, PaymentRef, PaymentStatus, SourceTopic,
    Submitter,
};

/// The answer to one submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Durable in `payment.incoming` now.
    Accepted(PaymentRef),
    /// Already accepted earlier with the same body; its current status.
    Duplicate(PaymentRef, PaymentStatus),
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    #[error("payment {0} was already submitted with a different body")]
    Conflict(String),
    #[error("ingest queue of partition {0} is full; retry later")]
    Busy(u32),
    #[error("{pending} payments of partition {partition} wait for processing (limit {limit}); retry later")]
    Backlog {
        partition: u32,
        pending: usize,
        limit: usize,
    },
    #[error("intake is held at {0} payments/s by the adaptive controller (control.adaptive); retry later")]
    Throttled(u64),
    #[error("the server is shutting down")]
    Closed,
    /// Free space below `data.min_free_bytes`; nothing was written.
    #[error("{0}")]
    NoSpace(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

struct Submission {
    payment: PaymentRef,
    submitted_by: Submitter,
    reply: oneshot::Sender<Result<Admission, IngestError>>,
}

/// Payments appended but maybe not yet in the store, by id and by offset.
#[derive(Default)]
pub struct Recent {
    by_id: HashMap<String, (PaymentRef, Option<Submitter>, u64)>,
    by_offset: BTreeMap<u64, String>,
}

impl Recent {
    fn insert(&mut self, payment: PaymentRef, submitted_by: Option<Submitter>, offset: u64) {
        self.by_offset.insert(offset, payment.id.clone());
        (self.by_id).insert(payment.id.clone(), (payment, submitted_by, offset));
    }

    /// Forgets payments below `offset`: the inflight processor's durable
    /// checkpoint holds them.
    fn forget_below(&mut self, offset: u64) {
        while let Some(entry) = self.by_offset.first_entry() {
            if *entry.key() >= offset {
                break;
            }
            let id = entry.remove();
            self.by_id.remove(&id);
        }
    }

    pub fn get(&self, id: &str) -> Option<&PaymentRef> {
        self.by_id.get(id).map(|(payment, _, _)| payment)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Handles to the sequencers.
pub struct Ingest {
    queues: Vec<mpsc::Sender<Submission>>,
    throttle: Arc<super::throttle::Throttle>,
    /// Per partition: what was appended and is not yet durable in the store.
    pub recent: Vec<Arc<Mutex<Recent>>>,
}

impl Ingest {
    /// Submits one payment on behalf of `submitted_by` (kept with the
    /// payment); returns once it is durable (or refused).
    pub async fn submit(
        &self,
        payment: PaymentRef,
        submitted_by: Submitter,
    ) -> Result<Admission, IngestError> {
        self.throttle.admit().map_err(IngestError::Throttled)?;
        let partition = partition_for(&payment.id, self.queues.len() as u32);
        let (reply, answer) = oneshot::channel();
        let submission = Submission {
            payment,
            submitted_by,
            reply,
        };
        self.queues[partition as usize]
            .try_send(submission)
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => IngestError::Busy(partition),
                mpsc::error::TrySendError::Closed(_) => IngestError::Closed,
            })?;
        answer.await.map_err(|_| IngestError::Closed)?
    }

    /// Every payment accepted on the partitions `keep` admits and not yet
    /// in the inflight processor's checkpoint (admitted since, or waiting
    /// in `payment.incoming`), with who submitted it.
    pub fn recent(&self, keep: impl Fn(u32) -> bool) -> Vec<(PaymentRef, Option<Submitter>)> {
        let partitions = self.recent.iter().enumerate();
        let kept = partitions.filter(|(partition, _)| keep(*partition as u32));
        kept.flat_map(|(_, recent)| {
            let recent = recent.lock().expect("recent lock");
            let all = recent.by_id.values();
            all.map(|(payment, by, _)| (payment.clone(), by.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
    }

    /// A payment accepted but not yet admitted by the inflight processor,
    /// with who submitted it.
    pub fn accepted(&self, id: &str) -> Option<(PaymentRef, Option<Submitter>)> {
        let partition = partition_for(id, self.queues.len() as u32) as usize;
        let recent = self.recent[partition].lock().expect("recent lock");
        let (payment, by, _) = recent.by_id.get(id)?;
        Some((payment.clone(), by.clone()))
    }
}

/// Starts one sequencer per partition; `recent` is rebuilt from the log
/// between the inflight processor's checkpoint and the high-water mark.
pub(super) async fn start(core: &Arc<Core>) -> Result<Ingest, RuntimeError> {
    let partitions = core.config.log.partitions;
    let mut queues = Vec::new();
    let mut recents = Vec::new();
    for partition in 0..partitions {
        let tp = TopicPartition::new(core.config.topics.incoming.clone(), partition);
        let recent = Arc::new(Mutex::new(recover(core, &tp).await?));
        let (sender, receiver) = mpsc::channel(core.config.pipeline.ingest_queue);
        let sequencer = Sequencer {
            core: core.clone(),
            tp,
            recent: recent.clone(),
        };
        core.tracker.spawn(sequencer.run(receiver));
        queues.push(sender);
        recents.push(recent);
    }
    Ok(Ingest {
        queues,
        throttle: core.throttle.clone(),
        recent: recents,
    })
}

async fn recover(core: &Core, tp: &TopicPartition) -> Result<Recent, RuntimeError> {
    let inflight = &core.inflight[tp.partition as usize];
    let offset = inflight.durable_offset((crate::model::SourceTopic::Incoming, tp.partition));
    let offset = offset.max(core.log.log_start(tp).await?);
    let end = core.log.high_watermark(tp).await?;
    let mut recent = Recent::default();
    crate::log::read_range_with(&*core.log, tp, offset, end, |records| {
        for stored in records {
            let Ok(mut envelope) = codec::decode(&stored.record.value) else {
                continue;
            };
            core.check_attribution(&mut envelope);
            if let Event::PaymentSubmitted(payment) = envelope.event {
                recent.insert(payment, envelope.submitted_by, stored.offset);
            }
        }
        true
    })
    .await?;
    Ok(recent)
}

struct Sequencer {
    core: Arc<Core>,
    tp: TopicPartition,
    recent: Arc<Mutex<Recent>>,
}

/// What the sequencer decided for one submission before the append.
enum Verdict {
    New(PaymentRef),
    Answer(Result<Admission, IngestError>),
}

impl Sequencer {
    async fn run(self, mut queue: mpsc::Receiver<Submission>) {
        let max = self.core.config.pipeline.ingest_batch;
        let mut batch = Vec::with_capacity(max);
        loop {
            let received = tokio::select! {
                n = queue.recv_many(&mut batch, max) => n,
                () = self.core.shutdown.cancelled() => 0,
            };
            if received == 0 {
                break;
            }
            self.commit(std::mem::take(&mut batch)).await;
        }
        queue.close();
        while let Ok(submission) = queue.try_recv() {
            let _ = submission.reply.send(Err(IngestError::Closed));
        }
    }

    /// Decides, appends and answers one group of submissions.
    async fn commit(&self, mut batch: Vec<Submission>) {
        let accepted_at_ms = now_ms();
        let durable = self.core.inflight[self.tp.partition as usize]
            .durable_offset((crate::model::SourceTopic::Incoming, self.tp.partition));
        let mut fresh: HashMap<String, PaymentRef> = HashMap::new();
        let mut verdicts = Vec::with_capacity(batch.len());
        {
            let mut recent = self.recent.lock().expect("recent lock");
            recent.forget_below(durable);
            let limit = self.core.config.pipeline.max_pending_payments;
            for submission in &batch {
                if recent.len() + fresh.len() >= limit {
                    verdicts.push(Verdict::Answer(Err(IngestError::Backlog {
                        partition: self.tp.partition,
                        pending: recent.len() + fresh.len(),
                        limit,
                    })));
                    continue;
                }
                let mut payment = submission.payment.clone();
                payment.accepted_at_ms = accepted_at_ms;
                verdicts.push(self.decide(&recent, &fresh, payment.clone()));
                if let Verdict::New(_) = verdicts.last().expect("just pushed") {
                    fresh.insert(payment.id.clone(), payment);
                }
            }
        }
        let records: Vec<Record> = (verdicts.iter().zip(&mut batch))
            .filter_map(|(verdict, submission)| match verdict {
                Verdict::New(payment) => {
                    let by = &mut submission.submitted_by;
                    self.core.sign_attribution(payment, by);
                    Some(to_record(&self.core, payment, by))
                }
                Verdict::Answer(_) => None,
            })
            .collect();
        let shortage = if records.is_empty() {
            None
        } else {
            self.core.space.below_floor()
        };
        if let Some(reason) = shortage {
            self.refuse_for_space(batch, verdicts, &reason);
            return;
        }
        let wrote = !records.is_empty();
        if wrote {
            failpoint::pass(Point::IngestBeforeAppend);
        }
        let appended = self.core.log.append(&self.tp, records).await;
        if wrote {
            self.core.note_append(&appended);
        }
        if wrote && appended.is_ok() {
            failpoint::pass(Point::IngestAfterAppend);
        }
        if matches!(&appended, Err(error) if error.is_no_space()) {
            metrics::counter!("kpay_intake_no_space_total").increment(1);
        }
        let mut offset = match &appended {
            Ok(first) => *first,
            Err(_) => 0,
        };
        let mut recent = self.recent.lock().expect("recent lock");
        for (submission, verdict) in batch.into_iter().zip(verdicts) {
            let answer = match (verdict, &appended) {
                (Verdict::Answer(answer), _) => answer,
                (Verdict::New(payment), Ok(_)) => {
                    recent.insert(payment.clone(), Some(submission.submitted_by), offset);
                    offset += 1;
                    Ok(Admission::Accepted(payment))
                }
                (Verdict::New(_), Err(error)) => Err(IngestError::Log(clone_log_error(error))),
            };
            let _ = submission.reply.send(answer);
        }
    }

    /// Answers a group whose new payments cannot be kept: free space is
    /// below the floor. Repeats of known payments still get their answer.
    fn refuse_for_space(&self, batch: Vec<Submission>, verdicts: Vec<Verdict>, reason: &str) {
        let mut refused = 0u64;
        for (submission, verdict) in batch.into_iter().zip(verdicts) {
            let answer = match verdict {
                Verdict::Answer(answer) => answer,
                Verdict::New(_) => {
                    refused += 1;
                    Err(IngestError::NoSpace(reason.to_owned()))
                }
            };
            let _ = submission.reply.send(answer);
        }
        metrics::counter!("kpay_intake_no_space_total").increment(refused);
    }

    fn decide(
        &self,
        recent: &Recent,
        fresh: &HashMap<String, PaymentRef>,
        payment: PaymentRef,
    ) -> Verdict {
        // The processor's row knows the real status, so it is asked first;
        // the recent index covers what the processor has not admitted yet.
        let processed = self.core.inflight[self.tp.partition as usize]
            .get(&self.core, &payment.id)
            .map(|row| row.map(|s| (s.payment, s.status)));
        let known = match processed {
            Ok(Some(known)) => Some(known),
            Ok(None) => recent
                .get(&payment.id)
                .or_else(|| fresh.get(&payment.id))
                .map(|p| (p.clone(), PaymentStatus::Accepted)),
            Err(error) => return Verdict::Answer(Err(error.into())),
        };
        match known {
            None => Verdict::New(payment),
            Some((earlier, status)) if earlier.same_request(&payment) => {
                Verdict::Answer(Ok(Admission::Duplicate(earlier, status)))
            }
            Some(_) => Verdict::Answer(Err(IngestError::Conflict(payment.id))),
        }
    }
}

/// The payment in kpay's binary format, sealed when there is a cluster
/// secret (any producer may write the public JSON format instead).
fn to_record(core: &Core, payment: &PaymentRef, submitted_by: &Submitter) -> Record {
    let mut envelope = Envelope::new(None, Event::PaymentSubmitted(payment.clone()));
    envelope.submitted_by = Some(submitted_by.clone());
    let key = payment.id.as_bytes();
    let value = core.seal(SourceTopic::Incoming, key, codec::encode(&envelope));
    Record {
        key: Bytes::copy_from_slice(key),
        value: Bytes::from(value),
        timestamp_ms: payment.accepted_at_ms,
    }
}

/// Log errors are not `Clone` (they may hold an io::Error); one append's error
/// is reported to every submission of the group by message.
fn clone_log_error(error: &LogError) -> LogError {
    match error {
        LogError::Full {
            used_bytes,
            limit_bytes,
        } => LogError::Full {
            used_bytes: *used_bytes,
            limit_bytes: *limit_bytes,
        },
        LogError::Closed => LogError::Closed,
        LogError::NoSpace { path, detail } => LogError::NoSpace {
            path: path.clone(),
            detail: detail.clone(),
        },
        other => LogError::Backend(other.to_string()),
    }
}
