//! `kpay`: parses the command line, loads the config and runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kpay::config::{Config, Overrides};

/// mimalloc: the pipeline allocates many small, short-lived buffers per
/// record; glibc's allocator spent ~30% of benchmark CPU on them.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kpay",
    version,
    about = "Payments as event-streaming microservices"
)]
struct Cli {
    /// Settings file (default: config/kpay.toml when present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Directory for the log and the state store.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve {
        /// Open the accounts of this CSV file (`id,opening_balance` in cents) at
        /// start; idempotent: accounts that exist are left alone.
        #[arg(long)]
        bootstrap: Option<PathBuf>,
    },
    /// Run the end-to-end benchmark in embedded mode and print the results.
    Bench(kpay::bench::BenchArgs),
    /// Rebuild the state tables from the log (the server must be stopped),
    /// compare them with the live ones and put them in place.
    Rebuild {
        /// Compare only; leave the live state as it is.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the state store's live data per table against its size on disk
    /// (the server must be stopped).
    StoreSize,
}

/// Stdout logs (text, or JSON lines), filtered by `RUST_LOG` (default
/// `info`); WARN and ERROR events also go to the error log whatever it says.
fn init_tracing(json: bool) {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, Layer};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let stdout = if json {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    tracing_subscriber::registry()
        .with(stdout.with_filter(filter))
        .with(kpay::ops::logs::ErrorLayer.with_filter(LevelFilter::WARN))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kpay: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole cause chain on one line, without a backtrace.
            eprintln!("kpay: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    init_tracing(cli.log_json);
    let overrides = Overrides {
        listen: cli.listen,
        data_dir: cli.data_dir,
    };
    let config = Config::load(cli.config.as_deref(), &overrides)?;
    kpay::failpoint::arm_from_env().map_err(anyhow::Error::msg)?;
    match cli.command.unwrap_or(Command::Serve { bootstrap: None }) {
        Command::Serve { bootstrap } => {
            // Installed first: a SIGTERM during the start waits for the drain.
            let stop = kpay::control::shutdown_signal();
            let accounts = match &bootstrap {
                Some(path) => kpay::control::bootstrap::read(path, config.limits.max_amount_cents)?,
                None => Vec::new(),
            };
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.server.listen))?;
            kpay::app::serve(config, listener, accounts, stop).await
        }
        Command::Bench(args) => kpay::bench::run(config, args).await,
        Command::StoreSize => {
            let size = kpay::ops::store_size::measure(&config)?;
            print!("{}", kpay::ops::store_size::render(&size));
            Ok(())
        }
        Command::Rebuild { dry_run } => {
            let reports = kpay::ops::rebuild::run(config, dry_run).await?;
            print!("{}", kpay::ops::rebuild::render(&reports));
            let same = reports.iter().all(|r| r.matches());
            match (same, dry_run) {
                (true, true) => {
                    println!("rebuilt state equals the live state (dry run: nothing changed)")
                }
                (true, false) => {
                    println!("rebuilt state equals the live state; it is now in place")
                }
                (false, true) => anyhow::bail!(
                    "the rebuilt state differs from the live state (dry run: nothing changed)"
                ),
                (false, false) => anyhow::bail!(
                    "the rebuilt state differed from the live state; it is now in place \
                     (the old state is in state.before-rebuild)"
                ),
            }
            Ok(())
        }
    }
}
