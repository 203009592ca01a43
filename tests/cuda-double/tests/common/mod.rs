//! Helpers shared by the double's integration tests. Each test file is its
//! own process, so the double's process-wide state (settings, faults,
//! violations) is per file; inside a file tests run on parallel threads.

#![allow(dead_code, reason = "each test binary uses part of this module")]

use std::ffi::{CString, c_void};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use cudarc::driver::sys::{CUcontext, CUdeviceptr, CUevent, CUresult, CUstream};
pub use gpusnap_cuda_double as dbl;

/// Asserts that a driver call returned `CUDA_SUCCESS`. The call is made in
/// an unsafe block: the tests pass the double only pointers to memory they
/// own, of the sizes the call documents.
macro_rules! ck {
    ($call:expr) => {{
        // SAFETY: a driver call of the double with arguments the test owns.
        let r = unsafe { $call };
        assert_eq!(
            r,
            $crate::common::CUresult::CUDA_SUCCESS,
            "{}",
            stringify!($call)
        );
    }};
}

/// Asserts that a driver call returned `$code` (unsafe like `ck!`).
macro_rules! expect_err {
    ($code:ident, $call:expr) => {{
        // SAFETY: a driver call of the double with arguments the test owns.
        let r = unsafe { $call };
        assert_eq!(r, $crate::common::CUresult::$code, "{}", stringify!($call));
    }};
}

/// A generous bound for waits that should end quickly.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// `cuInit(0)`.
pub fn init() {
    // SAFETY: no pointers.
    assert_eq!(unsafe { dbl::cuInit(0) }, CUresult::CUDA_SUCCESS);
}

/// The primary context of a device, retained and current on this thread;
/// released on drop (not while panicking: the release waits for the
/// context's work, which a failed test may have left blocked).
#[derive(Debug)]
pub struct Ctx {
    pub device: i32,
    pub handle: CUcontext,
}

impl Ctx {
    pub fn enter(device: i32) -> Self {
        init();
        let mut handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        let r = unsafe { dbl::cuDevicePrimaryCtxRetain(&mut handle, device) };
        assert_eq!(r, CUresult::CUDA_SUCCESS);
        let c = Self { device, handle };
        c.bind();
        c
    }

    /// Makes it current on the calling thread.
    pub fn bind(&self) {
        // SAFETY: a handle the double gave out.
        let r = unsafe { dbl::cuCtxSetCurrent(self.handle) };
        assert_eq!(r, CUresult::CUDA_SUCCESS);
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.bind();
            // SAFETY: no pointers.
            let r = unsafe { dbl::cuDevicePrimaryCtxRelease_v2(self.device) };
            assert_eq!(r, CUresult::CUDA_SUCCESS);
        }
    }
}

pub fn stream(flags: u32) -> CUstream {
    let mut s = std::ptr::null_mut();
    ck!(dbl::cuStreamCreate(&mut s, flags));
    s
}

pub fn event(flags: u32) -> CUevent {
    let mut e = std::ptr::null_mut();
    ck!(dbl::cuEventCreate(&mut e, flags));
    e
}

pub fn alloc(len: usize) -> CUdeviceptr {
    let mut p = 0;
    ck!(dbl::cuMemAlloc_v2(&mut p, len));
    p
}

pub fn legacy() -> CUstream {
    std::ptr::null_mut()
}

/// Writes `bytes` to device memory and waits for it.
pub fn upload(dst: CUdeviceptr, bytes: &[u8]) {
    ck!(dbl::cuMemcpyHtoD_v2(
        dst,
        bytes.as_ptr().cast(),
        bytes.len()
    ));
    ck!(dbl::cuStreamSynchronize(legacy()));
}

/// Reads `len` bytes of device memory (synchronously).
pub fn download(src: CUdeviceptr, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ck!(dbl::cuMemcpyDtoH_v2(v.as_mut_ptr().cast(), src, len));
    v
}

/// A gate a host function waits at, to keep a stream busy until the test
/// opens it. Dropping the guard opens it.
#[derive(Debug, Default)]
pub struct Latch {
    open: Mutex<bool>,
    changed: Condvar,
    entered: AtomicBool,
}

