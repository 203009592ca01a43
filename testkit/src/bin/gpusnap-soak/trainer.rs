//! `gpusnap-soak trainer`: one (job, rank) as its own process, so that
//! killing a trainer is a real SIGKILL. It registers the tensors of
//! [`crate::state::tensors`], restores Latest and checks every restored byte
//! (and that the step is not older than the last one it was told was
//! committed), then snapshots step after step, filling each with that
//! step's bytes, and logs each acknowledged commit, synced, before it counts
//! it ([`crate::acklog`]).
//!
//! It stops by itself after [`STEPS_MAX`] steps, when its parent is gone
//! (and the kernel kills it when its parent dies: `PR_SET_PDEATHSIG`), or
//! when its log cannot be written.

use std::path::PathBuf;
use std::time::Duration;

use gpusnap::{Client, ClientConfig, Error, HostTensor, SnapshotOutcome, Step, TensorSpec};

use crate::acklog::{self, AckLog, AckLogError, Entry};
use crate::state;

/// Steps one trainer process takes at most.
pub const STEPS_MAX: u64 = 1_000_000;
/// Tries at connecting and registering, and at the start-up restore, before
/// the trainer gives up (each try waits out the client's own timeouts).
const TRIES_MAX: u32 = 40;
/// Pause between failed tries.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What `trainer` was started with.
#[derive(Debug, Clone)]
pub struct TrainerParams {
    pub socket: PathBuf,
    pub job: u32,
    pub rank: u32,
    pub world: u32,
    pub seed: u64,
    pub log: PathBuf,
    pub pause: Duration,
}

/// Why a trainer stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error(transparent)]
    Log(#[from] AckLogError),
    #[error("allocating tensor {name}: {source}")]
    Allocate { name: String, source: Error },
    #[error("no registration after {TRIES_MAX} tries; last: {0}")]
    Register(#[source] Error),
    #[error("the start-up restore failed {TRIES_MAX} times; last: {0}")]
    Restore(#[source] Error),
    #[error("PR_SET_PDEATHSIG: {0}")]
    DeathSignal(#[source] nix::Error),
}

/// Whether a kill of the daemon or of this trainer's previous process
/// explains `e` (the connection broke, the daemon was away, the rank still
/// held by the connection that died); anything else is unexpected.
pub fn kill_explained(e: &Error) -> bool {
    matches!(
        e,
        Error::DaemonUnavailable { .. }
            | Error::Disconnected(_)
            | Error::Lost { .. }
            | Error::Timeout { .. }
            | Error::ShuttingDown(_)
            | Error::Busy(_)
            | Error::NotFound(_)
    )
}

/// The variant's name and the message, for the log.
fn describe(e: &Error) -> String {
    let debug = format!("{e:?}");
    let kind = debug.split([' ', '(', '{']).next().unwrap_or("Error");
    format!("{kind}: {e}")
}

struct Trainer<'p> {
    params: &'p TrainerParams,
    specs: Vec<TensorSpec>,
    tensors: Vec<HostTensor>,
    log: AckLog,
}

impl std::fmt::Debug for Trainer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("job", &self.params.job)
            .field("rank", &self.params.rank)
            .finish_non_exhaustive()
    }
}

