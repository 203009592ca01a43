//! `gpusnap-bench gpu`: the CUDA backend through the real `gpusnapd`, each
//! figure beside a plain CUDA copy of the same bytes in the same run:
//!
//! * capture of one device buffer into page-locked staging against a
//!   plain `cuMemcpyDtoHAsync` into `cuMemHostAlloc` memory (both timed by
//!   events on the device), per size;
//! * the host's stall per snapshot in overlapped use (`begin_snapshot` +
//!   `finish_snapshot_in_background`), per size;
//! * restore (host-to-device out of staging) against a plain pinned
//!   `cuMemcpyHtoDAsync` (both timed on the host, to the end of the copy);
//! * the one-off cost of page-locking staging, in GB/s;
//! * many small tensors (4 KiB to 1 MiB) captured in one snapshot against a
//!   loop of plain copies of the same tensors.
//!
//! `--smoke` runs it small, for CI on the CUDA driver double: its figures
//! mean nothing, and the report says so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys::{self, CUresult};
use gpusnap::device::cuda::{CudaDevice, DeviceMemory};
use gpusnap::proto::BusyPolicy;
use gpusnap::{Buffer, Client, ClientConfig, Dtype, Pinning, SnapshotOutcome, Step};
use gpusnapd::config::{ByteSize, Config};
use gpusnapd_testkit::{DaemonProcess, Defaults, Launch, Settings};
use serde::Serialize;

use crate::daemon::binary;
use crate::units::human_bytes;
use crate::workdir::WorkDir;
use crate::{sys as host, units};

/// Overlapped snapshots timed per size (the median is reported).
const OVERLAPPED_SNAPSHOTS: usize = 5;

/// What `gpu` was asked to do.
#[derive(Debug, Clone)]
pub struct GpuBench {
    pub sizes: Vec<u64>,
    pub many_tensors: usize,
    pub smoke: bool,
    pub dir: Option<PathBuf>,
    pub gpusnapd: Option<PathBuf>,
}

/// One size's figures.
#[derive(Debug, Clone, Serialize)]
pub struct SizeRun {
    pub size_bytes: u64,
    /// Page-locking the registration's staging (`None`: not pinned).
    pub register_gb_per_s: Option<f64>,
    pub capture_s: f64,
    pub peer_dtoh_s: f64,
    /// Peer time over ours: 1.0 is as fast as a plain pinned copy.
    pub capture_vs_peer: f64,
    /// Median host stall of an overlapped snapshot.
    pub overlapped_stall_s: f64,
    pub restore_copy_s: f64,
    pub peer_htod_s: f64,
    pub restore_vs_peer: f64,
}

/// Many small tensors in one snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct ManyRun {
    pub tensors: usize,
    pub bytes: u64,
    pub capture_s: f64,
    pub peer_loop_s: f64,
    pub capture_vs_peer: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    pub benchmark: &'static str,
    pub smoke: bool,
    /// Why the figures mean nothing, when they do not.
    pub caveat: Option<String>,
    pub device: String,
    pub driver_version: i32,
    pub driver_library: String,
    pub sizes: Vec<SizeRun>,
    pub many: Option<ManyRun>,
    pub date: String,
    pub host: String,
}

impl GpuReport {
    /// A human table.
    pub fn table(&self) -> String {
        let mut t = format!(
            "gpu: {} (driver {}, {})\n",
            self.device, self.driver_version, self.driver_library
        );
        if let Some(c) = &self.caveat {
            t += &format!("NOTE: {c}\n");
        }
        t += "size       pin GB/s  capture  peer D2H  ratio   stall(ovl)  restore  peer H2D  ratio\n";
        for r in &self.sizes {
            t += &format!(
                "{:<10} {:>8}  {:>7.4}  {:>8.4}  {:>5.2}   {:>10.6}  {:>7.4}  {:>8.4}  {:>5.2}\n",
                human_bytes(r.size_bytes),
                r.register_gb_per_s
                    .map_or_else(|| "unpinned".into(), |g| format!("{g:.2}")),
                r.capture_s,
                r.peer_dtoh_s,
                r.capture_vs_peer,
                r.overlapped_stall_s,
                r.restore_copy_s,
                r.peer_htod_s,
                r.restore_vs_peer
            );
        }
        if let Some(m) = &self.many {
            t += &format!(
                "{} tensors ({}): capture {:.4} s, plain copies {:.4} s, ratio {:.2}\n",
                m.tensors,
                human_bytes(m.bytes),
                m.capture_s,
                m.peer_loop_s,
                m.capture_vs_peer
            );
        }
        t
    }
}

