//! What a campaign counted and measured, and its printed summary.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::campaign::{Bounds, Params};

use crate::procfs::Usage;
use crate::stoppoint::Target;

/// The kill of one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The daemon, at a random moment.
    Daemon,
    /// One trainer, at a random moment.
    Trainer,
    /// One trainer and the daemon, within 20 ms of each other.
    Both,
    /// The daemon, parked at a commit step.
    StopPoint(Target),
    /// Every trainer, then the idle checks.
    AllTrainers,
}

impl Kind {
    /// The report's name for it.
    pub fn label(self) -> String {
        match self {
            Kind::Daemon => "daemon".to_owned(),
            Kind::Trainer => "trainer".to_owned(),
            Kind::Both => "both".to_owned(),
            Kind::StopPoint(t) => format!("stop-point {}", t.name()),
            Kind::AllTrainers => "all-trainers".to_owned(),
        }
    }
}

/// One daemon process's life: the rounds it lived through, the trainers
/// killed (each reconnecting) meanwhile, and its resources over it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Life {
    pub rounds: u64,
    pub trainer_kills: u64,
    /// The first measurement of this life and the largest of each figure.
    pub first: Option<Usage>,
    pub fds_max: u64,
    pub rss_max: u64,
    /// The first and the last measurement taken idle (no trainer
    /// connected): equal figures there mean nothing grew with the
    /// reconnects between them.
    pub idle_first: Option<Usage>,
    pub idle_last: Option<Usage>,
}

impl Life {
    fn measure(&mut self, u: Usage, idle: bool) {
        self.first.get_or_insert(u);
        self.fds_max = self.fds_max.max(u.fds);
        self.rss_max = self.rss_max.max(u.rss_bytes);
        if idle {
            self.idle_first.get_or_insert(u);
            self.idle_last = Some(u);
        }
    }
}

/// The campaign's counts, measurements and violations.
#[derive(Debug)]
pub struct Report {
    pub params: Params,
    pub started: Instant,
    pub duration: Duration,
    /// Rounds of each kind.
    pub kinds: BTreeMap<String, u64>,
    /// Stop-point rounds whose kill did not land at the step (killed after
    /// the wait instead).
    pub stop_point_misses: BTreeMap<&'static str, u64>,
    pub daemons_killed: u64,
    pub trainers_killed: u64,
    pub daemon_starts: u64,
    pub orderly_stops: u64,
    /// Acknowledged commits in the trainers' logs.
    pub acks: u64,
    /// Start-up restores the trainers checked byte for byte.
    pub restores_checked: u64,
    /// Client calls that failed in a way a kill explains.
    pub client_errors: u64,
    /// Client calls that failed in a way no kill explains, by error kind.
    pub unexpected_errors: BTreeMap<String, u64>,
    pub checks: u64,
    pub acks_checked: u64,
    pub snapshots_verified: u64,
    pub retired_while_checked: u64,
    pub idle_checks: u64,
    pub idle_wait_max: Duration,
    pub bounds: Option<Bounds>,
    pub fds: Option<(u64, u64)>,
    /// The running daemon's life so far.
    pub life: Life,
    /// The longest life of one daemon process.
    pub longest_life: Life,
    pub rss_max: u64,
    pub hwm_max: u64,
    pub violations: Vec<String>,
}

impl Report {
    /// An empty report of a campaign of `params`, its clock started.
    pub fn new(params: &Params) -> Report {
        Report {
            params: params.clone(),
            started: Instant::now(),
            duration: Duration::ZERO,
            kinds: BTreeMap::new(),
            stop_point_misses: BTreeMap::new(),
            daemons_killed: 0,
            trainers_killed: 0,
            daemon_starts: 0,
            orderly_stops: 0,
            acks: 0,
            restores_checked: 0,
            client_errors: 0,
            unexpected_errors: BTreeMap::new(),
            checks: 0,
            acks_checked: 0,
            snapshots_verified: 0,
            retired_while_checked: 0,
            idle_checks: 0,
            idle_wait_max: Duration::ZERO,
            bounds: None,
            fds: None,
            life: Life::default(),
            longest_life: Life::default(),
            rss_max: 0,
            hwm_max: 0,
            violations: Vec::new(),
        }
    }

    /// Counts a stop-point round's outcome.
    pub fn stop_point(&mut self, target: Target, hit: bool) {
        if !hit {
            *self.stop_point_misses.entry(target.name()).or_insert(0) += 1;
        }
    }

    /// The daemon lived through one more round, in which `trainer_kills`
    /// trainers were killed.
    pub fn daemon_lived(&mut self, trainer_kills: u64) {
        self.life.rounds += 1;
        self.life.trainer_kills += trainer_kills;
        if self.life.rounds > self.longest_life.rounds {
            self.longest_life = self.life;
        }
    }

