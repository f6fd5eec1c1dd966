//! The sections of the settings, each with its defaults. Every key is
//! documented in `config/kpay.toml`, which a test holds equal to these.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::SourceTopic;

/// Business goals; 0 (or false) turns a goal off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SloConfig {
    /// p99 latency (acceptance → terminal) of the newest window with payments stays below this, ms.
    pub latency_p99_ms: u64,
    /// Terminal payments per second in the newest ended window stay above this.
    pub min_throughput_per_second: u64,
    /// The dead letter queue stays empty.
    pub dlq_empty: bool,
    /// Total consumer lag stays below this many records.
    pub max_lag_records: u64,
}

impl Default for SloConfig {
    fn default() -> Self {
        Self {
            latency_p99_ms: 200,
            min_throughput_per_second: 0,
            dlq_empty: true,
            max_lag_records: 100_000,
        }
    }
}

/// The control plane's own settings (`[control]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// A controller sets the intake rate from the live signals (p99
    /// latency against `slo.latency_p99_ms`, lag against
    /// `slo.max_lag_records`, the free-space floor), never above the
    /// operator's rate limit.
    pub adaptive: bool,
    /// Lowest intake rate the controller sets, payments per second.
    pub adaptive_min_per_second: u64,
    /// Highest, when the operator set no rate limit.
    pub adaptive_max_per_second: u64,
    /// How often it looks at the signals, ms.
    pub adaptive_interval_ms: u64,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            adaptive: false,
            adaptive_min_per_second: 10,
            adaptive_max_per_second: 100_000,
            adaptive_interval_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InstrumentConfig {
    /// Keep throughput/latency windows and record Prometheus metrics (off: to measure their cost).
    pub enabled: bool,
    /// Length of a throughput/latency window.
    pub window_seconds: u32,
    /// Windows kept (and served by `GET /api/v1/metrics/throughput`).
    pub windows_kept: usize,
}

impl Default for InstrumentConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window_seconds: 60,
            windows_kept: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the HTTP server binds.
    pub listen: SocketAddr,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Directory of the web UI's static files.
    pub static_dir: PathBuf,
    /// Reads need a token too (any role).
    pub protect_reads: bool,
    /// Host names (or addresses) besides the loopback ones that protected
    /// mode answers, with any port; checked against every request's `Host`.
    pub allowed_hosts: Vec<String>,
    /// Origins (`http(s)://host[:port]`) of a dashboard served elsewhere:
    /// they get CORS answers, and in protected mode may change state.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory holding the embedded log (`log/`) and the state store (`state/`).
    pub dir: PathBuf,
    /// Bound of sled's page cache.
    pub state_cache_bytes: u64,
    /// Rows per store batch; bigger checkpoints are written in chunks under
    /// an undo record (1–256).
    pub store_batch_rows: usize,
    /// New payments and accounts are refused (507) while the device holding
    /// `dir` has less free space than this, so that what was accepted can
    /// still be processed and the state store never runs out (0: no check).
    pub min_free_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `embedded` (default) or `kafka`; [`LogConfig::backend`] pairs it
    /// with the settings of that backend.
    pub backend: BackendKind,
    /// Partitions of every topic: the unit of parallelism and ordering.
    pub partitions: u32,
    /// Size at which the embedded log starts a new segment file.
    pub segment_bytes: u64,
    /// Appends fail (503) once the embedded log retains this many bytes.
    pub max_retained_bytes: u64,
    /// Consumed records are kept until the log is larger than this, so that
    /// `kpay rebuild` can replay them; 0 deletes them as soon as consumed.
    pub history_bytes: u64,
    /// Newest records per partition the embedded log keeps in memory, so
    /// consumers at the tail never read the disk.
    pub tail_cache_records: usize,
    /// Records kept per partition of topics nothing in kpay reads (`payment.confirmed`, `payment.dlq`).
    pub sink_retain_records: u64,
    /// The Kafka cluster, when `backend = "kafka"`.
    pub kafka: KafkaConfig,
}

/// Which log the topics live in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The embedded durable log under `data.dir/log` (no broker).
    #[default]
    Embedded,
    /// A Kafka-protocol cluster, `log.kafka`.
    Kafka,
}

/// The configured log backend together with the settings it runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend<'a> {
    /// The embedded log: its settings are the rest of `[log]`.
    Embedded(&'a LogConfig),
    /// A Kafka-protocol cluster.
    Kafka(&'a KafkaConfig),
}

impl super::Config {
    /// Whether this instance shares its partitions through a group.
    pub fn scales_out(&self) -> bool {
        self.log.is_kafka() && self.cluster.scale_out
    }
}

impl LogConfig {
    /// The backend to open, with its settings.
    pub fn backend(&self) -> Backend<'_> {
        match self.backend {
            BackendKind::Embedded => Backend::Embedded(self),
            BackendKind::Kafka => Backend::Kafka(&self.kafka),
        }
    }

    /// Whether the log lives on a Kafka cluster (whose own retention applies).
    pub fn is_kafka(&self) -> bool {
        self.backend == BackendKind::Kafka
    }
}

