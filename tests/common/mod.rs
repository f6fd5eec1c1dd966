//! Helpers shared by the integration tests: an in-process server on
//! 127.0.0.1:0 over a temporary data directory, the real `kpay` binary for
//! crash tests, and small HTTP conveniences.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod browser;
pub mod cluster;
pub mod traffic;

use kpay::config::Config;
use kpay::http::State;
use kpay::runtime::{open_backends, Runtime};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// A test configuration: small and fast, no demo accounts unless asked. With
/// `KPAY_TEST_BACKEND=kafka` (and `KPAY_TEST_KAFKA`), on the Kafka broker.
pub fn test_config(dir: &Path) -> Config {
    if std::env::var("KPAY_TEST_BACKEND").as_deref() == Ok("kafka") {
        let broker = std::env::var("KPAY_TEST_KAFKA")
            .expect("KPAY_TEST_BACKEND=kafka needs KPAY_TEST_KAFKA=host:port");
        return kafka_config(dir, &broker);
    }
    embedded_config(dir)
}

fn embedded_config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.data.dir = dir.to_path_buf();
    config.demo.accounts = 0;
    config.log.partitions = 4;
    config.log.segment_bytes = 1 << 20;
    config.pipeline.commit_interval_ms = 100;
    config.pipeline.flush_interval_ms = 100;
    config.server.max_body_bytes = 64 * 1024;
    config
}

/// A server running in this process.
pub struct TestServer {
    pub base: String,
    pub state: State,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    config: Config,
    /// The temporary data directory of a server from [`TestServer::builder`],
    /// kept at least as long as the server runs.
    dir: Option<Arc<tempfile::TempDir>>,
}

/// Opens the log and the store of `config`. A server stopped a moment ago
/// in this process may still be dropping its last handles on the store (its
/// lock): tried again for up to 10 s while the store says it is in use.
pub async fn open_backends_retrying(
    config: &Config,
) -> Result<(Arc<dyn kpay::log::Log>, kpay::store::Store), kpay::runtime::RuntimeError> {
    let started = Instant::now();
    loop {
        match open_backends(config).await {
            Err(error)
                if error.to_string().contains("in use by another kpay")
                    && started.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            opened => return opened,
        }
    }
}

/// Why kpay refuses to start on `config` (which must be refused), over
/// backends opened as [`open_backends_retrying`] does.
pub async fn refused_start(config: Config) -> String {
    let (log, store) = match open_backends_retrying(&config).await {
        Ok(backends) => backends,
        Err(error) => return error.to_string(),
    };
    kpay::app::start_on(config, log, store)
        .await
        .err()
        .expect("must refuse")
        .to_string()
}

impl TestServer {
    /// A server over a fresh temporary directory, on [`test_config`] with
    /// the changes and accounts asked for: see [`ServerBuilder`].
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// The common case of the builder: the test configuration and these
    /// accounts, (id, cents); with a client for the server.
    pub async fn with_accounts(accounts: &[(&str, i64)]) -> (Self, reqwest::Client) {
        Self::builder().accounts(accounts).start().await
    }

    /// The same with raw record injection on, and an operator's client
    /// ([`ServerBuilder::raw_records`]).
    pub async fn with_raw_records(accounts: &[(&str, i64)]) -> (Self, reqwest::Client) {
        Self::builder()
            .raw_records()
            .accounts(accounts)
            .start()
            .await
    }

