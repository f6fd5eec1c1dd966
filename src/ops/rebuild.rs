//! `kpay rebuild`: the log is the source of truth, the state tables a cache
//! of it at known positions. Rebuild replays every input topic from offset 0
//! into an empty store, each task up to the position the live state has
//! reached (appending nothing), compares the result with the live state
//! table by table, and (unless `--dry-run`) puts the rebuilt tables in its
//! place, keeping the old ones as `state.before-rebuild`.
//!
//! The operator's tables (dead letters, replays, audit trail, error log,
//! metadata) are not derived from the inputs alone, so they are carried over.
//! Times of processing (an account's `updated_at`, a hop's time out) are
//! compared without: a replay happens at another time.
//!
//! Records deleted by retention cannot be replayed: rebuild refuses when an
//! input's history no longer starts at offset 0 (see `log.history_bytes`).
//! A state directory that is lost entirely needs no rebuild: a server that
//! starts with no state replays the whole log as a crash restart does.

use std::fmt::Debug;
use std::path::Path;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::log::{Log, TopicPartition};
use crate::pipeline::account::{Account, Accounts};
use crate::pipeline::confirmed::Confirmed;
use crate::pipeline::control::ControlPlane;
use crate::pipeline::inflight::{Inflight, PaymentState};
use crate::pipeline::Processor;
use crate::runtime::{open_backends, Runtime, Targets};
use crate::store::{Checkpoint, Store};

/// Tables the operator changes directly; carried over, never replayed.
const CARRIED_OVER: [&str; 8] = [
    crate::ops::idempotency::TABLE,
    crate::ops::dlq::TABLE,
    crate::ops::dlq::REPLAYED,
    crate::ops::audit::TABLE,
    crate::ops::audit::SUBMISSIONS,
    crate::ops::logs::TABLE,
    "m",
    "u",
];

/// How one table compared.
#[derive(Debug, Default)]
pub struct TableReport {
    pub table: String,
    /// Rows in both and equal.
    pub equal: u64,
    /// Rows in both and different.
    pub differing: u64,
    /// Rows only in the live state.
    pub only_live: u64,
    /// Rows only in the rebuilt state.
    pub only_rebuilt: u64,
    /// The first few differences, for a person.
    pub examples: Vec<String>,
}

impl TableReport {
    pub fn matches(&self) -> bool {
        self.differing == 0 && self.only_live == 0 && self.only_rebuilt == 0
    }
}

/// Most differences printed per table.
const EXAMPLES: usize = 5;

/// Rebuilds the state under `config.data.dir` from the log; returns the
/// comparison (the caller prints it) after replacing the state unless `dry_run`.
pub async fn run(config: Config, dry_run: bool) -> anyhow::Result<Vec<TableReport>> {
    let dir = config.data.dir.clone();
    if !dir.join("state").exists() {
        bail!(
            "no state under {}: nothing to compare. A server started there replays \
             the whole log into a new state by itself",
            dir.display()
        );
    }
    let (log, live) = open_backends(&config).await?;
    live.check_format()?;
    live.roll_back_partial()?;
    let targets = targets(&live, config.log.partitions)?;
    check_history(&*log, &config, &targets).await?;
    let rebuilt_dir = dir.join("state.rebuild");
    remove_dir(&rebuilt_dir)?;
    let rebuilt = Store::open(&rebuilt_dir, config.data.state_cache_bytes)?
        .with_batch_rows(config.data.store_batch_rows);
    Runtime::replay(config.clone(), log, rebuilt.clone(), &targets).await?;
    let reports = compare(&live, &rebuilt)?;
    if dry_run {
        drop((live, rebuilt));
        remove_dir(&rebuilt_dir)?;
        return Ok(reports);
    }
    for table in CARRIED_OVER {
        rebuilt.replace_table_from(&live, table)?;
    }
    rebuilt.flush().await?;
    drop((live, rebuilt));
    let before = dir.join("state.before-rebuild");
    remove_dir(&before)?;
    std::fs::rename(dir.join("state"), &before)
        .with_context(|| format!("moving the old state to {}", before.display()))?;
    std::fs::rename(&rebuilt_dir, dir.join("state"))
        .with_context(|| format!("moving the rebuilt state into {}", dir.display()))?;
    Ok(reports)
}

