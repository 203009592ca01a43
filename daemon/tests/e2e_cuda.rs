//! The CUDA backend end to end through the real daemon: CUDA device
//! buffers (mixed with host buffers) snapshotted in blocking and overlapped
//! use and restored into fresh device memory; thousands of small device
//! tensors; trainers SIGKILLed after `captured` (committed anyway) and
//! while their copies are still queued (nothing committed); injected
//! driver faults (a clear error, the trainer lives on, nothing half-written
//! committed); and no driver at all (a CUDA buffer is refused with
//! `NoCudaDriver`, host snapshots in the same process still work); the
//! staging a CUDA client page-locked at registration exported by the
//! daemon (`gpusnap_staging_*`, `Status`), and a refused page-lock (the
//! double's `GPUSNAP_CUDA_DOUBLE_HOST_REGISTER_MAX`) exported as unpinned
//! with its reason.
//!
//! On a machine without a GPU these run on the project's CUDA driver double
//! (`tests/cuda-double`, on `LD_LIBRARY_PATH` as `libcuda.so`): device
//! memory the host cannot read, asynchronous streams with a delay per
//! operation. Trainers that must behave differently (a raised delay, a
//! fault) are this binary run again (`--ignored --exact child_trainer`)
//! with the double's settings in their environment.

mod daemon;

use std::sync::Arc;
use std::time::Duration;

use daemon::{Daemon, State, client, pattern, verify_all};
use gpusnap::device::cuda::{CudaDevice, CudaError, DeviceMemory};
use gpusnap::proto::{AttachReport, PinState};
use gpusnap::{Buffer, Dtype, Error, Pinning, SnapshotOutcome, Step};

const ENV_SOCKET: &str = "GPUSNAP_E2E_SOCKET";
const ENV_ROLE: &str = "GPUSNAP_E2E_ROLE";

/// Device 0, or the counted skip (a failure under GPUSNAP_REQUIRE_CUDA=1).
fn device() -> Option<Arc<CudaDevice>> {
    match CudaDevice::get(0) {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(!gpusnapd_testkit::cuda_or_skip(Some(&e.to_string())));
            None
        }
    }
}

/// Whether the loaded driver is the double (it has its control API).
fn on_double() -> bool {
    if CudaDevice::count().is_err() {
        return false;
    }
    // SAFETY: a driver is loaded (counted above); looking a symbol up runs
    // no code of it.
    unsafe {
        cudarc::driver::sys::culib()
            .get::<unsafe extern "C" fn() -> i32>(b"gpusnapDoubleIsDouble")
            .is_ok()
    }
}

/// A trainer's state in device memory: `count` tensors of `bytes` each.
struct DeviceState {
    tensors: Vec<Arc<DeviceMemory>>,
}

impl DeviceState {
    fn new(device: &Arc<CudaDevice>, count: usize, bytes: usize) -> DeviceState {
        DeviceState {
            tensors: (0..count)
                .map(|_| Arc::new(DeviceMemory::new(device, bytes).expect("cuMemAlloc")))
                .collect(),
        }
    }

    fn register(&self, client: &mut gpusnap::Client) {
        for (i, t) in self.tensors.iter().enumerate() {
            let name = format!("gpu.{i}");
            let buffer = t.buffer(&name).expect("device buffer");
            client
                .register(
                    name,
                    Dtype::U8,
                    vec![t.len() as u64],
                    Buffer::Device(buffer),
                )
                .expect("register");
        }
    }

    /// Tensor `i` as `fill(seed)` makes it.
    fn expected(&self, seed: u64, i: usize) -> Vec<u8> {
        (0..self.tensors[i].len())
            .map(|j| pattern(seed, 1000 + i, j))
            .collect()
    }

    fn fill(&self, seed: u64) {
        for (i, t) in self.tensors.iter().enumerate() {
            t.write(0, &self.expected(seed, i)).expect("write");
        }
    }

    fn zero(&self) {
        for t in &self.tensors {
            t.write(0, &vec![0; t.len()]).expect("write");
        }
    }

    /// The first tensor that differs from `fill(seed)`.
    fn differs_from(&self, seed: u64) -> Option<usize> {
        (0..self.tensors.len()).find(|&i| {
            self.tensors[i]
                .read(0, self.tensors[i].len())
                .expect("read")
                != self.expected(seed, i)
        })
    }
}