    /// A server on `config` (for a restart over a directory a test holds).
    /// Opens the backends as [`open_backends_retrying`] does.
    pub async fn start(config: Config) -> Self {
        let (log, store) = open_backends_retrying(&config)
            .await
            .unwrap_or_else(|error| panic!("open backends: {error}"));
        let state = kpay::app::start_on(config.clone(), log, store)
            .await
            .expect("start");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = kpay::http::app(state.clone(), PathBuf::from("static"));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let handle = tokio::spawn(async move {
            let service = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
            axum::serve(listener, service)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await
                .unwrap();
        });
        let server = Self {
            base,
            state,
            stop,
            handle,
            config,
            dir: None,
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        wait_until(Duration::from_secs(10), || async {
            let url = format!("{}/readyz", self.base);
            matches!(client.get(url).send().await, Ok(r) if r.status() == 200)
        })
        .await;
    }

    /// Stops HTTP, drains and checkpoints, as SIGTERM does.
    pub async fn stop(self) {
        self.state.closing.cancel();
        self.stop.cancel();
        self.handle.await.unwrap();
        self.state.runtime.shutdown().await.unwrap();
    }

    /// Stops it, as [`TestServer::stop`] does, and starts it again on the
    /// same configuration and data.
    pub async fn restart(self) -> Self {
        let (config, dir) = (self.config.clone(), self.dir.clone());
        self.stop().await;
        let mut server = Self::start(config).await;
        server.dir = dir;
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn runtime(&self) -> &Runtime {
        &self.state.runtime
    }

    /// The configuration it started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The temporary data directory of a server from
    /// [`TestServer::builder`]; holding it keeps the directory after the
    /// server stops, for a restart or a look inside.
    pub fn dir(&self) -> Arc<tempfile::TempDir> {
        self.dir.clone().expect("a server from TestServer::builder")
    }
}

/// How a test's server starts: [`TestServer::builder`], then
/// `.config(|c| ...)`, `.accounts(&[("alice", 10_000), ("bob", 0)])`,
/// `.start().await`.
#[derive(Default)]
pub struct ServerBuilder {
    kafka: Option<String>,
    raw_records: bool,
    tweaks: Vec<Tweak>,
    accounts: Vec<(String, i64)>,
}

/// A change to a test's configuration.
type Tweak = Box<dyn FnOnce(&mut Config)>;

impl ServerBuilder {
    /// On this Kafka broker, with topics of its own ([`kafka_config`]),
    /// instead of [`test_config`]'s backend.
    pub fn kafka(mut self, broker: &str) -> Self {
        self.kafka = Some(broker.to_owned());
        self
    }

    /// Changes the configuration (applied in order, after the backend's).
    pub fn config(mut self, tweak: impl FnOnce(&mut Config) + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// With raw record injection (`POST /api/v1/ops/records`) on, which
    /// needs tokens: the operator token [`OPERATOR_TOKEN`] is configured and
    /// the client `start` returns sends it with every request.
    pub fn raw_records(mut self) -> Self {
        self.raw_records = true;
        self
    }

    /// Accounts opened over HTTP once the server is ready: (id, cents).
    pub fn accounts(mut self, accounts: &[(&str, i64)]) -> Self {
        let owned = accounts.iter().map(|&(id, cents)| (id.to_owned(), cents));
        self.accounts.extend(owned);
        self
    }

    /// Starts the server and opens the accounts; with a client for it.
    pub async fn start(self) -> (TestServer, reqwest::Client) {
        let dir = Arc::new(tempfile::tempdir().expect("a temporary data directory"));
        let mut config = match &self.kafka {
            Some(broker) => kafka_config(dir.path(), broker),
            None => test_config(dir.path()),
        };
        if self.raw_records {
            config.ops.raw_records = true;
            config.tokens = kpay::config::Tokens::parse(&format!("{OPERATOR_TOKEN}:operator"))
                .expect("the test token parses");
        }
        for tweak in self.tweaks {
            tweak(&mut config);
        }
        let mut server = TestServer::start(config).await;
        server.dir = Some(dir);
        let client = if self.raw_records {
            operator_client()
        } else {
            reqwest::Client::new()
        };
        for (id, cents) in &self.accounts {
            open_account(&client, &server.base, id, *cents).await;
        }
        (server, client)
    }
}

/// The operator token of servers with raw records on
/// ([`ServerBuilder::raw_records`], [`RAW_RECORDS_ENV`]).
pub const OPERATOR_TOKEN: &str = "test-operator-token";

/// The environment that turns raw record injection on in the real binary,
/// with [`OPERATOR_TOKEN`] as its operator token.
pub const RAW_RECORDS_ENV: [(&str, &str); 2] = [
    ("KPAY_OPS__RAW_RECORDS", "true"),
    ("KPAY_TOKENS", "test-operator-token:operator"),
];

/// A client that sends [`OPERATOR_TOKEN`] with every request.
pub fn operator_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = format!("Bearer {OPERATOR_TOKEN}");
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&value).expect("a valid header"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("a client")
}

/// Polls `check` every 20 ms until it holds; panics after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn post(client: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let response = client.post(url).json(&body).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub async fn get(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub async fn open_account(client: &reqwest::Client, base: &str, id: &str, cents: i64) {
    let (status, body) = post(
        client,
        &format!("{base}/api/v1/accounts"),
        json!({"id": id, "opening_balance": cents}),
    )
    .await;
    assert_eq!(status, 201, "open {id}: {body}");
}

/// Waits until a payment reaches a terminal state and returns it.
/// Asserts that an error answer's message mentions `text`.
pub fn assert_error_mentions(body: &Value, text: &str) {
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(text), "{body}");
}

