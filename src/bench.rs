//! `kpay bench`: the whole pipeline in embedded mode with durable
//! acknowledgement, driven in-process through the same ingest path as HTTP.
//!
//! Phase 1 (throughput): submit `--payments` as fast as `--concurrency`
//! submitters can and time until every one is terminal. Phase 2 (latency):
//! offer `--rate` payments/s for `--latency-seconds` and measure submit →
//! terminal per payment. Then peak RSS and disk used after retention.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;

use crate::config::Config;
use crate::model::{now_ms, Event, PaymentRef};
use crate::runtime::Runtime;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Payments in the throughput phase.
    #[arg(long, default_value_t = 1_000_000)]
    pub payments: u64,
    /// Accounts opened before the run.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: u32,
    /// Concurrent submitters in the throughput phase.
    #[arg(long, default_value_t = 1_024)]
    pub concurrency: u64,
    /// Offered payments per second in the latency phase (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Length of the latency phase.
    #[arg(long, default_value_t = 10)]
    pub latency_seconds: u64,
    /// Seconds of single-payment HTTP POSTs over keep-alive connections (0 skips it).
    #[arg(long, default_value_t = 5)]
    pub http_seconds: u64,
    /// Keep-alive connections in the HTTP phase.
    #[arg(long, default_value_t = 64)]
    pub http_connections: u64,
    /// Keep the benchmark's data directory afterwards.
    #[arg(long)]
    pub keep_data: bool,
}

/// Opening balance of every benchmark account: large enough that no payment
/// is rejected for funds, so the run measures the full debit/credit path.
const BENCH_BALANCE_CENTS: i64 = 1_000_000_000_000;

