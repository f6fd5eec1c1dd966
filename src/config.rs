//! Settings, layered: built-in defaults ← `config/kpay.toml` (or `--config`)
//! ← `KPAY_*` environment variables (`KPAY_SERVER__LISTEN`, section and key
//! joined by a double underscore) ← command-line flags. Every key is documented
//! in `config/kpay.toml`. Unknown keys and bad values stop the start with an
//! error that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub data: DataConfig,
    pub log: LogConfig,
    pub topics: TopicsConfig,
    pub pipeline: PipelineConfig,
    pub limits: LimitsConfig,
    pub demo: DemoConfig,
    pub generator: GeneratorConfig,
    pub instrument: InstrumentConfig,
    pub slo: SloConfig,
    /// Bearer tokens and roles, `token:role,token:role` (roles: operator,
    /// teller, viewer); usually from `KPAY_TOKENS`. Empty: protected mode.
    pub tokens: String,
}

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
    /// `embedded` (default) or `kafka`.
    pub backend: String,
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
    /// Newest audit entries kept in the store.
    pub audit_entries: usize,
    /// Dead letters kept in the store waiting for an operator; beyond it
    /// new ones are still published to the DLQ topic, counted and logged.
    /// Replayed entries are kept up to the same bound, oldest dropped first.
    pub dlq_entries: usize,
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
            backend: "embedded".into(),
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
        }
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
            dlq_entries: 10_000,
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

