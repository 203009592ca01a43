//! What an e2e benchmark run reports: one JSON object (the record kept in
//! `benches/results/`) and a human table. Every headline figure sits beside
//! its peer from the same run and their ratio. MB = 1e6 bytes.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::e2e_bench::E2eBench;
use crate::fio::FioResult;
use crate::fio_sweep::SweepSummary;
use crate::sys;
use crate::units::human_bytes;
use crate::workdir::CacheDropper;

/// Why the daemon is configured the way it is, for the record.
const MEMORY_CHOICE: &str = "staging.double = false and staging.budget_bytes = the state's size \
     rounded up to 1 MiB plus 1 MiB: one slot, so the state, the memcpy peer's destination, the \
     slot and the hot tier (budget the same) are four copies, 16 GiB at 4 GiB, within the VM's \
     24 GiB; a second slot would add a fifth. With one slot each snapshot waits for the \
     previous commit, which the loop does anyway (snapshot, then wait_committed).";

/// The bar each ratio is held to (DESIGN.md, "Numbers that set the bar").
#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    /// `stall_vs_memcpy` at most this.
    pub stall_vs_memcpy_max: f64,
    /// `persist_vs_fio` at least this.
    pub persist_vs_fio_min: f64,
    /// `restore_disk_vs_fio` at least this.
    pub restore_disk_vs_fio_min: f64,
}

impl Default for Targets {
    fn default() -> Targets {
        Targets {
            stall_vs_memcpy_max: 1.2,
            persist_vs_fio_min: 0.9,
            restore_disk_vs_fio_min: 0.9,
        }
    }
}

/// One snapshot: its stall, its peer's memcpy just before it, its persist.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRun {
    pub step: u64,
    /// Wall time `Client::snapshot` blocked, measured around the call.
    pub stall_s: f64,
    /// The client's own figure (`CaptureInfo::stall`).
    pub client_stall_s: f64,
    /// The copies alone (`CaptureInfo::capture`).
    pub capture_s: f64,
    /// The memcpy peer (client's copy threads) just before this snapshot.
    pub memcpy_s: Option<f64>,
    /// The memcpy peer on one thread just before this snapshot.
    pub memcpy_1thread_s: Option<f64>,
    /// From `snapshot` returning (captured) to `wait_committed` returning.
    pub persist_s: f64,
    #[serde(rename = "persist_MBps")]
    pub persist_mb_per_s: f64,
    /// The daemon's own figure (`CommitInfo::persist`).
    pub daemon_persist_s: f64,
    /// File bytes the daemon committed (header and data).
    pub commit_bytes: u64,
}

/// One restore, checked byte for byte afterwards.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreRun {
    /// `memory` (hot tier) or `disk`, as `RestoreInfo::source` says.
    pub source: String,
    pub step: u64,
    /// Wall time of `Client::restore`.
    pub wall_s: f64,
    #[serde(rename = "MBps")]
    pub mb_per_s: f64,
    /// The daemon filling its staging slot (`RestoreInfo::daemon_fill`).
    pub daemon_fill_s: f64,
    /// The client copying the slot into the tensors (`RestoreInfo::copy`).
    pub copy_s: f64,
    pub bytes: u64,
}

