//! What a `load` run reports: per (policy, device) the snapshots, skips,
//! streams and stall percentiles, per trainer size the median stall against
//! a memcpy of that size, per daemon its resident memory against its
//! budgets, and the verification of what was committed. One JSON object
//! and a human table. MB = 1e6 bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::load_events::TrainerSummary;
use crate::load_plan::{Budgets, LoadDevice, TrainerPlan};
use crate::load_watch::RssStats;
use crate::units::human_bytes;

/// What the harness gathered about one trainer.
#[derive(Debug, Clone, Serialize)]
pub struct TrainerRecord {
    pub plan: TrainerPlan,
    /// Staging slots the daemon gave it.
    pub slots: Option<u32>,
    /// Whether its CUDA device page-locked the staging mapping.
    pub pinned: Option<bool>,
    /// The stall of every captured snapshot, in order, seconds.
    #[serde(skip)]
    pub stalls_s: Vec<f64>,
    /// Snapshots the daemon skipped (policy `skip`).
    pub skipped: u64,
    /// Its closing report.
    pub summary: Option<TrainerSummary>,
}

/// The `p`-th percentile (`p` in 0..=100) of `values` by nearest rank
/// (the smallest value with at least `p`% of them at or below it); `None`
/// when empty.
pub fn percentile(values: &[f64], p: usize) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (p.min(100) * v.len()).div_ceil(100);
    v.get(rank.clamp(1, v.len()) - 1).copied()
}

/// One (policy, device) group of trainers.
#[derive(Debug, Clone, Serialize)]
pub struct GroupRow {
    pub policy: String,
    pub device: LoadDevice,
    pub trainers: usize,
    pub state_bytes: u64,
    /// Captured snapshots (into a slot or streamed).
    pub snapshots: u64,
    pub skipped: u64,
    /// Captures the daemon streamed through the ring
    /// (`gpusnap_streamed_snapshots_total` of the group's job).
    pub streamed: Option<u64>,
    /// Captured snapshots per second of the snapshot loop.
    pub snapshots_per_s: f64,
    pub stall_p50_s: Option<f64>,
    pub stall_p99_s: Option<f64>,
    pub stall_max_s: Option<f64>,
    /// The median over its snapshots of stall / memcpy of the trainer's
    /// size (1.0: as fast as a plain copy on an idle machine).
    pub stall_vs_memcpy_p50: Option<f64>,
}

/// One trainer size.
#[derive(Debug, Clone, Serialize)]
pub struct SizeRow {
    pub size_bytes: u64,
    pub trainers: usize,
    pub snapshots: u64,
    pub stall_p50_s: Option<f64>,
    pub stall_p99_s: Option<f64>,
    /// One thread's memcpy of this many bytes between two pre-faulted
    /// buffers, best of 3, measured by the harness before the trainers
    /// started (the trainers copy with one thread each).
    pub memcpy_s: Option<f64>,
    pub stall_p50_vs_memcpy: Option<f64>,
}

/// One daemon: its policy, budgets and resident memory.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonRow {
    pub policy: String,
    pub trainers: usize,
    pub budgets: Budgets,
    /// staging + hot tier + I/O pool + constant.
    pub rss_limit_bytes: u64,
    /// The largest VmRSS sampled every 100 ms.
    pub rss_max_sampled_bytes: u64,
    pub rss_samples: u64,
    /// The kernel's peak (VmHWM), read just before the daemon was stopped.
    pub vm_hwm_bytes: Option<u64>,
    /// Both the sampled maximum and the peak are within the limit.
    pub within_limit: bool,
    /// `gpusnap_snapshots_total` by outcome, both jobs together.
    pub outcomes: BTreeMap<String, u64>,
}