/// Settings given on the command line; they win over every other layer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Parse(Box<figment::Error>),
    #[error("config key {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Config {
    /// Loads the layers. `file` is read if given (it must then exist), else
    /// `config/kpay.toml` if present.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let default_file = Path::new("config/kpay.toml");
        match file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::Invalid {
                    key: "--config",
                    message: format!("file {} does not exist", path.display()),
                })
            }
            Some(path) => figment = figment.merge(Toml::file_exact(path)),
            None if default_file.exists() => {
                figment = figment.merge(Toml::file_exact(default_file))
            }
            None => {}
        }
        // Not settings: KPAY_KAFKA_BROKERS is handled below; KPAY_TEST_* belong
        // to the test suite (the Kafka tests' broker and backend);
        // KPAY_CRASH_AT arms a crash drill (`failpoint`).
        figment = figment.merge(
            Env::prefixed("KPAY_")
                .ignore(&["KAFKA_BROKERS", "TEST_KAFKA", "TEST_BACKEND", "CRASH_AT"])
                .split("__"),
        );
        // `KPAY_KAFKA_BROKERS` alone switches to Kafka.
        let brokers: Vec<String> = std::env::var("KPAY_KAFKA_BROKERS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .map(str::to_owned)
            .collect();
        if !brokers.is_empty() {
            figment = figment
                .merge(("log.backend", "kafka"))
                .merge(("log.kafka.brokers", brokers));
        }
        if let Some(listen) = overrides.listen {
            figment = figment.merge(("server.listen", listen.to_string()));
        }
        if let Some(dir) = &overrides.data_dir {
            figment = figment.merge(("data.dir", dir.display().to_string()));
        }
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        fn valid_broker(broker: &str) -> bool {
            broker
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        }
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if !(1..=256).contains(&self.log.partitions) {
            return invalid("log.partitions", "must be between 1 and 256");
        }
        let tokens = crate::http::auth::Tokens::parse(&self.tokens).map_err(|message| {
            ConfigError::Invalid {
                key: "tokens",
                message,
            }
        })?;
        if tokens.is_empty() && !self.server.listen.ip().is_loopback() {
            return invalid(
                "server.listen",
                "protected mode: with no token configured (KPAY_TOKENS) kpay listens on loopback only",
            );
        }
        if tokens.is_empty() && self.server.protect_reads {
            return invalid("server.protect_reads", "needs tokens (KPAY_TOKENS)");
        }
        match self.log.backend.as_str() {
            "embedded" => {}
            "kafka" => {
                let kafka = &self.log.kafka;
                if kafka.brokers.is_empty() {
                    return invalid(
                        "log.kafka.brokers",
                        "the kafka backend needs at least one broker (host:port)",
                    );
                }
                if let Some(bad) = kafka.brokers.iter().find(|b| !valid_broker(b)) {
                    return Err(ConfigError::Invalid {
                        key: "log.kafka.brokers",
                        message: format!("{bad:?} is not host:port"),
                    });
                }
                if !["none", "gzip", "lz4", "snappy"].contains(&kafka.compression.as_str()) {
                    return invalid(
                        "log.kafka.compression",
                        "must be one of none, gzip, lz4, snappy",
                    );
                }
                if kafka.replication_factor < 1
                    || kafka.poll_ms == 0
                    || kafka.request_timeout_ms == 0
                    || kafka.max_batch_records == 0
                    || kafka.fetch_max_bytes < 1024
                {
                    return invalid(
                        "log.kafka",
                        "replication_factor, poll_ms, request_timeout_ms and max_batch_records must be \
                         above 0, fetch_max_bytes at least 1024",
                    );
                }
            }
            _ => return invalid("log.backend", "must be \"embedded\" or \"kafka\""),
        }
        if !(1..=crate::store::MAX_BATCH_ROWS).contains(&self.data.store_batch_rows) {
            return invalid("data.store_batch_rows", "must be between 1 and 256");
        }
        if !(1 << 20..=crate::log::embedded::MAX_SEGMENT_BYTES).contains(&self.log.segment_bytes) {
            return invalid("log.segment_bytes", "must be between 1 MiB and 1 GiB");
        }
        if self.log.history_bytes >= self.log.max_retained_bytes {
            return invalid("log.history_bytes", "must be below log.max_retained_bytes");
        }
        if !(1..=1_000_000).contains(&self.pipeline.checkpoint_max_rows) {
            return invalid(
                "pipeline.checkpoint_max_rows",
                "must be between 1 and 1000000",
            );
        }
        if self.pipeline.batch_records == 0 || self.pipeline.ingest_batch == 0 {
            return invalid("pipeline.batch_records", "batch sizes must be at least 1");
        }
        if self.pipeline.ingest_queue == 0 {
            return invalid("pipeline.ingest_queue", "must be at least 1");
        }
        let generator = &self.generator;
        if generator.accounts < 2 || generator.accounts > generator.max_accounts {
            return invalid(
                "generator.accounts",
                "must be between 2 and generator.max_accounts",
            );
        }
        if generator.rejected_percent + generator.reversed_percent > 100 {
            return invalid(
                "generator.rejected_percent",
                "rejected_percent + reversed_percent must be at most 100",
            );
        }
        if generator.max_in_flight == 0 || generator.max_rate_per_second == 0 {
            return invalid(
                "generator.max_in_flight",
                "generator bounds must be above 0",
            );
        }
        if self.limits.max_amount_cents <= 0 {
            return invalid("limits.max_amount_cents", "must be > 0");
        }
        if !(1..=366 * 86_400).contains(&self.limits.payment_retention_seconds) {
            return invalid(
                "limits.payment_retention_seconds",
                "must be between 1 and 31622400 (366 days)",
            );
        }
        if self.limits.max_batch_payments == 0 || self.limits.max_page_items == 0 {
            return invalid("limits.max_batch_payments", "limits must be at least 1");
        }
        if !(1..=86_400).contains(&self.instrument.window_seconds) {
            return invalid("instrument.window_seconds", "must be between 1 and 86400");
        }
        if !(1..=10_000).contains(&self.instrument.windows_kept) {
            return invalid("instrument.windows_kept", "must be between 1 and 10000");
        }
        if self.demo.opening_balance_cents < 0 {
            return invalid("demo.opening_balance_cents", "must be >= 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("kpay.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    // The shipped config/kpay.toml parses and equals the built-in defaults, so it documents them truthfully.
    #[test]
    fn shipped_file_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kpay.toml");
        let loaded: Config = Figment::from(Toml::file_exact(path)).extract().unwrap();
        assert_eq!(loaded, Config::default());
    }

    // A file overrides defaults and flags override the file.
    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "[server]\nlisten = \"127.0.0.1:9000\"\n[log]\npartitions = 4\n",
        );
        let config = Config::load(Some(&path), &Overrides::default()).unwrap();
        assert_eq!(config.server.listen.port(), 9000);
        assert_eq!(config.log.partitions, 4);
        let flags = Overrides {
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            data_dir: Some(PathBuf::from("/tmp/elsewhere")),
        };
        let config = Config::load(Some(&path), &flags).unwrap();
        assert_eq!(config.server.listen.port(), 9100);
        assert_eq!(config.data.dir, PathBuf::from("/tmp/elsewhere"));
    }

    // Unknown keys, wrong types and out-of-range values are errors that name the key.
    #[test]
    fn bad_config_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("[log]\npartiitons = 4\n", "partiitons"),
            ("[log]\npartitions = \"many\"\n", "partitions"),
            ("[log]\npartitions = 0\n", "log.partitions"),
            (
                "[limits]\nmax_amount_cents = -1\n",
                "limits.max_amount_cents",
            ),
            ("[server]\nlisten = \"nowhere\"\n", "listen"),
        ];
        for (text, key) in cases {
            let path = write(dir.path(), text);
            let error = Config::load(Some(&path), &Overrides::default()).unwrap_err();
            assert!(error.to_string().contains(key), "{text:?}: {error}");
        }
        let missing = Config::load(Some(Path::new("/no/such.toml")), &Overrides::default());
        assert!(missing.unwrap_err().to_string().contains("does not exist"));
    }
}

#[cfg(test)]
mod decoder_fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        // Any settings file text loads or is refused with a message; it never panics.
        #[test]
        fn arbitrary_settings_files_never_panic(text in "(\\PC|\\n|=|\\[|\\]|\"){0,300}") {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("kpay.toml");
            std::fs::write(&path, &text).unwrap();
            if let Err(error) = Config::load(Some(&path), &Overrides::default()) {
                prop_assert!(!error.to_string().is_empty());
            }
        }

        // Settings-shaped text with arbitrary values: loaded or refused by key.
        #[test]
        fn arbitrary_values_never_panic(
            section in "(server|data|log|log.kafka|topics|pipeline|limits|demo|generator|instrument|slo)",
            key in "[a-z_]{1,24}",
            value in "(-?[0-9]{1,22}|\"[^\"\\\\]{0,20}\"|true|false|\\[\\])",
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("kpay.toml");
            std::fs::write(&path, format!("[{section}]\n{key} = {value}\n")).unwrap();
            let _ = Config::load(Some(&path), &Overrides::default());
        }
    }
}