/// Waits until payment `id` is terminal and asserts that it was confirmed.
pub async fn assert_confirmed(client: &reqwest::Client, base: &str, id: &str) {
    let payment = terminal(client, base, id).await;
    assert_eq!(payment["status"], "confirmed", "{payment}");
}

pub async fn terminal(client: &reqwest::Client, base: &str, id: &str) -> Value {
    let url = format!("{base}/api/v1/payments/{id}");
    let start = Instant::now();
    loop {
        let (status, body) = get(client, &url).await;
        if status == 200
            && ["confirmed", "rejected", "reversed"]
                .contains(&body["status"].as_str().unwrap_or(""))
        {
            return body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "payment {id} not terminal: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `kpay` binary as a command, without the test suite's own `KPAY_TEST_*`
/// variables (kpay refuses unknown `KPAY_*` settings) and without a crash
/// drill unless a test arms one. It listens on a port the system picks
/// (`--listen` overrides it): never on the default one, which a kpay the user
/// runs may hold.
pub fn kpay_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kpay"));
    command.env_remove("KPAY_CRASH_AT");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KPAY_TEST_") {
            command.env_remove(key);
        }
    }
    command.env("KPAY_SERVER__LISTEN", "127.0.0.1:0");
    command
}

/// The real `kpay` binary, started on a free port over a data directory.
pub struct Binary {
    pub child: Child,
    pub base: String,
}

impl Binary {
    /// Spawns it and waits until it is ready.
    pub async fn start(dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        let server = Self::spawn(dir, extra_env);
        server.wait_ready().await;
        server
    }

    pub fn spawn(dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        Self::spawn_with_args(dir, extra_env, &[])
    }

    /// Like `spawn`, with `serve` and its arguments.
    pub fn spawn_with_args(dir: &Path, extra_env: &[(&str, &str)], serve_args: &[&str]) -> Self {
        Self::spawn_to(dir, extra_env, serve_args, Stdio::null(), Stdio::inherit())
    }

    /// Like `spawn`, with stdout (its log, WARN and up) and stderr written
    /// to the file `output` (created).
    pub fn spawn_logged(dir: &Path, extra_env: &[(&str, &str)], output: &Path) -> Self {
        let file = std::fs::File::create(output).expect("create the output file");
        let stdout = Stdio::from(file.try_clone().expect("clone the output file"));
        Self::spawn_to(dir, extra_env, &[], stdout, Stdio::from(file))
    }

