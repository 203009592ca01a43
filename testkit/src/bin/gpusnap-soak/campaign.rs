//! The campaign: `--kills` rounds, each one kill (of the daemon, of a
//! trainer, of both, of the daemon parked at a commit step, or of every
//! trainer at once), then restarts, then the checks of [`crate::check`],
//! with the daemon's descriptors and memory measured every round.
//!
//! The kinds are drawn from the seed; stop-point rounds take the commit
//! steps in turn, so any run of 7 or more of them hits every step; every
//! `--quiesce-every`-th round kills every trainer and checks the idle
//! daemon (staging back to zero, nothing in progress on disk). A
//! stop-point round whose kill cannot be placed at its step is a violation
//! too, and so is any trainer's client error that no kill explains, a
//! trainer that exits by itself, and the daemon's descriptors or RSS over
//! their bounds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::acklog::{self, Entry};
use crate::check;
use crate::daemon::{DaemonCtl, DaemonError, HOT_TIER_BUDGET_BYTES, Mode, STAGING_BUDGET_BYTES};
use crate::disk;
use crate::fleet::{Fleet, FleetError, TrainerSetup};
use crate::procfs::{self, ProcError, Usage};
use crate::report::{Kind, Report};
use crate::rng::Rng;
use crate::stoppoint::{PARK_MS, Target};

/// Longest a stop-point round waits for a persist to park at its step.
pub const PARK_WAIT: Duration = Duration::from_secs(20);
/// A park seen later than this after it began is left for the next one,
/// so the kill lands with at least `PARK_MS` minus this still to sleep.
const PARK_FRESH: Duration = Duration::from_millis(PARK_MS / 2);
const PARK_POLL: Duration = Duration::from_millis(1);
/// Slack on top of the daemon's first descriptor count, per trainer and in
/// all: each connection holds a socket and its staging memfd, its lane
/// thread an io_uring ring and a data file.
const FD_SLACK: u64 = 64;
const FD_SLACK_PER_TRAINER: u64 = 8;
/// Slack on top of the daemon's first RSS plus every budget.
const RSS_SLACK_BYTES: u64 = 64 << 20;

/// What the campaign runs.
#[derive(Debug, Clone)]
pub struct Params {
    pub daemon: PathBuf,
    pub store: PathBuf,
    pub work: PathBuf,
    pub kills: u64,
    pub seed: u64,
    pub jobs: u32,
    pub ranks: u32,
    pub keep: u64,
    pub quiesce_every: u64,
    pub max_wait_ms: u64,
    pub pause_ms: u64,
    pub smoke: bool,
}

/// Why the campaign could not go on (violations are not errors: they are
/// counted and reported).
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Log(#[from] acklog::AckLogError),
    #[error("the observer's client: {0}")]
    Observer(#[from] gpusnap::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The bounds the daemon's resources are held to.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub fd_base: u64,
    pub fd_max: u64,
    pub rss_base: u64,
    pub rss_max: u64,
}

struct Campaign {
    p: Params,
    rng: Rng,
    daemon: DaemonCtl,
    fleet: Fleet,
    report: Report,
    bounds: Option<Bounds>,
    /// Violation and unexpected-error lines already taken from each
    /// trainer's log.
    seen_violations: BTreeMap<String, (usize, usize)>,
}

impl std::fmt::Debug for Campaign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Campaign")
            .field("params", &self.p)
            .finish_non_exhaustive()
    }
}

/// The kind of each round: every `quiesce_every`-th round kills every
/// trainer; the last tenth of the others kill one trainer each, so one
/// daemon process lives through them all (its descriptors and memory
/// measured across many reconnects); before that, every third parks the
/// daemon at the next commit step in turn (starting at one drawn from the
/// seed), so 30 rounds reach all 7, and the rest are drawn from the seed:
/// the daemon (40 %), a trainer (35 %), both (25 %).
pub fn plan(kills: u64, seed: u64, quiesce_every: u64) -> Vec<Kind> {
    let mut rng = Rng::new(seed ^ 0x91a2_b3c4_d5e6_f708);
    let mut next_target = usize::try_from(rng.below(7)).unwrap_or(0);
    let daemon_lives_from = kills - kills / 10;
    (1..=kills)
        .map(|round| {
            if quiesce_every > 0 && round.is_multiple_of(quiesce_every) {
                return Kind::AllTrainers;
            }
            if round > daemon_lives_from {
                return Kind::Trainer;
            }
            if round.is_multiple_of(3) {
                let t = Target::ALL[next_target % Target::ALL.len()];
                next_target += 1;
                return Kind::StopPoint(t);
            }
            match rng.below(100) {
                0..40 => Kind::Daemon,
                40..75 => Kind::Trainer,
                _ => Kind::Both,
            }
        })
        .collect()
}

