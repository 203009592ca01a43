//! What a store benchmark run reports: one JSON object (the record kept in
//! `benches/results/`) and a human table. MB = 1e6 bytes.

use std::fmt::Write as _;

use serde::Serialize;

use crate::fio::FioResult;
use crate::fio_sweep::SweepSummary;
use crate::units::human_bytes;

/// One backend's write and verified read of the same snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct BackendRun {
    /// The backend asked for (`--backends`).
    pub backend: String,
    /// The backend the manifest records (the store may only ever write with
    /// the one forced; a difference is reported as an error).
    pub manifest_backend: String,
    pub write_s: f64,
    #[serde(rename = "write_MBps")]
    pub write_mb_per_s: f64,
    /// Process CPU (user + system, all threads) during the write.
    pub write_cpu_s: f64,
    pub read_s: f64,
    #[serde(rename = "read_MBps")]
    pub read_mb_per_s: f64,
    pub read_cpu_s: f64,
    /// Bytes the verified read handed out (equals `size_bytes`).
    pub read_bytes: u64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub benchmark: &'static str,
    /// Backend whose figures are in `write_MBps` / `read_MBps`: io_uring
    /// when it ran, else the first backend that ran.
    pub backend: Option<String>,
    #[serde(rename = "write_MBps")]
    pub write_mb_per_s: Option<f64>,
    #[serde(rename = "fio_write_MBps")]
    pub fio_write_mb_per_s: Option<f64>,
    #[serde(rename = "read_MBps")]
    pub read_mb_per_s: Option<f64>,
    #[serde(rename = "fio_read_MBps")]
    pub fio_read_mb_per_s: Option<f64>,
    /// `write_MBps` / `fio_write_MBps` (fio's single setting).
    pub write_vs_fio: Option<f64>,
    /// `read_MBps` / `fio_read_MBps` (fio's single setting).
    pub read_vs_fio: Option<f64>,
    /// `write_MBps` / `fio_best_write_MBps`: against the disk's limit.
    pub write_vs_fio_best: Option<f64>,
    /// `read_MBps` / `fio_best_read_MBps`: against the disk's limit.
    pub read_vs_fio_best: Option<f64>,
    /// CPU seconds per GB (1e9 bytes) written, by `backend`'s write.
    #[serde(rename = "cpu_s_per_GB")]
    pub cpu_s_per_gb: Option<f64>,
    #[serde(rename = "io_uring_write_MBps")]
    pub io_uring_write_mb_per_s: Option<f64>,
    #[serde(rename = "io_uring_read_MBps")]
    pub io_uring_read_mb_per_s: Option<f64>,
    #[serde(rename = "pwrite_write_MBps")]
    pub pwrite_write_mb_per_s: Option<f64>,
    #[serde(rename = "pwrite_read_MBps")]
    pub pwrite_read_mb_per_s: Option<f64>,
    #[serde(rename = "buffered_write_MBps")]
    pub buffered_write_mb_per_s: Option<f64>,
    #[serde(rename = "buffered_read_MBps")]
    pub buffered_read_mb_per_s: Option<f64>,
    pub size_bytes: u64,
    pub tensors: usize,
    /// Whether the page cache was dropped before each read (needs root);
    /// when false, buffered reads may come from memory.
    pub page_cache_dropped: bool,
    pub queue_depth: usize,
    pub io_buffer_bytes: usize,
    pub fio_iodepth: usize,
    pub date: String,
    pub host: String,
    pub kernel: String,
    pub cpus: usize,
    pub dir: String,
    pub fio_version: String,
    pub fio_write: Option<FioResult>,
    pub fio_read: Option<FioResult>,
    /// The fio sweep: `fio_sweep_ran`, `fio_sweep`, `fio_best_*`.
    #[serde(flatten)]
    pub sweep: SweepSummary,
    pub runs: Vec<BackendRun>,
    /// What failed (a backend that could not be opened, fio, a short read).
    pub errors: Vec<String>,
}

