//! The trainer processes: one `gpusnap-soak trainer` child per (job,
//! rank), spawned, SIGKILLed and reaped, respawned on the same log. The
//! fleet kills and reaps every child still running when it drops.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// How long a SIGKILLed trainer may take to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(2);
/// Lines of a trainer's stderr a report of its exit carries.
const STDERR_TAIL_LINES: usize = 10;

/// Why a trainer could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trainer {name} (pid {pid}): {what}: {source}")]
    Signal {
        name: String,
        pid: u32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("trainer {name} (pid {pid}) was not reaped within {REAP_WAIT:?} of SIGKILL")]
    NotReaped { name: String, pid: u32 },
}

/// What every trainer is started with.
#[derive(Debug, Clone)]
pub struct TrainerSetup {
    pub exe: PathBuf,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub world: u32,
    pub seed: u64,
    pub pause_ms: u64,
}

/// One (job, rank) and its process, if running.
#[derive(Debug)]
pub struct Trainer {
    pub job: u32,
    pub rank: u32,
    child: Option<Child>,
}

impl Trainer {
    /// `soak-job<j>-r<r>`.
    pub fn name(&self) -> String {
        format!("{}-r{}", crate::state::job_name(self.job), self.rank)
    }

    /// Its acknowledgment log.
    pub fn log_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.log", self.name()))
    }

    fn stderr_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.stderr", self.name()))
    }
}

/// Every trainer of the campaign.
#[derive(Debug)]
pub struct Fleet {
    pub setup: TrainerSetup,
    pub trainers: Vec<Trainer>,
}

impl Fleet {
    /// `jobs` x `ranks` trainers, none running yet.
    pub fn new(setup: TrainerSetup, jobs: u32) -> Fleet {
        let trainers = (0..jobs)
            .flat_map(|job| {
                (0..setup.world).map(move |rank| Trainer {
                    job,
                    rank,
                    child: None,
                })
            })
            .collect();
        Fleet { setup, trainers }
    }

    /// Starts trainer `i` (it must not be running).
    pub fn spawn(&mut self, i: usize) -> Result<(), FleetError> {
        let s = &self.setup;
        let t = &mut self.trainers[i];
        let stderr_path = t.stderr_path(&s.dir);
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .map_err(|source| FleetError::Io {
                what: "opening",
                path: stderr_path.clone(),
                source,
            })?;
        let child = Command::new(&s.exe)
            .arg("trainer")
            .arg("--socket")
            .arg(&s.socket)
            .arg("--log")
            .arg(t.log_path(&s.dir))
            .args(["--job", &t.job.to_string()])
            .args(["--rank", &t.rank.to_string()])
            .args(["--world", &s.world.to_string()])
            .args(["--seed", &s.seed.to_string()])
            .args(["--pause-ms", &s.pause_ms.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| FleetError::Io {
                what: "starting a trainer from",
                path: s.exe.clone(),
                source,
            })?;
        t.child = Some(child);
        Ok(())
    }

    /// Starts every trainer that is not running.
    pub fn spawn_missing(&mut self) -> Result<(), FleetError> {
        for i in 0..self.trainers.len() {
            if self.trainers[i].child.is_none() {
                self.spawn(i)?;
            }
        }
        Ok(())
    }

    /// SIGKILLs trainer `i` and reaps it; whether it was running.
    pub fn kill(&mut self, i: usize) -> Result<bool, FleetError> {
        let t = &mut self.trainers[i];
        let Some(mut child) = t.child.take() else {
            return Ok(false);
        };
        let pid = child.id();
        let signal_err = |what, source| FleetError::Signal {
            name: t.name(),
            pid,
            what,
            source,
        };
        let raw = i32::try_from(pid).map_err(|e| signal_err("pid", std::io::Error::other(e)))?;
        // The child is not reaped yet, so its pid cannot have been reused.
        match nix::sys::signal::kill(Pid::from_raw(raw), Signal::SIGKILL) {
            Ok(()) | Err(nix::Error::ESRCH) => {}
            Err(e) => return Err(signal_err("SIGKILL", e.into())),
        }
        let deadline = Instant::now() + REAP_WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(true),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                Ok(None) => {
                    let name = t.name();
                    t.child = Some(child);
                    return Err(FleetError::NotReaped { name, pid });
                }
                Err(e) => return Err(signal_err("waiting for", e)),
            }
        }
    }

    /// Trainers that exited by themselves since the last look: their name,
    /// exit status and the tail of their stderr. They are no longer running.
    pub fn exited(&mut self) -> Vec<String> {
        let dir = self.setup.dir.clone();
        let mut out = Vec::new();
        for t in &mut self.trainers {
            let Some(child) = t.child.as_mut() else {
                continue;
            };
            let status = match child.try_wait() {
                Ok(Some(status)) => status.to_string(),
                Ok(None) => continue,
                Err(e) => format!("(cannot wait: {e})"),
            };
            t.child = None;
            let stderr = std::fs::read_to_string(t.stderr_path(&dir)).unwrap_or_default();
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join(" | ");
            out.push(format!(
                "trainer {} exited by itself ({status}): {tail}",
                t.name()
            ));
        }
        out
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for i in 0..self.trainers.len() {
            if let Err(e) = self.kill(i) {
                eprintln!("gpusnap-soak: {e}");
            }
        }
    }
}
