//! Streams: each one a worker thread that runs its operations in order, and
//! the ordering rules between streams, expressed as dependencies.
//!
//! Every enqueued operation records the completions it must wait for: the
//! previous operation of its stream; for the legacy default stream, the last
//! operation of every blocking stream of the context; for a blocking stream,
//! the last operation of the legacy stream; for `cuStreamWaitEvent`, the
//! event's recorded operation. The worker waits for them (condvar waits,
//! never a spin) before it runs the operation.

use std::ffi::c_void;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::{self, ThreadId};
use std::time::Duration;

use cudarc::driver::sys::CUresult;

use crate::capture::CaptureId;
use crate::completion::Completion;
use crate::context::CtxShared;
use crate::control::control;
use crate::driver::State;
use crate::host;

/// Copies and fills at least this long run in `PIECES` pieces, the delay
/// spread between them, so a host that looks early sees partial bytes.
pub const PIECE_THRESHOLD_BYTES: usize = 64 << 10;
pub const PIECES: usize = 4;

/// Which stream: the legacy default stream and the per-thread streams are
/// kept on their context; created streams by handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKey {
    Legacy { device: usize },
    PerThread { device: usize, thread: ThreadId },
    Created { handle: usize },
}

impl StreamKey {
    pub fn is_legacy(&self) -> bool {
        matches!(self, Self::Legacy { .. })
    }
}

/// A stream's bookkeeping.
#[derive(Debug)]
pub struct StreamEntry {
    /// The value a caller names it by (0 for the legacy stream, 2 for a
    /// per-thread stream).
    pub handle: usize,
    pub ctx: Arc<CtxShared>,
    pub flags: u32,
    pub priority: i32,
    /// Blocking streams synchronize with the legacy stream.
    pub blocking: bool,
    /// The last operation enqueued.
    pub last: Option<Arc<Completion>>,
    /// The capture sequence this stream takes part in.
    pub capture: Option<CaptureId>,
    worker: Worker,
}

impl StreamEntry {
    pub fn new(
        handle: usize,
        ctx: Arc<CtxShared>,
        flags: u32,
        priority: i32,
        blocking: bool,
    ) -> Result<Self, CUresult> {
        Ok(Self {
            handle,
            worker: Worker::spawn(format!("cuda-double-stream-{handle:#x}"))?,
            ctx,
            flags,
            priority,
            blocking,
            last: None,
            capture: None,
        })
    }

    /// Whether everything enqueued so far has run.
    pub fn is_idle(&self) -> bool {
        self.last.as_ref().is_none_or(|c| c.is_done())
    }
}

/// What an operation does when it runs. Addresses are plain numbers: device
/// sides are addresses in a device's alias mapping, host sides the caller's.
#[derive(Debug)]
pub enum Work {
    Copy {
        dst: usize,
        src: Source,
        len: usize,
        /// A page-locked host side, checked to be still mapped when the copy
        /// runs (the real driver would DMA into pinned pages nobody maps).
        locked_host: Option<(usize, usize)>,
    },
    Fill {
        dst: usize,
        value: u8,
        len: usize,
    },
    HostFn {
        func: unsafe extern "C" fn(*mut c_void),
        data: usize,
    },
    /// Orders and completes only: an event record, a wait.
    Marker,
}

#[derive(Debug)]
pub enum Source {
    Addr(usize),
    /// Pageable host bytes the call copied to staging memory, as the driver
    /// does for a host-to-device copy from pageable memory.
    Staged(Vec<u8>),
}

/// One enqueued operation.
#[derive(Debug)]
pub struct Op {
    /// The API call that enqueued it, for messages.
    pub label: &'static str,
    pub stream: usize,
    pub work: Work,
    pub deps: Vec<Arc<Completion>>,
    pub done: Arc<Completion>,
    pub ctx: Arc<CtxShared>,
    /// An injected `@async` fault: the operation fails when it runs.
    pub fault: Option<CUresult>,
}

/// Where an operation went.
#[derive(Debug)]
pub enum Enqueued {
    Queued(Arc<Completion>),
    /// Recorded into a capture sequence, never run.
    Captured,
}

#[derive(Debug)]
struct Worker {
    tx: mpsc::Sender<Op>,
}

impl Worker {
    fn spawn(name: String) -> Result<Self, CUresult> {
        let (tx, rx) = mpsc::channel::<Op>();
        thread::Builder::new()
            .name(name)
            .spawn(move || {
                // Ends when the stream is destroyed (its sender dropped) and
                // everything already enqueued has run.
                for op in rx {
                    op.run();
                }
            })
            .map_err(|_| CUresult::CUDA_ERROR_OUT_OF_MEMORY)?;
        Ok(Self { tx })
    }
}