/// Runs the trainer until [`STEPS_MAX`] or its parent is gone.
pub fn run(params: &TrainerParams) -> Result<(), TrainerError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(TrainerError::DeathSignal)?;
    let parent = std::os::unix::process::parent_id();
    let specs = state::tensors(params.job, params.rank);
    let tensors = specs
        .iter()
        .map(|s| {
            HostTensor::zeros(s.dtype, s.shape.clone()).map_err(|source| TrainerError::Allocate {
                name: s.name.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let acked = acklog::last_ack(&acklog::read(&params.log)?);
    let mut trainer = Trainer {
        params,
        specs,
        tensors,
        log: AckLog::open(&params.log)?,
    };
    let client = trainer.connect()?;
    let (mut client, restored) = trainer.check_restore(client, acked)?;
    let first = acked.max(restored).map_or(1, |s| s + 1);
    for step in first..first + STEPS_MAX {
        if std::os::unix::process::parent_id() != parent {
            return Ok(());
        }
        trainer.fill(step);
        if let Err(e) = trainer.snapshot(&mut client, step)? {
            trainer.record(&e)?;
            // The old connection goes first: it may still hold the rank.
            drop(client);
            client = trainer.connect()?;
        }
        std::thread::sleep(params.pause);
    }
    Ok(())
}

impl Trainer<'_> {
    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new(state::job_name(self.params.job));
        config.socket = self.params.socket.clone();
        config.rank = self.params.rank;
        config.world_size = self.params.world;
        config.connect_timeout = Duration::from_secs(20);
        config.busy_timeout = Some(Duration::from_secs(20));
        config.call_timeout = Duration::from_secs(20);
        config.commit_timeout = Duration::from_secs(30);
        config.copy_threads = 1;
        config
    }

    /// A client with the tensors registered, retried while kills explain
    /// the failures.
    fn connect(&mut self) -> Result<Client, TrainerError> {
        let mut last = None;
        for _ in 0..TRIES_MAX {
            match self.try_connect() {
                Ok(client) => return Ok(client),
                Err(e) => {
                    self.record(&e)?;
                    last = Some(e);
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
        Err(TrainerError::Register(last.unwrap_or_else(|| {
            Error::Disconnected("no try was made".to_owned())
        })))
    }

    fn try_connect(&self) -> Result<Client, Error> {
        let mut client = Client::with_config(self.config())?;
        for (spec, tensor) in self.specs.iter().zip(&self.tensors) {
            client.register_host(spec.name.clone(), tensor)?;
        }
        client.sync_registration()?;
        Ok(client)
    }

    /// Logs `e` as explained by a kill, or as unexpected.
    fn record(&mut self, e: &Error) -> Result<(), TrainerError> {
        let entry = if kill_explained(e) {
            Entry::Error(describe(e))
        } else {
            Entry::Unexpected(describe(e))
        };
        Ok(self.log.append(&entry)?)
    }

    fn fill(&self, step: u64) {
        let p = self.params;
        for (index, tensor) in self.tensors.iter().enumerate() {
            state::fill(p.seed, p.job, p.rank, step, index, &mut tensor.write());
        }
    }

    /// Restores Latest and checks it: exactly the bytes of its step, no
    /// walk-back, not older than `acked`, something when `acked` is. The
    /// client (a new one after a failed try) and the step restored, if any.
    fn check_restore(
        &mut self,
        mut client: Client,
        acked: Option<u64>,
    ) -> Result<(Client, Option<u64>), TrainerError> {
        let mut last = None;
        for _ in 0..TRIES_MAX {
            match client.restore(Step::Latest) {
                Ok(info) => {
                    let step = info.as_ref().map(|i| i.step);
                    let mut problems = Vec::new();
                    if let Some(info) = &info {
                        problems.extend(self.differences(info.step));
                        if !info.walked_back.is_empty() {
                            problems.push(format!(
                                "the restore of step {} walked back past {:?}",
                                info.step, info.walked_back
                            ));
                        }
                    }
                    if let Some(acked) = acked
                        && step.is_none_or(|s| s < acked)
                    {
                        problems.push(format!(
                            "restored {step:?}, but step {acked} was acknowledged as committed"
                        ));
                    }
                    for problem in problems {
                        self.log.append(&Entry::Violation(format!(
                            "{} rank {}: {problem}",
                            state::job_name(self.params.job),
                            self.params.rank
                        )))?;
                    }
                    self.log.append(&Entry::Restore(step))?;
                    return Ok((client, step));
                }
                Err(e) => {
                    self.record(&e)?;
                    last = Some(e);
                    std::thread::sleep(RETRY_PAUSE);
                    // The old connection goes first: it may still hold the rank.
                    drop(client);
                    client = self.connect()?;
                }
            }
        }
        Err(TrainerError::Restore(last.unwrap_or_else(|| {
            Error::Disconnected("no try was made".to_owned())
        })))
    }

    /// Each registered tensor whose bytes are not those of `step`.
    fn differences(&self, step: u64) -> Vec<String> {
        let p = self.params;
        let mut out = Vec::new();
        for (index, (spec, tensor)) in self.specs.iter().zip(&self.tensors).enumerate() {
            let bytes = tensor.read();
            let len = state::byte_len(spec);
            if let Some(at) =
                state::first_difference(p.seed, p.job, p.rank, step, index, &bytes, len)
            {
                out.push(format!(
                    "restored step {step}: tensor {} differs at byte {at}",
                    spec.name
                ));
            }
        }
        out
    }

    /// One snapshot, waited for until committed, and its acknowledgment
    /// logged; a step the daemon already has (a commit an earlier process
    /// of this rank never heard of) is skipped.
    /// The outer error is the log's (the trainer stops: it cannot count
    /// what it cannot log), the inner one the client's.
    fn snapshot(
        &mut self,
        client: &mut Client,
        step: u64,
    ) -> Result<Result<(), Error>, TrainerError> {
        let committed = match client.snapshot(step) {
            Ok(SnapshotOutcome::Captured(_)) => client.wait_committed(step).map(|_| true),
            Ok(SnapshotOutcome::Skipped { .. }) => Ok(false),
            Err(e) => Err(e),
        };
        match committed {
            Ok(true) => {
                self.log.append(&Entry::Ack(step))?;
                Ok(Ok(()))
            }
            Ok(false) => Ok(Ok(())),
            Err(e) => Ok(Err(e)),
        }
    }
}
