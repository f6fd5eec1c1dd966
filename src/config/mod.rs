//! Settings, layered: built-in defaults ← `config/kpay.toml` (or `--config`)
//! ← `KPAY_<SECTION>__<KEY>` environment variables (`KPAY_SERVER__LISTEN`,
//! section and key joined by a double underscore) and the shortcuts
//! `KPAY_TOKENS` and `KPAY_KAFKA_BROKERS` ← command-line flags. Every key is
//! documented in `config/kpay.toml`. Unknown keys and bad values stop the
//! start with an error that names the key; other `KPAY_*` variables (such as
//! the `KPAY_PORT` Kubernetes injects for a Service named `kpay`) are not
//! settings and are ignored.
//!
//! Config owns its types and its limits, and imports nothing but `model`:
//! every layer above reads it.

pub mod hosts;
mod secret;
mod sections;
mod tokens;
mod validate;

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use secret::{Secret, MIN_SECRET_CHARS};
pub use sections::*;
pub use tokens::{Role, Tokens, MIN_TOKEN_CHARS};
pub use validate::{MAX_GROUP_CHARS, MAX_SEGMENT_BYTES, MAX_STORE_BATCH_ROWS, SESSION_TIMEOUT_MS};

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
    pub ops: OpsConfig,
    pub cluster: ClusterConfig,
    pub control: ControlConfig,
    /// The screening rules a new log starts with (`[screening]`); later
    /// changes go through `PUT /api/v1/screening/rules`.
    pub screening: crate::model::ScreeningRules,
    /// Bearer tokens and roles, `token:role,token:role` (roles: operator,
    /// teller, viewer); usually from `KPAY_TOKENS`. Empty: protected mode.
    pub tokens: Tokens,
}

/// `KPAY_*` variables that are settings without the `<SECTION>__<KEY>`
/// form (lower case, as figment hands them to the filter).
const ENV_SHORTCUTS: &[&str] = &["tokens"];

/// Whether `KPAY_<name>` is a setting: `<SECTION>__<KEY>` or a shortcut.
/// `KPAY_KAFKA_BROKERS` is read on its own (it also selects the backend).
fn is_setting(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.contains("__") || ENV_SHORTCUTS.contains(&name.as_str())
}

/// Settings given on the command line; they win over every other layer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    pub listen: Option<std::net::SocketAddr>,
    pub data_dir: Option<std::path::PathBuf>,
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
        // Only `KPAY_<SECTION>__<KEY>` and the shortcuts are settings; the
        // rest (KPAY_KAFKA_BROKERS, handled below; KPAY_TEST_* of the test
        // suite; KPAY_CRASH_AT of the crash drills; KPAY_PORT and friends
        // from Kubernetes) are not.
        figment = figment.merge(
            Env::prefixed("KPAY_")
                .filter(|name| is_setting(name.as_str()))
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
            (
                "[server]\nallowed_hosts = [\"kpay.internal:8080\"]\n",
                "server.allowed_hosts",
            ),
            (
                "[server]\nallowed_origins = [\"https://ops.example/\"]\n",
                "server.allowed_origins",
            ),
        ];
        for (text, key) in cases {
            let path = write(dir.path(), text);
            let error = Config::load(Some(&path), &Overrides::default()).unwrap_err();
            assert!(error.to_string().contains(key), "{text:?}: {error}");
        }
        let missing = Config::load(Some(Path::new("/no/such.toml")), &Overrides::default());
        assert!(missing.unwrap_err().to_string().contains("does not exist"));
    }

    // Only KPAY_<SECTION>__<KEY> and the shortcuts are settings; what Kubernetes injects is not.
    #[test]
    fn only_section_keys_and_shortcuts_are_settings() {
        for setting in ["SERVER__LISTEN", "log__partitions", "TOKENS", "NOSUCH__KEY"] {
            assert!(is_setting(setting), "{setting}");
        }
        for other in [
            "PORT",
            "SERVICE_HOST",
            "PORT_8080_TCP_ADDR",
            "CRASH_AT",
            "TEST_KAFKA",
        ] {
            assert!(!is_setting(other), "{other}");
        }
    }

    // Bad tokens stop the load with the reason, under the key `tokens`.
    #[test]
    fn bad_tokens_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "tokens = \"short:operator\"\n");
        let error = Config::load(Some(&path), &Overrides::default()).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("tokens") && text.contains("8 characters"),
            "{text}"
        );
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
            section in "(server|data|log|log.kafka|topics|pipeline|limits|demo|generator|instrument|slo|ops|cluster)",
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
