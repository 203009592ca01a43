//! `gpusnap-bench`: gpusnap's benchmarks, each measured against the peer
//! that sets its bar (see benches/README.md). Start it through `benches/run`.
//!
//! Logs and progress go to stderr; with `--json`, stdout holds exactly one
//! JSON object.

mod daemon;
mod e2e_bench;
mod e2e_report;
mod fio;
mod fio_sweep;
mod gpu_bench;
mod load_bench;
mod load_events;
mod load_plan;
mod load_report;
mod load_trainer;
mod load_watch;
mod mapping;
mod remote_bench;
mod remote_report;
mod report;
mod state;
mod store_bench;
mod sys;
mod tensors;
mod units;
mod workdir;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::e2e_bench::E2eBench;
use crate::store_bench::{Backend, StoreBench};

#[derive(Debug, Parser)]
#[command(
    name = "gpusnap-bench",
    about = "gpusnap benchmarks, each against its peer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The snapshot store's write and verified read, per I/O backend,
    /// against fio (io_uring, O_DIRECT) on the same directory.
    Store(StoreArgs),
    /// A trainer's snapshots, commits and restores through the real
    /// gpusnapd (host backend): stall against memcpy, persist and restore
    /// against fio, and a naive write + fsync baseline.
    E2e(E2eArgs),
    /// The CUDA backend through the real gpusnapd: capture and restore of
    /// device memory against plain pinned CUDA copies, the overlapped
    /// stall, the page-locking rate, many small tensors.
    Gpu(GpuArgs),
    /// The remote (S3) tier against the plain object-store client on a
    /// loopback SeaweedFS: upload vs a plain multipart upload, persist with
    /// uploads vs without, download + restore vs ranged GETs alone.
    Remote(RemoteArgs),
    /// Many trainers at once (64 of 1 MiB to 256 MiB, half host, half
    /// CUDA) on three daemons, one per staging policy: daemon memory
    /// against its budgets, stall percentiles against memcpy, snapshots/s,
    /// skips and streams, a watchdog, and every commit verified after.
    Load(LoadArgs),
    /// One trainer of `load` (started by it; not for direct use).
    #[command(hide = true)]
    LoadTrainer(load_trainer::TrainerArgs),
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// How long every trainer snapshots in a loop (60s, 500ms, 2m).
    #[arg(long, default_value = "60s", value_parser = units::parse_duration)]
    duration: std::time::Duration,
    /// "Compute" between two snapshots of one trainer.
    #[arg(long, default_value = "200ms", value_parser = units::parse_duration)]
    interval: std::time::Duration,
    /// A request unanswered for longer than this fails the run, naming the
    /// trainer.
    #[arg(long, default_value = "30s", value_parser = units::parse_duration)]
    watchdog: std::time::Duration,
    /// Six trainers of 1-16 MiB for 3 s with no interval (overrides
    /// --duration and --interval), for CI.
    #[arg(long)]
    smoke: bool,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Run in a fresh directory under DIR, removed afterwards [default:
    /// the repository's target/gpusnap-bench/, or /var/tmp if that is tmpfs].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The gpusnapd binary [default: the one beside gpusnap-bench].
    #[arg(long, value_name = "PATH")]
    gpusnapd: Option<PathBuf>,
    /// A directory put first on the CUDA trainers' LD_LIBRARY_PATH: the
    /// CUDA driver double's (tests/cuda-double/build prints it; benches/run
    /// passes it unless given --system-cuda).
    #[arg(long, value_name = "DIR", conflicts_with = "system_cuda")]
    cuda_lib_dir: Option<PathBuf>,
    /// The CUDA trainers use the system's libcuda.so (a GPU).
    #[arg(long)]
    system_cuda: bool,
}