pub async fn run(mut config: Config, args: BenchArgs) -> anyhow::Result<()> {
    let run = format!("bench-{}", now_ms());
    let dir = config.data.dir.join(&run);
    config.data.dir = dir.clone();
    config.demo.accounts = 0;
    if config.log.is_kafka() {
        // Topics of this run only: a broker keeps those of earlier runs.
        let topics = &mut config.topics;
        for name in [
            &mut topics.incoming,
            &mut topics.inflight,
            &mut topics.complete,
            &mut topics.confirmed,
            &mut topics.dlq,
            &mut topics.commands,
            &mut topics.audit,
            &mut topics.logs,
        ] {
            *name = format!("{run}.{name}");
        }
        println!(
            "backend: kafka at {} (topics {run}.*)",
            config.log.kafka.brokers.join(",")
        );
    }
    let state = crate::app::start(config).await?;
    let runtime = state.runtime.clone();
    open_accounts(&runtime, args.accounts).await?;
    println!("accounts: {} opened", args.accounts);

    let (cpu_before, written_before) = process_usage();
    let started = Instant::now();
    let submitted = throughput_phase(&runtime, &args).await?;
    wait_terminal(&runtime, submitted).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu_after, written_after) = process_usage();
    println!(
        "sustained: {:.0} payments/s ({} payments in {:.2} s, {} partitions)",
        submitted as f64 / elapsed,
        submitted,
        elapsed,
        runtime.config().log.partitions
    );
    let cpu = cpu_after - cpu_before;
    println!(
        "cpu: {:.0}% during the sustained phase ({cpu:.1} s of CPU, {:.0} µs per payment)",
        100.0 * cpu / elapsed,
        1e6 * cpu / submitted.max(1) as f64
    );
    let per_payment = |bytes: u64| bytes / submitted.max(1);
    match (written_before, written_after) {
        (Some(before), Some(after)) if after > 0 => println!(
            "written: {} bytes/payment during the sustained phase, {} since start",
            per_payment(after - before),
            per_payment(after)
        ),
        _ => println!("written: not counted (no write_bytes in /proc/self/io on this kernel)"),
    }
    lookup_phase(&runtime, &args)?;
    if args.rate > 0 {
        latency_phase(&runtime, &args, submitted).await?;
    }
    let ledger = crate::instrument::Integrity::from(&runtime.ledger());
    println!("ledger integrity ok: {}", ledger.ok);
    let total = submitted + args.rate * args.latency_seconds;
    report_resources(&runtime, total).await;
    if args.http_seconds > 0 {
        http_phase(state, &args).await?;
    }
    runtime.shutdown().await?;
    if !args.keep_data {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

async fn open_accounts(runtime: &Runtime, count: u32) -> anyhow::Result<()> {
    for chunk in (0..count).collect::<Vec<_>>().chunks(10_000) {
        let events = chunk
            .iter()
            .map(|n| Event::OpenAccount {
                account: account_id(*n),
                opening_balance_cents: BENCH_BALANCE_CENTS,
                at_ms: now_ms(),
            })
            .collect();
        runtime.append_account_events(events).await?;
    }
    while runtime.ledger().account_count < u64::from(count) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn account_id(n: u32) -> String {
    format!("acct-{n:07}")
}

fn random_payment(id: String, accounts: u32) -> PaymentRef {
    let mut rng = rand::thread_rng();
    let from = rng.gen_range(0..accounts);
    let to = (from + rng.gen_range(1..accounts.max(2))) % accounts.max(2);
    PaymentRef {
        id,
        from: account_id(from),
        to: account_id(to),
        amount_cents: rng.gen_range(100..100_000),
        accepted_at_ms: 0,
    }
}

/// Who the bench's payments are attributed to.
fn bench_submitter() -> crate::model::Submitter {
    crate::model::Submitter::new("bench", "bench")
}

async fn throughput_phase(runtime: &Runtime, args: &BenchArgs) -> anyhow::Result<u64> {
    let per_worker = args.payments / args.concurrency;
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..args.concurrency {
        let runtime = runtime.clone();
        let accounts = args.accounts;
        workers.spawn(async move {
            for n in 0..per_worker {
                let payment = random_payment(format!("t{worker}-{n}"), accounts);
                loop {
                    match runtime
                        .ingest()
                        .submit(payment.clone(), bench_submitter())
                        .await
                    {
                        Ok(_) => break,
                        Err(
                            crate::runtime::ingest::IngestError::Busy(_)
                            | crate::runtime::ingest::IngestError::Backlog { .. },
                        ) => tokio::time::sleep(Duration::from_millis(2)).await,
                        Err(error) => return Err(error),
                    }
                }
            }
            Ok(per_worker)
        });
    }
    let mut submitted = 0;
    while let Some(done) = workers.join_next().await {
        submitted += done??;
    }
    Ok(submitted)
}

/// Reads 10,000 payments of the throughput phase by id, as `GET
/// /api/v1/payments/{id}` does (settled by now: in blocks, most of them out
/// of the tasks' caches); fails unless every one is found.
fn lookup_phase(runtime: &Runtime, args: &BenchArgs) -> anyhow::Result<()> {
    const LOOKUPS: u64 = 10_000;
    let per_worker = args.payments / args.concurrency;
    if per_worker == 0 {
        return Ok(());
    }
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let started = Instant::now();
    for _ in 0..LOOKUPS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let id = format!("t{}-{}", x % args.concurrency, (x >> 32) % per_worker);
        anyhow::ensure!(runtime.payment(&id)?.is_some(), "payment {id} not found");
    }
    println!(
        "lookups: {LOOKUPS} payments by id, {:.1} µs each (all found)",
        started.elapsed().as_secs_f64() * 1e6 / LOOKUPS as f64
    );
    Ok(())
}

/// Waits until `expected` payments have reached a terminal state.
async fn wait_terminal(runtime: &Runtime, expected: u64) {
    loop {
        let t = runtime.confirmed_totals();
        if t.confirmed_count + t.rejected_count + t.reversed_count >= expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn latency_phase(runtime: &Runtime, args: &BenchArgs, before: u64) -> anyhow::Result<()> {
    let total = args.rate * args.latency_seconds;
    let tick = Duration::from_millis(10);
    let per_tick = (args.rate / 100).max(1);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = Vec::with_capacity(total as usize);
    let mut inflight = tokio::task::JoinSet::new();
    let started = Instant::now();
    while (sent.len() as u64) < total {
        interval.tick().await;
        for _ in 0..per_tick.min(total - sent.len() as u64) {
            let payment = random_payment(format!("l{}", sent.len()), args.accounts);
            sent.push((payment.id.clone(), epoch_ms_f64()));
            let runtime = runtime.clone();
            inflight
                .spawn(async move { runtime.ingest().submit(payment, bench_submitter()).await });
        }
        // Finished submissions are collected as they go, so that the bench's
        // own bookkeeping does not add to the peak RSS it reports.
        while let Some(result) = inflight.try_join_next() {
            result??;
        }
    }
    while let Some(result) = inflight.join_next().await {
        result??;
    }
    let offered_s = started.elapsed().as_secs_f64();
    wait_terminal(runtime, before + total).await;
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut steps = Steps::default();
    for (id, start_ms) in &sent {
        let row = runtime.payment(id)?;
        if let Some(row) = &row {
            steps.add(*start_ms, row)?;
        }
        let done_ms = row.and_then(|r| r.completed_at_ms).unwrap_or(0) as f64;
        histogram.record(((done_ms - start_ms).max(0.0) * 1000.0) as u64)?;
    }
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "latency at {} payments/s offered ({:.0}/s achieved, {} payments): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.rate,
        total as f64 / offered_s,
        total,
        ms(0.50),
        ms(0.95),
        ms(0.99),
        histogram.max() as f64 / 1000.0
    );
    println!("latency by step, p50/p99 ms: {steps}");
    Ok(())
}

/// Where a payment's time goes, from its lineage: the intake (submit to
/// accepted), then for each hop the wait in its input topic (appended to
/// processed) and the append of what it produced (processed to the next
/// hop's input appended). Whole milliseconds, as lineage records them.
#[derive(Default)]
struct Steps(Vec<(String, Histogram<u64>)>);

impl Steps {
    fn add(
        &mut self,
        start_ms: f64,
        row: &crate::pipeline::inflight::PaymentState,
    ) -> anyhow::Result<()> {
        let intake = row.payment.accepted_at_ms as f64 - start_ms;
        self.record("intake", intake)?;
        let hops = &row.lineage;
        for (n, hop) in hops.iter().enumerate() {
            let stage = hop.stage.as_str();
            self.record(
                &format!("{stage} wait"),
                (hop.at_ms - hop.received_at_ms) as f64,
            )?;
            if let Some(next) = hops.get(n + 1) {
                let append = (next.received_at_ms - hop.at_ms) as f64;
                self.record(&format!("{stage} append"), append)?;
            }
        }
        Ok(())
    }

    fn record(&mut self, step: &str, ms: f64) -> anyhow::Result<()> {
        let at = match self.0.iter().position(|(name, _)| name == step) {
            Some(at) => at,
            None => {
                self.0.push((step.to_owned(), Histogram::new(3)?));
                self.0.len() - 1
            }
        };
        self.0[at].1.record(ms.max(0.0) as u64)?;
        Ok(())
    }
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = (self.0.iter())
            .map(|(name, h)| {
                let (p50, p99) = (h.value_at_quantile(0.5), h.value_at_quantile(0.99));
                format!("{name} {p50}/{p99}")
            })
            .collect();
        f.write_str(&parts.join(", "))
    }
}

fn epoch_ms_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

async fn report_resources(runtime: &Runtime, payments: u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: unknown")
        .trim_start_matches("VmHWM:")
        .trim()
        .to_owned();
    println!("peak RSS: {peak}");
    // Let two flush cycles run so retention has applied the final offsets.
    let flush = runtime.config().pipeline.flush_interval_ms;
    let commit = runtime.config().pipeline.commit_interval_ms;
    tokio::time::sleep(Duration::from_millis(2 * (flush + commit))).await;
    let log_bytes = runtime.log().disk_bytes();
    let state_bytes = runtime.store().disk_bytes();
    let per_million = |b: u64| b as f64 * 1e6 / payments.max(1) as f64 / (1 << 20) as f64;
    println!(
        "disk after retention: log {:.1} MiB, state {:.1} MiB per million payments",
        per_million(log_bytes),
        per_million(state_bytes)
    );
}

/// Serves the API on a loopback port and posts single payments over
/// keep-alive connections with a minimal HTTP/1.1 client.
async fn http_phase(state: crate::http::State, args: &BenchArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let app = crate::http::app(state.clone(), std::path::PathBuf::from("static"));
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(args.http_seconds);
    let mut clients = tokio::task::JoinSet::new();
    for connection in 0..args.http_connections {
        let accounts = args.accounts;
        clients.spawn(post_loop(address, connection, accounts, deadline));
    }
    let mut accepted = 0u64;
    while let Some(done) = clients.join_next().await {
        accepted += done??;
    }
    println!(
        "http: {:.0} payments/s accepted (single POSTs, {} keep-alive connections, {} s)",
        accepted as f64 / args.http_seconds as f64,
        args.http_connections,
        args.http_seconds
    );
    stop.cancel();
    server.await??;
    Ok(())
}

async fn post_loop(
    address: std::net::SocketAddr,
    connection: u64,
    accounts: u32,
    deadline: Instant,
) -> anyhow::Result<u64> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let mut stream = BufReader::new(stream);
    let mut accepted = 0;
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let payment = random_payment(format!("h{connection}-{n}"), accounts);
        let body = format!(
            r#"{{"id":"{}","from":"{}","to":"{}","amount":{}}}"#,
            payment.id, payment.from, payment.to, payment.amount_cents
        );
        let request = format!(
            // The server's own address as Host: protected mode answers loopback names only.
            "POST /api/v1/payments HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.get_mut().write_all(request.as_bytes()).await?;
        let mut status_line = String::new();
        stream.read_line(&mut status_line).await?;
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            stream.read_line(&mut header).await?;
            if header == "\r\n" || header.is_empty() {
                break;
            }
            if let Some(value) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse()?;
            }
        }
        let mut response = vec![0; length];
        stream.read_exact(&mut response).await?;
        if status_line.contains(" 202 ") {
            accepted += 1;
        }
    }
    Ok(accepted)
}

/// Clock ticks per second of `/proc/self/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds this process has used so far (user and system, from
/// `/proc/self/stat`), and the bytes it has caused to be written to storage
/// (`write_bytes` of `/proc/self/io`); each `0.0`/`None` where not known.
fn process_usage() -> (f64, Option<u64>) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces), from field 3 on:
    // utime and stime are fields 14 and 15.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |n: usize| {
        fields
            .get(n)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / TICKS_PER_SECOND;
    let written = std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            (io.lines())
                .find_map(|line| line.strip_prefix("write_bytes:"))
                .and_then(|n| n.trim().parse().ok())
        });
    (cpu, written)
}