/// A Kafka-protocol cluster as the log (rskafka). `KPAY_KAFKA_BROKERS=host:port,…`
/// alone selects it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Replication factor of the topics kpay creates.
    pub replication_factor: i16,
    /// `none`, `gzip`, `lz4` or `snappy`.
    pub compression: String,
    /// Deadline of every call to the cluster (connect, produce, fetch, metadata).
    pub request_timeout_ms: u64,
    /// Most records in one produce request; larger appends are split.
    pub max_batch_records: usize,
    /// Most bytes one fetch returns per partition.
    pub fetch_max_bytes: i32,
    /// How often a waiting task asks the broker for records written by
    /// other producers; records this process appends wake it at once.
    pub poll_ms: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: Vec::new(),
            replication_factor: 1,
            compression: "none".into(),
            request_timeout_ms: 10_000,
            max_batch_records: 10_000,
            fetch_max_bytes: 1 << 20,
            poll_ms: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    pub incoming: String,
    pub inflight: String,
    pub complete: String,
    pub confirmed: String,
    pub dlq: String,
    /// Control commands (one partition: one order for all of them).
    pub commands: String,
    /// The audit trail (one partition).
    pub audit: String,
    /// WARN and ERROR log events with their context (one partition).
    pub logs: String,
    /// On a cluster: where the owner of each task publishes its checkpoints
    /// (partitioned like the pipeline's topics).
    pub positions: String,
    /// On a cluster: snapshots of each task partition's state, from which
    /// an instance with an empty data directory restores (partitioned like
    /// the pipeline's topics).
    pub snapshots: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Most records a task reads per batch, over all its inputs.
    pub batch_records: usize,
    /// A task checkpoints once this many rows changed, or every
    /// `commit_interval_ms`, whichever comes first.
    pub checkpoint_max_rows: usize,
    /// How often a task writes its state and offsets to the store.
    pub commit_interval_ms: u64,
    /// How often the store is flushed to disk (and retention runs).
    pub flush_interval_ms: u64,
    /// Rows a task keeps in memory; clean rows beyond it are dropped.
    pub cache_rows_per_task: usize,
    /// Keys per task the presence filter is sized for (1% false positives
    /// up to it); beyond it the filter still works, with more store reads.
    pub presence_filter_items: usize,
    /// Submissions waiting per ingest partition before 503.
    pub ingest_queue: usize,
    /// Payments per partition accepted but not yet checkpointed by the
    /// inflight processor; beyond it submissions get 503 (backpressure).
    pub max_pending_payments: usize,
    /// Most submissions in one ingest group commit.
    pub ingest_batch: usize,
    /// How long shutdown waits for in-flight payments to finish.
    pub shutdown_drain_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest amount of one payment, deposit or opening balance.
    pub max_amount_cents: i64,
    /// Most payments in one `POST /payments/batch`.
    pub max_batch_payments: usize,
    /// Most items one page of a list endpoint returns.
    pub max_page_items: usize,
    /// Newest audit entries of control and administrative calls kept in the store.
    pub audit_entries: usize,
    /// Newest audit entries of payment and account submissions kept in the
    /// store; apart, so that submission traffic never pushes out a pause.
    pub audit_submission_entries: usize,
    /// Dead letters kept in the store waiting for an operator; beyond it
    /// new ones are still published to the DLQ topic, counted and logged.
    /// Replayed entries are kept up to the same bound, oldest dropped first.
    pub dlq_entries: usize,
    /// Most bytes of a dead-lettered record's value kept in its dead letter;
    /// a longer value keeps this prefix, its length and its SHA-256.
    pub dead_letter_value_bytes: usize,
    /// Newest WARN and ERROR log events kept in the store.
    pub error_log_entries: usize,
    /// How long a settled payment is kept for lookup and deduplication,
    /// counted from its acceptance to the newest payment record read on its
    /// partition. A payment older than this when it reaches the log is
    /// refused (`expired`): it could be a copy of a forgotten one.
    pub payment_retention_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Accounts `demo-0000`… opened on the first start (0 = none).
    pub accounts: u32,
    /// Opening balance of each demo account.
    pub opening_balance_cents: i64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("valid address"),
            max_body_bytes: 1 << 20,
            static_dir: PathBuf::from("static"),
            protect_reads: false,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data"),
            state_cache_bytes: 32 << 20,
            store_batch_rows: 256,
            min_free_bytes: 64 << 20,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Embedded,
            partitions: 8,
            segment_bytes: 64 << 20,
            max_retained_bytes: 8 << 30,
            history_bytes: 1 << 30,
            tail_cache_records: 4_096,
            sink_retain_records: 10_000,
            kafka: KafkaConfig::default(),
        }
    }
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            incoming: "payment.incoming".into(),
            inflight: "payment.inflight".into(),
            complete: "payment.complete".into(),
            confirmed: "payment.confirmed".into(),
            dlq: "payment.dlq".into(),
            commands: "control.commands".into(),
            audit: "ops.audit".into(),
            logs: "ops.logs".into(),
            positions: "cluster.positions".into(),
            snapshots: "cluster.snapshots".into(),
        }
    }
}

