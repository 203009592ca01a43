//! What a remote benchmark run reports: one JSON object (the record kept in
//! `benches/results/`) and a human table. Every figure sits beside its peer
//! from the same run and their ratio. MB = 1e6 bytes.

use std::fmt::Write as _;

use serde::Serialize;

use crate::e2e_report::{RestoreRun, SnapshotRun, median, min, ratio};
use crate::units::human_bytes;

/// What the figures measure, in the report and the JSON.
pub const NOTE: &str = "the S3 server is SeaweedFS on loopback: these figures measure gpusnap's \
     overhead over the object-store client, not a network";

/// The bar each ratio is held to (the targets).
#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    /// `upload_vs_plain` at least this.
    pub upload_vs_plain_min: f64,
    /// `persist_with_vs_without` at least this.
    pub persist_with_vs_without_min: f64,
}

impl Default for Targets {
    fn default() -> Targets {
        Targets {
            upload_vs_plain_min: 0.9,
            persist_with_vs_without_min: 0.95,
        }
    }
}

/// One round of the upload figure: ours, then the plain multipart upload
/// of the same file's bytes.
#[derive(Debug, Clone, Serialize)]
pub struct UploadRun {
    /// `transfer::upload`: data parts read, checked and put, completed,
    /// HEAD, manifest created and read back.
    pub ours_s: f64,
    #[serde(rename = "ours_MBps")]
    pub ours_mb_per_s: f64,
    /// create_multipart, `concurrency` parts of pread + put_part in
    /// flight, complete_multipart.
    pub plain_s: f64,
    #[serde(rename = "plain_MBps")]
    pub plain_mb_per_s: f64,
    /// Parts each sent.
    pub ours_parts: usize,
    pub plain_parts: usize,
}

/// One round of the download figure: the plain ranged GETs, then a fresh
/// daemon's restore from the object store.
#[derive(Debug, Clone, Serialize)]
pub struct DownloadRun {
    /// HEAD, then `concurrency` ranged GETs of `part_bytes` in flight, the
    /// bytes kept in memory.
    pub ranged_gets_s: f64,
    #[serde(rename = "ranged_gets_MBps")]
    pub ranged_gets_mb_per_s: f64,
    /// Bytes the GETs fetched (the data object: header and data).
    pub ranged_gets_bytes: u64,
    /// The restore on a fresh daemon with an empty root (source `remote`).
    pub restore: RestoreRun,
}