/// What was checked after the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyRow {
    /// Commits the trainers were told of.
    pub commits_reported: u64,
    /// `committed` outcomes the daemons counted (must equal the above).
    pub commits_counted: u64,
    /// Snapshots left on disk (retention keeps the newest
    /// `keep_snapshots` per trainer).
    pub on_disk: u64,
    /// Of those, how many re-read with every chunk's CRC32 matching.
    pub verified: u64,
    /// Trainers whose restore of their newest commit matched byte for byte.
    pub restores_verified: usize,
    /// Every problem found (each fails the run).
    pub problems: Vec<String>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub benchmark: &'static str,
    pub smoke: bool,
    /// Why the figures mean little, when they do.
    pub caveat: Option<String>,
    pub trainers: usize,
    pub state_bytes: u64,
    /// The configured snapshot loop.
    pub duration_s: f64,
    pub interval_s: f64,
    /// A request unanswered for longer than this fails the run.
    pub watchdog_s: f64,
    /// Every captured snapshot per second of the longest snapshot loop.
    pub snapshots_per_s: f64,
    pub snapshots: u64,
    pub skipped: u64,
    pub streamed: Option<u64>,
    pub stall_p50_s: Option<f64>,
    pub stall_p99_s: Option<f64>,
    pub groups: Vec<GroupRow>,
    pub sizes: Vec<SizeRow>,
    pub daemons: Vec<DaemonRow>,
    pub verify: VerifyRow,
    pub keep_snapshots: usize,
    /// The CUDA trainers' driver library directory (the driver double's,
    /// or none: the system's driver).
    pub cuda_library_dir: Option<String>,
    pub records: Vec<TrainerRecord>,
    pub date: String,
    pub host: String,
    pub kernel: String,
    pub cpus: usize,
    pub dir: String,
    /// What failed (each fails the run: exit 1).
    pub errors: Vec<String>,
}

