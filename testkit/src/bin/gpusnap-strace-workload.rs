//! The workload `tests/strace-check` drives the real gpusnapd with while it
//! runs under `strace -f`: `--jobs` jobs of `--ranks` ranks, one client
//! thread per (job, rank), each registering one `U8` tensor of its own size
//! and taking `--steps` snapshots, each with content of its own, each
//! waited for until it is committed. Snapshots run one at a time per rank,
//! the ranks at once.
//!
//! Every step number is used by exactly one (job, rank), so the daemon's
//! `committed` event for a step names one snapshot in the trace. The data
//! section is that one tensor, so the CRC32 of each `--chunk-bytes` piece of
//! it, computed here, is what the manifest the daemon writes must list.
//!
//! Writes to `--out` one JSON document: the parameters and a
//! list of every snapshot whose commit the daemon reported: job, rank,
//! step, the tensor's bytes, the file's bytes the daemon reported, the
//! chunk CRCs, and prints a one-line summary. Exits non-zero, naming the (job, rank), when any snapshot is
//! not committed.
//!
//! ```text
//! gpusnap-strace-workload --socket PATH --jobs 4 --ranks 2 --steps 40 \
//!     --chunk-bytes 65536 --out workload.json
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use gpusnap::{Client, ClientConfig, Dtype, HostTensor, SnapshotOutcome};
use serde::Serialize;

/// Steps of one (job, rank) start at its index times this, plus one.
const STEP_STRIDE: u64 = 100_000;
/// The smallest tensor a rank registers; each rank adds a different amount.
const TENSOR_BYTES_MIN: u64 = 96 * 1024;
/// Most jobs, ranks and steps accepted, so a typo cannot start a run that
/// never ends.
const JOBS_MAX: u32 = 64;
const RANKS_MAX: u32 = 16;
const STEPS_MAX: u64 = 10_000;

/// What the command line asks for.
#[derive(Debug, Clone, Serialize)]
struct Params {
    socket: PathBuf,
    jobs: u32,
    ranks: u32,
    steps: u64,
    chunk_bytes: u64,
    #[serde(skip)]
    out: PathBuf,
}

/// One snapshot the daemon reported committed.
#[derive(Debug, Clone, Serialize)]
struct Snapshot {
    job: String,
    rank: u32,
    step: u64,
    tensor_bytes: u64,
    file_bytes: u64,
    chunk_crc32: Vec<u32>,
}

/// One rank's thread as it ended: (job index, rank, what it returned).
type RankOutcome = (
    u32,
    u32,
    std::thread::Result<Result<Vec<Snapshot>, WorkloadError>>,
);

/// The whole run, as printed.
#[derive(Debug, Serialize)]
struct Report<'a> {
    params: &'a Params,
    wall_ms: u128,
    snapshots: Vec<Snapshot>,
}

/// Why the workload failed.
#[derive(Debug, thiserror::Error)]
enum WorkloadError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("job {job} rank {rank}: {what}: {source}")]
    Client {
        job: String,
        rank: u32,
        what: String,
        source: gpusnap::Error,
    },
    #[error("job {job} rank {rank}: step {step} was not captured: {outcome:?}")]
    NotCaptured {
        job: String,
        rank: u32,
        step: u64,
        outcome: SnapshotOutcome,
    },
    #[error("job {job} rank {rank}: its thread panicked")]
    Panicked { job: String, rank: u32 },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("encoding the report: {0}")]
    Json(#[from] serde_json::Error),
}

fn parse_args(args: &[String]) -> Result<Params, WorkloadError> {
    let usage = || {
        WorkloadError::Usage(
            "gpusnap-strace-workload --socket PATH --jobs N --ranks N --steps N --chunk-bytes N --out PATH"
                .to_owned(),
        )
    };
    let mut socket = None;
    let mut out = None;
    let mut numbers = [None; 4];
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(usage)?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| WorkloadError::Usage(format!("{flag} takes a number, not {value:?}")))
        };
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value)),
            "--out" => out = Some(PathBuf::from(value)),
            "--jobs" => numbers[0] = Some(number()?),
            "--ranks" => numbers[1] = Some(number()?),
            "--steps" => numbers[2] = Some(number()?),
            "--chunk-bytes" => numbers[3] = Some(number()?),
            _ => return Err(WorkloadError::Usage(format!("unknown flag {flag}"))),
        }
    }
    let [Some(jobs), Some(ranks), Some(steps), Some(chunk_bytes)] = numbers else {
        return Err(usage());
    };
    let in_range = |name: &str, v: u64, max: u64| {
        if (1..=max).contains(&v) {
            Ok(v)
        } else {
            Err(WorkloadError::Usage(format!(
                "{name} must be 1..={max}, not {v}"
            )))
        }
    };
    let jobs =
        u32::try_from(in_range("--jobs", jobs, u64::from(JOBS_MAX))?).map_err(|_| usage())?;
    let ranks =
        u32::try_from(in_range("--ranks", ranks, u64::from(RANKS_MAX))?).map_err(|_| usage())?;
    let steps = in_range("--steps", steps, STEPS_MAX)?;
    if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(4096) {
        return Err(WorkloadError::Usage(format!(
            "--chunk-bytes must be a positive multiple of 4096 (the daemon's store.io_buffer_bytes), not {chunk_bytes}"
        )));
    }
    Ok(Params {
        socket: socket.ok_or_else(usage)?,
        jobs,
        ranks,
        steps,
        chunk_bytes,
        out: out.ok_or_else(usage)?,
    })
}

