//! One `load` trainer, a process of its own (`gpusnap-bench load-trainer`,
//! started by the harness): its state is one U8 tensor of `--size` bytes,
//! in host memory or in CUDA device memory, filled with the benches'
//! pattern. It registers, tells the harness, waits for the start line
//! (`go <milliseconds>` on stdin), then until that time has passed stamps
//! the step into its state, snapshots it and "computes" for `--interval-ms`.
//! After each capture it collects the commit outcomes of its earlier
//! captured steps (the client keeps only its last 1024 outcomes, skips
//! included, so a skip-heavy trainer that waited only at the end would
//! find old ones gone); at the end it waits for the last, restores the
//! newest commit and checks every byte. Every call that waits on the daemon is
//! announced on stdout first (`load_events`), for the harness's watchdog.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpusnap::device::cuda::{CudaDevice, DeviceMemory};
use gpusnap::{Buffer, Client, ClientConfig, Dtype, Pinning, SnapshotOutcome, Step, TensorSpec};
use gpusnap_proto::convert::to_usize;

use crate::load_events::{Event, TrainerSummary};
use crate::load_plan::LoadDevice;
use crate::state::{self, TrainerState};

/// Bytes of device memory written or read back at a time.
const DEVICE_CHUNK_BYTES: usize = 8 << 20;
/// How long a trainer waits for the start line before giving up.
const START_WAIT: Duration = Duration::from_secs(600);
/// The tensor's name.
const TENSOR: &str = "state";

/// What one trainer process was asked to do.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainerArgs {
    /// The daemon's socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// This trainer's rank (its number in the run).
    #[arg(long)]
    pub rank: u32,
    /// Ranks in the job (every trainer of the run).
    #[arg(long)]
    pub world: u32,
    /// State bytes.
    #[arg(long)]
    pub size: u64,
    /// Where the state lives: host or cuda.
    #[arg(long)]
    pub device: LoadDevice,
    /// "Compute" between two snapshots, milliseconds.
    #[arg(long)]
    pub interval_ms: u64,
}

/// Runs the trainer; any failure is reported as a `failed` line and an
/// error exit.
pub fn main(args: &TrainerArgs) -> std::process::ExitCode {
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The harness also sees the exit status if stdout is gone.
            let _ = Event::Failed { error }.emit();
            std::process::ExitCode::FAILURE
        }
    }
}

fn emit(event: Event) -> Result<(), String> {
    event
        .emit()
        .map_err(|e| format!("writing to the harness: {e}"))
}

fn request(what: &str, step: u64) -> Result<(), String> {
    emit(Event::Request {
        what: what.into(),
        step,
    })
}

/// The trainer's state on its device.
enum State {
    Host(TrainerState),
    Cuda(Arc<DeviceMemory>),
}

impl State {
    fn new(device: LoadDevice, size: u64) -> Result<State, String> {
        match device {
            LoadDevice::Host => {
                let spec = TensorSpec::new(TENSOR, Dtype::U8, vec![size]);
                let state = TrainerState::new(vec![spec])?;
                state.fill(0);
                Ok(State::Host(state))
            }
            LoadDevice::Cuda => {
                let device = CudaDevice::get(0).map_err(|e| format!("CUDA: {e}"))?;
                let memory = DeviceMemory::new(&device, to_usize(size))
                    .map_err(|e| format!("allocating {size} bytes of device memory: {e}"))?;
                let state = State::Cuda(Arc::new(memory));
                state.fill_device(Some(0))?;
                Ok(state)
            }
        }
    }

    fn register(&self, client: &mut Client, size: u64) -> Result<(), String> {
        match self {
            State::Host(state) => state.register(client),
            State::Cuda(memory) => {
                let buffer = memory.buffer(TENSOR).map_err(|e| e.to_string())?;
                client
                    .register(TENSOR, Dtype::U8, vec![size], Buffer::Device(buffer))
                    .map_err(|e| format!("registering device memory: {e}"))
            }
        }
    }

    /// Device memory: the pattern with `step`'s stamp, or (`None`) a
    /// scribble that is not the pattern.
    fn fill_device(&self, step: Option<u64>) -> Result<(), String> {
        let State::Cuda(memory) = self else {
            return Ok(());
        };
        let mut chunk = vec![0xA5u8; DEVICE_CHUNK_BYTES.min(memory.len())];
        let mut offset = 0;
        while offset < memory.len() {
            let len = DEVICE_CHUNK_BYTES.min(memory.len() - offset);
            let piece = &mut chunk[..len];
            if let Some(step) = step {
                state::expected_into(0, offset, step, piece);
            }
            memory
                .write(offset, piece)
                .map_err(|e| format!("writing device memory: {e}"))?;
            offset += len;
        }
        Ok(())
    }

    fn stamp(&self, step: u64) -> Result<(), String> {
        match self {
            State::Host(state) => {
                state.stamp(step);
                Ok(())
            }
            State::Cuda(memory) => {
                let bytes = state::stamp_bytes(0, step);
                let n = bytes.len().min(memory.len());
                memory
                    .write(0, &bytes[..n])
                    .map_err(|e| format!("stamping device memory: {e}"))
            }
        }
    }

    fn scribble(&self) -> Result<(), String> {
        match self {
            State::Host(state) => {
                state.scribble();
                Ok(())
            }
            State::Cuda(_) => self.fill_device(None),
        }
    }