impl Report {
    /// Fills the headline keys from `runs` and the fio results.
    pub fn summarize(&mut self) {
        let by_name = |name: &str| self.runs.iter().find(|r| r.backend == name);
        let primary = by_name("io_uring").or_else(|| self.runs.first()).cloned();
        self.io_uring_write_mb_per_s = by_name("io_uring").map(|r| r.write_mb_per_s);
        self.io_uring_read_mb_per_s = by_name("io_uring").map(|r| r.read_mb_per_s);
        self.pwrite_write_mb_per_s = by_name("pwrite").map(|r| r.write_mb_per_s);
        self.pwrite_read_mb_per_s = by_name("pwrite").map(|r| r.read_mb_per_s);
        self.buffered_write_mb_per_s = by_name("buffered").map(|r| r.write_mb_per_s);
        self.buffered_read_mb_per_s = by_name("buffered").map(|r| r.read_mb_per_s);
        self.fio_write_mb_per_s = self.fio_write.as_ref().map(FioResult::mb_per_s);
        self.fio_read_mb_per_s = self.fio_read.as_ref().map(FioResult::mb_per_s);
        let gb = self.size_bytes as f64 / 1e9;
        if let Some(p) = primary {
            self.backend = Some(p.backend.clone());
            self.write_mb_per_s = Some(p.write_mb_per_s);
            self.read_mb_per_s = Some(p.read_mb_per_s);
            self.cpu_s_per_gb = Some(p.write_cpu_s / gb);
        }
        self.write_vs_fio = ratio(self.write_mb_per_s, self.fio_write_mb_per_s);
        self.read_vs_fio = ratio(self.read_mb_per_s, self.fio_read_mb_per_s);
        self.sweep.consider_single(
            self.fio_iodepth,
            self.fio_write_mb_per_s,
            self.fio_read_mb_per_s,
        );
        self.write_vs_fio_best = ratio(self.write_mb_per_s, self.sweep.fio_best_write_mb_per_s);
        self.read_vs_fio_best = ratio(self.read_mb_per_s, self.sweep.fio_best_read_mb_per_s);
    }

    /// The human table: one line per figure, ours against fio's.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "store benchmark: {} in {} tensors, {} on {} ({}), {}",
            human_bytes(self.size_bytes),
            self.tensors,
            self.dir,
            self.host,
            self.kernel,
            self.date
        );
        let _ = writeln!(
            s,
            "{:<20} {:>12} {:>12} {:>8} {:>14} {:>8} {:>10}",
            "figure", "ours MB/s", "fio MB/s", "ratio", "fio best MB/s", "ratio", "CPU s/GB"
        );
        let gb = self.size_bytes as f64 / 1e9;
        for run in &self.runs {
            for (what, ours, fio, best, cpu) in [
                (
                    "write",
                    run.write_mb_per_s,
                    self.fio_write_mb_per_s,
                    self.sweep.fio_best_write_mb_per_s,
                    run.write_cpu_s,
                ),
                (
                    "read",
                    run.read_mb_per_s,
                    self.fio_read_mb_per_s,
                    self.sweep.fio_best_read_mb_per_s,
                    run.read_cpu_s,
                ),
            ] {
                let _ = writeln!(
                    s,
                    "{:<20} {:>12.1} {:>12} {:>8} {:>14} {:>8} {:>10.3}",
                    format!("{what} ({})", run.backend),
                    ours,
                    opt(fio, 1),
                    opt(ratio(Some(ours), fio), 2),
                    opt(best, 1),
                    opt(ratio(Some(ours), best), 2),
                    cpu / gb
                );
            }
        }
        let _ = writeln!(s, "fio single setting: qd {}, bs 1M", self.fio_iodepth);
        if self.sweep.fio_sweep_ran {
            let _ = writeln!(s, "{}", self.sweep.best_line());
            for e in &self.sweep.fio_sweep {
                let _ = writeln!(
                    s,
                    "  fio {:<16} write {:>10} MB/s   read {:>10} MB/s",
                    e.setting.label(),
                    opt(e.write_mb_per_s, 1),
                    opt(e.read_mb_per_s, 1)
                );
            }
        } else {
            let _ = writeln!(s, "fio sweep not run (--no-fio-sweep)");
        }
        if !self.page_cache_dropped {
            let _ = writeln!(
                s,
                "page cache NOT dropped before reads (not root?): buffered reads may come from memory"
            );
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        s
    }
}

fn ratio(ours: Option<f64>, peer: Option<f64>) -> Option<f64> {
    match (ours, peer) {
        (Some(o), Some(p)) if p > 0.0 => Some(o / p),
        _ => None,
    }
}

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}