fn captured(outcome: SnapshotOutcome) {
    assert!(
        matches!(outcome, SnapshotOutcome::Captured(_)),
        "{outcome:?}"
    );
}

#[test]
fn device_and_host_buffers_snapshot_and_restore_byte_exact_in_blocking_use() {
    let Some(device) = device() else { return };
    let daemon = Daemon::start(&[]);
    let gpu = DeviceState::new(&device, 6, 3 << 20);
    let host = State::new(3, 2 << 20);
    let mut c = client(&daemon, "cuda-mixed", 0, 1);
    gpu.register(&mut c);
    host.register(&mut c);
    gpu.fill(1);
    host.fill(1);
    captured(c.snapshot(1).expect("snapshot"));
    c.wait_committed(1).expect("committed");
    drop(c);

    let fresh_gpu = DeviceState::new(&device, 6, 3 << 20);
    let fresh_host = State::new(3, 2 << 20);
    let mut c = client(&daemon, "cuda-mixed", 0, 1);
    fresh_gpu.register(&mut c);
    fresh_host.register(&mut c);
    fresh_gpu.zero();
    let restored = c
        .restore(Step::Latest)
        .expect("restore")
        .expect("a snapshot");
    assert_eq!(restored.step, 1);
    assert_eq!(
        fresh_gpu.differs_from(1),
        None,
        "device tensors restored wrong"
    );
    assert_eq!(
        fresh_host.differs_from(1),
        None,
        "host tensors restored wrong"
    );
    assert_eq!(verify_all(&daemon.root), 1);
}

#[test]
fn an_overlapped_capture_keeps_the_state_of_its_step_while_training_goes_on() {
    let Some(device) = device() else { return };
    let daemon = Daemon::start(&[("store", "keep_snapshots", "4")]);
    // On the double every stream operation takes 20 ms in the trainer, so
    // its next step's writes come while the copies still run: only the
    // ordering on the device keeps them out of the snapshot.
    let delay = if on_double() { "20000" } else { "0" };
    run_trainer(
        &daemon,
        "overlap",
        &[("GPUSNAP_CUDA_DOUBLE_OP_DELAY_US", delay)],
        "overlap done",
        false,
    );
    let gpu = DeviceState::new(&device, 8, 256 << 10);
    let mut c = client(&daemon, "cuda-crashy", 0, 1);
    gpu.register(&mut c);
    for step in 1..=4u64 {
        gpu.zero();
        c.restore(Step::At(step))
            .expect("restore")
            .expect("a snapshot");
        assert_eq!(
            gpu.differs_from(step),
            None,
            "step {step} holds a later write"
        );
    }
}

#[test]
fn thousands_of_small_device_tensors_round_trip() {
    let Some(device) = device() else { return };
    let daemon = Daemon::start(&[]);
    let gpu = DeviceState::new(&device, 2000, 4096);
    let mut c = client(&daemon, "cuda-many", 0, 1);
    gpu.register(&mut c);
    gpu.fill(7);
    captured(c.snapshot(1).expect("snapshot"));
    c.wait_committed(1).expect("committed");
    gpu.zero();
    c.restore(Step::Latest)
        .expect("restore")
        .expect("a snapshot");
    assert_eq!(gpu.differs_from(7), None);
}

