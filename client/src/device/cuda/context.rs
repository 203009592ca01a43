//! Owned driver objects, each released by its `Drop` (errors there are
//! logged, never panicked): the device's primary context (the one PyTorch
//! and the CUDA runtime use; this backend never creates a context of its
//! own), a guard that makes it current on the calling thread and puts back
//! what was current before, a non-blocking stream, and an event.
//!
//! These use cudarc's `sys` layer, not its safe types: the safe stream
//! constructor synchronizes the whole context on its first call unless
//! event tracking is off, and the safe types store the errors of their
//! `Drop` in the context, to surface from some later, unrelated call.
//! Neither fits a library living inside someone else's training loop.

use std::ffi::c_uint;
use std::marker::PhantomData;

use cudarc::driver::sys::{self, CUcontext, CUevent, CUresult, CUstream};

use super::error::{Check, CudaError};

/// A device's primary context, retained for as long as this lives.
#[derive(Debug)]
pub(crate) struct PrimaryContext {
    ordinal: u32,
    device: sys::CUdevice,
    raw: CUcontext,
}

// SAFETY: a CUcontext handle may be used from any thread (the driver API
// is thread-safe; making it current is per thread, done by `Current`).
unsafe impl Send for PrimaryContext {}
// SAFETY: as above; the handle is never changed after creation.
unsafe impl Sync for PrimaryContext {}

impl PrimaryContext {
    /// Retains device `ordinal`'s primary context (creating it if nobody
    /// has yet; PyTorch retains the same one).
    pub(crate) fn retain(ordinal: u32) -> Result<PrimaryContext, CudaError> {
        let index = std::ffi::c_int::try_from(ordinal).map_err(|_| CudaError::NoDevice {
            reason: format!("device ordinal {ordinal} is out of range"),
        })?;
        let mut device: sys::CUdevice = 0;
        // SAFETY: the driver is loaded and initialized (the caller got it
        // from `driver()`); the out-pointer is a live local.
        match unsafe { sys::cuDeviceGet(&mut device, index) } {
            CUresult::CUDA_SUCCESS => {}
            CUresult::CUDA_ERROR_INVALID_DEVICE => {
                return Err(CudaError::NoDevice {
                    reason: format!("the driver has no device {ordinal}"),
                });
            }
            code => return Err(CudaError::driver("cuDeviceGet", code)),
        }
        let mut raw: CUcontext = std::ptr::null_mut();
        // SAFETY: `device` is a valid device handle; the out-pointer is a
        // live local.
        unsafe { sys::cuDevicePrimaryCtxRetain(&mut raw, device) }
            .check("cuDevicePrimaryCtxRetain")?;
        Ok(PrimaryContext {
            ordinal,
            device,
            raw,
        })
    }

    pub(crate) fn ordinal(&self) -> u32 {
        self.ordinal
    }

    pub(crate) fn device(&self) -> sys::CUdevice {
        self.device
    }

    pub(crate) fn raw(&self) -> CUcontext {
        self.raw
    }

    /// Makes this context current on the calling thread until the guard
    /// drops, which puts back the context that was current before (the
    /// trainer's thread may have another device's context current, and the
    /// CUDA runtime uses whatever is current).
    pub(crate) fn enter(&self) -> Result<Current, CudaError> {
        let mut current: CUcontext = std::ptr::null_mut();
        // SAFETY: the out-pointer is a live local.
        unsafe { sys::cuCtxGetCurrent(&mut current) }.check("cuCtxGetCurrent")?;
        if current == self.raw {
            return Ok(Current {
                pushed: false,
                _this_thread: PhantomData,
            });
        }
        // SAFETY: `raw` is a retained context handle.
        unsafe { sys::cuCtxPushCurrent_v2(self.raw) }.check("cuCtxPushCurrent_v2")?;
        Ok(Current {
            pushed: true,
            _this_thread: PhantomData,
        })
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: `device`'s primary context was retained by `retain` and
        // is released once, here.
        if let Err(e) = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) }
            .check("cuDevicePrimaryCtxRelease_v2")
        {
            tracing::warn!(device = self.ordinal, error = %e, "releasing the primary context failed");
        }
    }
}

/// A context made current by [`PrimaryContext::enter`]; not `Send`, so
/// it is undone on the thread that made it.
#[derive(Debug)]
pub(crate) struct Current {
    pushed: bool,
    _this_thread: PhantomData<*const ()>,
}

impl Drop for Current {
    fn drop(&mut self) {
        if !self.pushed {
            return;
        }
        let mut popped: CUcontext = std::ptr::null_mut();
        // SAFETY: `enter` pushed a context on this thread's stack (the
        // guard is not `Send`: it drops on the thread that made it); the
        // out-pointer is a live local.
        if let Err(e) = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) }.check("cuCtxPopCurrent_v2")
        {
            tracing::warn!(error = %e, "restoring the thread's CUDA context failed");
        }
    }
}

