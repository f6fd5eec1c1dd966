//! The checks a loaded configuration must pass before anything starts: one
//! function per section, each error naming the key at fault.

use super::hosts::{host_name, origin_authority, MAX_ALLOWED_ENTRIES};
use super::{BackendKind, ClusterConfig, Config, ConfigError, KafkaConfig, MIN_SECRET_CHARS};

/// Most rows in one store batch (`data.store_batch_rows`).
pub const MAX_STORE_BATCH_ROWS: usize = 256;

/// Largest segment file of the embedded log (`log.segment_bytes`).
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;

/// Bounds of `cluster.session_timeout_ms`: below a second a pause of the
/// process drops the member; above five minutes a dead one holds its
/// partitions too long.
pub const SESSION_TIMEOUT_MS: std::ops::RangeInclusive<u64> = 1_000..=300_000;

/// Longest consumer group name (`cluster.group`).
pub const MAX_GROUP_CHARS: usize = 200;

type Checked = Result<(), ConfigError>;

fn invalid(key: &'static str, message: impl Into<String>) -> Checked {
    Err(ConfigError::Invalid {
        key,
        message: message.into(),
    })
}

impl Config {
    /// Checks every section; the first error found is returned.
    pub fn validate(&self) -> Checked {
        self.validate_server()?;
        self.validate_log()?;
        self.validate_data_and_pipeline()?;
        self.validate_generator()?;
        self.validate_limits()?;
        self.validate_cluster()?;
        if let Err(message) = self.screening.validate() {
            return invalid("screening", message);
        }
        let control = &self.control;
        if control.adaptive_min_per_second == 0 {
            return invalid("control.adaptive_min_per_second", "must be at least 1");
        }
        if control.adaptive_max_per_second < control.adaptive_min_per_second {
            return invalid(
                "control.adaptive_max_per_second",
                "must be at least control.adaptive_min_per_second",
            );
        }
        if !(100..=60_000).contains(&control.adaptive_interval_ms) {
            return invalid("control.adaptive_interval_ms", "must be 100 to 60000");
        }
        self.validate_instrument_and_demo()
    }

    fn validate_cluster(&self) -> Checked {
        let cluster = &self.cluster;
        let secret = &cluster.secret;
        if !secret.is_empty() && secret.chars() < MIN_SECRET_CHARS {
            return invalid(
                "cluster.secret",
                format!("must be empty or at least {MIN_SECRET_CHARS} characters long"),
            );
        }
        let group_ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        if cluster.group.is_empty()
            || cluster.group.len() > MAX_GROUP_CHARS
            || !cluster.group.chars().all(group_ok)
        {
            return invalid(
                "cluster.group",
                format!("must be 1 to {MAX_GROUP_CHARS} letters, digits, '.', '_' or '-'"),
            );
        }
        let url = &cluster.advertised_url;
        if !url.is_empty() && origin_authority(url.trim_end_matches('/')).is_none() {
            return invalid(
                "cluster.advertised_url",
                format!("{url:?} is not http://host[:port] or https://host[:port]"),
            );
        }
        validate_group_timing(cluster)
    }

    fn validate_server(&self) -> Checked {
        if self.tokens.is_empty() && !self.server.listen.ip().is_loopback() {
            return invalid(
                "server.listen",
                "protected mode: with no token configured (KPAY_TOKENS) kpay listens on loopback only",
            );
        }
        if self.tokens.is_empty() && self.server.protect_reads {
            return invalid("server.protect_reads", "needs tokens (KPAY_TOKENS)");
        }
        validate_allowed_lists(&self.server)
    }

    fn validate_log(&self) -> Checked {
        let log = &self.log;
        if !(1..=256).contains(&log.partitions) {
            return invalid("log.partitions", "must be between 1 and 256");
        }
        if log.backend == BackendKind::Kafka {
            validate_kafka(&log.kafka)?;
        }
        if !(1 << 20..=MAX_SEGMENT_BYTES).contains(&log.segment_bytes) {
            return invalid("log.segment_bytes", "must be between 1 MiB and 1 GiB");
        }
        if log.history_bytes >= log.max_retained_bytes {
            return invalid("log.history_bytes", "must be below log.max_retained_bytes");
        }
        Ok(())
    }

    fn validate_data_and_pipeline(&self) -> Checked {
        if !(1..=MAX_STORE_BATCH_ROWS).contains(&self.data.store_batch_rows) {
            return invalid("data.store_batch_rows", "must be between 1 and 256");
        }
        let pipeline = &self.pipeline;
        if !(1..=1_000_000).contains(&pipeline.checkpoint_max_rows) {
            return invalid(
                "pipeline.checkpoint_max_rows",
                "must be between 1 and 1000000",
            );
        }
        if pipeline.batch_records == 0 || pipeline.ingest_batch == 0 {
            return invalid("pipeline.batch_records", "batch sizes must be at least 1");
        }
        if pipeline.ingest_queue == 0 {
            return invalid("pipeline.ingest_queue", "must be at least 1");
        }
        Ok(())
    }

    fn validate_generator(&self) -> Checked {
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
        Ok(())
    }