/// Runs the benchmark; any failure of gpusnap or of a peer copy is an
/// `Err`.
pub fn run(args: &GpuBench) -> Result<GpuReport, String> {
    let device = CudaDevice::get(0).map_err(|e| format!("CUDA: {e}"))?;
    let on_double = CudaDevice::driver_library().is_ok_and(|l| l.contains("cuda-double"));
    let caveat = match (args.smoke, on_double) {
        (_, true) => {
            Some("run on the CUDA driver double (host memory): these figures mean nothing".into())
        }
        (true, false) => {
            Some("smoke mode: sizes too small for the figures to mean anything".into())
        }
        (false, false) => None,
    };
    let work = WorkDir::choose(None, args.dir.as_deref())?;
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    let many_bytes = many_sizes(args.many_tensors, args.smoke)
        .iter()
        .sum::<u64>();
    let mut daemon = start_daemon(
        &binary(args.gpusnapd.as_deref())?,
        &work.path,
        largest.max(many_bytes),
    )?;
    let mut report = GpuReport {
        benchmark: "gpu",
        smoke: args.smoke,
        caveat,
        device: device.device_name().to_owned(),
        driver_version: CudaDevice::driver_version().map_err(|e| e.to_string())?,
        driver_library: CudaDevice::driver_library()
            .map_err(|e| e.to_string())?
            .to_owned(),
        sizes: Vec::new(),
        many: None,
        date: host::utc_now(),
        host: host::host(),
    };
    for &size in &args.sizes {
        eprintln!("gpu: {}", human_bytes(size));
        report.sizes.push(one_size(&daemon, &device, size)?);
    }
    if args.many_tensors > 0 {
        eprintln!("gpu: {} small tensors", args.many_tensors);
        report.many = Some(many(
            &daemon,
            &device,
            &many_sizes(args.many_tensors, args.smoke),
        )?);
    }
    daemon.stop().map_err(|e| e.to_string())?;
    Ok(report)
}

fn one_size(
    daemon: &DaemonProcess,
    device: &Arc<CudaDevice>,
    size: u64,
) -> Result<SizeRun, String> {
    let len = units_to_usize(size);
    let memory = Arc::new(DeviceMemory::new(device, len).map_err(|e| e.to_string())?);
    memory
        .write(0, &vec![0x5a; len])
        .map_err(|e| e.to_string())?;
    let peer = Peer::new(device, len)?;
    let peer_dtoh_s = peer.dtoh(memory.device_ptr(), len)?;

    let mut client = connect(daemon, &format!("gpu-{size}"))?;
    let buffer = memory.buffer("weights").map_err(|e| e.to_string())?;
    client
        .register("weights", Dtype::U8, vec![size], Buffer::Device(buffer))
        .map_err(|e| e.to_string())?;
    client.sync_registration().map_err(|e| e.to_string())?;
    let register_gb_per_s = client.staging_pinning().iter().find_map(|p| match p {
        Pinning::Pinned { bytes, seconds } => Some(*bytes as f64 / seconds.max(1e-9) / 1e9),
        _ => None,
    });
    let capture = match client.snapshot(1).map_err(|e| e.to_string())? {
        SnapshotOutcome::Captured(c) => c.capture,
        other => return Err(format!("step 1 not captured: {other:?}")),
    };
    client.wait_committed(1).map_err(|e| e.to_string())?;
    let mut stalls = Vec::with_capacity(OVERLAPPED_SNAPSHOTS);
    for step in 2..2 + OVERLAPPED_SNAPSHOTS as u64 {
        let started = Instant::now();
        client.begin_snapshot(step).map_err(|e| e.to_string())?;
        client
            .finish_snapshot_in_background()
            .map_err(|e| e.to_string())?;
        stalls.push(started.elapsed());
        client.wait_committed(step).map_err(|e| e.to_string())?;
    }
    stalls.sort();
    let restored = client
        .restore(Step::Latest)
        .map_err(|e| e.to_string())?
        .ok_or("no snapshot to restore")?;
    let peer_htod_s = peer.htod(memory.device_ptr(), len)?;
    let capture_s = capture.as_secs_f64();
    let restore_copy_s = restored.copy.as_secs_f64();
    Ok(SizeRun {
        size_bytes: size,
        register_gb_per_s,
        capture_s,
        peer_dtoh_s,
        capture_vs_peer: peer_dtoh_s / capture_s.max(1e-9),
        overlapped_stall_s: stalls[stalls.len() / 2].as_secs_f64(),
        restore_copy_s,
        peer_htod_s,
        restore_vs_peer: peer_htod_s / restore_copy_s.max(1e-9),
    })
}