thread_local! {
    static IN_HOST_FN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is inside a `cuLaunchHostFunc` callback, where
/// the driver forbids CUDA calls.
pub fn in_host_fn() -> bool {
    IN_HOST_FN.with(|f| f.get())
}

impl Op {
    fn run(self) {
        for d in &self.deps {
            d.wait();
        }
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.execute())).unwrap_or_else(|_| {
                control().violation(format!(
                    "{} on stream {:#x}: the double panicked running it",
                    self.label, self.stream
                ));
                Err(CUresult::CUDA_ERROR_UNKNOWN)
            });
        self.done.complete(result);
    }

    fn execute(&self) -> Result<(), CUresult> {
        let delay = Duration::from_micros(control().op_delay_us());
        if let Some(code) = self.fault {
            thread::sleep(delay);
            self.ctx.break_with(code);
            return Err(code);
        }
        match &self.work {
            Work::Marker => self.ctx.check(),
            Work::HostFn { func, data } => {
                // Host functions run even in a broken context, so a test's
                // latch never hangs; the error still reaches every caller.
                thread::sleep(delay);
                IN_HOST_FN.with(|f| f.set(true));
                // SAFETY: the caller of cuLaunchHostFunc promised that `func`
                // may be called once, on another thread, with `data`.
                unsafe { func(std::ptr::with_exposed_provenance_mut(*data)) };
                IN_HOST_FN.with(|f| f.set(false));
                self.ctx.check()
            }
            Work::Copy {
                dst,
                src,
                len,
                locked_host,
            } => {
                self.ctx.check()?;
                let src = match src {
                    Source::Addr(a) => *a,
                    Source::Staged(bytes) => bytes.as_ptr().expose_provenance(),
                };
                self.in_pieces(*len, delay, |at, n| {
                    if let Some((start, span)) = locked_host
                        && !host::is_mapped(*start, *span)
                    {
                        control().violation(format!(
                            "{} on stream {:#x}: its page-locked host range {:#x}..{:#x} is no longer mapped when the copy runs",
                            self.label,
                            self.stream,
                            start,
                            start + span
                        ));
                        return false;
                    }
                    // SAFETY: the device side lies in the alias of a live
                    // allocation (checked at enqueue; the alias stays mapped
                    // for the life of the process). The host side is the
                    // caller's memory, which the CUDA contract keeps valid
                    // until the operation completes: a pageable caller waits
                    // for it, a page-locked range was just checked mapped.
                    // `copy` allows the overlap a device-to-device copy may have.
                    unsafe {
                        std::ptr::copy(
                            std::ptr::with_exposed_provenance::<u8>(src + at),
                            std::ptr::with_exposed_provenance_mut::<u8>(dst + at),
                            n,
                        );
                    }
                    true
                });
                self.ctx.check()
            }
            Work::Fill { dst, value, len } => {
                self.ctx.check()?;
                self.in_pieces(*len, delay, |at, n| {
                    // SAFETY: the range lies in the alias of a live device
                    // allocation (checked at enqueue).
                    unsafe {
                        std::ptr::write_bytes(
                            std::ptr::with_exposed_provenance_mut::<u8>(dst + at),
                            *value,
                            n,
                        )
                    };
                    true
                });
                self.ctx.check()
            }
        }
    }

    /// Runs `step(offset, len)` over `len` bytes in pieces, sleeping the
    /// delay (spread over the pieces) before each; `step` returns false to stop.
    fn in_pieces(&self, len: usize, delay: Duration, mut step: impl FnMut(usize, usize) -> bool) {
        if len == 0 {
            // Nothing to move (and the addresses of an empty copy may be null).
            thread::sleep(delay);
            return;
        }
        let pieces = if len >= PIECE_THRESHOLD_BYTES {
            PIECES
        } else {
            1
        };
        let piece = len.div_ceil(pieces).max(1);
        let pause = delay / u32::try_from(pieces).unwrap_or(1);
        let mut at = 0;
        loop {
            thread::sleep(pause);
            let n = piece.min(len - at);
            if !step(at, n) {
                return;
            }
            at += n;
            if at >= len {
                return;
            }
        }
    }
}

/// Enqueues `work` on stream `key` with the implicit ordering rules; on a
/// capturing stream it is recorded instead. `extra` are further completions
/// to wait for (an event's recorded work).
pub fn enqueue(
    st: &mut State,
    key: StreamKey,
    work: Work,
    extra: Vec<Arc<Completion>>,
    fault: Option<CUresult>,
    label: &'static str,
) -> Result<Enqueued, CUresult> {
    let (ctx, capture, stream_handle, blocking) = {
        let s = st.stream(&key).ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
        (Arc::clone(&s.ctx), s.capture, s.handle, s.blocking)
    };
    if let Some(id) = capture {
        st.captures.record_op(id, key)?;
        return Ok(Enqueued::Captured);
    }
    let device = ctx.device;
    if key.is_legacy() {
        st.check_legacy_use(device)?;
    }
    let mut deps = extra;
    deps.extend(st.stream(&key).and_then(|s| s.last.clone()));
    if key.is_legacy() {
        deps.extend(st.blocking_streams(device).filter_map(|s| s.last.clone()));
        let retired = &mut st.contexts[device].retired;
        retired.retain(|c| !c.is_done());
        deps.extend(retired.iter().cloned());
    } else if blocking {
        deps.extend(
            st.contexts[device]
                .legacy
                .as_ref()
                .and_then(|s| s.last.clone()),
        );
    }
    deps.retain(|d| !d.is_done());
    let done = Completion::new();
    let op = Op {
        label,
        stream: stream_handle,
        work,
        deps,
        done: Arc::clone(&done),
        ctx,
        fault,
    };
    let s = st
        .stream_mut(&key)
        .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
    s.worker
        .tx
        .send(op)
        .map_err(|_| CUresult::CUDA_ERROR_UNKNOWN)?;
    s.last = Some(Arc::clone(&done));
    Ok(Enqueued::Queued(done))
}