    fn spawn_to(
        dir: &Path,
        extra_env: &[(&str, &str)],
        serve_args: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Self {
        let port = free_port();
        let mut command = kpay_command();
        if !serve_args.is_empty() {
            command.arg("serve").args(serve_args);
        }
        command
            .arg("--data-dir")
            .arg(dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("KPAY_DEMO__ACCOUNTS", "0")
            .env("RUST_LOG", "warn")
            .stdout(stdout)
            .stderr(stderr);
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn kpay");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let url = format!("{}/readyz", self.base);
        wait_until(Duration::from_secs(30), || async {
            matches!(client.get(&url).send().await, Ok(r) if r.status() == 200)
        })
        .await;
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, waited for on a blocking thread (tasks sending traffic go on
    /// meanwhile); how it exited.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        tokio::task::spawn_blocking(move || self.terminate())
            .await
            .unwrap()
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        self.child.wait().expect("reap")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on loopback (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// For a test that cannot run here for want of `why` (a tool, a broker,
/// root): outside CI, says "<test>: skipped: <why>" on stderr (past the test
/// harness's capture, so that a plain `cargo test` shows it) and returns, for
/// the test to return; in CI (`CI` set, as `.ci/run` does), which provides
/// everything the tests need, fails.
pub fn skip_or_fail_in_ci(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: must not be skipped in CI: {why}"
    );
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
}

/// The Kafka-protocol broker for the Kafka variants of the tests
/// (`KPAY_TEST_KAFKA=host:port`). Without it they say why they are
/// skipped; in CI (which starts one) its absence is a failure.
pub fn kafka_broker(test: &str) -> Option<String> {
    match std::env::var("KPAY_TEST_KAFKA") {
        Ok(broker) if !broker.is_empty() => Some(broker),
        _ => {
            skip_or_fail_in_ci(
                test,
                "no Kafka broker: set KPAY_TEST_KAFKA=host:port (scripts/kafka-broker starts one)",
            );
            None
        }
    }
}

/// Topic names unique to one test's data directory (so a restart over the
/// same directory finds its topics again, and tests can share a broker).
pub fn kafka_topics(broker: &str, dir: &Path) -> Vec<(String, String)> {
    let name: String = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let prefix = format!("t{}-{name}", std::process::id());
    let mut env = vec![("KPAY_KAFKA_BROKERS".to_owned(), broker.to_owned())];
    for topic in [
        "incoming",
        "inflight",
        "complete",
        "confirmed",
        "dlq",
        "commands",
        "audit",
        "logs",
        "positions",
        "snapshots",
    ] {
        env.push((
            format!("KPAY_TOPICS__{}", topic.to_uppercase()),
            format!("{prefix}.{topic}"),
        ));
    }
    env.push(("KPAY_LOG__KAFKA__REQUEST_TIMEOUT_MS".into(), "3000".into()));
    env
}

/// [`test_config`] on the Kafka broker, with topics unique to this test.
pub fn kafka_config(dir: &Path, broker: &str) -> Config {
    let mut config = embedded_config(dir);
    config.log.backend = kpay::config::BackendKind::Kafka;
    config.log.kafka.brokers = vec![broker.to_owned()];
    config.log.kafka.request_timeout_ms = 3_000;
    for (key, name) in kafka_topics(broker, dir).into_iter().skip(1) {
        let topics = &mut config.topics;
        match key.as_str() {
            "KPAY_TOPICS__INCOMING" => topics.incoming = name,
            "KPAY_TOPICS__INFLIGHT" => topics.inflight = name,
            "KPAY_TOPICS__COMPLETE" => topics.complete = name,
            "KPAY_TOPICS__CONFIRMED" => topics.confirmed = name,
            "KPAY_TOPICS__DLQ" => topics.dlq = name,
            "KPAY_TOPICS__COMMANDS" => topics.commands = name,
            "KPAY_TOPICS__AUDIT" => topics.audit = name,
            "KPAY_TOPICS__LOGS" => topics.logs = name,
            "KPAY_TOPICS__POSITIONS" => topics.positions = name,
            "KPAY_TOPICS__SNAPSHOTS" => topics.snapshots = name,
            _ => {}
        }
    }
    config
}

/// The stages of a payment's lineage, in order.
pub fn lineage_stages(payment: &Value) -> Vec<&str> {
    payment["lineage"]
        .as_array()
        .unwrap()
        .iter()
        .map(|hop| hop["stage"].as_str().unwrap())
        .collect()
}

/// The stages a payment with terminal `status` passes, each once.
pub fn expected_stages(status: &str) -> &'static [&'static str] {
    match status {
        "confirmed" => &["admitted", "debited", "credited", "completed"],
        "rejected" => &["admitted", "rejected", "completed"],
        // The saga: the credit is refused, the debit refunded to `from`.
        _ => &["admitted", "debited", "rejected", "refunded", "completed"],
    }
}

/// The newest block of `table` holding the row `key` (`store/blocks.rs`):
/// the block's store key and bytes.
pub fn newest_block_of(store: &kpay::store::Store, table: &str, key: &str) -> (String, Vec<u8>) {
    let blocks = store.raw_rows(&format!("b/{table}/"), |_| true).unwrap();
    let holding = blocks.into_iter().rev().find(|(block, bytes)| {
        let block = String::from_utf8_lossy(block);
        let rows = kpay::store::block_entries(&block, bytes).unwrap();
        rows.iter().any(|(k, _)| k == key)
    });
    let (block, bytes) = holding.unwrap_or_else(|| panic!("no block of {table} holds {key}"));
    (String::from_utf8(block).unwrap(), bytes)
}