fn mode_for(kind: Option<&Kind>) -> Mode {
    match kind {
        Some(Kind::StopPoint(t)) => Mode::Park(*t),
        _ => Mode::Plain,
    }
}

/// Runs the campaign: the report, violations included.
pub fn run(p: Params, exe: PathBuf) -> Result<Report, CampaignError> {
    let io = |what: String| move |source| CampaignError::Io { what, source };
    std::fs::create_dir_all(&p.work).map_err(io(format!("making {}", p.work.display())))?;
    std::fs::create_dir_all(&p.store).map_err(io(format!("making {}", p.store.display())))?;
    let daemon = DaemonCtl::new(&p.daemon, &p.work, &p.store, p.keep)?;
    let setup = TrainerSetup {
        exe,
        socket: daemon.socket(),
        dir: p.work.clone(),
        world: p.ranks,
        seed: p.seed,
        pause_ms: p.pause_ms,
    };
    let fleet = Fleet::new(setup, p.jobs);
    let mut c = Campaign {
        rng: Rng::new(p.seed),
        report: Report::new(&p),
        p,
        daemon,
        fleet,
        bounds: None,
        seen_violations: BTreeMap::new(),
    };
    c.campaign()?;
    Ok(c.report)
}

impl Campaign {
    fn campaign(&mut self) -> Result<(), CampaignError> {
        let started = Instant::now();
        let plan = plan(self.p.kills, self.p.seed, self.p.quiesce_every);
        let first = self.daemon.start(mode_for(plan.first()))?;
        let base = procfs::usage(first)?;
        let trainers = u64::try_from(self.fleet.trainers.len()).unwrap_or(u64::MAX);
        let budgets = STAGING_BUDGET_BYTES + HOT_TIER_BUDGET_BYTES + self.daemon.io_pool_bytes();
        let bounds = Bounds {
            fd_base: base.fds,
            fd_max: base.fds + FD_SLACK + FD_SLACK_PER_TRAINER * trainers,
            rss_base: base.rss_bytes,
            rss_max: base.rss_bytes + budgets + RSS_SLACK_BYTES,
        };
        self.bounds = Some(bounds);
        self.report.bounds = Some(bounds);
        self.fleet.spawn_missing()?;
        // Let every trainer register and commit a little before the first kill.
        std::thread::sleep(Duration::from_millis(300));
        for (round, kind) in plan.iter().enumerate() {
            let next = plan.get(round + 1);
            self.round(round, *kind, next)?;
            if self.report.violations.len() > 50 {
                self.report
                    .violations
                    .push("stopped early: more than 50 violations".to_owned());
                break;
            }
        }
        // The end: every trainer gone, the idle daemon checked, stopped in order.
        for i in 0..self.fleet.trainers.len() {
            self.fleet.kill(i)?;
        }
        self.daemon.ensure(Mode::Plain)?;
        self.check(true)?;
        if let Some(status) = self.daemon.stop()?
            && !status.success()
        {
            self.report
                .violations
                .push(format!("the final orderly stop exited {status}"));
        }
        self.report.orderly_stops = self.daemon.orderly_stops;
        self.report.daemon_starts = self.daemon.starts;
        self.report
            .violations
            .extend(self.daemon.unclean_stops.iter().cloned());
        self.report.duration = started.elapsed();
        Ok(())
    }

    fn random_pause(&mut self) {
        let ms = self.rng.below(self.p.max_wait_ms + 1);
        std::thread::sleep(Duration::from_millis(ms));
    }

    fn random_trainer(&mut self) -> usize {
        let n = u64::try_from(self.fleet.trainers.len()).unwrap_or(1);
        usize::try_from(self.rng.below(n)).unwrap_or(0)
    }