/// The trainer: commits step 1 on device buffers, then does its role's
/// part and waits to be killed (or exits, for the fault role). The
/// `no-cuda` role instead checks the error a missing driver or device
/// gives, then snapshots host state.
#[test]
#[ignore = "child process of the CUDA tests"]
fn child_trainer() {
    let socket = std::env::var(ENV_SOCKET).expect("socket");
    let role = std::env::var(ENV_ROLE).expect("role");
    if role == "no-cuda" {
        return child_without_cuda(&socket);
    }
    if role == "overlap" {
        return child_overlapped(&socket);
    }
    if role == "pin-refused" {
        return child_pin_refused(&socket);
    }
    let device = CudaDevice::get(0).expect("a CUDA device in the child");
    let mut config = gpusnap::ClientConfig::new("cuda-crashy");
    config.socket = socket.into();
    let mut c = gpusnap::Client::with_config(config).expect("connect");
    let gpu = DeviceState::new(&device, 4, 2 << 20);
    gpu.register(&mut c);
    gpu.fill(1);
    captured(c.snapshot(1).expect("snapshot"));
    c.wait_committed(1).expect("committed");
    println!("committed 1");
    gpu.fill(2);
    match role.as_str() {
        "queued" => {
            // Every operation takes an hour from now on: the copies stay
            // queued.
            set_double_delay(Duration::from_secs(3600));
            c.begin_snapshot(2).expect("begin");
            c.finish_snapshot_in_background().expect("handed off");
            println!("queued 2");
            park();
        }
        "captured" => {
            c.begin_snapshot(2).expect("begin");
            c.finish_snapshot_in_background().expect("handed off");
            match c.background_outcome(2) {
                Some(Ok(SnapshotOutcome::Captured(_))) => println!("captured 2"),
                other => panic!("not captured: {other:?}"),
            }
            park();
        }
        "fault" => {
            // The double fails the next device-to-host copy as a device
            // fault would (asynchronously, sticky).
            let failed = c.snapshot(2);
            let Err(Error::Cuda(CudaError::Driver { name, .. })) = &failed else {
                panic!("the fault did not surface: {failed:?}");
            };
            println!("failed 2: {name}");
            // The trainer lives on; host state snapshots still work on a
            // new client of its own.
            let host = State::new(2, 1 << 20);
            let mut other = gpusnap::ClientConfig::new("cuda-crashy-host");
            other.socket = c.config().socket.clone();
            let mut h = gpusnap::Client::with_config(other).expect("connect");
            host.register(&mut h);
            host.fill(3);
            captured(h.snapshot(3).expect("host snapshot"));
            h.wait_committed(3).expect("host commit");
            println!("host committed 3");
        }
        other => panic!("unknown role {other}"),
    }
}

/// Overlapped use: each step's capture is handed off and the next step's
/// state written at once (on the legacy stream, which the capture ordered
/// after its copies); every step is committed with its own state.
fn child_overlapped(socket: &str) {
    let device = CudaDevice::get(0).expect("a CUDA device in the child");
    let mut config = gpusnap::ClientConfig::new("cuda-crashy");
    config.socket = socket.into();
    let mut c = gpusnap::Client::with_config(config).expect("connect");
    let gpu = DeviceState::new(&device, 8, 256 << 10);
    gpu.register(&mut c);
    gpu.fill(1);
    for step in 1..=4u64 {
        let next: Vec<Vec<u8>> = (0..gpu.tensors.len())
            .map(|i| gpu.expected(step + 1, i))
            .collect();
        c.begin_snapshot(step).expect("begin");
        c.finish_snapshot_in_background().expect("handed off");
        assert_eq!(
            c.copies_done(),
            Some(false),
            "the copies of step {step} ran before the hand-off returned"
        );
        // Last tensor first: the copies run in registration order, so
        // without the ordering the first write lands well before the copy
        // of its tensor.
        for (t, bytes) in gpu.tensors.iter().zip(&next).rev() {
            t.write(0, bytes).expect("the next step's write");
        }
    }
    for step in 1..=4u64 {
        c.wait_committed(step).expect("committed");
    }
    println!("overlap done");
}

/// What a process without a usable driver or device sees: a typed error
/// for CUDA (never a panic), and host snapshots that work.
fn child_without_cuda(socket: &str) {
    let expected = std::env::var("GPUSNAP_E2E_EXPECT").expect("expectation");
    match (expected.as_str(), CudaDevice::get(0)) {
        ("no-driver", Err(CudaError::NoCudaDriver { reason })) => println!("no driver: {reason}"),
        ("no-driver", Ok(_)) => {
            // A driver installed system-wide is found whatever the library
            // path says: nothing to check on such a machine.
            println!("no driver: a system-wide driver was found");
        }
        ("no-device", Err(CudaError::NoDevice { reason })) => println!("no device: {reason}"),
        ("too-old", Err(CudaError::CudaDriverTooOld { found, required })) => {
            println!("too old: {found} < {required}");
        }
        (what, other) => panic!("expected {what}, got {other:?}"),
    }
    // The same error again, without probing again.
    assert_eq!(
        CudaDevice::get(0).err().map(|e| e.to_string()),
        CudaDevice::get(0).err().map(|e| e.to_string())
    );
    let host = State::new(2, 1 << 20);
    let mut config = gpusnap::ClientConfig::new(format!("cuda-absent-{expected}"));
    config.socket = socket.into();
    let mut h = gpusnap::Client::with_config(config).expect("connect");
    host.register(&mut h);
    host.fill(5);
    captured(h.snapshot(5).expect("host snapshot"));
    h.wait_committed(5).expect("host commit");
    println!("host committed 5");
}