#[derive(Debug, clap::Args)]
struct RemoteArgs {
    /// State size: the registered tensors' bytes, and the uploaded
    /// snapshot's data (K, M, G suffixes are powers of 1024).
    #[arg(long, default_value = "512M", value_parser = units::parse_size)]
    size: u64,
    /// Part of a multipart upload and of a ranged GET (remote.part_bytes),
    /// for gpusnap and its peers alike.
    #[arg(long = "part", default_value = "16M", value_parser = units::parse_size)]
    part_bytes: u64,
    /// Requests in flight (remote.concurrency), for gpusnap and its peers.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Rounds of the upload and of the download figure (best of each).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Snapshots per daemon in the persist figure (without uploads, beside
    /// a plain uploader, with the daemon's uploads).
    #[arg(long, default_value_t = 5)]
    snapshots: usize,
    /// A small run for CI (--size 64M); its figures say little.
    #[arg(long)]
    smoke: bool,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Run in DIR and leave the daemons' configs and logs there.
    #[arg(long, value_name = "DIR", conflicts_with = "dir")]
    keep: Option<PathBuf>,
    /// Run in a fresh directory under DIR, removed afterwards [default:
    /// the repository's target/gpusnap-bench/, or /var/tmp if that is tmpfs].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The S3 servers' data in a fresh directory under DIR [default:
    /// /dev/shm when it is tmpfs, so the server's writes stay off the
    /// store's disk, else the run's directory].
    #[arg(long, value_name = "DIR")]
    server_dir: Option<PathBuf>,
    /// The gpusnapd binary [default: the one beside gpusnap-bench].
    #[arg(long, value_name = "PATH")]
    gpusnapd: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct GpuArgs {
    /// Sizes of one device buffer (K, M, G; `max`: the largest that fits).
    #[arg(long, default_value = "1G,10G,max")]
    sizes: String,
    /// Small tensors (4 KiB to 1 MiB) in the many-tensors case (0: none).
    #[arg(long, default_value_t = 10_000)]
    tensors: usize,
    /// Small sizes for CI on the CUDA driver double (overrides --sizes and
    /// --tensors); its figures mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Run in a fresh directory under DIR, removed afterwards.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The gpusnapd binary [default: the one beside gpusnap-bench].
    #[arg(long, value_name = "PATH")]
    gpusnapd: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct E2eArgs {
    /// State size: the registered tensors' bytes (K, M, G suffixes are
    /// powers of 1024).
    #[arg(long, default_value = "4G", value_parser = units::parse_size)]
    size: u64,
    /// Snapshots timed on the first daemon (stall, persist).
    #[arg(long, default_value_t = 5)]
    snapshots: usize,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Run in DIR and leave the store, daemon configs and logs there.
    #[arg(long, value_name = "DIR", conflicts_with = "dir")]
    keep: Option<PathBuf>,
    /// Run in a fresh directory under DIR, removed afterwards [default:
    /// the repository's target/gpusnap-bench/, or /var/tmp if that is tmpfs].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The gpusnapd binary [default: the one beside gpusnap-bench].
    #[arg(long, value_name = "PATH")]
    gpusnapd: Option<PathBuf>,
    /// fio's --iodepth at the single setting (1 MiB blocks).
    #[arg(long, default_value_t = 16)]
    fio_iodepth: usize,
    /// Skip the fio sweep (iodepth 16/32/64 x bs 1M/4M, the disk's limit):
    /// a quicker run, compared with the single setting only.
    #[arg(long)]
    no_fio_sweep: bool,
    /// Run even when four copies of the state do not fit in MemAvailable.
    #[arg(long)]
    ignore_memory: bool,
}

#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// Data section size (K, M, G suffixes are powers of 1024).
    #[arg(long, default_value = "4G", value_parser = units::parse_size)]
    size: u64,
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Run in DIR and leave the written snapshots there (DIR/<backend>/).
    #[arg(long, value_name = "DIR", conflicts_with = "dir")]
    keep: Option<PathBuf>,
    /// Run in a fresh directory under DIR, removed afterwards [default:
    /// the repository's target/gpusnap-bench/, or /var/tmp if that is tmpfs].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Backends to measure, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "io_uring,pwrite,buffered"
    )]
    backends: Vec<Backend>,
    /// Transfers in flight per file (store.queue_depth).
    #[arg(long, default_value_t = gpusnapd::store::StoreConfig::default().queue_depth)]
    queue_depth: usize,
    /// Size of one I/O buffer and chunk (store.io_buffer_bytes).
    #[arg(long, default_value = "1M", value_parser = parse_usize_size)]
    io_buffer: usize,
    /// fio's --iodepth at the single setting, 1 MiB blocks (the peer's
    /// transfers in flight; the store's are --queue-depth).
    #[arg(long, default_value_t = 16)]
    fio_iodepth: usize,
    /// Skip the fio sweep (iodepth 16/32/64 x bs 1M/4M, the disk's limit):
    /// a quicker run, compared with the single setting only.
    #[arg(long)]
    no_fio_sweep: bool,
}

fn parse_usize_size(text: &str) -> Result<usize, String> {
    units::parse_size(text).map(gpusnap_proto::convert::to_usize)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs();
    match cli.command {
        Command::Store(args) => store(args),
        Command::E2e(args) => e2e(args),
        Command::Gpu(args) => gpu(args),
        Command::Remote(args) => remote(args),
        Command::Load(args) => load(args),
        Command::LoadTrainer(args) => load_trainer::main(&args),
    }
}