/// The naive baseline: write(2) every tensor into one file, then fsync.
#[derive(Debug, Clone, Serialize)]
pub struct NaiveRun {
    pub write_s: f64,
    pub fsync_s: f64,
    /// What the trainer waits: create, write, fsync.
    pub total_s: f64,
    #[serde(rename = "MBps")]
    pub mb_per_s: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct E2eReport {
    pub benchmark: &'static str,
    /// The client's copy device.
    pub backend: &'static str,
    /// Median stall of `snapshot` (step 1 included).
    pub stall_s: Option<f64>,
    pub stall_min_s: Option<f64>,
    /// Median memcpy peer, same threads as the client's copy device.
    pub memcpy_s: Option<f64>,
    pub memcpy_min_s: Option<f64>,
    pub memcpy_1thread_s: Option<f64>,
    pub stall_vs_memcpy: Option<f64>,
    pub stall_min_vs_memcpy_min: Option<f64>,
    pub stall_vs_memcpy_1thread: Option<f64>,
    /// Size / median persist time (captured to committed).
    #[serde(rename = "persist_MBps")]
    pub persist_mb_per_s: Option<f64>,
    #[serde(rename = "fio_write_MBps")]
    pub fio_write_mb_per_s: Option<f64>,
    pub persist_vs_fio: Option<f64>,
    /// `persist_MBps` / `fio_best_write_MBps`: against the disk's limit.
    pub persist_vs_fio_best: Option<f64>,
    /// The same on the restarted daemon, whose hot tier is off (no copy
    /// into the hot tier before the commit is reported).
    #[serde(rename = "persist_no_hot_MBps")]
    pub persist_no_hot_mb_per_s: Option<f64>,
    pub persist_no_hot_vs_fio: Option<f64>,
    /// `persist_no_hot_MBps` / `fio_best_write_MBps`.
    pub persist_no_hot_vs_fio_best: Option<f64>,
    /// Median wall time of a restore from the hot tier.
    pub restore_mem_s: Option<f64>,
    #[serde(rename = "restore_mem_MBps")]
    pub restore_mem_mb_per_s: Option<f64>,
    pub restore_mem_vs_memcpy: Option<f64>,
    pub restore_disk_s: Option<f64>,
    #[serde(rename = "restore_disk_MBps")]
    pub restore_disk_mb_per_s: Option<f64>,
    #[serde(rename = "fio_read_MBps")]
    pub fio_read_mb_per_s: Option<f64>,
    pub restore_disk_vs_fio: Option<f64>,
    /// `restore_disk_MBps` / `fio_best_read_MBps`: against the disk's limit.
    pub restore_disk_vs_fio_best: Option<f64>,
    /// The naive baseline's stall (write + fsync).
    pub naive_stall_s: Option<f64>,
    /// `naive_stall_s / stall_s`: how many times longer the naive trainer
    /// waits.
    pub naive_vs_stall: Option<f64>,
    /// Restore from disk on the restarted daemon again, cache dropped, its
    /// staging slot now faulted in (the first one paid for that).
    #[serde(rename = "restore_disk_warm_MBps")]
    pub restore_disk_warm_mb_per_s: Option<f64>,
    pub restore_disk_warm_vs_fio: Option<f64>,
    /// `restore_disk_warm_MBps` / `fio_best_read_MBps`.
    pub restore_disk_warm_vs_fio_best: Option<f64>,
    /// From the daemon's /metrics (histogram sum / count): mean stall and
    /// persist it observed over all N snapshots, and over steps 2..N
    /// (the first one may pay for first-touch memory the daemon had not populated yet).
    pub daemon_stall_mean_s: Option<f64>,
    pub daemon_stall_mean_after_first_s: Option<f64>,
    pub daemon_persist_mean_s: Option<f64>,
    pub daemon_persist_mean_after_first_s: Option<f64>,
    pub targets: Targets,
    /// Per target: whether this run met it (null: not measured).
    pub meets_stall_target: Option<bool>,
    pub meets_persist_target: Option<bool>,
    pub meets_restore_disk_target: Option<bool>,
    pub size_bytes: u64,
    pub tensors: usize,
    pub snapshots_requested: usize,
    pub client_copy_threads: usize,
    pub memcpy_threads: usize,
    /// The store's I/O backend, as the daemon reports it.
    pub io_backend: String,
    pub staging_slots: u32,
    pub register_s: f64,
    pub page_cache_dropped: bool,
    pub thp_enabled: String,
    pub thp_shmem_enabled: String,
    pub memory_choice: &'static str,
    /// The config of the first daemon (hot tier on).
    pub config: serde_json::Value,
    /// The config of the restarted daemon (hot tier off).
    pub config_restart: serde_json::Value,
    pub fio_iodepth: usize,
    pub date: String,
    pub host: String,
    pub kernel: String,
    pub cpus: usize,
    pub mem_available_bytes: Option<u64>,
    pub dir: String,
    pub gpusnapd: String,
    pub fio_version: String,
    pub fio_write: Option<FioResult>,
    pub fio_read: Option<FioResult>,
    /// The fio sweep: `fio_sweep_ran`, `fio_sweep`, `fio_best_*`.
    #[serde(flatten)]
    pub sweep: SweepSummary,
    pub snapshots: Vec<SnapshotRun>,
    pub snapshots_no_hot: Vec<SnapshotRun>,
    pub restores_memory: Vec<RestoreRun>,
    pub restore_disk: Option<RestoreRun>,
    pub restore_disk_warm: Option<RestoreRun>,
    pub naive: Option<NaiveRun>,
    /// What failed without stopping the run (fio, a metrics scrape).
    pub errors: Vec<String>,
}

impl E2eReport {
    pub fn new(
        args: &E2eBench,
        dir: &Path,
        gpusnapd: &Path,
        fio_version: String,
        cache: &CacheDropper,
    ) -> E2eReport {
        E2eReport {
            benchmark: "e2e",
            backend: "host",
            stall_s: None,
            stall_min_s: None,
            memcpy_s: None,
            memcpy_min_s: None,
            memcpy_1thread_s: None,
            stall_vs_memcpy: None,
            stall_min_vs_memcpy_min: None,
            stall_vs_memcpy_1thread: None,
            persist_mb_per_s: None,
            fio_write_mb_per_s: None,
            persist_vs_fio: None,
            persist_no_hot_mb_per_s: None,
            persist_no_hot_vs_fio: None,
            restore_mem_s: None,
            restore_mem_mb_per_s: None,
            restore_mem_vs_memcpy: None,
            restore_disk_s: None,
            restore_disk_mb_per_s: None,
            fio_read_mb_per_s: None,
            restore_disk_vs_fio: None,
            naive_stall_s: None,
            naive_vs_stall: None,
            restore_disk_warm_mb_per_s: None,
            restore_disk_warm_vs_fio: None,
            restore_disk_warm_vs_fio_best: None,
            persist_vs_fio_best: None,
            persist_no_hot_vs_fio_best: None,
            restore_disk_vs_fio_best: None,
            daemon_stall_mean_s: None,
            daemon_stall_mean_after_first_s: None,
            daemon_persist_mean_s: None,
            daemon_persist_mean_after_first_s: None,
            targets: Targets::default(),
            meets_stall_target: None,
            meets_persist_target: None,
            meets_restore_disk_target: None,
            size_bytes: args.size_bytes,
            tensors: 0,
            snapshots_requested: args.snapshots,
            client_copy_threads: 0,
            memcpy_threads: 0,
            io_backend: String::new(),
            staging_slots: 0,
            register_s: 0.0,
            page_cache_dropped: cache.works,
            thp_enabled: sys::thp_setting("enabled"),
            thp_shmem_enabled: sys::thp_setting("shmem_enabled"),
            memory_choice: MEMORY_CHOICE,
            config: serde_json::Value::Null,
            config_restart: serde_json::Value::Null,
            fio_iodepth: args.fio_iodepth,
            date: sys::utc_now(),
            host: sys::host(),
            kernel: sys::kernel(),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            mem_available_bytes: sys::mem_available_bytes(),
            dir: dir.display().to_string(),
            gpusnapd: gpusnapd.display().to_string(),
            fio_version,
            fio_write: None,
            fio_read: None,
            sweep: SweepSummary::default(),
            snapshots: Vec::new(),
            snapshots_no_hot: Vec::new(),
            restores_memory: Vec::new(),
            restore_disk: None,
            restore_disk_warm: None,
            naive: None,
            errors: Vec::new(),
        }
    }