/// Registers device buffers on a driver that refuses to page-lock staging
/// (the double's host-register limit, from the parent): the registration
/// goes on unpinned; prints the reason and waits to be killed.
fn child_pin_refused(socket: &str) {
    let device = CudaDevice::get(0).expect("a CUDA device in the child");
    let mut config = gpusnap::ClientConfig::new("cuda-unpinned");
    config.socket = socket.into();
    let mut c = gpusnap::Client::with_config(config).expect("connect");
    let gpu = DeviceState::new(&device, 2, 1 << 20);
    gpu.register(&mut c);
    c.sync_registration().expect("registers unpinned");
    match c.staging_pinning().as_slice() {
        [Pinning::Unpinned { reason }] => println!("reported unpinned: {reason}"),
        other => panic!("the page-lock was not refused: {other:?}"),
    }
    park();
}

/// The session of `job` as `Status` shows it.
fn session_pinning(daemon: &Daemon, job: &str) -> Vec<AttachReport> {
    let status = client(daemon, "cuda-status", 0, 1)
        .status()
        .expect("status");
    status
        .sessions
        .into_iter()
        .find(|s| s.job == job)
        .unwrap_or_else(|| panic!("no session of {job}"))
        .staging_pinning
}

#[test]
fn the_daemon_exports_the_staging_a_cuda_client_page_locked_until_it_leaves() {
    let Some(device) = device() else { return };
    let daemon = Daemon::start(&[]);
    let gpu = DeviceState::new(&device, 2, 1 << 20);
    let host = State::new(1, 1 << 20);
    let mut c = client(&daemon, "cuda-pinned", 0, 1);
    gpu.register(&mut c);
    host.register(&mut c);
    let memfd = c.sync_registration().expect("register").memfd_bytes;
    // The host device needs nothing; the CUDA one page-locked the mapping.
    assert!(
        matches!(
            c.staging_pinning().as_slice(),
            [Pinning::Pinned { bytes, .. }, Pinning::NotNeeded] if *bytes == memfd
        ),
        "{:?}",
        c.staging_pinning()
    );
    // Reported before the registration returned.
    assert_eq!(
        daemon.metric(r#"gpusnap_staging_clients{pinning="pinned"}"#),
        1.0
    );
    assert_eq!(daemon.metric("gpusnap_staging_pinned_bytes"), memfd as f64);
    assert_eq!(
        daemon.metric(r#"gpusnap_staging_pin_seconds_count{job="cuda-pinned"}"#),
        1.0,
        "the pin time, once per registration"
    );
    let reports = session_pinning(&daemon, "cuda-pinned");
    assert!(
        matches!(
            reports.as_slice(),
            [
                AttachReport { device: cuda, pin: PinState::Pinned { bytes, .. } },
                AttachReport { device: hostname, pin: PinState::NotNeeded },
            ] if cuda == "cuda:0" && hostname == "host" && *bytes == memfd
        ),
        "{reports:?}"
    );
    assert!(
        daemon.log().contains("staging page-locked by the client"),
        "the pin rate is logged"
    );
    // Snapshots do not pin again.
    gpu.fill(1);
    captured(c.snapshot(1).expect("snapshot"));
    c.wait_committed(1).expect("committed");
    assert_eq!(
        daemon.metric(r#"gpusnap_staging_pin_seconds_count{job="cuda-pinned"}"#),
        1.0
    );
    drop(c);
    daemon::wait_for(
        "the pinned share given back",
        Duration::from_secs(30),
        || {
            daemon.metric(r#"gpusnap_staging_clients{pinning="pinned"}"#) == 0.0
                && daemon.metric("gpusnap_staging_pinned_bytes") == 0.0
        },
    );
}

#[test]
fn a_refused_page_lock_is_exported_as_unpinned_with_its_reason() {
    let Some(_device) = device() else { return };
    if !on_double() {
        eprintln!("a real driver cannot be made to refuse: checked on the double only");
        return;
    }
    let daemon = Daemon::start(&[]);
    let env: Vec<(&str, &std::ffi::OsStr)> = vec![
        (ENV_SOCKET, daemon.socket.as_os_str()),
        (ENV_ROLE, "pin-refused".as_ref()),
        // Every piece of staging is larger than one page.
        ("GPUSNAP_CUDA_DOUBLE_HOST_REGISTER_MAX", "4096".as_ref()),
    ];
    let (mut child, lines) = daemon::spawn_child_test("child_trainer", &env);
    let mut seen = Vec::new();
    for l in lines {
        let l = l.expect("line");
        let done = l.contains("reported unpinned: ");
        seen.push(l);
        if done {
            break;
        }
    }
    let reason = seen
        .iter()
        .find_map(|l| {
            l.split_once("reported unpinned: ")
                .map(|(_, r)| r.to_owned())
        })
        .unwrap_or_else(|| panic!("trainer output: {seen:?}"));
    assert!(reason.contains("cuMemHostRegister"), "{reason}");
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(
            daemon.metric(r#"gpusnap_staging_clients{pinning="unpinned"}"#),
            1.0
        );
        assert_eq!(daemon.metric("gpusnap_staging_pinned_bytes"), 0.0);
        let reports = session_pinning(&daemon, "cuda-unpinned");
        assert!(
            matches!(
                reports.as_slice(),
                [AttachReport { device, pin: PinState::Unpinned { reason: said } }]
                    if device == "cuda:0" && *said == reason
            ),
            "{reports:?}"
        );
        let log = daemon.log();
        assert!(
            log.contains("staging is not page-locked by the client") && log.contains(&reason),
            "the warning names the reason"
        );
    }));
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    if let Err(panic) = checked {
        std::panic::resume_unwind(panic);
    }
    daemon::wait_for(
        "the unpinned share given back",
        Duration::from_secs(30),
        || daemon.metric(r#"gpusnap_staging_clients{pinning="unpinned"}"#) == 0.0,
    );
}

/// Sets the double's delay per stream operation (its control API).
fn set_double_delay(delay: Duration) {
    // SAFETY: the driver is loaded (the child opened a device); the symbol
    // is the double's documented `void gpusnapDoubleSetOpDelayUs(uint64_t)`.
    let set = unsafe {
        cudarc::driver::sys::culib()
            .get::<unsafe extern "C" fn(u64)>(b"gpusnapDoubleSetOpDelayUs")
            .map(|f| *f)
    }
    .expect("the double's control API");
    // SAFETY: as above.
    unsafe { set(u64::try_from(delay.as_micros()).expect("delay")) };
}

fn park() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Runs the child trainer with `env` until it prints `line`; kills it if
/// `kill`, else waits for it to exit. Its output lines.
fn run_trainer(
    daemon: &Daemon,
    role: &str,
    env: &[(&str, &str)],
    line: &str,
    kill: bool,
) -> Vec<String> {
    let mut all: Vec<(&str, &std::ffi::OsStr)> = vec![
        (ENV_SOCKET, daemon.socket.as_os_str()),
        (ENV_ROLE, role.as_ref()),
    ];
    all.extend(env.iter().map(|(k, v)| (*k, std::ffi::OsStr::new(*v))));
    let (mut child, lines) = daemon::spawn_child_test("child_trainer", &all);
    let mut seen = Vec::new();
    let mut reached = false;
    for l in lines {
        let l = l.expect("line");
        reached |= l.ends_with(line);
        seen.push(l);
        // A trainer to kill is killed at its line; any other is read to
        // its end (it writes its test summary after the line).
        if reached && kill {
            break;
        }
    }
    assert!(reached, "trainer output: {seen:?}");
    if kill {
        child.kill().expect("SIGKILL");
    }
    let status = child.wait().expect("reap");
    if !kill {
        assert!(status.success(), "trainer failed: {seen:?}");
    }
    seen
}

fn newest_step(daemon: &Daemon, device: &Arc<CudaDevice>) -> (u64, DeviceState) {
    let gpu = DeviceState::new(device, 4, 2 << 20);
    let mut c = client(daemon, "cuda-crashy", 0, 1);
    gpu.register(&mut c);
    gpu.zero();
    let r = c
        .restore(Step::Latest)
        .expect("restore")
        .expect("a snapshot");
    (r.step, gpu)
}

#[test]
fn a_trainer_killed_after_captured_still_gets_its_snapshot() {
    let Some(device) = device() else { return };
    let daemon = Daemon::start(&[]);
    run_trainer(&daemon, "captured", &[], "captured 2", true);
    let (step, gpu) = newest_step(&daemon, &device);
    assert_eq!(step, 2, "a captured snapshot survives its trainer");
    assert_eq!(gpu.differs_from(2), None);
    assert_eq!(verify_all(&daemon.root), 2);
}

#[test]
fn a_trainer_killed_with_its_copies_queued_commits_nothing_of_that_step() {
    let Some(device) = device() else { return };
    if !on_double() {
        eprintln!("holding copies queued takes the double's delay: checked on the double only");
        return;
    }
    let daemon = Daemon::start(&[]);
    // Step 1 at the usual pace; then the child makes every operation take
    // an hour.
    run_trainer(&daemon, "queued", &[], "queued 2", true);
    let (step, gpu) = newest_step(&daemon, &device);
    assert_eq!(step, 1, "the half-copied step 2 is not a snapshot");
    assert_eq!(gpu.differs_from(1), None);
    assert_eq!(verify_all(&daemon.root), 1);
}

#[test]
fn an_injected_device_fault_fails_the_snapshot_and_the_trainer_lives_on() {
    let Some(device) = device() else { return };
    if !on_double() {
        eprintln!("faults are injected by the double only");
        return;
    }
    let daemon = Daemon::start(&[]);
    // Four tensors per snapshot: the fifth copy is step 2's first.
    let seen = run_trainer(
        &daemon,
        "fault",
        &[(
            "GPUSNAP_CUDA_DOUBLE_FAULTS",
            "cuMemcpyDtoHAsync_v2:5=CUDA_ERROR_ILLEGAL_ADDRESS@async",
        )],
        "host committed 3",
        false,
    );
    assert!(
        seen.iter()
            .any(|l| l.ends_with("failed 2: CUDA_ERROR_ILLEGAL_ADDRESS")),
        "{seen:?}"
    );
    let (step, gpu) = newest_step(&daemon, &device);
    assert_eq!(step, 1, "nothing of the failed step was committed");
    assert_eq!(gpu.differs_from(1), None);
    assert_eq!(
        verify_all(&daemon.root),
        2,
        "step 1 and the host job's step 3"
    );
}

#[test]
fn without_a_usable_driver_or_device_cuda_is_a_typed_error_and_host_snapshots_work() {
    let daemon = Daemon::start(&[]);
    // No library at all (the double is only ever on LD_LIBRARY_PATH).
    let seen = run_trainer(
        &daemon,
        "no-cuda",
        &[("LD_LIBRARY_PATH", ""), ("GPUSNAP_E2E_EXPECT", "no-driver")],
        "host committed 5",
        false,
    );
    assert!(seen.iter().any(|l| l.contains("no driver: ")), "{seen:?}");
    if device().is_none() || !on_double() {
        return;
    }
    // The double with no device, and pretending to be a CUDA 12.4 driver.
    for (env, expect, line) in [
        ("GPUSNAP_CUDA_DOUBLE_DEVICES", "no-device", "no device: "),
        (
            "GPUSNAP_CUDA_DOUBLE_DRIVER_VERSION",
            "too-old",
            "too old: 12040 < 13000",
        ),
    ] {
        let value = if expect == "no-device" { "0" } else { "12040" };
        let seen = run_trainer(
            &daemon,
            "no-cuda",
            &[(env, value), ("GPUSNAP_E2E_EXPECT", expect)],
            "host committed 5",
            false,
        );
        assert!(seen.iter().any(|l| l.contains(line)), "{expect}: {seen:?}");
    }
}