impl LoadReport {
    /// Fills the groups, sizes and totals from `records`, `memcpy_s` (by
    /// size) and `streamed` (by policy name and device).
    pub fn summarize(
        &mut self,
        memcpy_s: &BTreeMap<u64, f64>,
        streamed: &BTreeMap<(String, LoadDevice), u64>,
    ) {
        let ratio_of = |r: &TrainerRecord| -> Vec<f64> {
            memcpy_s
                .get(&r.plan.size_bytes)
                .filter(|m| **m > 0.0)
                .map(|m| r.stalls_s.iter().map(|s| s / m).collect())
                .unwrap_or_default()
        };
        let loop_s = |rs: &[&TrainerRecord]| {
            rs.iter()
                .filter_map(|r| r.summary.as_ref().map(|s| s.loop_s))
                .fold(0.0, f64::max)
        };
        let mut groups: BTreeMap<(String, LoadDevice), Vec<&TrainerRecord>> = BTreeMap::new();
        for r in &self.records {
            groups
                .entry((r.plan.policy.name().to_owned(), r.plan.device))
                .or_default()
                .push(r);
        }
        self.groups = groups
            .iter()
            .map(|((policy, device), rs)| {
                let stalls: Vec<f64> = rs.iter().flat_map(|r| r.stalls_s.clone()).collect();
                let ratios: Vec<f64> = rs.iter().flat_map(|r| ratio_of(r)).collect();
                let snapshots = stalls.len() as u64;
                let secs = loop_s(rs);
                GroupRow {
                    policy: policy.clone(),
                    device: *device,
                    trainers: rs.len(),
                    state_bytes: rs.iter().map(|r| r.plan.size_bytes).sum(),
                    snapshots,
                    skipped: rs.iter().map(|r| r.skipped).sum(),
                    streamed: streamed.get(&(policy.clone(), *device)).copied(),
                    snapshots_per_s: if secs > 0.0 {
                        snapshots as f64 / secs
                    } else {
                        0.0
                    },
                    stall_p50_s: percentile(&stalls, 50),
                    stall_p99_s: percentile(&stalls, 99),
                    stall_max_s: percentile(&stalls, 100),
                    stall_vs_memcpy_p50: percentile(&ratios, 50),
                }
            })
            .collect();
        let mut sizes: BTreeMap<u64, Vec<&TrainerRecord>> = BTreeMap::new();
        for r in &self.records {
            sizes.entry(r.plan.size_bytes).or_default().push(r);
        }
        self.sizes = sizes
            .iter()
            .map(|(&size, rs)| {
                let stalls: Vec<f64> = rs.iter().flat_map(|r| r.stalls_s.clone()).collect();
                let p50 = percentile(&stalls, 50);
                let memcpy = memcpy_s.get(&size).copied();
                SizeRow {
                    size_bytes: size,
                    trainers: rs.len(),
                    snapshots: stalls.len() as u64,
                    stall_p50_s: p50,
                    stall_p99_s: percentile(&stalls, 99),
                    memcpy_s: memcpy,
                    stall_p50_vs_memcpy: match (p50, memcpy) {
                        (Some(s), Some(m)) if m > 0.0 => Some(s / m),
                        _ => None,
                    },
                }
            })
            .collect();
        let all: Vec<f64> = self
            .records
            .iter()
            .flat_map(|r| r.stalls_s.clone())
            .collect();
        let everyone: Vec<&TrainerRecord> = self.records.iter().collect();
        let secs = loop_s(&everyone);
        self.trainers = self.records.len();
        self.state_bytes = self.records.iter().map(|r| r.plan.size_bytes).sum();
        self.snapshots = all.len() as u64;
        self.snapshots_per_s = if secs > 0.0 {
            all.len() as f64 / secs
        } else {
            0.0
        };
        self.skipped = self.records.iter().map(|r| r.skipped).sum();
        self.streamed = (!streamed.is_empty()).then(|| streamed.values().sum());
        self.stall_p50_s = percentile(&all, 50);
        self.stall_p99_s = percentile(&all, 99);
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let opt = |v: Option<f64>, unit: &str| {
            v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}{unit}"))
        };
        let _ = writeln!(
            s,
            "load benchmark: {} trainers, {} of state, {:.0} s loop, {:.0} ms between snapshots, \
             watchdog {:.0} s, {} on {} ({}, {} CPUs), {}",
            self.trainers,
            human_bytes(self.state_bytes),
            self.duration_s,
            self.interval_s * 1e3,
            self.watchdog_s,
            self.dir,
            self.host,
            self.kernel,
            self.cpus,
            self.date
        );
        if let Some(c) = &self.caveat {
            let _ = writeln!(s, "NOTE: {c}");
        }
        let _ = writeln!(
            s,
            "{:<7} {:<5} {:>3} {:>10} {:>6} {:>6} {:>6} {:>7} {:>9} {:>9} {:>9} {:>10}",
            "policy",
            "dev",
            "n",
            "state",
            "snaps",
            "skip",
            "stream",
            "snap/s",
            "p50 s",
            "p99 s",
            "max s",
            "p50/memcpy"
        );
        for g in &self.groups {
            let _ = writeln!(
                s,
                "{:<7} {:<5} {:>3} {:>10} {:>6} {:>6} {:>6} {:>7.2} {:>9} {:>9} {:>9} {:>10}",
                g.policy,
                g.device.name(),
                g.trainers,
                human_bytes(g.state_bytes),
                g.snapshots,
                g.skipped,
                g.streamed.map_or_else(|| "-".to_owned(), |n| n.to_string()),
                g.snapshots_per_s,
                opt(g.stall_p50_s, ""),
                opt(g.stall_p99_s, ""),
                opt(g.stall_max_s, ""),
                g.stall_vs_memcpy_p50
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.1}"))
            );
        }
        let _ = writeln!(
            s,
            "all: {} snapshots, {:.2}/s, {} skipped, {} streamed, stall p50 {} p99 {}",
            self.snapshots,
            self.snapshots_per_s,
            self.skipped,
            self.streamed
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            opt(self.stall_p50_s, " s"),
            opt(self.stall_p99_s, " s")
        );
        let _ = writeln!(
            s,
            "{:<10} {:>3} {:>7} {:>10} {:>10} {:>12} {:>8}",
            "size", "n", "snaps", "p50 s", "p99 s", "memcpy s", "ratio"
        );
        for z in &self.sizes {
            let _ = writeln!(
                s,
                "{:<10} {:>3} {:>7} {:>10} {:>10} {:>12} {:>8}",
                human_bytes(z.size_bytes),
                z.trainers,
                z.snapshots,
                opt(z.stall_p50_s, ""),
                opt(z.stall_p99_s, ""),
                z.memcpy_s
                    .map_or_else(|| "-".to_owned(), |m| format!("{m:.5}")),
                z.stall_p50_vs_memcpy
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.1}"))
            );
        }
        for d in &self.daemons {
            let b = &d.budgets;
            let _ = writeln!(
                s,
                "daemon {}: {} trainers; RSS max {} sampled ({} samples), peak {} vs limit {} \
                 (staging {} + hot tier {} + I/O pool {} + constant {}): {}; outcomes {:?}",
                d.policy,
                d.trainers,
                human_bytes(d.rss_max_sampled_bytes),
                d.rss_samples,
                d.vm_hwm_bytes.map_or_else(|| "-".to_owned(), human_bytes),
                human_bytes(d.rss_limit_bytes),
                human_bytes(b.staging_bytes),
                human_bytes(b.hot_tier_bytes),
                human_bytes(b.io_pool_bytes),
                human_bytes(b.constant_bytes),
                if d.within_limit { "within" } else { "OVER" },
                d.outcomes
            );
        }
        let v = &self.verify;
        let _ = writeln!(
            s,
            "verify: {} commits reported, {} counted by the daemons; {} snapshots on disk \
             (keep {} per trainer), {} verified (every chunk's CRC32); {} of {} trainers' \
             restores matched byte for byte",
            v.commits_reported,
            v.commits_counted,
            v.on_disk,
            self.keep_snapshots,
            v.verified,
            v.restores_verified,
            self.records.len()
        );
        for p in &v.problems {
            let _ = writeln!(s, "problem: {p}");
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        s
    }
}