    /// Fills the headline keys, ratios and verdicts from the runs.
    pub fn summarize(&mut self, targets: &Targets) {
        let size_mb = self.size_bytes as f64 / 1e6;
        let stalls: Vec<f64> = self.snapshots.iter().map(|s| s.stall_s).collect();
        let memcpys: Vec<f64> = self.snapshots.iter().filter_map(|s| s.memcpy_s).collect();
        let memcpys_1t: Vec<f64> = self
            .snapshots
            .iter()
            .filter_map(|s| s.memcpy_1thread_s)
            .collect();
        let persists: Vec<f64> = self.snapshots.iter().map(|s| s.persist_s).collect();
        let persists_no_hot: Vec<f64> = self.snapshots_no_hot.iter().map(|s| s.persist_s).collect();
        let restores: Vec<f64> = self.restores_memory.iter().map(|r| r.wall_s).collect();

        self.stall_s = median(&stalls);
        self.stall_min_s = min(&stalls);
        self.memcpy_s = median(&memcpys);
        self.memcpy_min_s = min(&memcpys);
        self.memcpy_1thread_s = median(&memcpys_1t);
        self.stall_vs_memcpy = ratio(self.stall_s, self.memcpy_s);
        self.stall_min_vs_memcpy_min = ratio(self.stall_min_s, self.memcpy_min_s);
        self.stall_vs_memcpy_1thread = ratio(self.stall_s, self.memcpy_1thread_s);

        self.persist_mb_per_s = median(&persists).map(|s| size_mb / s);
        self.fio_write_mb_per_s = self.fio_write.as_ref().map(FioResult::mb_per_s);
        self.persist_vs_fio = ratio(self.persist_mb_per_s, self.fio_write_mb_per_s);
        self.persist_no_hot_mb_per_s = median(&persists_no_hot).map(|s| size_mb / s);
        self.persist_no_hot_vs_fio = ratio(self.persist_no_hot_mb_per_s, self.fio_write_mb_per_s);

        self.restore_mem_s = median(&restores);
        self.restore_mem_mb_per_s = self.restore_mem_s.map(|s| size_mb / s);
        self.restore_mem_vs_memcpy = ratio(self.restore_mem_s, self.memcpy_s);
        self.restore_disk_s = self.restore_disk.as_ref().map(|r| r.wall_s);
        self.restore_disk_mb_per_s = self.restore_disk.as_ref().map(|r| r.mb_per_s);
        self.fio_read_mb_per_s = self.fio_read.as_ref().map(FioResult::mb_per_s);
        self.restore_disk_vs_fio = ratio(self.restore_disk_mb_per_s, self.fio_read_mb_per_s);
        self.restore_disk_warm_mb_per_s = self.restore_disk_warm.as_ref().map(|r| r.mb_per_s);
        self.restore_disk_warm_vs_fio =
            ratio(self.restore_disk_warm_mb_per_s, self.fio_read_mb_per_s);

        self.sweep.consider_single(
            self.fio_iodepth,
            self.fio_write_mb_per_s,
            self.fio_read_mb_per_s,
        );
        let best_write = self.sweep.fio_best_write_mb_per_s;
        let best_read = self.sweep.fio_best_read_mb_per_s;
        self.persist_vs_fio_best = ratio(self.persist_mb_per_s, best_write);
        self.persist_no_hot_vs_fio_best = ratio(self.persist_no_hot_mb_per_s, best_write);
        self.restore_disk_vs_fio_best = ratio(self.restore_disk_mb_per_s, best_read);
        self.restore_disk_warm_vs_fio_best = ratio(self.restore_disk_warm_mb_per_s, best_read);

        self.naive_stall_s = self.naive.as_ref().map(|n| n.total_s);
        self.naive_vs_stall = ratio(self.naive_stall_s, self.stall_s);

        self.targets = targets.clone();
        self.meets_stall_target = self
            .stall_vs_memcpy
            .map(|r| r <= targets.stall_vs_memcpy_max);
        self.meets_persist_target = self.persist_vs_fio.map(|r| r >= targets.persist_vs_fio_min);
        self.meets_restore_disk_target = self
            .restore_disk_vs_fio
            .map(|r| r >= targets.restore_disk_vs_fio_min);
    }