/// Byte `i` of the tensor for `seed`: a mix no two steps share.
fn pattern(seed: u64, i: u64) -> u8 {
    let x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i);
    let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x ^ (x >> 32)).to_le_bytes()[0]
}

/// CRC32 of each `chunk_bytes` piece of `bytes`, as the manifest lists them.
fn chunk_crcs(bytes: &[u8], chunk_bytes: u64) -> Vec<u32> {
    let chunk = usize::try_from(chunk_bytes).unwrap_or(usize::MAX);
    bytes.chunks(chunk).map(crc32fast::hash).collect()
}

/// One rank's snapshots, in order, each waited for until committed.
fn run_rank(params: &Params, job_index: u32, rank: u32) -> Result<Vec<Snapshot>, WorkloadError> {
    let job = format!("strace-job{job_index}");
    let client_err = |what: String| {
        let job = job.clone();
        move |source| WorkloadError::Client {
            job,
            rank,
            what,
            source,
        }
    };
    let mut config = ClientConfig::new(job.clone());
    config.socket = params.socket.clone();
    config.rank = rank;
    config.world_size = params.ranks;
    config.connect_timeout = Duration::from_secs(30);
    config.call_timeout = Duration::from_secs(60);
    config.commit_timeout = Duration::from_secs(120);
    let index = u64::from(job_index * params.ranks + rank);
    // Sizes differ per rank, none a multiple of 4096, so padded tails and
    // several chunks are both exercised.
    let tensor_bytes = TENSOR_BYTES_MIN + index * 20_011 + 1_234;
    let tensor = HostTensor::zeros(Dtype::U8, [tensor_bytes])
        .map_err(client_err("allocate the tensor".to_owned()))?;
    let mut client = Client::with_config(config).map_err(client_err("connect".to_owned()))?;
    client
        .register_host("weights", &tensor)
        .map_err(client_err("register".to_owned()))?;
    let mut done = Vec::new();
    for s in 0..params.steps {
        let step = index * STEP_STRIDE + s + 1;
        let crcs = {
            let mut w = tensor.write();
            for (i, b) in (0u64..).zip(w.iter_mut()) {
                *b = pattern(step, i);
            }
            chunk_crcs(&w, params.chunk_bytes)
        };
        let outcome = client
            .snapshot(step)
            .map_err(client_err(format!("snapshot {step}")))?;
        if !matches!(outcome, SnapshotOutcome::Captured(_)) {
            return Err(WorkloadError::NotCaptured {
                job,
                rank,
                step,
                outcome,
            });
        }
        let info = client
            .wait_committed(step)
            .map_err(client_err(format!("wait for the commit of {step}")))?;
        done.push(Snapshot {
            job: job.clone(),
            rank,
            step,
            tensor_bytes,
            file_bytes: info.bytes,
            chunk_crc32: crcs,
        });
    }
    Ok(done)
}

fn run(params: &Params) -> Result<Report<'_>, WorkloadError> {
    let started = Instant::now();
    let results: Vec<RankOutcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..params.jobs)
            .flat_map(|j| (0..params.ranks).map(move |r| (j, r)))
            .map(|(j, r)| (j, r, scope.spawn(move || run_rank(params, j, r))))
            .collect();
        handles
            .into_iter()
            .map(|(j, r, h)| (j, r, h.join()))
            .collect()
    });
    let mut snapshots = Vec::new();
    for (j, rank, result) in results {
        match result {
            Ok(Ok(done)) => snapshots.extend(done),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(WorkloadError::Panicked {
                    job: format!("strace-job{j}"),
                    rank,
                });
            }
        }
    }
    Ok(Report {
        params,
        wall_ms: started.elapsed().as_millis(),
        snapshots,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = parse_args(&args).and_then(|params| {
        let report = run(&params)?;
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(&params.out, &json).map_err(|source| WorkloadError::Write {
            path: params.out.clone(),
            source,
        })?;
        println!(
            "workload: {} jobs x {} ranks x {} steps: {} snapshots committed in {} ms",
            params.jobs,
            params.ranks,
            params.steps,
            report.snapshots.len(),
            report.wall_ms
        );
        Ok(())
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpusnap-strace-workload: {e}");
            ExitCode::FAILURE
        }
    }
}