    /// The daemon was started again in this round.
    pub fn daemon_restarted(&mut self) {
        self.life = Life::default();
    }

    /// Takes one measurement of the daemon (`idle`: with no trainer
    /// connected).
    pub fn measure(&mut self, u: Usage, idle: bool) {
        self.life.measure(u, idle);
        self.fds = Some(match self.fds {
            None => (u.fds, u.fds),
            Some((lo, hi)) => (lo.min(u.fds), hi.max(u.fds)),
        });
        self.rss_max = self.rss_max.max(u.rss_bytes);
        self.hwm_max = self.hwm_max.max(u.hwm_bytes);
    }

    /// Kill events in all (one per round).
    pub fn kills(&self) -> u64 {
        self.kinds.values().sum()
    }

    /// The printed summary.
    pub fn render(&self) -> String {
        let p = &self.params;
        let mib = |b: u64| {
            format!(
                "{:.1} MiB",
                f64::from(u32::try_from(b >> 10).unwrap_or(u32::MAX)) / 1024.0
            )
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "gpusnap-soak: seed {} ({}), {} jobs x {} ranks, keep {}, store {} (ext4)",
            p.seed,
            if p.smoke { "smoke" } else { "full" },
            p.jobs,
            p.ranks,
            p.keep,
            p.store.display()
        );
        let _ = writeln!(s, "kills: {} in all", self.kills());
        for (kind, n) in &self.kinds {
            let _ = writeln!(s, "  {kind:<28} {n}");
        }
        let misses: u64 = self.stop_point_misses.values().sum();
        let _ = writeln!(
            s,
            "  stop points missed (killed after {:?} instead): {misses} {:?}",
            crate::campaign::PARK_WAIT,
            self.stop_point_misses
        );
        let _ = writeln!(
            s,
            "processes SIGKILLed: {} daemons, {} trainers; daemon starts {}, orderly stops (mode changes) {}",
            self.daemons_killed, self.trainers_killed, self.daemon_starts, self.orderly_stops
        );
        let _ = writeln!(
            s,
            "commits acknowledged: {}; start-up restores checked by trainers: {}",
            self.acks, self.restores_checked
        );
        let _ = writeln!(
            s,
            "client errors a kill explains: {}; unexpected: {:?}",
            self.client_errors, self.unexpected_errors
        );
        let _ = writeln!(
            s,
            "checks: {} rounds, {} acknowledged steps against the listing, {} listed snapshots byte for byte ({} retired by retention mid-check), {} idle checks (staging 0, nothing in flight, nothing in progress on disk, every step directory listed; longest wait {:.0?})",
            self.checks,
            self.acks_checked,
            self.snapshots_verified,
            self.retired_while_checked,
            self.idle_checks,
            self.idle_wait_max
        );
        if let (Some(b), Some((lo, hi))) = (self.bounds, self.fds) {
            let _ = writeln!(
                s,
                "daemon fds: min {lo} max {hi} (first start {}, bound {})",
                b.fd_base, b.fd_max
            );
            let _ = writeln!(
                s,
                "daemon RSS: max {} peak (VmHWM) {} (first start {}, bound {} = first + staging + hot tier + io pool budgets + 64 MiB)",
                mib(self.rss_max),
                mib(self.hwm_max),
                mib(b.rss_base),
                mib(b.rss_max)
            );
        }
        let l = &self.longest_life;
        let _ = writeln!(
            s,
            "longest daemon life: {} rounds, {} trainers SIGKILLed and reconnected in it; fds {} at its first check, {} at most; RSS {} at its first check, {} at most",
            l.rounds,
            l.trainer_kills,
            l.first.map_or(0, |u| u.fds),
            l.fds_max,
            mib(l.first.map_or(0, |u| u.rss_bytes)),
            mib(l.rss_max)
        );
        if let (Some(a), Some(b)) = (l.idle_first, l.idle_last) {
            let _ = writeln!(
                s,
                "  idle (no trainer connected) in that life: fds {} first, {} last; RSS {} first, {} last",
                a.fds,
                b.fds,
                mib(a.rss_bytes),
                mib(b.rss_bytes)
            );
        }
        let _ = writeln!(s, "duration: {:.1} s", self.duration.as_secs_f64());
        let _ = writeln!(s, "violations: {}", self.violations.len());
        for v in &self.violations {
            let _ = writeln!(s, "  VIOLATION: {v}");
        }
        if !self.violations.is_empty() {
            let _ = writeln!(s, "replay with: --seed {}", p.seed);
        }
        s
    }
}