impl TopicsConfig {
    /// The topic a processor input of `kind` reads.
    pub fn name(&self, kind: SourceTopic) -> &str {
        match kind {
            SourceTopic::Incoming => &self.incoming,
            SourceTopic::Inflight => &self.inflight,
            SourceTopic::Complete => &self.complete,
            SourceTopic::Control => &self.commands,
            // Replays come from the DLQ (they are appended to the source topic).
            SourceTopic::Replay => &self.dlq,
            // kpay's own writes go to the inflight and control topics; they
            // are never read as an input of their own.
            SourceTopic::Api => "(api)",
        }
    }

    /// The partitioned topics of the payment pipeline.
    pub fn all(&self) -> [&str; 5] {
        [
            &self.incoming,
            &self.inflight,
            &self.complete,
            &self.confirmed,
            &self.dlq,
        ]
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            batch_records: 1_024,
            checkpoint_max_rows: 4_096,
            commit_interval_ms: 500,
            flush_interval_ms: 500,
            cache_rows_per_task: 20_000,
            presence_filter_items: 1_000_000,
            ingest_queue: 16_384,
            ingest_batch: 4_096,
            max_pending_payments: 25_000,
            shutdown_drain_ms: 10_000,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_amount_cents: 100_000_000_000,
            max_batch_payments: 1_000,
            max_page_items: 1_000,
            audit_entries: 100_000,
            audit_submission_entries: 100_000,
            dlq_entries: 10_000,
            dead_letter_value_bytes: 4_096,
            error_log_entries: 10_000,
            payment_retention_seconds: 3_600,
        }
    }
}

/// The payment generator (`/api/v1/generator`): its defaults and bounds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// Accounts `gen-00000`, … used when a start names none.
    pub accounts: u32,
    /// Opening balance of each generator account, in cents.
    pub opening_balance_cents: i64,
    /// Highest rate a start may ask for, payments per second.
    pub max_rate_per_second: u64,
    /// Most accounts a start may ask for.
    pub max_accounts: u32,
    /// Submissions waiting for their acknowledgement at once; beyond it the
    /// generator sends less than asked (and says so in `behind`).
    pub max_in_flight: usize,
    /// Percent of payments from an empty account (rejected: insufficient funds).
    pub rejected_percent: u32,
    /// Percent of payments to an account that does not exist (reversed).
    pub reversed_percent: u32,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            accounts: 1_000,
            opening_balance_cents: 1_000_000,
            max_rate_per_second: 100_000,
            max_accounts: 1_000_000,
            max_in_flight: 4_096,
            rejected_percent: 2,
            reversed_percent: 1,
        }
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            accounts: 100,
            opening_balance_cents: 1_000_000,
        }
    }
}

/// The operational plane's switches.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OpsConfig {
    /// Whether `POST /api/v1/ops/records` may append raw records (for
    /// drills). It bypasses every check of the API, so it is off unless
    /// asked for, and even then needs an operator token.
    pub raw_records: bool,
}

/// What every kpay sharing the same topics must agree on, and how one
/// joins the others: the consumer group through which kpay instances divide
/// the partitions between them (`cluster` module).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Key of the HMAC-SHA256 on every record of `payment.inflight`,
    /// `payment.complete` and `control.commands`; a record without a valid
    /// one is dead-lettered as `unauthenticated`. Empty: nothing is signed
    /// or checked.
    pub secret: super::Secret,
    /// On Kafka: join `group` and share the partitions with the other
    /// members (each partition's tasks append on its owner only; the others
    /// follow). Off: this instance owns every partition.
    pub scale_out: bool,
    /// The Kafka consumer group the instances of one kpay cluster join.
    pub group: String,
    /// The URL other instances reach this one's HTTP API at (for routing
    /// queries); empty: `http://<server.listen>`.
    pub advertised_url: String,
    /// The coordinator drops a member it has not heard from for this long.
    pub session_timeout_ms: u64,
    /// How often a member tells the coordinator it is alive (below the session timeout).
    pub heartbeat_interval_ms: u64,
    /// How long a rebalance may take: the longest wait of a join, and how
    /// long a member waits for its partitions to be released before it rejoins.
    pub rebalance_timeout_ms: u64,
    /// How often the owner of a task partition writes a snapshot of its
    /// state to `topics.snapshots`: a new instance restores from the latest
    /// and replays at most this much of the log.
    pub snapshot_interval_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            secret: super::Secret::default(),
            scale_out: false,
            group: "kpay".into(),
            advertised_url: String::new(),
            session_timeout_ms: 10_000,
            heartbeat_interval_ms: 1_000,
            rebalance_timeout_ms: 30_000,
            snapshot_interval_ms: 60_000,
        }
    }
}
