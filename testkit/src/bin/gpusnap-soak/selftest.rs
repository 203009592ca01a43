//! `gpusnap-soak selftest`: the checks must catch what they look for, so a
//! campaign's "0 violations" cannot come from checks that see nothing.
//! Against a real daemon and one real trainer, each planted fault must be
//! reported, and the clean state must not be:
//!
//! 1. a step acknowledged in the log that the daemon never committed;
//! 2. one flipped byte in the newest listed snapshot's data file;
//! 3. the same flip seen by a trainer's start-up restore (the daemon
//!    restarted, so the hot tier cannot serve it): the trainer logs a
//!    violation (the restore walks back past the corrupt step);
//! 4. a registered client still connected when the daemon should be idle
//!    (staging in use);
//! 5. a `.partial` directory on disk when the daemon is idle;
//! 6. a `step-<N>` directory that is no valid snapshot (so not listed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpusnap::{Client, ClientConfig, Dtype, HostTensor};

use crate::acklog::{self, Entry};
use crate::campaign::CampaignError;
use crate::check;
use crate::daemon::{DaemonCtl, Mode};
use crate::disk;
use crate::fleet::{Fleet, TrainerSetup};
use crate::state;

/// Acknowledged commits the trainer makes before the faults are planted.
const ACKS_BEFORE: usize = 6;
/// Longest wait for the trainer's acknowledgments or its restore.
const TRAINER_WAIT: Duration = Duration::from_secs(60);
/// The idle wait of the planted staging fault (it must run out).
const SHORT_IDLE: Duration = Duration::from_secs(1);

/// Where the self-test runs.
#[derive(Debug, Clone)]
pub struct SelfTestParams {
    pub daemon: PathBuf,
    pub store: PathBuf,
    pub work: PathBuf,
    pub seed: u64,
}