    /// The human table: each figure, its peer, the ratio, the target.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "e2e benchmark: {} in {} tensors, {} snapshots, host backend ({} copy threads), \
             store I/O {}, {} on {} ({}), {}",
            human_bytes(self.size_bytes),
            self.tensors,
            self.snapshots.len(),
            self.client_copy_threads,
            self.io_backend,
            self.dir,
            self.host,
            self.kernel,
            self.date
        );
        let _ = writeln!(
            s,
            "{:<34} {:>12} {:<26} {:>8} {:>8}",
            "figure", "gpusnap", "peer", "ratio", "target"
        );
        let secs = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3} s"));
        let mbps = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} MB/s"));
        let mut row = |what: &str, ours: String, peer: String, r: Option<f64>, target: &str| {
            let _ = writeln!(
                s,
                "{what:<34} {ours:>12} {peer:<26} {:>8} {target:>8}",
                r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))
            );
        };
        row(
            "stall per snapshot (median)",
            secs(self.stall_s),
            format!("memcpy {}", secs(self.memcpy_s)),
            self.stall_vs_memcpy,
            "<= 1.2",
        );
        row(
            "stall per snapshot (min)",
            secs(self.stall_min_s),
            format!("memcpy {}", secs(self.memcpy_min_s)),
            self.stall_min_vs_memcpy_min,
            "",
        );
        row(
            "stall (median) vs 1-thread memcpy",
            secs(self.stall_s),
            format!("memcpy {}", secs(self.memcpy_1thread_s)),
            self.stall_vs_memcpy_1thread,
            "",
        );
        row(
            "persist (captured -> committed)",
            mbps(self.persist_mb_per_s),
            format!("fio write {}", mbps(self.fio_write_mb_per_s)),
            self.persist_vs_fio,
            ">= 0.9",
        );
        row(
            "  vs fio best",
            mbps(self.persist_mb_per_s),
            format!("fio best {}", mbps(self.sweep.fio_best_write_mb_per_s)),
            self.persist_vs_fio_best,
            "",
        );
        row(
            "persist, hot tier off",
            mbps(self.persist_no_hot_mb_per_s),
            format!("fio write {}", mbps(self.fio_write_mb_per_s)),
            self.persist_no_hot_vs_fio,
            "",
        );
        row(
            "  vs fio best",
            mbps(self.persist_no_hot_mb_per_s),
            format!("fio best {}", mbps(self.sweep.fio_best_write_mb_per_s)),
            self.persist_no_hot_vs_fio_best,
            "",
        );
        row(
            "restore from memory (hot tier)",
            secs(self.restore_mem_s),
            format!("memcpy {}", secs(self.memcpy_s)),
            self.restore_mem_vs_memcpy,
            "",
        );
        row(
            "restore from disk (restarted)",
            mbps(self.restore_disk_mb_per_s),
            format!("fio read {}", mbps(self.fio_read_mb_per_s)),
            self.restore_disk_vs_fio,
            ">= 0.9",
        );
        row(
            "  vs fio best",
            mbps(self.restore_disk_mb_per_s),
            format!("fio best {}", mbps(self.sweep.fio_best_read_mb_per_s)),
            self.restore_disk_vs_fio_best,
            "",
        );
        row(
            "restore from disk, slot faulted",
            mbps(self.restore_disk_warm_mb_per_s),
            format!("fio read {}", mbps(self.fio_read_mb_per_s)),
            self.restore_disk_warm_vs_fio,
            "",
        );
        row(
            "  vs fio best",
            mbps(self.restore_disk_warm_mb_per_s),
            format!("fio best {}", mbps(self.sweep.fio_best_read_mb_per_s)),
            self.restore_disk_warm_vs_fio_best,
            "",
        );
        row(
            "naive write+fsync stall",
            secs(self.naive_stall_s),
            format!("gpusnap stall {}", secs(self.stall_s)),
            self.naive_vs_stall,
            "",
        );
        let _ = writeln!(s, "fio single setting: qd {}, bs 1M", self.fio_iodepth);
        if self.sweep.fio_sweep_ran {
            let _ = writeln!(s, "{}", self.sweep.best_line());
            let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
            for e in &self.sweep.fio_sweep {
                let _ = writeln!(
                    s,
                    "  fio {:<16} write {:>10} MB/s   read {:>10} MB/s",
                    e.setting.label(),
                    opt(e.write_mb_per_s),
                    opt(e.read_mb_per_s)
                );
            }
        } else {
            let _ = writeln!(s, "fio sweep not run (--no-fio-sweep)");
        }
        let _ = writeln!(
            s,
            "daemon-side means (all / after the first): stall {} / {}, persist {} / {}",
            secs(self.daemon_stall_mean_s),
            secs(self.daemon_stall_mean_after_first_s),
            secs(self.daemon_persist_mean_s),
            secs(self.daemon_persist_mean_after_first_s)
        );
        if let Some(first) = self.snapshots.first() {
            let _ = writeln!(
                s,
                "first snapshot: stall {:.3} s, persist {:.2} s; \
                 every restore verified byte for byte",
                first.stall_s, first.persist_s
            );
        }
        if !self.page_cache_dropped {
            let _ = writeln!(
                s,
                "page cache NOT dropped (not root?): the disk restore may come from memory"
            );
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        s
    }
}

