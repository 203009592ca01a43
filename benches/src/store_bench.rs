//! `gpusnap-bench store`: the snapshot store's write and verified read of
//! one snapshot, per I/O backend, against fio on the same directory.
//!
//! Order (fio runs next to the io_uring figures it is compared with, so the
//! shared machine's noise hits both alike):
//!
//! ```text
//! for each backend:
//!     [io_uring only]  drop cache, fio write
//!     drop cache, store write (timed)
//!     [io_uring only]  drop cache, fio read, remove fio's file
//!     drop cache, store read, every chunk's CRC checked (timed)
//!     [io_uring only, unless --no-fio-sweep]  the fio sweep (fio_sweep.rs):
//!         6 settings, each drop cache, write, drop cache, read
//!     remove the backend's directory unless --keep
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use gpusnap_proto::convert::{to_u64, to_usize};
use gpusnapd::storage::probe::BackendChoice;
use gpusnapd::store::{Layout, SnapshotId, Source, Store, StoreConfig};

use crate::fio::{self, Direction, Setting};
use crate::fio_sweep;
use crate::mapping::DataMapping;
use crate::report::{BackendRun, Report};
use crate::sys;
use crate::units::human_bytes;
use crate::workdir::{CacheDropper, WorkDir};

/// The job name of the benchmark's snapshots.
const JOB: &str = "bench";

/// One I/O backend to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Pwrite,
    Buffered,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::IoUring, Backend::Pwrite, Backend::Buffered];

    pub fn name(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::Pwrite => "pwrite",
            Backend::Buffered => "buffered",
        }
    }

    fn choice(self) -> BackendChoice {
        match self {
            Backend::IoUring => BackendChoice::IoUring,
            Backend::Pwrite => BackendChoice::Pwrite,
            Backend::Buffered => BackendChoice::Buffered,
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown backend {s:?} (io_uring, pwrite, buffered)"))
    }
}

/// What `store` was asked to do.
#[derive(Debug, Clone)]
pub struct StoreBench {
    pub size_bytes: u64,
    /// Run here and leave the snapshots.
    pub keep: Option<PathBuf>,
    /// Run in a fresh directory under this one.
    pub dir: Option<PathBuf>,
    pub backends: Vec<Backend>,
    pub queue_depth: usize,
    pub io_buffer_bytes: usize,
    /// fio's `--iodepth` at the single setting (1 MiB blocks).
    pub fio_iodepth: usize,
    /// Whether to run the fio sweep (the disk's limit) too.
    pub fio_sweep: bool,
}