/// A stream this backend created and destroys: non-blocking, so it never
/// synchronizes with the legacy default stream (PyTorch's default stream):
/// work the trainer queues there does not wait for its copies, nor they
/// for the trainer's work, except where an event says so.
#[derive(Debug)]
pub(crate) struct Stream {
    raw: CUstream,
}

// SAFETY: a stream handle may be used from any thread.
unsafe impl Send for Stream {}
// SAFETY: as above; the handle is never changed after creation.
unsafe impl Sync for Stream {}

impl Stream {
    /// A new non-blocking stream in the current context.
    pub(crate) fn non_blocking(_current: &Current) -> Result<Stream, CudaError> {
        let mut raw: CUstream = std::ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint;
        // SAFETY: a context is current (`_current`); the out-pointer is a
        // live local.
        unsafe { sys::cuStreamCreate(&mut raw, flags) }.check("cuStreamCreate")?;
        Ok(Stream { raw })
    }

    pub(crate) fn raw(&self) -> CUstream {
        self.raw
    }

    /// Makes the stream wait (on the device, not the host) for `event`.
    pub(crate) fn wait(&self, event: &Event) -> Result<(), CudaError> {
        wait_event(self.raw, event)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: the stream was created by `non_blocking` and is destroyed
        // once; the driver lets queued work finish first.
        if let Err(e) = unsafe { sys::cuStreamDestroy_v2(self.raw) }.check("cuStreamDestroy_v2") {
            tracing::warn!(error = %e, "destroying a copy stream failed");
        }
    }
}

/// Makes `stream` (any stream handle, the trainer's too) wait for `event`.
pub(crate) fn wait_event(stream: CUstream, event: &Event) -> Result<(), CudaError> {
    // SAFETY: `stream` is a stream handle the caller vouches for (checked
    // by `trainer_stream` for the trainer's), `event` a live event.
    unsafe { sys::cuStreamWaitEvent(stream, event.raw, 0) }.check("cuStreamWaitEvent")
}

/// What an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    /// Only ordering (no timing; the cheapest).
    Order,
    /// Timed: a start or end mark of copies.
    Timed,
    /// Timed, and a host wait on it sleeps instead of spinning (the event
    /// a client thread waits for).
    TimedBlocking,
}

/// An event this backend created and destroys.
#[derive(Debug)]
pub(crate) struct Event {
    raw: CUevent,
}

// SAFETY: an event handle may be used from any thread.
unsafe impl Send for Event {}
// SAFETY: as above; the handle is never changed after creation.
unsafe impl Sync for Event {}

impl Event {
    /// A new event in the current context.
    pub(crate) fn new(_current: &Current, kind: EventKind) -> Result<Event, CudaError> {
        let flags = match kind {
            EventKind::Order => sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as c_uint,
            EventKind::Timed => sys::CUevent_flags::CU_EVENT_DEFAULT as c_uint,
            EventKind::TimedBlocking => sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as c_uint,
        };
        let mut raw: CUevent = std::ptr::null_mut();
        // SAFETY: a context is current; the out-pointer is a live local.
        unsafe { sys::cuEventCreate(&mut raw, flags) }.check("cuEventCreate")?;
        Ok(Event { raw })
    }

    /// Captures the work queued on `stream` so far.
    pub(crate) fn record(&self, stream: CUstream) -> Result<(), CudaError> {
        // SAFETY: a live event; `stream` a handle the caller vouches for.
        unsafe { sys::cuEventRecord(self.raw, stream) }.check("cuEventRecord")
    }

    /// Whether the recorded work finished (an error is the work's error).
    pub(crate) fn is_complete(&self) -> Result<bool, CudaError> {
        // SAFETY: a live event.
        match unsafe { sys::cuEventQuery(self.raw) } {
            CUresult::CUDA_SUCCESS => Ok(true),
            CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            code => Err(CudaError::driver("cuEventQuery", code)),
        }
    }

    /// Waits on the host for the recorded work.
    pub(crate) fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: a live event.
        unsafe { sys::cuEventSynchronize(self.raw) }.check("cuEventSynchronize")
    }

    /// Milliseconds from `start` to this event (both timed, both complete).
    pub(crate) fn millis_since(&self, start: &Event) -> Result<f32, CudaError> {
        let mut millis = 0.0f32;
        // SAFETY: two live events; the out-pointer is a live local.
        unsafe { sys::cuEventElapsedTime_v2(&mut millis, start.raw, self.raw) }
            .check("cuEventElapsedTime_v2")?;
        Ok(millis)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event was created by `new` and is destroyed once (the
        // driver allows it while recorded work is pending).
        if let Err(e) = unsafe { sys::cuEventDestroy_v2(self.raw) }.check("cuEventDestroy_v2") {
            tracing::warn!(error = %e, "destroying an event failed");
        }
    }
}
