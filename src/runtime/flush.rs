//! The flusher: makes checkpoints durable on a timer, then lets the log drop
//! what every consumer has durably passed (retention of the embedded log).

use std::sync::Arc;
use std::time::Duration;

use super::core::Core;
use super::RuntimeError;
use crate::log::TopicPartition;
use crate::model::SourceTopic;

/// Flushes the store on a timer, then marks the flushed checkpoints durable
/// and lets the log drop what every consumer has durably passed.
pub(super) async fn flusher(core: Arc<Core>) {
    let every = Duration::from_millis(core.config.pipeline.flush_interval_ms);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = core.processors_stop.cancelled() => break,
        }
        if let Err(error) = flush_once(&core).await {
            tracing::error!(%error, "store flush failed");
        }
    }
}

async fn flush_once(core: &Core) -> Result<(), RuntimeError> {
    let snapshot: Vec<_> = (core.inflight.iter().map(|t| (&t.committed, &t.durable)))
        .chain(core.accounts.iter().map(|t| (&t.committed, &t.durable)))
        .chain(core.confirmed.iter().map(|t| (&t.committed, &t.durable)))
        .chain(std::iter::once(&core.control).map(|t| (&t.committed, &t.durable)))
        .map(|(committed, durable)| (committed.lock().expect("lock").clone(), durable))
        .collect();
    core.store.flush().await?;
    for (committed, durable) in snapshot {
        *durable.lock().expect("lock") = committed;
    }
    retention(core).await
}

async fn retention(core: &Core) -> Result<(), RuntimeError> {
    if core.config.log.is_kafka() {
        // The cluster's own retention settings apply.
        return Ok(());
    }
    let topics = &core.config.topics;
    // Commands live on in the control state; their records need not pin segments.
    let commands = TopicPartition::new(topics.commands.clone(), 0);
    let applied = core.control.durable_offset((SourceTopic::Control, 0));
    core.log.release_before(&commands, applied).await?;
    // Journals are kept in the store as they are appended.
    for journal in [&topics.audit, &topics.logs] {
        let tp = TopicPartition::new(journal.clone(), 0);
        let end = core.log.high_watermark(&tp).await?;
        core.log.release_before(&tp, end).await?;
    }
    for p in 0..core.config.log.partitions {
        let i = p as usize;
        let incoming = core.inflight[i].durable_offset((SourceTopic::Incoming, p));
        let inflight = core.accounts[i].durable_offset((SourceTopic::Inflight, p));
        let complete = core.inflight[i]
            .durable_offset((SourceTopic::Complete, p))
            .min(core.confirmed[i].durable_offset((SourceTopic::Complete, p)));
        let releases = [
            (&topics.incoming, incoming),
            (&topics.inflight, inflight),
            (&topics.complete, complete),
        ];
        for (topic, offset) in releases {
            let tp = TopicPartition::new(topic.clone(), p);
            core.log.release_before(&tp, offset).await?;
        }
        let confirmed = TopicPartition::new(topics.confirmed.clone(), p);
        let end = core.log.high_watermark(&confirmed).await?;
        let keep = core.config.log.sink_retain_records;
        core.log
            .release_before(&confirmed, end.saturating_sub(keep))
            .await?;
        // Dead letters are kept in the store; a rare record must not pin a
        // segment of the core log.
        let dlq = TopicPartition::new(topics.dlq.clone(), p);
        let end = core.log.high_watermark(&dlq).await?;
        core.log.release_before(&dlq, end).await?;
    }
    Ok(())
}