/// The daemon's own upload figures (from its /metrics, after the
/// snapshots of the with-uploads run were all complete remotely).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DaemonUploads {
    /// `gpusnap_remote_uploads_total{outcome="uploaded"}`.
    pub uploaded: Option<f64>,
    /// `gpusnap_remote_uploads_total{outcome="skipped"}`: older steps
    /// passed over for a newer one.
    pub skipped: Option<f64>,
    pub upload_seconds_mean: Option<f64>,
    pub upload_bytes_total: Option<f64>,
    /// Seconds from the last snapshot's commit until its step was complete
    /// in the object store.
    pub last_step_complete_after_s: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteReport {
    pub benchmark: &'static str,
    pub note: &'static str,
    /// Best of the repeats: data file bytes / time.
    #[serde(rename = "upload_MBps")]
    pub upload_mb_per_s: Option<f64>,
    #[serde(rename = "plain_upload_MBps")]
    pub plain_upload_mb_per_s: Option<f64>,
    pub upload_vs_plain: Option<f64>,
    /// State bytes / median of the daemon's persist time
    /// (`CommitInfo::persist`), with the remote tier uploading.
    #[serde(rename = "persist_with_uploads_MBps")]
    pub persist_with_uploads_mb_per_s: Option<f64>,
    /// The same with no `[remote]` table.
    #[serde(rename = "persist_without_uploads_MBps")]
    pub persist_without_uploads_mb_per_s: Option<f64>,
    pub persist_with_vs_without: Option<f64>,
    /// The same daemon config as without, a plain uploader sending the
    /// same bytes beside it from the first commit on: what uploading costs
    /// the persist on this machine whoever uploads (the server shares the
    /// CPUs and the uploader reads the store's disk).
    #[serde(rename = "persist_beside_plain_uploads_MBps")]
    pub persist_beside_plain_uploads_mb_per_s: Option<f64>,
    /// `persist_with_uploads_MBps / persist_beside_plain_uploads_MBps`.
    pub persist_with_vs_beside_plain: Option<f64>,
    /// Data file bytes / the daemon's mean upload time during the persists.
    #[serde(rename = "daemon_upload_MBps")]
    pub daemon_upload_mb_per_s: Option<f64>,
    /// Data file bytes / the mean time of the plain uploads beside the
    /// other daemon's persists.
    #[serde(rename = "plain_beside_upload_MBps")]
    pub plain_beside_upload_mb_per_s: Option<f64>,
    pub daemon_upload_vs_plain_beside: Option<f64>,
    /// The same two from the client's side (captured to committed).
    #[serde(rename = "client_persist_with_uploads_MBps")]
    pub client_persist_with_uploads_mb_per_s: Option<f64>,
    #[serde(rename = "client_persist_without_uploads_MBps")]
    pub client_persist_without_uploads_mb_per_s: Option<f64>,
    pub client_persist_with_vs_without: Option<f64>,
    /// Best of the repeats: `Client::restore` wall time on a fresh daemon.
    pub restore_remote_s: Option<f64>,
    #[serde(rename = "restore_remote_MBps")]
    pub restore_remote_mb_per_s: Option<f64>,
    /// Best of the repeats: the same object by ranged GETs alone.
    pub ranged_gets_s: Option<f64>,
    #[serde(rename = "ranged_gets_MBps")]
    pub ranged_gets_mb_per_s: Option<f64>,
    /// `ranged_gets_s / restore_remote_s` (1: the restore costs no more
    /// than fetching the bytes).
    pub ranged_gets_vs_restore: Option<f64>,
    pub targets: Targets,
    pub meets_upload_target: Option<bool>,
    pub meets_persist_target: Option<bool>,
    pub size_bytes: u64,
    /// The committed data file (safetensors header and data).
    pub file_bytes: u64,
    pub tensors: usize,
    pub part_bytes: u64,
    pub concurrency: usize,
    pub repeats: usize,
    pub snapshots_requested: usize,
    pub smoke: bool,
    pub page_cache_dropped: bool,
    pub endpoint: String,
    /// The `[remote]` table the daemons and the library ran with.
    pub remote_config: serde_json::Value,
    /// The daemon config without and with the remote tier.
    pub config_without: serde_json::Value,
    pub config_with: serde_json::Value,
    pub date: String,
    pub host: String,
    pub kernel: String,
    pub cpus: usize,
    pub dir: String,
    /// Where the S3 servers kept their data, and whether that is tmpfs.
    pub server_dir: String,
    pub server_in_memory: bool,
    pub gpusnapd: String,
    pub wall_s: f64,
    pub uploads: Vec<UploadRun>,
    pub snapshots_without: Vec<SnapshotRun>,
    pub snapshots_with: Vec<SnapshotRun>,
    pub snapshots_beside_plain: Vec<SnapshotRun>,
    /// Each plain upload beside that daemon, seconds.
    pub plain_beside_upload_s: Vec<f64>,
    pub daemon_uploads: DaemonUploads,
    pub downloads: Vec<DownloadRun>,
    pub errors: Vec<String>,
}