fn load(args: LoadArgs) -> ExitCode {
    let bench = load_bench::LoadBench {
        smoke: args.smoke,
        duration: if args.smoke {
            load_bench::SMOKE_DURATION
        } else {
            args.duration
        },
        interval: if args.smoke {
            load_bench::SMOKE_INTERVAL
        } else {
            args.interval
        },
        watchdog: args.watchdog,
        dir: args.dir,
        gpusnapd: args.gpusnapd,
        cuda_library_dir: args.cuda_lib_dir,
    };
    let report = match load_bench::run(&bench) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gpusnap-bench load: FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    let failed = !report.errors.is_empty();
    print_report(&report, &report.table(), args.json, failed)
}

fn remote(args: RemoteArgs) -> ExitCode {
    let bench = remote_bench::RemoteBench {
        size_bytes: if args.smoke {
            remote_bench::SMOKE_SIZE_BYTES
        } else {
            args.size
        },
        part_bytes: args.part_bytes,
        concurrency: args.concurrency,
        repeats: args.repeats,
        snapshots: args.snapshots,
        smoke: args.smoke,
        keep: args.keep,
        dir: args.dir,
        server_dir: args.server_dir,
        gpusnapd: args.gpusnapd,
    };
    let report = match remote_bench::run(&bench) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gpusnap-bench remote: FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    let failed = !report.errors.is_empty();
    print_report(&report, &report.table(), args.json, failed)
}

fn gpu(args: GpuArgs) -> ExitCode {
    let (sizes, tensors) = if args.smoke {
        (Ok(vec![4 << 20]), 200)
    } else {
        let here = args.dir.clone().unwrap_or_else(|| PathBuf::from("."));
        (gpu_bench::parse_sizes(&args.sizes, &here), args.tensors)
    };
    let sizes = match sizes {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gpusnap-bench gpu: --sizes: {e}");
            return ExitCode::from(2);
        }
    };
    let bench = gpu_bench::GpuBench {
        sizes,
        many_tensors: tensors,
        smoke: args.smoke,
        dir: args.dir,
        gpusnapd: args.gpusnapd,
    };
    match gpu_bench::run(&bench) {
        Ok(report) => print_report(&report, &report.table(), args.json, false),
        Err(e) => {
            eprintln!("gpusnap-bench gpu: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn e2e(args: E2eArgs) -> ExitCode {
    let bench = E2eBench {
        size_bytes: args.size,
        snapshots: args.snapshots,
        keep: args.keep,
        dir: args.dir,
        gpusnapd: args.gpusnapd,
        fio_iodepth: args.fio_iodepth,
        fio_sweep: !args.no_fio_sweep,
        ignore_memory: args.ignore_memory,
    };
    let report = match e2e_bench::run(&bench) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gpusnap-bench e2e: FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    let failed = !report.errors.is_empty();
    print_report(&report, &report.table(), args.json, failed)
}

fn store(args: StoreArgs) -> ExitCode {
    if args.backends.is_empty() {
        eprintln!("gpusnap-bench: --backends names no backend");
        return ExitCode::from(2);
    }
    let bench = StoreBench {
        size_bytes: args.size,
        keep: args.keep,
        dir: args.dir,
        backends: args.backends,
        queue_depth: args.queue_depth,
        io_buffer_bytes: args.io_buffer,
        fio_iodepth: args.fio_iodepth,
        fio_sweep: !args.no_fio_sweep,
    };
    let report = match store_bench::run(&bench) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gpusnap-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let failed = !report.errors.is_empty();
    print_report(&report, &report.table(), args.json, failed)
}

/// The table on stdout, or the table on stderr and the JSON on stdout;
/// failure when printing fails or `failed`.
fn print_report(report: &impl serde::Serialize, table: &str, json: bool, failed: bool) -> ExitCode {
    let printed = if json {
        eprint!("{table}");
        serde_json::to_string_pretty(report)
            .map_err(std::io::Error::other)
            .and_then(|json| writeln!(std::io::stdout(), "{json}"))
    } else {
        write!(std::io::stdout(), "{table}")
    };
    if let Err(e) = printed {
        eprintln!("gpusnap-bench: writing the report: {e}");
        return ExitCode::FAILURE;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The daemon library's tracing events (backend choice, warnings) on stderr;
/// `RUST_LOG` overrides the default `warn`.
#[cfg(feature = "logs")]
fn init_logs() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(not(feature = "logs"))]
fn init_logs() {}
