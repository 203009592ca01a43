//! gpusnapd: the gpusnap node daemon.
//!
//! `gpusnapd [--config FILE] [--socket PATH] [--root DIR] [--metrics-listen ADDR] [--log-level L]`
//! runs the daemon: opens the store (recovery first), listens on the control
//! socket (or the one systemd passed), serves `/metrics`, and on SIGTERM or
//! SIGINT stops in order and exits 0. `gpusnapd check-store` runs only the
//! start-up work on a store and reports.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gpusnapd::config::{Config, DEFAULT_CONFIG_PATH};
use gpusnapd::server::{self, Daemon};
use gpusnapd::storage::probe::BackendChoice;
use gpusnapd::store::{Store, StoreConfig};

#[derive(Parser, Debug)]
#[command(name = "gpusnapd", version, about = "gpusnap node daemon")]
struct Cli {
    /// Config file (TOML). Without it, /etc/gpusnap/gpusnapd.toml if present, else defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Control socket path (overrides daemon.socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Store root (overrides store.root).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Metrics address host:port, or "" to turn it off (overrides metrics.listen).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Log level or tracing filter (overrides daemon.log_level).
    #[arg(long)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run start-up recovery on a store root and report the backend chosen.
    CheckStore {
        #[arg(long, default_value = "/var/lib/gpusnap")]
        root: PathBuf,
        /// auto, io_uring, pwrite or buffered.
        #[arg(long, default_value = "auto", value_parser = parse_backend)]
        io_backend: BackendChoice,
    },
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?} is not one of auto, io_uring, pwrite, buffered"))
}

fn init_logs(filter: &str) {
    // journald adds its own timestamps; plain lines without colour either way.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter);
    if under_journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckStore { root, io_backend }) = &cli.command {
        init_logs("info");
        return check_store(root, *io_backend);
    }
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpusnapd: {e}");
            return ExitCode::from(2);
        }
    };
    init_logs(&config.daemon.log_level);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "gpusnapd cannot run");
            eprintln!("gpusnapd: {e}");
            ExitCode::from(1)
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, gpusnapd::config::ConfigError> {
    let (path, must_exist) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let mut config = Config::load(&path, must_exist)?;
    if let Some(s) = &cli.socket {
        config.daemon.socket = absolute(s);
    }
    if let Some(r) = &cli.root {
        config.store.root = absolute(r);
    }
    if let Some(m) = &cli.metrics_listen {
        config.metrics.listen = m.clone();
    }
    if let Some(l) = &cli.log_level {
        config.daemon.log_level = l.clone();
    }
    config.validate()?;
    Ok(config)
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn run(config: Config) -> Result<(), server::ServerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gpusnapd")
        .build()?;
    let served = runtime.block_on(async move {
        let daemon = tokio::task::spawn_blocking(move || Daemon::open(config))
            .await
            .map_err(|e| server::ServerError::Io(std::io::Error::other(e)))??;
        let metrics = match daemon.config.metrics.listen.as_str() {
            "" => None,
            addr => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| server::ServerError::MetricsListen {
                        addr: addr.to_owned(),
                        source,
                    })?,
            ),
        };
        if let Some(l) = &metrics {
            tracing::info!(addr = %l.local_addr()?, "metrics on /metrics");
        }
        let socket = server::control_socket(&daemon.config)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            }
        };
        server::serve(daemon, socket, metrics, stop).await
    });
    // Bounded: blocking work still running (a restore's read, say) is not
    // waited for past this; the process exits and the kernel reclaims it.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_MAX);
    served
}

/// Longest the exit waits for the runtime's blocking work once serving
/// ended.
const RUNTIME_SHUTDOWN_MAX: std::time::Duration = std::time::Duration::from_secs(5);

fn check_store(root: &std::path::Path, io_backend: BackendChoice) -> ExitCode {
    let root = absolute(root);
    let config = StoreConfig {
        root,
        io_backend,
        ..StoreConfig::default()
    };
    let store = match Store::open(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gpusnapd: cannot open the store: {e}");
            return ExitCode::from(2);
        }
    };
    match store.list(None) {
        Ok(listing) => {
            println!(
                "store {}: backend {}, {} committed snapshots, {} invalid directories",
                store.root().display(),
                store.storage().backend(),
                listing.snapshots.len(),
                listing.invalid.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gpusnapd: cannot list the store: {e}");
            ExitCode::from(2)
        }
    }
}