/// The outcome: each plant's name and whether it was caught, and any
/// violation the clean state reported.
#[derive(Debug, Default)]
pub struct SelfTest {
    pub plants: Vec<(&'static str, bool)>,
    pub clean_state_violations: Vec<String>,
}

impl SelfTest {
    /// Every plant caught and the clean state clean.
    pub fn passed(&self) -> bool {
        self.clean_state_violations.is_empty() && self.plants.iter().all(|(_, caught)| *caught)
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> CampaignError {
    move |source| CampaignError::Io { what, source }
}

fn logs(fleet: &Fleet) -> Result<BTreeMap<(u32, u32), Vec<Entry>>, CampaignError> {
    let mut out = BTreeMap::new();
    for t in &fleet.trainers {
        out.insert(
            (t.job, t.rank),
            acklog::read(&t.log_path(&fleet.setup.dir))?,
        );
    }
    Ok(out)
}

fn wait_log(
    fleet: &Fleet,
    what: &str,
    done: impl Fn(&[Entry]) -> bool,
) -> Result<(), CampaignError> {
    let path = fleet.trainers[0].log_path(&fleet.setup.dir);
    let started = Instant::now();
    while started.elapsed() < TRAINER_WAIT {
        if done(&acklog::read(&path)?) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(CampaignError::Io {
        what: format!("self-test: waiting for the trainer to {what}"),
        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
    })
}

/// Flips the last byte of the data file in `dir` (tensor data: the file
/// ends with the data section).
fn flip_last_byte(dir: &Path) -> Result<(), CampaignError> {
    use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
    let path = dir.join("state.safetensors");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    let mut byte = [0u8; 1];
    let what = format!("flipping the last byte of {}", path.display());
    f.seek(SeekFrom::End(-1)).map_err(io(what.clone()))?;
    f.read_exact(&mut byte).map_err(io(what.clone()))?;
    byte[0] ^= 0x5a;
    f.seek(SeekFrom::End(-1)).map_err(io(what.clone()))?;
    f.write_all(&byte).map_err(io(what.clone()))?;
    f.sync_all().map_err(io(what))
}

/// Runs the self-test.
pub fn run(p: &SelfTestParams, exe: PathBuf) -> Result<SelfTest, CampaignError> {
    std::fs::create_dir_all(&p.work).map_err(io(format!("making {}", p.work.display())))?;
    std::fs::create_dir_all(&p.store).map_err(io(format!("making {}", p.store.display())))?;
    let keep = 3;
    let mut daemon = DaemonCtl::new(&p.daemon, &p.work, &p.store, keep)?;
    daemon.start(Mode::Plain)?;
    let socket = daemon.socket();
    let setup = TrainerSetup {
        exe,
        socket: socket.clone(),
        dir: p.work.clone(),
        world: 1,
        seed: p.seed,
        pause_ms: 5,
    };
    let mut fleet = Fleet::new(setup, 1);
    let mut out = SelfTest::default();
    fleet.spawn(0)?;
    wait_log(&fleet, "acknowledge its commits", |e| {
        e.iter().filter(|e| matches!(e, Entry::Ack(_))).count() >= ACKS_BEFORE
    })?;
    fleet.kill(0)?;

    // The clean state.
    let mut v = Vec::new();
    check::wait_idle(&socket, &p.store, check::IDLE_WAIT, &mut v)?;
    check::disk_is_listed(&socket, &p.store, 1, &mut v)?;
    let clean = logs(&fleet)?;
    check::listing_and_bytes(&socket, &p.store, p.seed, 1, keep, &clean, &mut v)?;
    out.clean_state_violations = v;
    let last = clean
        .values()
        .find_map(|e| acklog::last_ack(e))
        .unwrap_or(0);

    // 1. An acknowledgment of a step never committed.
    let mut planted = clean.clone();
    for entries in planted.values_mut() {
        entries.push(Entry::Ack(last + 10_000));
    }
    let mut v = Vec::new();
    check::listing_and_bytes(&socket, &p.store, p.seed, 1, keep, &planted, &mut v)?;
    out.plants.push((
        "an acknowledged step that is not listed",
        v.iter().any(|m| m.contains("not listed")),
    ));

    // 2. A flipped byte in the newest listed snapshot (the last acknowledged
    //    step is the newest: the trainer was killed after it or before the
    //    next one committed, and nothing commits now).
    let mut observer = check::observer(&socket)?;
    let newest = observer
        .list_job(Some(&state::job_name(0)))?
        .snapshots
        .iter()
        .map(|s| s.step)
        .max()
        .unwrap_or(last);
    let dir = disk::snapshot_dir(&p.store, &state::job_name(0), 0, newest);
    flip_last_byte(&dir)?;
    let mut v = Vec::new();
    check::listing_and_bytes(&socket, &p.store, p.seed, 1, keep, &clean, &mut v)?;
    out.plants.push((
        "a flipped byte in a listed snapshot",
        v.iter().any(|m| m.contains("differs")),
    ));

    // 3. The trainer's restore check sees the same flip from disk.
    drop(observer);
    daemon.kill()?;
    daemon.start(Mode::Plain)?;
    let restores_before = clean
        .values()
        .flatten()
        .filter(|e| matches!(e, Entry::Restore(_)))
        .count();
    fleet.spawn(0)?;
    wait_log(&fleet, "restore", |e| {
        e.iter().filter(|e| matches!(e, Entry::Restore(_))).count() > restores_before
    })?;
    fleet.kill(0)?;
    let after = logs(&fleet)?;
    let trainer_saw = after
        .values()
        .flatten()
        .any(|e| matches!(e, Entry::Violation(m) if m.contains("walked back") || m.contains("acknowledged")));
    out.plants.push((
        "a corrupt newest snapshot, seen by a trainer's restore",
        trainer_saw,
    ));
    // Retention keeps the corrupt step only until newer ones push it out;
    // the remaining plants do not read snapshots.

    // 4. Staging still in use: a registered client stays connected.
    let mut config = ClientConfig::new("soak-selftest-holder");
    config.socket = socket.clone();
    let mut holder = Client::with_config(config)?;
    let tensor = HostTensor::zeros(Dtype::U8, [1 << 20])?;
    holder.register_host("held", &tensor)?;
    holder.sync_registration()?;
    let mut v = Vec::new();
    check::wait_idle(&socket, &p.store, SHORT_IDLE, &mut v)?;
    out.plants.push((
        "staging held by a connected client",
        v.iter().any(|m| m.contains("staging used")),
    ));
    drop(holder);

    // 5. Work in progress on disk while idle.
    let partial = p
        .store
        .join(state::job_name(0))
        .join("0")
        .join("step-999999999.partial");
    std::fs::create_dir(&partial).map_err(io(format!("making {}", partial.display())))?;
    let mut v = Vec::new();
    check::wait_idle(&socket, &p.store, check::IDLE_WAIT, &mut v)?;
    out.plants.push((
        "a .partial directory while idle",
        v.iter().any(|m| m.contains("in progress")),
    ));
    std::fs::remove_dir(&partial).map_err(io(format!("removing {}", partial.display())))?;

    // 6. A committed name over something that is no snapshot.
    let bogus = p
        .store
        .join(state::job_name(0))
        .join("0")
        .join("step-999999998");
    std::fs::create_dir(&bogus).map_err(io(format!("making {}", bogus.display())))?;
    let mut v = Vec::new();
    check::disk_is_listed(&socket, &p.store, 1, &mut v)?;
    out.plants.push((
        "a step directory that is not a valid snapshot",
        v.iter().any(|m| m.contains("not listed")),
    ));
    std::fs::remove_dir(&bogus).map_err(io(format!("removing {}", bogus.display())))?;
    daemon.stop()?;
    Ok(out)
}