fn many(
    daemon: &DaemonProcess,
    device: &Arc<CudaDevice>,
    sizes: &[u64],
) -> Result<ManyRun, String> {
    let mut client = connect(daemon, "gpu-many")?;
    let mut memories = Vec::with_capacity(sizes.len());
    for (i, &size) in sizes.iter().enumerate() {
        let memory =
            Arc::new(DeviceMemory::new(device, units_to_usize(size)).map_err(|e| e.to_string())?);
        let name = format!("t{i}");
        let buffer = memory.buffer(&name).map_err(|e| e.to_string())?;
        client
            .register(name, Dtype::U8, vec![size], Buffer::Device(buffer))
            .map_err(|e| e.to_string())?;
        memories.push(memory);
    }
    let bytes: u64 = sizes.iter().sum();
    let peer = Peer::new(device, units_to_usize(bytes))?;
    let peer_loop_s = peer.dtoh_each(&memories)?;
    let capture = match client.snapshot(1).map_err(|e| e.to_string())? {
        SnapshotOutcome::Captured(c) => c.capture,
        other => return Err(format!("not captured: {other:?}")),
    };
    client.wait_committed(1).map_err(|e| e.to_string())?;
    let capture_s = capture.as_secs_f64();
    Ok(ManyRun {
        tensors: sizes.len(),
        bytes,
        capture_s,
        peer_loop_s,
        capture_vs_peer: peer_loop_s / capture_s.max(1e-9),
    })
}

/// `count` sizes from 4 KiB to 1 MiB (64 KiB in smoke mode), 4 KiB
/// multiples spread over the powers of two between, by a fixed sequence.
fn many_sizes(count: usize, smoke: bool) -> Vec<u64> {
    let max_exp: u64 = if smoke { 4 } else { 8 }; // 2^8 pages: 1 MiB
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..count)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let base = 1u64 << ((x >> 33) % (max_exp + 1));
            let pages = (base + (x >> 13) % base).min(1 << max_exp);
            pages * 4096
        })
        .collect()
}

fn units_to_usize(v: u64) -> usize {
    gpusnap_proto::convert::to_usize(v)
}

/// A plain CUDA copy's side: page-locked host memory (`cuMemHostAlloc`)
/// and a stream of its own.
struct Peer {
    device: Arc<CudaDevice>,
    host: *mut std::ffi::c_void,
    len: usize,
    stream: sys::CUstream,
}

fn check(call: &str, code: CUresult) -> Result<(), String> {
    if code == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{call}: {code:?}"))
    }
}

impl Peer {
    fn new(device: &Arc<CudaDevice>, len: usize) -> Result<Peer, String> {
        make_current(device)?;
        let mut host: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: a context is current; the out-pointer is a live local.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(&mut host, len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE)
        })?;
        let mut stream: sys::CUstream = std::ptr::null_mut();
        // SAFETY: as above.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(&mut stream, 1)
        })?;
        Ok(Peer {
            device: Arc::clone(device),
            host,
            len,
            stream,
        })
    }

    /// Seconds between two events around `copies` enqueued on the stream.
    fn timed(
        &self,
        copies: impl FnOnce(sys::CUstream) -> Result<(), String>,
    ) -> Result<f64, String> {
        make_current(&self.device)?;
        let (mut start, mut end): (sys::CUevent, sys::CUevent) =
            (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: a context is current; out-pointers are live locals; the
        // events are destroyed below.
        unsafe {
            check("cuEventCreate", sys::cuEventCreate(&mut start, 0))?;
            check("cuEventCreate", sys::cuEventCreate(&mut end, 0))?;
            check("cuEventRecord", sys::cuEventRecord(start, self.stream))?;
        }
        copies(self.stream)?;
        let mut millis = 0.0f32;
        // SAFETY: live events and stream.
        unsafe {
            check("cuEventRecord", sys::cuEventRecord(end, self.stream))?;
            check("cuEventSynchronize", sys::cuEventSynchronize(end))?;
            check(
                "cuEventElapsedTime_v2",
                sys::cuEventElapsedTime_v2(&mut millis, start, end),
            )?;
            sys::cuEventDestroy_v2(start);
            sys::cuEventDestroy_v2(end);
        }
        Ok(f64::from(millis) / 1e3)
    }

    fn dtoh(&self, from: sys::CUdeviceptr, len: usize) -> Result<f64, String> {
        assert!(len <= self.len);
        self.timed(|s| {
            // SAFETY: `host` holds `len` page-locked bytes; `from` is a live
            // allocation of `len` bytes.
            let code = unsafe { sys::cuMemcpyDtoHAsync_v2(self.host, from, len, s) };
            check("cuMemcpyDtoHAsync_v2", code)
        })
    }

    fn dtoh_each(&self, memories: &[Arc<DeviceMemory>]) -> Result<f64, String> {
        self.timed(|s| {
            let mut offset = 0usize;
            for m in memories {
                // SAFETY: the offsets partition `host` (its length is the
                // sum of the memories'), so this stays inside it.
                let to = unsafe { self.host.cast::<u8>().add(offset) }.cast();
                // SAFETY: `to` has `m.len()` page-locked bytes; the source
                // is a live allocation of that length.
                let code = unsafe { sys::cuMemcpyDtoHAsync_v2(to, m.device_ptr(), m.len(), s) };
                check("cuMemcpyDtoHAsync_v2", code)?;
                offset += m.len();
            }
            Ok(())
        })
    }

    /// Host wall time of a host-to-device copy to its end (as a restore's
    /// copy is timed).
    fn htod(&self, to: sys::CUdeviceptr, len: usize) -> Result<f64, String> {
        make_current(&self.device)?;
        let started = Instant::now();
        // SAFETY: as in `dtoh`, the other way.
        unsafe {
            check(
                "cuMemcpyHtoDAsync_v2",
                sys::cuMemcpyHtoDAsync_v2(to, self.host, len, self.stream),
            )?;
            check("cuStreamSynchronize", sys::cuStreamSynchronize(self.stream))?;
        }
        Ok(started.elapsed().as_secs_f64())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: made by `new`, released once.
        unsafe {
            sys::cuStreamDestroy_v2(self.stream);
            sys::cuMemFreeHost(self.host);
        }
    }
}