impl Latch {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.changed.notify_all();
    }

    /// Whether the host function has started waiting.
    pub fn entered(&self) -> bool {
        self.entered.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until the host function is waiting at the latch.
    pub fn wait_entered(&self) {
        let deadline = Instant::now() + PATIENCE;
        while !self.entered() {
            assert!(Instant::now() < deadline, "the host function never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

unsafe extern "C" fn latch_host_fn(data: *mut c_void) {
    // SAFETY: `data` is the Arc::into_raw of `block`, consumed exactly once here.
    let latch = unsafe { Arc::from_raw(data.cast_const().cast::<Latch>()) };
    latch.entered.store(true, Ordering::SeqCst);
    let mut open = latch.open.lock().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !*open && Instant::now() < deadline {
        open = latch
            .changed
            .wait_timeout(open, Duration::from_millis(100))
            .unwrap()
            .0;
    }
}

/// Opens its latch when dropped, so a failing test never leaves a stream blocked.
#[derive(Debug)]
pub struct Blocked(pub Arc<Latch>);

impl Drop for Blocked {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Enqueues a host function that waits at a new latch: the stream is busy
/// until the returned guard opens it.
pub fn block(stream: CUstream) -> Blocked {
    let latch = Latch::new();
    let raw = Arc::into_raw(Arc::clone(&latch))
        .cast_mut()
        .cast::<c_void>();
    ck!(dbl::cuLaunchHostFunc(stream, Some(latch_host_fn), raw));
    Blocked(latch)
}

/// Page-aligned anonymous host memory, unmapped on drop.
#[derive(Debug)]
pub struct HostMap {
    pub ptr: *mut u8,
    pub len: usize,
    mapped: bool,
}

// SAFETY: the mapping is plain memory owned by this value; tests share it
// across threads only through the double's copies.
unsafe impl Send for HostMap {}

impl HostMap {
    pub fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self {
            ptr: p.cast(),
            len,
            mapped: true,
        }
    }

    pub fn void(&self) -> *mut c_void {
        self.ptr.cast()
    }

    pub fn fill(&mut self, byte: u8) {
        // SAFETY: `len` bytes of our mapping.
        unsafe { std::ptr::write_bytes(self.ptr, byte, self.len) };
    }

    pub fn write(&mut self, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= self.len);
        // SAFETY: inside our mapping.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(at), bytes.len()) };
    }

    /// The bytes now, read with volatile loads (a copy may be writing them).
    pub fn snapshot(&self) -> Vec<u8> {
        // SAFETY: inside our mapping; volatile because the double's worker
        // may write concurrently.
        (0..self.len)
            .map(|i| unsafe { self.ptr.add(i).read_volatile() })
            .collect()
    }

    pub fn byte(&self, at: usize) -> u8 {
        assert!(at < self.len);
        // SAFETY: inside our mapping.
        unsafe { self.ptr.add(at).read_volatile() }
    }

    /// Unmaps now (a test of what happens to a registration afterwards).
    pub fn unmap(&mut self) {
        if self.mapped {
            // SAFETY: our mapping, no longer used by the test.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
            self.mapped = false;
        }
    }
}

impl Drop for HostMap {
    fn drop(&mut self) {
        self.unmap();
    }
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            u8::try_from(i % 251)
                .unwrap()
                .wrapping_mul(31)
                .wrapping_add(seed)
        })
        .collect()
}

/// A test-file-wide lock for tests that change process-wide settings.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

pub fn call_count(name: &str) -> u64 {
    let n = cstr(name);
    // SAFETY: a NUL-terminated string.
    unsafe { dbl::gpusnapDoubleCallCount(n.as_ptr()) }
}

pub fn violations() -> Vec<String> {
    // SAFETY: no pointers.
    let n = unsafe { dbl::gpusnapDoubleViolationCount() };
    (0..n)
        .map(|i| {
            // SAFETY: a null buffer with length 0 asks for the length.
            let len = unsafe { dbl::gpusnapDoubleViolationMessage(i, std::ptr::null_mut(), 0) };
            let mut buf = vec![0u8; len + 1];
            // SAFETY: `buf` holds len + 1 bytes.
            let got = unsafe {
                dbl::gpusnapDoubleViolationMessage(i, buf.as_mut_ptr().cast(), buf.len())
            };
            assert_eq!(got, len);
            assert_eq!(buf[len], 0);
            String::from_utf8(buf[..len].to_vec()).unwrap()
        })
        .collect()
}

/// The environment variable that makes a test binary run one test as a
/// child with its own environment.
pub const CHILD_ENV: &str = "GPUSNAP_CUDA_DOUBLE_TEST_CHILD";

/// Whether this process is the child running test `name`.
pub fn is_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).as_deref() == Ok(name)
}

/// Runs test `name` of this binary in a child process with `env` (and no
/// other `GPUSNAP_CUDA_DOUBLE_*` setting), and returns its output.
pub fn run_child(name: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"]);
    for (k, _) in std::env::vars() {
        if k.starts_with("GPUSNAP_CUDA_DOUBLE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env(CHILD_ENV, name).envs(env.iter().copied());
    cmd.output().unwrap()
}

/// Runs test `name` in a child and asserts that it passed.
pub fn child_passes(name: &str, env: &[(&str, &str)]) -> Output {
    let out = run_child(name, env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child {name} failed: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