    fn validate_limits(&self) -> Checked {
        let limits = &self.limits;
        if limits.max_amount_cents <= 0 {
            return invalid("limits.max_amount_cents", "must be > 0");
        }
        if !(1..=366 * 86_400).contains(&limits.payment_retention_seconds) {
            return invalid(
                "limits.payment_retention_seconds",
                "must be between 1 and 31622400 (366 days)",
            );
        }
        if limits.max_batch_payments == 0 || limits.max_page_items == 0 {
            return invalid("limits.max_batch_payments", "limits must be at least 1");
        }
        // At most one event's worth: every record that could decode is then
        // kept whole, and a letter stays far below the log's record limit.
        let most = crate::model::codec::MAX_EVENT_BYTES;
        if !(16..=most).contains(&limits.dead_letter_value_bytes) {
            return invalid(
                "limits.dead_letter_value_bytes",
                format!("must be between 16 and {most}"),
            );
        }
        if limits.audit_entries == 0 {
            return invalid("limits.audit_entries", "must be at least 1");
        }
        if limits.audit_submission_entries == 0 {
            return invalid("limits.audit_submission_entries", "must be at least 1");
        }
        Ok(())
    }

    fn validate_instrument_and_demo(&self) -> Checked {
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

/// `server.allowed_hosts` holds names without a port, `server.allowed_origins`
/// holds `http(s)://host[:port]`, and neither is longer than the bound.
fn validate_allowed_lists(server: &super::ServerConfig) -> Checked {
    if server.allowed_hosts.len() > MAX_ALLOWED_ENTRIES {
        return invalid("server.allowed_hosts", "at most 64 entries");
    }
    if let Some(bad) = server
        .allowed_hosts
        .iter()
        .find(|h| host_name(h) != Some(h.as_str()))
    {
        return invalid(
            "server.allowed_hosts",
            format!("{bad:?} is not a host name or address without a port (IPv6 in brackets)"),
        );
    }
    if server.allowed_origins.len() > MAX_ALLOWED_ENTRIES {
        return invalid("server.allowed_origins", "at most 64 entries");
    }
    if let Some(bad) = server
        .allowed_origins
        .iter()
        .find(|o| origin_authority(o).is_none())
    {
        return invalid(
            "server.allowed_origins",
            format!("{bad:?} is not an origin: http://host[:port] or https://host[:port]"),
        );
    }
    Ok(())
}

/// Session timeout within bounds; at least three heartbeats in one session,
/// so that one lost heartbeat does not drop a member; a rebalance may last
/// at least a session.
fn validate_group_timing(cluster: &ClusterConfig) -> Checked {
    let session = cluster.session_timeout_ms;
    if !SESSION_TIMEOUT_MS.contains(&session) {
        return invalid(
            "cluster.session_timeout_ms",
            format!(
                "must be between {} and {}",
                SESSION_TIMEOUT_MS.start(),
                SESSION_TIMEOUT_MS.end()
            ),
        );
    }
    let heartbeat = cluster.heartbeat_interval_ms;
    if heartbeat == 0 || heartbeat.saturating_mul(3) > session {
        return invalid(
            "cluster.heartbeat_interval_ms",
            "must be above 0 and at most a third of cluster.session_timeout_ms",
        );
    }
    if cluster.rebalance_timeout_ms < session || cluster.rebalance_timeout_ms > i32::MAX as u64 {
        return invalid(
            "cluster.rebalance_timeout_ms",
            "must be at least cluster.session_timeout_ms (and fit in 32 bits)",
        );
    }
    if !(1_000..=86_400_000).contains(&cluster.snapshot_interval_ms) {
        return invalid(
            "cluster.snapshot_interval_ms",
            "must be between 1000 (a second) and 86400000 (a day)",
        );
    }
    Ok(())
}

fn validate_kafka(kafka: &KafkaConfig) -> Checked {
    fn valid_broker(broker: &str) -> bool {
        broker
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
    }
    if kafka.brokers.is_empty() {
        return invalid(
            "log.kafka.brokers",
            "the kafka backend needs at least one broker (host:port)",
        );
    }
    if let Some(bad) = kafka.brokers.iter().find(|b| !valid_broker(b)) {
        return invalid("log.kafka.brokers", format!("{bad:?} is not host:port"));
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_refused(change: impl FnOnce(&mut ClusterConfig)) -> &'static str {
        let mut config = Config::default();
        change(&mut config.cluster);
        match config.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("accepted: {other:?}"),
        }
    }

    // The group settings are checked: a usable group name and URL, heartbeats well within the session, a rebalance at least a session long.
    #[test]
    fn cluster_settings_are_checked() {
        assert!(Config::default().validate().is_ok());
        let mut fine = Config::default();
        fine.cluster.advertised_url = "https://kpay-2.internal:8443/".into();
        fine.cluster.group = "kpay.prod-1".into();
        assert!(fine.validate().is_ok());
        assert_eq!(key_refused(|c| c.group.clear()), "cluster.group");
        assert_eq!(key_refused(|c| c.group = "a b".into()), "cluster.group");
        let url = "cluster.advertised_url";
        assert_eq!(key_refused(|c| c.advertised_url = "kpay:8080".into()), url);
        let session = "cluster.session_timeout_ms";
        assert_eq!(key_refused(|c| c.session_timeout_ms = 999), session);
        let heartbeat = "cluster.heartbeat_interval_ms";
        assert_eq!(key_refused(|c| c.heartbeat_interval_ms = 0), heartbeat);
        assert_eq!(key_refused(|c| c.heartbeat_interval_ms = 3_334), heartbeat);
        let rebalance = "cluster.rebalance_timeout_ms";
        assert_eq!(key_refused(|c| c.rebalance_timeout_ms = 9_999), rebalance);
    }
}