impl RemoteReport {
    /// Fills the headline keys, ratios and verdicts from the runs.
    pub fn summarize(&mut self) {
        let size_mb = self.size_bytes as f64 / 1e6;
        let file_mb = self.file_bytes as f64 / 1e6;
        let ours: Vec<f64> = self.uploads.iter().map(|u| u.ours_s).collect();
        let plain: Vec<f64> = self.uploads.iter().map(|u| u.plain_s).collect();
        self.upload_mb_per_s = min(&ours).map(|s| file_mb / s);
        self.plain_upload_mb_per_s = min(&plain).map(|s| file_mb / s);
        self.upload_vs_plain = ratio(self.upload_mb_per_s, self.plain_upload_mb_per_s);

        let daemon = |runs: &[SnapshotRun]| {
            median(&runs.iter().map(|r| r.daemon_persist_s).collect::<Vec<_>>())
                .map(|s| size_mb / s)
        };
        let client = |runs: &[SnapshotRun]| {
            median(&runs.iter().map(|r| r.persist_s).collect::<Vec<_>>()).map(|s| size_mb / s)
        };
        self.persist_with_uploads_mb_per_s = daemon(&self.snapshots_with);
        self.persist_without_uploads_mb_per_s = daemon(&self.snapshots_without);
        self.persist_with_vs_without = ratio(
            self.persist_with_uploads_mb_per_s,
            self.persist_without_uploads_mb_per_s,
        );
        self.persist_beside_plain_uploads_mb_per_s = daemon(&self.snapshots_beside_plain);
        self.persist_with_vs_beside_plain = ratio(
            self.persist_with_uploads_mb_per_s,
            self.persist_beside_plain_uploads_mb_per_s,
        );
        self.daemon_upload_mb_per_s = self.daemon_uploads.upload_seconds_mean.map(|s| file_mb / s);
        let beside = &self.plain_beside_upload_s;
        self.plain_beside_upload_mb_per_s = (!beside.is_empty())
            .then(|| file_mb / (beside.iter().sum::<f64>() / beside.len() as f64));
        self.daemon_upload_vs_plain_beside = ratio(
            self.daemon_upload_mb_per_s,
            self.plain_beside_upload_mb_per_s,
        );
        self.client_persist_with_uploads_mb_per_s = client(&self.snapshots_with);
        self.client_persist_without_uploads_mb_per_s = client(&self.snapshots_without);
        self.client_persist_with_vs_without = ratio(
            self.client_persist_with_uploads_mb_per_s,
            self.client_persist_without_uploads_mb_per_s,
        );

        let restores: Vec<f64> = self.downloads.iter().map(|d| d.restore.wall_s).collect();
        let gets: Vec<f64> = self.downloads.iter().map(|d| d.ranged_gets_s).collect();
        self.restore_remote_s = min(&restores);
        self.restore_remote_mb_per_s = self.restore_remote_s.map(|s| size_mb / s);
        self.ranged_gets_s = min(&gets);
        self.ranged_gets_mb_per_s = self.ranged_gets_s.map(|s| file_mb / s);
        self.ranged_gets_vs_restore = ratio(self.ranged_gets_s, self.restore_remote_s);

        let t = &self.targets;
        self.meets_upload_target = self.upload_vs_plain.map(|r| r >= t.upload_vs_plain_min);
        self.meets_persist_target = self
            .persist_with_vs_without
            .map(|r| r >= t.persist_with_vs_without_min);
    }

