//! Consumer lag: per task and input partition, how many records wait behind
//! the high-water mark and how old the oldest of them is.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::log::TopicPartition;
use crate::model::now_ms;
use crate::runtime::{Runtime, RuntimeError};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LagView {
    /// `inflight`, `account` or `confirmed`.
    pub processor: String,
    /// The input topic-partition.
    pub topic: String,
    pub partition: u32,
    /// Next offset the task will read.
    pub position: u64,
    /// Offset the next record appended will get.
    pub high_watermark: u64,
    /// Records waiting: `high_watermark - position`.
    pub lag_records: u64,
    /// Age of the oldest waiting record, ms (0 when none waits).
    pub oldest_age_ms: i64,
}

/// Lag of the partitions this instance owns (every one, without a group):
/// a partition's lag as its owner sees it.
pub async fn owned_lag(runtime: &Runtime) -> Result<Vec<LagView>, RuntimeError> {
    let owned = runtime.ownership().owned();
    lag(runtime, |p| owned.owns(p)).await
}

/// Lag of every processor task over every input it reads, of the
/// partitions `counted` admits.
pub async fn lag(
    runtime: &Runtime,
    counted: impl Fn(u32) -> bool,
) -> Result<Vec<LagView>, RuntimeError> {
    let log = runtime.log();
    let positions = runtime.input_positions();
    let mut views = Vec::with_capacity(positions.len());
    let inputs = positions.into_iter().filter(|i| i.processor != "control");
    for input in inputs.filter(|i| counted(i.partition)) {
        let tp = TopicPartition::new(runtime.topics().name(input.topic), input.partition);
        let high_watermark = log.high_watermark(&tp).await?;
        let lag_records = high_watermark.saturating_sub(input.position);
        let oldest_age_ms = match lag_records {
            0 => 0,
            _ => match log.read(&tp, input.position, 1).await {
                Ok(records) => records
                    .first()
                    .map_or(0, |r| (now_ms() - r.record.timestamp_ms).max(0)),
                // Below the log start: retention ran ahead of a stale position.
                Err(_) => 0,
            },
        };
        views.push(LagView {
            processor: input.processor.to_owned(),
            topic: tp.topic,
            partition: input.partition,
            position: input.position,
            high_watermark,
            lag_records,
            oldest_age_ms,
        });
    }
    Ok(views)
}