fn make_current(device: &CudaDevice) -> Result<(), String> {
    // SAFETY: the device's retained primary context.
    check("cuCtxSetCurrent", unsafe {
        sys::cuCtxSetCurrent(device.cu_context())
    })
}

fn connect(daemon: &DaemonProcess, job: &str) -> Result<Client, String> {
    let mut config = ClientConfig::new(job);
    config.socket = daemon.socket().to_path_buf();
    config.call_timeout = Duration::from_secs(300);
    config.commit_timeout = Duration::from_secs(1200);
    Client::with_config(config).map_err(|e| format!("connecting: {e}"))
}

/// One daemon for the run: staging for the largest case, a small hot tier
/// (restores are timed from the copy out of staging), one snapshot kept.
fn start_daemon(binary: &Path, dir: &Path, largest: u64) -> Result<DaemonProcess, String> {
    let budget = largest.next_multiple_of(1 << 20) + (1 << 20);
    let mut config = Config::default();
    config.daemon.socket = dir.join("gpusnapd.sock");
    config.daemon.log_level = "info".into();
    config.staging.budget_bytes = ByteSize(budget);
    config.staging.double = false;
    config.staging.policy = BusyPolicy::Block;
    config.hot_tier.budget_bytes = ByteSize(1 << 20);
    config.metrics.listen = String::new();
    config.store.root = dir.join("store");
    config.store.keep_snapshots = 1;
    config
        .validate()
        .map_err(|e| format!("the generated daemon config is invalid: {e}"))?;
    let settings = Settings::from_config(&config).map_err(|e| e.to_string())?;
    let waits = Defaults::load().map_err(|e| e.to_string())?.waits;
    Launch::new(binary, dir, settings, waits)
        .named("gpusnapd-gpu")
        .start()
        .map_err(|e| e.to_string())
}

/// `--sizes`: K/M/G sizes, or `max` for the largest that fits: 80 % of the
/// device's free memory, a quarter of the host's available memory (staging
/// and the peer's pinned buffer both hold it), and a quarter of the free
/// space where the run writes (a commit and its predecessor both exist for
/// a moment).
pub fn parse_sizes(text: &str, dir: &Path) -> Result<Vec<u64>, String> {
    text.split(',')
        .map(|s| match s.trim() {
            "max" => largest_that_fits(dir),
            s => units::parse_size(s),
        })
        .collect()
}

fn largest_that_fits(dir: &Path) -> Result<u64, String> {
    let device = CudaDevice::get(0).map_err(|e| format!("CUDA: {e}"))?;
    make_current(&device)?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: a context is current; out-pointers are live locals.
    check("cuMemGetInfo_v2", unsafe {
        sys::cuMemGetInfo_v2(&mut free, &mut total)
    })?;
    let device_cap = gpusnap_proto::convert::to_u64(free) / 10 * 8;
    let host_cap = host::mem_available_bytes().unwrap_or(0) / 4;
    let disk =
        nix::sys::statvfs::statvfs(dir).map_err(|e| format!("statvfs {}: {e}", dir.display()))?;
    let disk_cap = disk.blocks_available().saturating_mul(disk.fragment_size()) / 4;
    Ok(device_cap.min(host_cap).min(disk_cap) / (1 << 20) * (1 << 20))
}