    fn verify(&self, step: u64) -> Result<(), String> {
        match self {
            State::Host(state) => state.verify(step),
            State::Cuda(memory) => {
                let mut want = vec![0u8; DEVICE_CHUNK_BYTES.min(memory.len())];
                let mut offset = 0;
                while offset < memory.len() {
                    let len = DEVICE_CHUNK_BYTES.min(memory.len() - offset);
                    let got = memory
                        .read(offset, len)
                        .map_err(|e| format!("reading device memory: {e}"))?;
                    let want = &mut want[..len];
                    state::expected_into(0, offset, step, want);
                    if let Some(at) = got.iter().zip(want.iter()).position(|(a, b)| a != b) {
                        return Err(format!(
                            "restored device memory differs at byte {} (step {step})",
                            offset + at
                        ));
                    }
                    offset += len;
                }
                Ok(())
            }
        }
    }
}

fn run(args: &TrainerArgs) -> Result<(), String> {
    let state = State::new(args.device, args.size)?;
    let mut config = ClientConfig::new(args.device.job());
    config.socket = args.socket.clone();
    config.rank = args.rank;
    config.world_size = args.world;
    config.copy_threads = 1;
    config.connect_timeout = Duration::from_secs(30);
    config.call_timeout = Duration::from_secs(120);
    config.commit_timeout = Duration::from_secs(300);
    let mut client = Client::with_config(config).map_err(|e| format!("connecting: {e}"))?;
    state.register(&mut client, args.size)?;
    request("register", 0)?;
    let staging = client
        .sync_registration()
        .map_err(|e| format!("registering: {e}"))?;
    let (slots, policy) = (staging.slots, staging.policy.name().to_owned());
    let pinned = client
        .staging_pinning()
        .iter()
        .any(|p| matches!(p, Pinning::Pinned { .. }));
    emit(Event::Registered {
        slots,
        policy,
        pinned,
    })?;

    let duration = wait_for_start()?;
    let interval = Duration::from_millis(args.interval_ms);
    let started = Instant::now();
    let mut commits = Commits::default();
    let (mut captured, mut skipped) = (0u64, 0u64);
    let mut step = 0u64;
    while started.elapsed() < duration {
        step += 1;
        state.stamp(step)?;
        request("snapshot", step)?;
        let t = Instant::now();
        let outcome = client
            .snapshot(step)
            .map_err(|e| format!("snapshot of step {step}: {e}"))?;
        let stall_s = t.elapsed().as_secs_f64();
        let was_captured = matches!(outcome, SnapshotOutcome::Captured(_));
        emit(Event::Snapshot {
            step,
            captured: was_captured,
            stall_s,
        })?;
        if was_captured {
            captured += 1;
            // The client keeps only its last 1024 outcomes, skips included:
            // collect the earlier steps' now (their slot was free for this
            // capture, so they are almost always in already).
            commits.collect(&mut client)?;
            commits.outstanding.push(step);
        } else {
            skipped += 1;
        }
        std::thread::sleep(interval);
    }
    let loop_s = started.elapsed().as_secs_f64();
    commits.collect(&mut client)?;
    let Commits {
        errors: commit_errors,
        newest: newest_committed,
        committed,
        wait_s: commit_wait_s,
        ..
    } = commits;

    let (mut restored_step, mut restore_source, mut restore_verified) = (None, None, false);
    if let Some(newest) = newest_committed {
        state.scribble()?;
        request("restore", newest)?;
        let info = client
            .restore(Step::Latest)
            .map_err(|e| format!("restore: {e}"))?
            .ok_or("restore: the daemon has no snapshot of this rank")?;
        restored_step = Some(info.step);
        restore_source = Some(info.source.name().to_owned());
        if info.step != newest {
            return Err(format!(
                "restore of the latest step gave step {}, not the newest committed {newest}",
                info.step
            ));
        }
        state.verify(newest)?;
        restore_verified = true;
    }
    emit(Event::Done(Box::new(TrainerSummary {
        loop_s,
        captured,
        skipped,
        committed,
        commit_wait_s,
        commit_errors,
        newest_committed,
        restored_step,
        restore_source,
        restore_verified,
    })))
}

/// The commit outcomes a trainer has collected, and the captured steps
/// whose outcome it has not.
#[derive(Debug, Default)]
struct Commits {
    outstanding: Vec<u64>,
    committed: u64,
    newest: Option<u64>,
    errors: Vec<String>,
    /// Time spent in `wait_committed`.
    wait_s: f64,
}

impl Commits {
    /// Waits for the outcome of every outstanding step, each announced to
    /// the watchdog.
    fn collect(&mut self, client: &mut Client) -> Result<(), String> {
        for step in std::mem::take(&mut self.outstanding) {
            request("commit", step)?;
            let t = Instant::now();
            let error = client.wait_committed(step).err().map(|e| e.to_string());
            self.wait_s += t.elapsed().as_secs_f64();
            match &error {
                None => {
                    self.committed += 1;
                    self.newest = self.newest.max(Some(step));
                }
                Some(e) => self.errors.push(format!("step {step}: {e}")),
            }
            emit(Event::Committed { step, error })?;
        }
        Ok(())
    }
}

/// Reads `go <milliseconds>` from stdin: the length of the snapshot loop.
fn wait_for_start() -> Result<Duration, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    // The read blocks; a thread lets the wait be bounded. It ends with the
    // process if the line never comes.
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = std::io::stdin().lock().read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
    });
    let line = rx
        .recv_timeout(START_WAIT)
        .map_err(|_| format!("no start line within {} s", START_WAIT.as_secs()))?
        .map_err(|e| format!("reading the start line: {e}"))?;
    let ms = line
        .trim()
        .strip_prefix("go ")
        .and_then(|ms| ms.parse::<u64>().ok())
        .ok_or_else(|| format!("the start line is {line:?}, not \"go <milliseconds>\""))?;
    Ok(Duration::from_millis(ms))
}