/// Runs the benchmark; the report carries any per-backend failure in
/// `errors`.
pub fn run(args: &StoreBench) -> Result<Report, String> {
    let fio_version = fio::version()?;
    let size_usize = to_usize(args.size_bytes);
    let work = WorkDir::choose(args.keep.as_deref(), args.dir.as_deref())?;
    for backend in &args.backends {
        let root = work.path.join(backend.name());
        crate::workdir::refuse_existing(&root)?;
    }
    let (specs, layout) = crate::tensors::planned_tensor_set(args.size_bytes)?;
    eprintln!(
        "store bench: {} in {} tensors, in {}",
        human_bytes(args.size_bytes),
        specs.len(),
        work.path.display()
    );

    let fill_start = Instant::now();
    let data = DataMapping::filled(size_usize)
        .map_err(|e| format!("mmap of {} bytes: {e}", args.size_bytes))?;
    eprintln!(
        "data section mapped and filled in {:.2} s",
        fill_start.elapsed().as_secs_f64()
    );

    let cache = CacheDropper::new();
    let mut report = Report {
        benchmark: "store",
        backend: None,
        write_mb_per_s: None,
        fio_write_mb_per_s: None,
        read_mb_per_s: None,
        fio_read_mb_per_s: None,
        write_vs_fio: None,
        read_vs_fio: None,
        write_vs_fio_best: None,
        read_vs_fio_best: None,
        cpu_s_per_gb: None,
        io_uring_write_mb_per_s: None,
        io_uring_read_mb_per_s: None,
        pwrite_write_mb_per_s: None,
        pwrite_read_mb_per_s: None,
        buffered_write_mb_per_s: None,
        buffered_read_mb_per_s: None,
        size_bytes: args.size_bytes,
        tensors: specs.len(),
        page_cache_dropped: cache.works,
        queue_depth: args.queue_depth,
        io_buffer_bytes: args.io_buffer_bytes,
        fio_iodepth: args.fio_iodepth,
        date: sys::utc_now(),
        host: sys::host(),
        kernel: sys::kernel(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        dir: work.path.display().to_string(),
        fio_version,
        fio_write: None,
        fio_read: None,
        sweep: fio_sweep::SweepSummary::default(),
        runs: Vec::new(),
        errors: Vec::new(),
    };

    // fio runs beside io_uring, or beside the first backend without it.
    let fio_next_to = if args.backends.contains(&Backend::IoUring) {
        Some(Backend::IoUring)
    } else {
        args.backends.first().copied()
    };
    for &backend in &args.backends {
        let mut one = OneBackend {
            args,
            work: &work,
            layout: &layout,
            data: data.as_slice(),
            cache: &cache,
            with_fio: fio_next_to == Some(backend),
            report: &mut report,
        };
        match one.run(backend) {
            Ok(run) => {
                eprintln!(
                    "{}: write {:.1} MB/s, read {:.1} MB/s",
                    run.backend, run.write_mb_per_s, run.read_mb_per_s
                );
                report.runs.push(run);
            }
            Err(e) => {
                eprintln!("error: {}: {e}", backend.name());
                report.errors.push(format!("{}: {e}", backend.name()));
            }
        }
        if let Err(e) = fio::remove_file(&work.path) {
            report.errors.push(format!("removing fio's file: {e}"));
        }
        if args.fio_sweep && fio_next_to == Some(backend) {
            sweep(&work.path, &cache, &mut report);
        }
        if args.keep.is_none() {
            let root = work.path.join(backend.name());
            if let Err(e) = std::fs::remove_dir_all(&root)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                report
                    .errors
                    .push(format!("removing {}: {e}", root.display()));
            }
        }
    }
    if report.fio_write.is_none() {
        // The backend fio was to run beside failed before fio's turn: run the
        // peer on its own, so the record still says what the disk does.
        fio_alone(&work.path, args.fio_iodepth, &cache, &mut report);
    }
    report.summarize();
    Ok(report)
}

/// The fio sweep on `dir`, its summary and failures into `report`.
fn sweep(dir: &Path, cache: &CacheDropper, report: &mut Report) {
    eprintln!(
        "fio sweep: {} settings, write and read",
        fio_sweep::SETTINGS.len()
    );
    let sweep = fio_sweep::run(dir, report.size_bytes, cache);
    report.sweep = sweep.summary();
    eprintln!("{}", report.sweep.best_line());
    report.errors.extend(sweep.errors);
}

/// fio write then read on `dir`, with no store run between them.
fn fio_alone(dir: &Path, iodepth: usize, cache: &CacheDropper, report: &mut Report) {
    for direction in [Direction::Write, Direction::Read] {
        cache.drop_cache();
        match fio::run(
            dir,
            direction,
            report.size_bytes,
            Setting::mib_blocks(iodepth),
        ) {
            Ok(r) => {
                eprintln!("fio {}: {:.1} MB/s", direction.name(), r.mb_per_s());
                match direction {
                    Direction::Write => report.fio_write = Some(r),
                    Direction::Read => report.fio_read = Some(r),
                }
            }
            Err(e) => {
                report.errors.push(e);
                break;
            }
        }
    }
    if let Err(e) = fio::remove_file(dir) {
        report.errors.push(format!("removing fio's file: {e}"));
    }
}