/// Sum and count of the daemon's stall and persist histograms for a job.
#[derive(Debug, Clone, Copy, Default)]
pub struct DaemonSums {
    pub stall_sum_s: f64,
    pub stall_count: f64,
    pub persist_sum_s: f64,
    pub persist_count: f64,
}

impl DaemonSums {
    /// Reads them from a /metrics body (scraped after a commit, so both
    /// histograms have samples); `None` when the job lacks either there, an
    /// error when a value is not a number.
    pub fn parse(body: &str, job: &str) -> Result<Option<DaemonSums>, String> {
        let get = |series: &str| {
            gpusnapd_testkit::sample(body, &format!("{series}{{job=\"{job}\"}}"))
                .map_err(|e| e.to_string())
        };
        let (Some(stall_sum_s), Some(stall_count), Some(persist_sum_s), Some(persist_count)) = (
            get("gpusnap_stall_seconds_sum")?,
            get("gpusnap_stall_seconds_count")?,
            get("gpusnap_persist_seconds_sum")?,
            get("gpusnap_persist_seconds_count")?,
        ) else {
            return Ok(None);
        };
        Ok(Some(DaemonSums {
            stall_sum_s,
            stall_count,
            persist_sum_s,
            persist_count,
        }))
    }

    /// (mean stall, mean persist) of what `self` holds beyond `earlier`.
    pub fn means_since(&self, earlier: &DaemonSums) -> (Option<f64>, Option<f64>) {
        let mean = |sum: f64, count: f64| (count > 0.0).then(|| sum / count);
        (
            mean(
                self.stall_sum_s - earlier.stall_sum_s,
                self.stall_count - earlier.stall_count,
            ),
            mean(
                self.persist_sum_s - earlier.persist_sum_s,
                self.persist_count - earlier.persist_count,
            ),
        )
    }
}