    fn round(
        &mut self,
        round: usize,
        kind: Kind,
        next: Option<&Kind>,
    ) -> Result<(), CampaignError> {
        let starts = self.daemon.starts;
        let trainers_killed = self.report.trainers_killed;
        self.daemon.ensure(mode_for(Some(&kind)))?;
        for exited in self.fleet.exited() {
            self.report
                .violations
                .push(format!("round {round}: {exited}"));
        }
        self.fleet.spawn_missing()?;
        let mut daemon_killed = false;
        match kind {
            Kind::Daemon => {
                self.random_pause();
                self.kill_daemon()?;
                daemon_killed = true;
            }
            Kind::Trainer => {
                self.random_pause();
                let i = self.random_trainer();
                self.kill_trainer(i)?;
            }
            Kind::Both => {
                self.random_pause();
                let i = self.random_trainer();
                let gap = Duration::from_millis(self.rng.below(21));
                if self.rng.below(2) == 0 {
                    self.kill_trainer(i)?;
                    std::thread::sleep(gap);
                    self.kill_daemon()?;
                } else {
                    self.kill_daemon()?;
                    std::thread::sleep(gap);
                    self.kill_trainer(i)?;
                }
                daemon_killed = true;
            }
            Kind::StopPoint(target) => {
                let hit = self.park_and_kill(target)?;
                self.report.stop_point(target, hit);
                if !hit {
                    // The instrument is broken (the daemon's thread names,
                    // its delays, the store's layout changed): fail, so the
                    // stop points cannot rot into random kills unnoticed.
                    self.report.violations.push(format!(
                        "round {round}: no persist parked at {} within {PARK_WAIT:?}; the daemon was killed unplaced",
                        target.name()
                    ));
                }
                daemon_killed = true;
            }
            Kind::AllTrainers => {
                self.random_pause();
                for i in 0..self.fleet.trainers.len() {
                    self.kill_trainer(i)?;
                }
            }
        }
        self.report
            .kinds
            .entry(kind.label())
            .and_modify(|n| *n += 1)
            .or_insert(1);
        if daemon_killed {
            self.daemon.start(mode_for(next))?;
        }
        let idle = kind == Kind::AllTrainers;
        self.check(idle)?;
        if self.daemon.starts == starts {
            self.report
                .daemon_lived(self.report.trainers_killed - trainers_killed);
        } else {
            self.report.daemon_restarted();
        }
        self.fleet.spawn_missing()?;
        if (round + 1).is_multiple_of(50) || self.p.smoke {
            eprintln!(
                "gpusnap-soak: round {}/{} ({}), {} acknowledged, {} violations, {:.0?}",
                round + 1,
                self.p.kills,
                kind.label(),
                self.report.acks,
                self.report.violations.len(),
                self.report.started.elapsed()
            );
        }
        Ok(())
    }

    fn kill_daemon(&mut self) -> Result<(), CampaignError> {
        if self.daemon.exited_by_itself() {
            self.report.violations.push(format!(
                "the daemon exited before it was killed; log:\n{}",
                self.daemon.log_tail(30)
            ));
        }
        self.daemon.kill()?;
        self.report.daemons_killed += 1;
        Ok(())
    }

    fn kill_trainer(&mut self, i: usize) -> Result<(), CampaignError> {
        if self.fleet.kill(i)? {
            self.report.trainers_killed += 1;
        }
        Ok(())
    }

    /// Waits for a persist thread to park at `target` (a fresh park, with
    /// the store in the step's state) and SIGKILLs the daemon inside it.
    /// Whether the kill landed there; after [`PARK_WAIT`] it is killed
    /// anyway and the round counts as a miss (a violation: see `round`).
    fn park_and_kill(&mut self, target: Target) -> Result<bool, CampaignError> {
        let pid = self.daemon.pid().ok_or(DaemonError::Launch(
            gpusnapd_testkit::LaunchError::NotRunning,
        ))?;
        let started = Instant::now();
        let mut first_seen: BTreeMap<(u32, u64), Instant> = BTreeMap::new();
        let mut hit = false;
        while started.elapsed() < PARK_WAIT {
            let parks = procfs::parked_persist_threads(pid)?;
            let now = Instant::now();
            first_seen.retain(|k, _| parks.contains(k));
            for park in &parks {
                first_seen.entry(*park).or_insert(now);
            }
            let fresh = first_seen
                .values()
                .any(|t| now.duration_since(*t) <= PARK_FRESH);
            if fresh {
                let disk = disk::in_progress(&self.p.store);
                if disk.as_ref().is_ok_and(|d| target.matches(d)) {
                    hit = true;
                    break;
                }
            }
            std::thread::sleep(PARK_POLL);
        }
        self.kill_daemon()?;
        Ok(hit)
    }