/// The RSS row of one daemon.
pub fn daemon_row(
    policy: &str,
    trainers: usize,
    budgets: Budgets,
    rss: RssStats,
    vm_hwm_bytes: Option<u64>,
    outcomes: BTreeMap<String, u64>,
) -> DaemonRow {
    let limit = budgets.rss_limit_bytes();
    DaemonRow {
        policy: policy.to_owned(),
        trainers,
        budgets,
        rss_limit_bytes: limit,
        rss_max_sampled_bytes: rss.max_bytes,
        rss_samples: rss.samples,
        vm_hwm_bytes,
        within_limit: rss.samples > 0
            && rss.max_bytes <= limit
            && vm_hwm_bytes.is_some_and(|p| p <= limit),
        outcomes,
    }
}

/// Builders the tests of other `load` modules share.
#[cfg(test)]
pub mod tests_support {
    use super::*;

    /// A report with no records and nothing summarized.
    pub fn empty_report() -> LoadReport {
        LoadReport {
            benchmark: "load",
            smoke: true,
            caveat: None,
            trainers: 0,
            state_bytes: 0,
            duration_s: 2.0,
            interval_s: 0.1,
            watchdog_s: 30.0,
            snapshots_per_s: 0.0,
            snapshots: 0,
            skipped: 0,
            streamed: None,
            stall_p50_s: None,
            stall_p99_s: None,
            groups: Vec::new(),
            sizes: Vec::new(),
            daemons: Vec::new(),
            verify: VerifyRow::default(),
            keep_snapshots: 2,
            cuda_library_dir: None,
            records: Vec::new(),
            date: String::new(),
            host: String::new(),
            kernel: String::new(),
            cpus: 2,
            dir: String::new(),
            errors: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpusnap::proto::BusyPolicy;

    #[test]
    fn percentiles_by_nearest_rank() {
        assert_eq!(percentile(&[], 50), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50), Some(50.0));
        assert_eq!(percentile(&v, 99), Some(99.0));
        assert_eq!(percentile(&v, 100), Some(100.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50), Some(2.0));
        assert_eq!(percentile(&[5.0], 99), Some(5.0));
        assert_eq!(percentile(&[1.0, 9.0], 0), Some(1.0));
    }

    fn record(id: usize, policy: BusyPolicy, device: LoadDevice, stalls: &[f64]) -> TrainerRecord {
        TrainerRecord {
            plan: TrainerPlan {
                id,
                size_bytes: 1 << 20,
                policy,
                device,
            },
            slots: Some(1),
            pinned: None,
            stalls_s: stalls.to_vec(),
            skipped: 1,
            summary: Some(TrainerSummary {
                loop_s: 2.0,
                captured: stalls.len() as u64,
                skipped: 1,
                committed: stalls.len() as u64,
                commit_wait_s: 0.0,
                commit_errors: Vec::new(),
                newest_committed: Some(1),
                restored_step: Some(1),
                restore_source: Some("disk".into()),
                restore_verified: true,
            }),
        }
    }

    fn report(records: Vec<TrainerRecord>) -> LoadReport {
        LoadReport {
            records,
            ..tests_support::empty_report()
        }
    }

    #[test]
    fn groups_sizes_and_totals_come_from_the_records() {
        let mut r = report(vec![
            record(0, BusyPolicy::Block, LoadDevice::Host, &[0.1, 0.3]),
            record(3, BusyPolicy::Block, LoadDevice::Host, &[0.2]),
            record(
                2,
                BusyPolicy::Stream,
                LoadDevice::Cuda,
                &[1.0, 2.0, 3.0, 4.0],
            ),
        ]);
        let memcpy = BTreeMap::from([(1 << 20, 0.1)]);
        let streamed = BTreeMap::from([(("stream".to_owned(), LoadDevice::Cuda), 3)]);
        r.summarize(&memcpy, &streamed);
        assert_eq!(r.trainers, 3);
        assert_eq!(r.snapshots, 7);
        assert_eq!(r.skipped, 3);
        assert_eq!(r.streamed, Some(3));
        assert_eq!(r.snapshots_per_s, 3.5, "7 snapshots over a 2 s loop");
        assert_eq!(r.groups.len(), 2);
        let block = &r.groups[0];
        assert_eq!(
            (block.policy.as_str(), block.device),
            ("block", LoadDevice::Host)
        );
        assert_eq!((block.trainers, block.snapshots, block.skipped), (2, 3, 2));
        assert_eq!(block.stall_p50_s, Some(0.2));
        assert_eq!(block.stall_max_s, Some(0.3));
        assert_eq!(block.streamed, None);
        assert!((block.stall_vs_memcpy_p50.expect("ratio") - 2.0).abs() < 1e-9);
        let stream = &r.groups[1];
        assert_eq!(stream.streamed, Some(3));
        assert_eq!(stream.stall_p99_s, Some(4.0));
        assert_eq!(r.sizes.len(), 1);
        assert_eq!(r.sizes[0].snapshots, 7);
        assert_eq!(r.sizes[0].stall_p50_s, Some(1.0));
        assert!((r.sizes[0].stall_p50_vs_memcpy.expect("ratio") - 10.0).abs() < 1e-9);
        assert!(r.table().contains("stream  cuda"));
    }

    #[test]
    fn a_daemon_over_its_limit_or_unsampled_is_not_within_it() {
        let budgets = Budgets {
            staging_bytes: 100,
            hot_tier_bytes: 10,
            io_pool_bytes: 5,
            constant_bytes: 5,
        };
        let rss = |max_bytes, samples| RssStats { max_bytes, samples };
        let row = |r, hwm| daemon_row("skip", 1, budgets, r, hwm, BTreeMap::new());
        assert!(row(rss(120, 3), Some(120)).within_limit);
        assert!(!row(rss(121, 3), Some(120)).within_limit);
        assert!(!row(rss(100, 3), Some(121)).within_limit, "the peak counts");
        assert!(!row(rss(100, 3), None).within_limit);
        assert!(!row(rss(0, 0), Some(1)).within_limit, "never sampled");
    }
}