/// One backend's part of the run.
struct OneBackend<'a> {
    args: &'a StoreBench,
    work: &'a WorkDir,
    layout: &'a Layout,
    data: &'a [u8],
    cache: &'a CacheDropper,
    with_fio: bool,
    report: &'a mut Report,
}

impl OneBackend<'_> {
    fn run(&mut self, backend: Backend) -> Result<BackendRun, String> {
        let size = self.args.size_bytes;
        let root = self.work.path.join(backend.name());
        crate::workdir::refuse_existing(&root)?;
        let store = Store::open(StoreConfig {
            root: root.clone(),
            io_backend: backend.choice(),
            keep_snapshots: 1,
            queue_depth: self.args.queue_depth,
            io_buffer_bytes: self.args.io_buffer_bytes,
            ..StoreConfig::default()
        })
        .map_err(|e| format!("opening the store in {}: {e}", root.display()))?;
        let id = SnapshotId::new(JOB, 0, 1).map_err(|e| e.to_string())?;

        if self.with_fio {
            self.cache.drop_cache();
            let r = fio::run(
                &self.work.path,
                Direction::Write,
                size,
                Setting::mib_blocks(self.args.fio_iodepth),
            )?;
            eprintln!("fio write: {:.1} MB/s", r.mb_per_s());
            self.report.fio_write = Some(r);
        }
        self.cache.drop_cache();
        let cpu_start = sys::cpu_seconds();
        let start = Instant::now();
        let committed = store
            .write_laid_out(&id, self.layout, 1, Source::Memory(self.data))
            .map_err(|e| format!("write: {e}"))?;
        let write_s = start.elapsed().as_secs_f64();
        let write_cpu_s = sys::cpu_seconds() - cpu_start;
        let manifest_backend = committed.manifest.io_backend.name().to_owned();
        if manifest_backend != backend.name() {
            return Err(format!(
                "asked for {} but the manifest says it was written with {manifest_backend}",
                backend.name()
            ));
        }

        if self.with_fio {
            self.cache.drop_cache();
            let r = fio::run(
                &self.work.path,
                Direction::Read,
                size,
                Setting::mib_blocks(self.args.fio_iodepth),
            )?;
            eprintln!("fio read: {:.1} MB/s", r.mb_per_s());
            self.report.fio_read = Some(r);
            fio::remove_file(&self.work.path).map_err(|e| format!("removing fio's file: {e}"))?;
        }
        self.cache.drop_cache();
        let snapshot = store
            .find(JOB, 0, None)
            .map_err(|e| format!("finding the snapshot just written: {e}"))?;
        if snapshot.id() != id {
            return Err(format!(
                "found {:?}, not the snapshot just written",
                snapshot.id()
            ));
        }
        let mut read_bytes = 0u64;
        let mut next_offset = 0u64;
        let mut out_of_order = false;
        let cpu_start = sys::cpu_seconds();
        let start = Instant::now();
        store
            .read(&snapshot, &mut |offset, bytes| {
                out_of_order |= offset != next_offset;
                let len = to_u64(bytes.len());
                next_offset = offset + len;
                read_bytes += len;
                Ok(())
            })
            .map_err(|e| format!("verified read: {e}"))?;
        let read_s = start.elapsed().as_secs_f64();
        let read_cpu_s = sys::cpu_seconds() - cpu_start;
        if read_bytes != size || out_of_order {
            return Err(format!(
                "the verified read handed out {read_bytes} bytes{} for a {size}-byte data section",
                if out_of_order { " out of order" } else { "" }
            ));
        }
        Ok(BackendRun {
            backend: backend.name().to_owned(),
            manifest_backend,
            write_s,
            write_mb_per_s: size as f64 / 1e6 / write_s,
            write_cpu_s,
            read_s,
            read_mb_per_s: size as f64 / 1e6 / read_s,
            read_cpu_s,
            read_bytes,
        })
    }
}