    /// Every trainer's log entries, and their new violation lines counted.
    fn read_logs(&mut self) -> Result<BTreeMap<(u32, u32), Vec<Entry>>, CampaignError> {
        let mut out = BTreeMap::new();
        let dir = self.fleet.setup.dir.clone();
        let mut acks = 0;
        let mut restores = 0;
        let mut errors = 0;
        let mut unexpected = BTreeMap::new();
        for t in &self.fleet.trainers {
            let entries = acklog::read(&t.log_path(&dir))?;
            let (seen, seen_unexpected) = self.seen_violations.entry(t.name()).or_insert((0, 0));
            let mut violations = 0;
            let mut unexpected_lines = 0;
            for e in &entries {
                match e {
                    Entry::Ack(_) => acks += 1,
                    Entry::Restore(_) => restores += 1,
                    Entry::Error(_) => errors += 1,
                    Entry::Unexpected(what) => {
                        let kind = what.split(':').next().unwrap_or("").to_owned();
                        *unexpected.entry(kind).or_insert(0u64) += 1;
                        unexpected_lines += 1;
                        if unexpected_lines > *seen_unexpected {
                            self.report.violations.push(format!(
                                "trainer {}: a client call failed in a way no kill explains: {what}",
                                t.name()
                            ));
                        }
                    }
                    Entry::Violation(what) => {
                        violations += 1;
                        if violations > *seen {
                            self.report
                                .violations
                                .push(format!("trainer {}: {what}", t.name()));
                        }
                    }
                }
            }
            *seen = violations.max(*seen);
            *seen_unexpected = unexpected_lines.max(*seen_unexpected);
            out.insert((t.job, t.rank), entries);
        }
        self.report.acks = acks;
        self.report.restores_checked = restores;
        self.report.client_errors = errors;
        self.report.unexpected_errors = unexpected;
        Ok(out)
    }

    /// The checks of one round (and the idle ones when `idle`), and the
    /// daemon's resources against their bounds.
    fn check(&mut self, idle: bool) -> Result<(), CampaignError> {
        if idle {
            let socket = self.daemon.socket();
            let waited = check::wait_idle(
                &socket,
                &self.p.store,
                check::IDLE_WAIT,
                &mut self.report.violations,
            )?;
            check::disk_is_listed(
                &socket,
                &self.p.store,
                self.p.jobs,
                &mut self.report.violations,
            )?;
            self.report.idle_checks += 1;
            self.report.idle_wait_max = self.report.idle_wait_max.max(waited.waited);
        }
        let acks = self.read_logs()?;
        let counted = check::listing_and_bytes(
            &self.daemon.socket(),
            &self.p.store,
            self.p.seed,
            self.p.jobs,
            self.p.keep,
            &acks,
            &mut self.report.violations,
        )?;
        self.report.checks += 1;
        self.report.acks_checked += counted.acks_checked;
        self.report.snapshots_verified += counted.snapshots_verified;
        self.report.retired_while_checked += counted.retired_while_checked;
        if let Some(pid) = self.daemon.pid() {
            let usage = procfs::usage(pid)?;
            self.measure(usage, idle);
        }
        Ok(())
    }

    fn measure(&mut self, usage: Usage, idle: bool) {
        self.report.measure(usage, idle);
        let Some(b) = self.bounds else { return };
        if usage.fds > b.fd_max {
            self.report.violations.push(format!(
                "the daemon holds {} descriptors, over the bound {}",
                usage.fds, b.fd_max
            ));
        }
        if usage.rss_bytes > b.rss_max || usage.hwm_bytes > b.rss_max {
            self.report.violations.push(format!(
                "the daemon's RSS {} (peak {}) bytes is over the bound {}",
                usage.rss_bytes, usage.hwm_bytes, b.rss_max
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_rounds_reach_every_commit_step_and_every_kind() {
        for seed in 0..50 {
            let kinds = plan(30, seed, 10);
            assert_eq!(kinds.len(), 30);
            for t in Target::ALL {
                assert!(
                    kinds.contains(&Kind::StopPoint(t)),
                    "seed {seed}: {t:?} missing"
                );
            }
            let quiesced = kinds.iter().filter(|k| **k == Kind::AllTrainers).count();
            assert_eq!(quiesced, 3, "seed {seed}");
            assert_eq!(plan(30, seed, 10), kinds, "the seed decides");
        }
        let kinds = plan(1000, 7, 10);
        for kind in [Kind::Daemon, Kind::Trainer, Kind::Both] {
            let n = kinds.iter().filter(|k| **k == kind).count();
            assert!(n > 100, "{kind:?}: {n}");
        }
        let tail = &kinds[900..];
        assert!(
            tail.iter()
                .all(|k| matches!(k, Kind::Trainer | Kind::AllTrainers)),
            "the daemon lives through the last tenth: {tail:?}"
        );
    }
}
