//! gpusnapd: the gpusnap node daemon.
//!
//! The control plane (socket, staging, persist engine) comes with the daemon
//! issue. What runs today is the daemon's start-up work on a store, as a
//! one-shot: choose the I/O backend (and say why), remove unfinished
//! snapshots left by a crash, and report what is committed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gpusnapd::storage::probe::BackendChoice;
use gpusnapd::store::{Store, StoreConfig};

#[derive(Parser, Debug)]
#[command(name = "gpusnapd", version, about = "gpusnap node daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Cli { command } = Cli::parse();
    let Command::CheckStore { root, io_backend } = command;
    let root = match std::path::absolute(&root) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gpusnapd: {}: {e}", root.display());
            return ExitCode::from(2);
        }
    };
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