    /// The human table: each figure, its peer, the ratio, the target.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "remote benchmark: {} in {} tensors ({} data file), parts of {}, concurrency {}, \
             best of {} repeats, {} snapshots; {} on {} ({}), {}",
            human_bytes(self.size_bytes),
            self.tensors,
            human_bytes(self.file_bytes),
            human_bytes(self.part_bytes),
            self.concurrency,
            self.repeats,
            self.snapshots_requested,
            self.dir,
            self.host,
            self.kernel,
            self.date
        );
        let _ = writeln!(s, "note: {NOTE}");
        let _ = writeln!(
            s,
            "S3 server data in {} ({})",
            self.server_dir,
            if self.server_in_memory {
                "tmpfs: the server's writes stay off the store's disk"
            } else {
                "on disk: the server's writes share it with the store's"
            }
        );
        let _ = writeln!(
            s,
            "{:<38} {:>12} {:<30} {:>8} {:>8}",
            "figure", "gpusnap", "peer", "ratio", "target"
        );
        let secs = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3} s"));
        let mbps = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} MB/s"));
        let mut row = |what: &str, ours: String, peer: String, r: Option<f64>, target: &str| {
            let _ = writeln!(
                s,
                "{what:<38} {ours:>12} {peer:<30} {:>8} {target:>8}",
                r.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))
            );
        };
        row(
            "upload (transfer::upload)",
            mbps(self.upload_mb_per_s),
            format!("plain multipart {}", mbps(self.plain_upload_mb_per_s)),
            self.upload_vs_plain,
            ">= 0.9",
        );
        row(
            "persist with uploads (daemon's)",
            mbps(self.persist_with_uploads_mb_per_s),
            format!("without {}", mbps(self.persist_without_uploads_mb_per_s)),
            self.persist_with_vs_without,
            ">= 0.95",
        );
        row(
            "persist with uploads vs plain uploader",
            mbps(self.persist_with_uploads_mb_per_s),
            format!(
                "beside plain {}",
                mbps(self.persist_beside_plain_uploads_mb_per_s)
            ),
            self.persist_with_vs_beside_plain,
            "",
        );
        row(
            "upload during the persists (mean)",
            mbps(self.daemon_upload_mb_per_s),
            format!("plain beside {}", mbps(self.plain_beside_upload_mb_per_s)),
            self.daemon_upload_vs_plain_beside,
            "",
        );
        row(
            "persist with uploads (client's)",
            mbps(self.client_persist_with_uploads_mb_per_s),
            format!(
                "without {}",
                mbps(self.client_persist_without_uploads_mb_per_s)
            ),
            self.client_persist_with_vs_without,
            "",
        );
        row(
            "download + restore (fresh daemon)",
            secs(self.restore_remote_s),
            format!("ranged GETs {}", secs(self.ranged_gets_s)),
            self.ranged_gets_vs_restore,
            "",
        );
        let _ = writeln!(
            s,
            "download + restore {} vs ranged GETs alone {}; ratio = GETs time / restore time",
            mbps(self.restore_remote_mb_per_s),
            mbps(self.ranged_gets_mb_per_s)
        );
        let u = &self.daemon_uploads;
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        let _ = writeln!(
            s,
            "daemon uploads during the persist run: {} uploaded, {} skipped for a newer step, \
             {} each (mean); last step complete remotely {:.2} s after its commit",
            opt(u.uploaded),
            opt(u.skipped),
            secs(u.upload_seconds_mean),
            u.last_step_complete_after_s
        );
        for (i, up) in self.uploads.iter().enumerate() {
            let _ = writeln!(
                s,
                "  upload round {}: ours {:.3} s ({:.1} MB/s, {} parts), plain {:.3} s ({:.1} MB/s, {} parts)",
                i + 1,
                up.ours_s,
                up.ours_mb_per_s,
                up.ours_parts,
                up.plain_s,
                up.plain_mb_per_s,
                up.plain_parts
            );
        }
        for (what, runs) in [
            ("without", &self.snapshots_without),
            ("beside plain", &self.snapshots_beside_plain),
            ("with", &self.snapshots_with),
        ] {
            let persists: Vec<String> = runs
                .iter()
                .map(|r| format!("{:.3}", r.daemon_persist_s))
                .collect();
            let _ = writeln!(
                s,
                "  persist {what} uploads, daemon's, per snapshot (s): {}",
                persists.join(" ")
            );
        }
        for (i, d) in self.downloads.iter().enumerate() {
            let _ = writeln!(
                s,
                "  download round {}: ranged GETs {:.3} s, restore {:.3} s (daemon fill {:.3} s, copy {:.3} s), verified",
                i + 1,
                d.ranged_gets_s,
                d.restore.wall_s,
                d.restore.daemon_fill_s,
                d.restore.copy_s
            );
        }
        if !self.page_cache_dropped {
            let _ = writeln!(
                s,
                "page cache NOT dropped (not root?): file reads may come from memory"
            );
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        s
    }
}