/// The median (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => v.get(n / 2).copied(),
        _ => Some((v.get(n / 2 - 1)? + v.get(n / 2)?) / 2.0),
    }
}

pub fn min(values: &[f64]) -> Option<f64> {
    values.iter().copied().min_by(f64::total_cmp)
}

pub fn ratio(ours: Option<f64>, peer: Option<f64>) -> Option<f64> {
    match (ours, peer) {
        (Some(o), Some(p)) if p > 0.0 => Some(o / p),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_means_difference_two_scrapes() {
        let at = |stall: f64, n: f64| {
            format!(
                "gpusnap_stall_seconds_sum{{job=\"b\"}} {stall}\n\
                 gpusnap_stall_seconds_count{{job=\"b\"}} {n}\n\
                 gpusnap_persist_seconds_sum{{job=\"b\"}} {}\n\
                 gpusnap_persist_seconds_count{{job=\"b\"}} {n}\n",
                stall * 10.0
            )
        };
        let parse = |body: &str, job: &str| DaemonSums::parse(body, job).expect("numbers");
        let first = parse(&at(6.0, 1.0), "b").expect("parsed");
        let all = parse(&at(8.0, 5.0), "b").expect("parsed");
        assert_eq!(all.means_since(&first), (Some(0.5), Some(5.0)));
        assert_eq!(
            all.means_since(&DaemonSums::default()),
            (Some(1.6), Some(16.0))
        );
        assert!(parse(&at(1.0, 1.0), "other").is_none());
        let no_persist = "gpusnap_stall_seconds_sum{job=\"b\"} 1\n\
                          gpusnap_stall_seconds_count{job=\"b\"} 1\n";
        assert!(parse(no_persist, "b").is_none(), "persist is required too");
        assert!(DaemonSums::parse("gpusnap_stall_seconds_sum{job=\"b\"} x\n", "b").is_err());
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(min(&[3.0, 1.0]), Some(1.0));
        assert_eq!(ratio(Some(1.0), Some(2.0)), Some(0.5));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
    }
}