fn remove_dir(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::remove_dir_all(path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Each task's position in the live state: where its replay stops.
fn targets(live: &Store, partitions: u32) -> anyhow::Result<Targets> {
    fn add<P: Processor>(
        live: &Store,
        partitions: u32,
        targets: &mut Targets,
    ) -> anyhow::Result<()> {
        for p in 0..partitions {
            let key = crate::store::checkpoint_key(P::NAME, p);
            if let Some(checkpoint) = live.get::<Checkpoint<P::Stats>>(&key)? {
                targets.insert((P::NAME.to_owned(), p), checkpoint.next_offsets);
            }
        }
        Ok(())
    }
    let mut targets = Targets::new();
    add::<Inflight>(live, partitions, &mut targets)?;
    add::<Accounts>(live, partitions, &mut targets)?;
    add::<Confirmed>(live, partitions, &mut targets)?;
    add::<ControlPlane>(live, 1, &mut targets)?;
    Ok(targets)
}

/// Refuses when a record a replay needs was deleted by retention.
async fn check_history(log: &dyn Log, config: &Config, targets: &Targets) -> anyhow::Result<()> {
    for positions in targets.values() {
        for (&(kind, partition), &end) in positions {
            let tp = TopicPartition::new(config.topics.name(kind), partition);
            let start = log.log_start(&tp).await?;
            if end > 0 && start > 0 {
                bail!(
                    "retention deleted offsets 0..{start} of {tp} (log.history_bytes = {}); \
                     the state cannot be rebuilt from the log alone, so it was left as it is",
                    config.log.history_bytes
                );
            }
        }
    }
    Ok(())
}

/// Compares every derived table of the two stores.
pub fn compare(live: &Store, rebuilt: &Store) -> anyhow::Result<Vec<TableReport>> {
    Ok(vec![
        compare_rows(
            accounts(live)?.into_iter().map(Ok::<_, anyhow::Error>),
            accounts(rebuilt)?.into_iter().map(Ok::<_, anyhow::Error>),
            "accounts",
            |a: Account| {
                // Opening and update times are times of processing.
                (a.id, a.balance_cents, a.status, a.last_payment_id)
            },
        )?,
        compare_rows(
            payments(live)?.into_iter().map(Ok::<_, anyhow::Error>),
            payments(rebuilt)?.into_iter().map(Ok::<_, anyhow::Error>),
            "payments",
            |mut p: PaymentState| {
                for hop in &mut p.lineage {
                    hop.at_ms = 0;
                }
                p
            },
        )?,
        checkpoints::<Inflight>(live, rebuilt)?,
        checkpoints::<Accounts>(live, rebuilt)?,
        checkpoints::<Confirmed>(live, rebuilt)?,
        checkpoints::<ControlPlane>(live, rebuilt)?,
    ])
}

fn checkpoints<P: Processor>(live: &Store, rebuilt: &Store) -> anyhow::Result<TableReport>
where
    P::Stats: PartialEq + Debug,
{
    let table = format!("t/{}", P::NAME);
    let name = format!("{} offsets and statistics", P::NAME);
    compare_table(live, rebuilt, &table, &name, |c: Checkpoint<P::Stats>| c)
}

/// Walks both tables in key order, comparing normalised rows.
fn compare_table<T, K>(
    live: &Store,
    rebuilt: &Store,
    table: &str,
    name: &str,
    normalise: impl Fn(T) -> K,
) -> anyhow::Result<TableReport>
where
    T: DeserializeOwned,
    K: PartialEq + Debug,
{
    compare_rows(
        live.entries::<T>(table),
        rebuilt.entries::<T>(table),
        name,
        normalise,
    )
}

/// Every account of a store, in key order: the newest copy of its row in
/// the blocks (`store/blocks/`); its key alone is a row of its own.
fn accounts(store: &Store) -> anyhow::Result<Vec<(String, Account)>> {
    let rows = rows_in_blocks::<Account>(store, Accounts::TABLE)?;
    let mut missing = None;
    store.for_each_key(Accounts::TABLE, |key| {
        if !rows.contains_key(key) {
            missing = Some(key.to_owned());
        }
        missing.is_none()
    })?;
    if let Some(key) = missing {
        bail!("account {key} has its key in the state store but no row");
    }
    Ok(rows.into_iter().collect())
}

/// The newest copy in the blocks of every row of `table`, decoded.
fn rows_in_blocks<T: DeserializeOwned>(
    store: &Store,
    table: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, T>> {
    let mut rows = std::collections::BTreeMap::new();
    for (key, bytes) in store.block_rows(table)? {
        let row = crate::store::decode_row(&key, &bytes)?;
        rows.insert(key, row);
    }
    Ok(rows)
}

/// Every payment row of a store, in key order: rows of their own (payments
/// in flight) and the rows in blocks of settled ones (`store/blocks/`).
fn payments(store: &Store) -> anyhow::Result<Vec<(String, PaymentState)>> {
    let mut rows = rows_in_blocks::<PaymentState>(store, Inflight::TABLE)?;
    for entry in store.entries::<PaymentState>(Inflight::TABLE) {
        let (key, row) = entry?;
        rows.insert(key, row);
    }
    Ok(rows.into_iter().collect())
}

/// Walks two sequences of rows in key order, comparing normalised rows.
fn compare_rows<T, K, E>(
    left: impl Iterator<Item = Result<(String, T), E>>,
    right: impl Iterator<Item = Result<(String, T), E>>,
    name: &str,
    normalise: impl Fn(T) -> K,
) -> anyhow::Result<TableReport>
where
    K: PartialEq + Debug,
    E: Into<anyhow::Error>,
{
    let mut report = TableReport {
        table: name.to_owned(),
        ..TableReport::default()
    };
    let (mut left, mut right) = (left.peekable(), right.peekable());
    loop {
        let order = match (left.peek(), right.peek()) {
            (None, None) => break,
            (Some(Err(_)), _) | (_, Some(Err(_))) => {
                let error = left
                    .next()
                    .and_then(Result::err)
                    .or_else(|| right.next().and_then(Result::err));
                return Err(error.expect("an error was peeked").into());
            }
            (Some(Ok((a, _))), Some(Ok((b, _)))) => a.cmp(b),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
        };
        let example = |report: &mut TableReport, text: String| {
            if report.examples.len() < EXAMPLES {
                report.examples.push(text);
            }
        };
        match order {
            std::cmp::Ordering::Less => {
                let (key, _) = left.next().expect("peeked").map_err(Into::into)?;
                report.only_live += 1;
                example(&mut report, format!("{key}: only in the live state"));
            }
            std::cmp::Ordering::Greater => {
                let (key, _) = right.next().expect("peeked").map_err(Into::into)?;
                report.only_rebuilt += 1;
                example(&mut report, format!("{key}: only in the rebuilt state"));
            }
            std::cmp::Ordering::Equal => {
                let (key, a) = left.next().expect("peeked").map_err(Into::into)?;
                let (_, b) = right.next().expect("peeked").map_err(Into::into)?;
                let (a, b) = (normalise(a), normalise(b));
                if a == b {
                    report.equal += 1;
                } else {
                    report.differing += 1;
                    example(&mut report, format!("{key}: live {a:?}, rebuilt {b:?}"));
                }
            }
        }
    }
    Ok(report)
}

/// The comparison as text, one line per table plus examples.
pub fn render(reports: &[TableReport]) -> String {
    let mut out = String::new();
    for r in reports {
        let verdict = if r.matches() { "equal" } else { "DIFFERENT" };
        out.push_str(&format!(
            "{:<36} {verdict:<9} equal {:>9}  differing {:>6}  only live {:>6}  only rebuilt {:>6}\n",
            r.table, r.equal, r.differing, r.only_live, r.only_rebuilt
        ));
        for example in &r.examples {
            out.push_str(&format!("    {example}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
    use crate::log::Record;
    use crate::model::SourceTopic;

    // Once retention has deleted the start of an input, rebuild refuses and says which and why.
    #[tokio::test]
    async fn refuses_when_retention_deleted_history() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(EmbeddedLogConfig {
            segment_bytes: 400,
            ..EmbeddedLogConfig::with_dir(dir.path())
        })
        .unwrap();
        let config = Config::default();
        let tp = TopicPartition::new(config.topics.incoming.clone(), 0);
        log.ensure_topic(&tp.topic, 1).await.unwrap();
        for n in 0..40 {
            let record = Record {
                key: bytes::Bytes::from_static(b"k"),
                value: bytes::Bytes::from(format!("value {n:>20}")),
                timestamp_ms: 0,
            };
            log.append(&tp, vec![record]).await.unwrap();
        }
        let mut targets = Targets::new();
        let positions = [((SourceTopic::Incoming, 0), 40)].into_iter().collect();
        targets.insert(("inflight".into(), 0), positions);
        check_history(&*log, &config, &targets).await.unwrap();
        log.release_before(&tp, 40).await.unwrap();
        assert!(log.log_start(&tp).await.unwrap() > 0);
        let error = check_history(&*log, &config, &targets)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("retention deleted offsets 0..")
                && error.contains("payment.incoming")
                && error.contains("log.history_bytes"),
            "{error}"
        );
    }
}
