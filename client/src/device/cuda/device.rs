//! [`CudaDevice`]: one CUDA device of this process, copying its buffers to
//! and from staging on a copy stream of its own, ordered after the
//! trainer's stream by events.
//!
//! A capture records an event on the trainer's stream (the work that
//! produced the state), makes the copy stream wait for it, enqueues the
//! device-to-host copies into the slot, and records a done event: it
//! returns at once, and the trainer's next kernels run while the copies do.
//! The [`CudaTicket`] it returns answers `is_done` from the done event,
//! waits for it on the host, or makes the trainer's streams wait for it on
//! the device (`cuStreamWaitEvent`), so an optimizer step cannot change
//! state under a copy without the host ever blocking. A restore is the
//! same with host-to-device copies, and the trainer's stream always waits
//! for them.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys::{self, CUcontext, CUdeviceptr, CUresult, CUstream};

use super::buffer::CudaBuffer;
use super::context::{Event, EventKind, PrimaryContext, Stream};
use super::driver::{self, guarded};
use super::error::{Check, CudaError};
use super::pinned::{self, PinGuard};
use super::ticket::{CudaTicket, Direction};
use crate::device::{
    AttachedStaging, CaptureCopy, CopyTicket, Device, Pinning, RestoreCopy, Source, StagingRegion,
    StreamOrder, Target,
};
use crate::error::{Error, Result};

/// One CUDA device. There is one per device ordinal per process
/// ([`CudaDevice::get`]), kept for the life of the process: every buffer of
/// a device returns that one handle, which is how the client groups copies
/// by device.
pub struct CudaDevice {
    /// Declared before `ctx`: fields drop in order, so the stream is
    /// destroyed before the context is released.
    copy_stream: Stream,
    ctx: Arc<PrimaryContext>,
    name: String,
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaDevice({}: {})", self.ordinal(), self.name)
    }
}

static DEVICES: Mutex<Option<HashMap<u32, Arc<CudaDevice>>>> = Mutex::new(None);

impl CudaDevice {
    /// Device `ordinal`: its primary context retained and a copy stream
    /// made on the first call, the same handle on every later one.
    /// [`CudaError::NoCudaDriver`], [`CudaError::NoDevice`] or
    /// [`CudaError::CudaDriverTooOld`] where there is no usable driver or
    /// device; never a panic.
    pub fn get(ordinal: u32) -> Result<Arc<CudaDevice>, CudaError> {
        let found = driver::driver()?;
        if ordinal >= found.devices {
            return Err(CudaError::NoDevice {
                reason: format!(
                    "device {ordinal} was asked for; the driver counts {}",
                    found.devices
                ),
            });
        }
        let mut devices = DEVICES.lock().unwrap_or_else(PoisonError::into_inner);
        let devices = devices.get_or_insert_with(HashMap::new);
        if let Some(device) = devices.get(&ordinal) {
            return Ok(Arc::clone(device));
        }
        let device = guarded("opening a CUDA device", || CudaDevice::open(ordinal))??;
        let device = Arc::new(device);
        devices.insert(ordinal, Arc::clone(&device));
        Ok(device)
    }

    fn open(ordinal: u32) -> Result<CudaDevice, CudaError> {
        let ctx = Arc::new(PrimaryContext::retain(ordinal)?);
        let current = ctx.enter()?;
        let copy_stream = Stream::non_blocking(&current)?;
        drop(current);
        let name = device_name(ctx.device());
        tracing::info!(device = ordinal, %name, "CUDA device opened");
        Ok(CudaDevice {
            ctx,
            copy_stream,
            name,
        })
    }

    /// The device that `ptr` is memory of (the driver's pointer attribute).
    pub fn of_pointer(ptr: CUdeviceptr) -> Result<Arc<CudaDevice>, CudaError> {
        driver::driver()?;
        let mut ordinal: i32 = -1;
        // SAFETY: the driver is loaded and initialized; the out-pointer is
        // a live local of the attribute's type (int).
        let code = unsafe {
            sys::cuPointerGetAttribute(
                (&raw mut ordinal).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        };
        match code {
            CUresult::CUDA_SUCCESS => {}
            CUresult::CUDA_ERROR_INVALID_VALUE => {
                return Err(CudaError::InvalidPointer {
                    tensor: String::new(),
                    reason: format!("{ptr:#x} is not memory the CUDA driver knows"),
                });
            }
            code => return Err(CudaError::driver("cuPointerGetAttribute", code)),
        }
        let ordinal = u32::try_from(ordinal).map_err(|_| CudaError::InvalidPointer {
            tensor: String::new(),
            reason: format!("{ptr:#x} is on no device (ordinal {ordinal})"),
        })?;
        CudaDevice::get(ordinal)
    }

    /// Devices the driver counts.
    pub fn count() -> Result<u32, CudaError> {
        Ok(driver::driver()?.devices)
    }

    /// The driver's CUDA version (13000 for 13.0).
    pub fn driver_version() -> Result<i32, CudaError> {
        Ok(driver::driver()?.version)
    }

    /// The driver library in use.
    pub fn driver_library() -> Result<&'static str, CudaError> {
        Ok(&driver::driver()?.library)
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> u32 {
        self.ctx.ordinal()
    }

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The primary context this device copies in (PyTorch's).
    pub fn cu_context(&self) -> CUcontext {
        self.ctx.raw()
    }

    pub(crate) fn context(&self) -> &Arc<PrimaryContext> {
        &self.ctx
    }

    /// `len` bytes of this device's memory at `ptr`, checked with the
    /// driver, to register as [`Buffer::Device`](crate::Buffer::Device)
    /// under `name` (errors name it).
    ///
    /// # Safety
    /// The memory stays allocated for as long as the buffer lives: hold
    /// what owns it in `keep_alive`, or outlive the buffer.
    pub unsafe fn buffer(
        self: &Arc<Self>,
        name: &str,
        ptr: CUdeviceptr,
        len: usize,
        keep_alive: Option<Box<dyn std::any::Any + Send + Sync>>,
    ) -> Result<Arc<CudaBuffer>, CudaError> {
        let device = Arc::clone(self);
        // SAFETY: the caller's promise, passed on.
        let made = guarded("registering a CUDA buffer", || unsafe {
            CudaBuffer::new(device, name, ptr, len, keep_alive)
        })??;
        Ok(Arc::new(made))
    }

    /// The trainer's stream for this device from `order`, checked: it
    /// belongs to this device's context and is not capturing a graph.
    fn trainer_stream(&self, order: &StreamOrder) -> Result<CUstream, CudaError> {
        let handle = order.stream_for(self.ordinal());
        let stream = crate::proto::convert::to_usize(handle) as CUstream;
        let invalid = |reason: String| CudaError::InvalidStream {
            device: self.ordinal(),
            stream: handle,
            reason,
        };
        // The legacy (0, 1) and per-thread (2) default streams are the
        // current context's; any other handle names its own context.
        if handle > 2 {
            let mut owner: CUcontext = std::ptr::null_mut();
            // SAFETY: the driver checks the handle; the out-pointer is a
            // live local.
            match unsafe { sys::cuStreamGetCtx(stream, &mut owner) } {
                CUresult::CUDA_SUCCESS => {}
                CUresult::CUDA_ERROR_INVALID_HANDLE | CUresult::CUDA_ERROR_INVALID_VALUE => {
                    return Err(invalid("not a live stream".into()));
                }
                code => return Err(CudaError::driver("cuStreamGetCtx", code)),
            }
            if owner != self.ctx.raw() {
                return Err(invalid(
                    "it belongs to another context (another device's, or not a primary context)"
                        .into(),
                ));
            }
        }
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: as above.
        match unsafe { sys::cuStreamIsCapturing(stream, &mut status) } {
            CUresult::CUDA_SUCCESS => {}
            CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT => {
                return Err(CudaError::GraphCapture {
                    device: self.ordinal(),
                    stream: handle,
                });
            }
            code => return Err(CudaError::driver("cuStreamIsCapturing", code)),
        }
        if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Err(CudaError::GraphCapture {
                device: self.ordinal(),
                stream: handle,
            });
        }
        Ok(stream)
    }

    /// The CUDA buffer behind a device source or target, and the address
    /// of its range.
    fn address(
        &self,
        buffer: &Arc<dyn crate::device::DeviceBuffer>,
        offset: usize,
        len: usize,
    ) -> Result<CUdeviceptr> {
        let Some(cuda) = buffer.as_any().downcast_ref::<CudaBuffer>() else {
            return Err(misrouted("a buffer that is not CUDA memory"));
        };
        if cuda.cuda_device().ordinal() != self.ordinal() {
            return Err(misrouted("a buffer of another CUDA device"));
        }
        Ok(cuda.address(offset, len)?)
    }

    /// Enqueues `copies` on the copy stream after the trainer's work, and
    /// returns their ticket.
    fn start<C: Copyable>(
        self: &Arc<Self>,
        direction: Direction,
        copies: Vec<C>,
        order: &StreamOrder,
    ) -> Result<CudaTicket<C>> {
        let current = self.ctx.enter()?;
        let trainer = self.trainer_stream(order)?;
        let ready = Event::new(&current, EventKind::Order)?;
        ready.record(trainer)?;
        self.copy_stream.wait(&ready)?;
        let start = Event::new(&current, EventKind::Timed)?;
        start.record(self.copy_stream.raw())?;
        let enqueued = copies
            .iter()
            .try_for_each(|copy| copy.enqueue(self, self.copy_stream.raw()));
        if let Err(e) = enqueued {
            // What was enqueued touches the spans and buffers: let it
            // finish before they go.
            // SAFETY: the copy stream is live.
            if let Err(drained) = unsafe { sys::cuStreamSynchronize(self.copy_stream.raw()) }
                .check("cuStreamSynchronize")
            {
                tracing::warn!(error = %drained, "draining the copy stream after a failed enqueue");
            }
            return Err(e);
        }
        let done = Event::new(&current, EventKind::TimedBlocking)?;
        done.record(self.copy_stream.raw())?;
        let ticket = CudaTicket::new(Arc::clone(self), direction, copies, trainer, start, done);
        if direction == Direction::Restore {
            // The trainer's next use of the restored tensors waits for the
            // copies on the device, in blocking use too.
            ticket.order_streams_after()?;
        }
        Ok(ticket)
    }
}

/// A copy this device can enqueue.
pub(crate) trait Copyable: Send + 'static {
    fn enqueue(&self, device: &CudaDevice, stream: CUstream) -> Result<()>;
}

impl Copyable for CaptureCopy {
    fn enqueue(&self, device: &CudaDevice, stream: CUstream) -> Result<()> {
        let Source::Device(src) = &self.src else {
            return Err(misrouted("a capture of host memory"));
        };
        assert_eq!(
            src.len(),
            self.dst.len(),
            "a capture copy's sides differ in length"
        );
        if src.is_empty() {
            return Ok(());
        }
        let from = device.address(src.buffer(), src.offset(), src.len())?;
        // SAFETY: `from..from + len` is inside a live CUDA buffer (checked
        // at registration; the source holds the buffer); the span is `len`
        // bytes of the mapped staging that nothing else in this process
        // touches, kept mapped by the ticket (which holds the span) until
        // the copy completed.
        unsafe { sys::cuMemcpyDtoHAsync_v2(self.dst.as_ptr().cast(), from, src.len(), stream) }
            .check("cuMemcpyDtoHAsync_v2")?;
        Ok(())
    }
}

impl Copyable for RestoreCopy {
    fn enqueue(&self, device: &CudaDevice, stream: CUstream) -> Result<()> {
        let Target::Device(dst) = &self.dst else {
            return Err(misrouted("a restore into host memory"));
        };
        assert_eq!(
            dst.len(),
            self.src.len(),
            "a restore copy's sides differ in length"
        );
        if dst.is_empty() {
            return Ok(());
        }
        let to = device.address(dst.buffer(), dst.offset(), dst.len())?;
        // SAFETY: as for a capture, with the span read and the buffer
        // written; the target is the only writer of its range.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(to, self.src.as_ptr().cast_const().cast(), dst.len(), stream)
        }
        .check("cuMemcpyHtoDAsync_v2")?;
        Ok(())
    }
}

fn misrouted(what: &str) -> Error {
    Error::internal(format!(
        "the CUDA device was given {what} (the client routes each buffer to its own device)"
    ))
}

/// The driver's name for `device`.
fn device_name(device: sys::CUdevice) -> String {
    let mut name = [0 as std::ffi::c_char; 256];
    let len = std::ffi::c_int::try_from(name.len()).unwrap_or(0);
    // SAFETY: the buffer is live and `len` bytes long; the driver writes a
    // NUL-terminated name into it.
    let code = unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), len, device) };
    if code != CUresult::CUDA_SUCCESS {
        return format!("an unnamed device ({code:?})");
    }
    // SAFETY: the driver NUL-terminated it within the buffer.
    unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// What [`CudaDevice::attach`] holds for one registration.
#[derive(Debug)]
struct CudaAttached {
    pin: PinGuard,
}

impl AttachedStaging for CudaAttached {
    fn pinning(&self) -> Pinning {
        self.pin.pinning()
    }
}

impl Device for CudaDevice {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn label(&self) -> String {
        format!("cuda:{}", self.ordinal())
    }

    fn attach(&self, staging: &StagingRegion) -> Result<Box<dyn AttachedStaging>> {
        let pin = guarded("page-locking staging", || {
            pinned::pin(&self.ctx, staging, staging.pin_policy())
        })??;
        Ok(Box::new(CudaAttached { pin }))
    }

    fn capture(
        &self,
        copies: Vec<CaptureCopy>,
        order: &StreamOrder,
    ) -> Result<Box<dyn CopyTicket>> {
        let this = self.handle()?;
        let ticket = guarded("starting CUDA copies", || {
            this.start(Direction::Capture, copies, order)
        })??;
        Ok(Box::new(ticket))
    }

    fn restore(
        &self,
        copies: Vec<RestoreCopy>,
        order: &StreamOrder,
    ) -> Result<Box<dyn CopyTicket>> {
        let this = self.handle()?;
        let ticket = guarded("starting CUDA copies", || {
            this.start(Direction::Restore, copies, order)
        })??;
        Ok(Box::new(ticket))
    }
}

impl CudaDevice {
    /// This device's shared handle (every device lives in the registry).
    fn handle(&self) -> Result<Arc<CudaDevice>> {
        let devices = DEVICES.lock().unwrap_or_else(PoisonError::into_inner);
        devices
            .as_ref()
            .and_then(|d| d.get(&self.ordinal()))
            .filter(|d| std::ptr::eq(Arc::as_ptr(d), self))
            .map(Arc::clone)
            .ok_or_else(|| Error::internal("a CUDA device outside the process's registry"))
    }
}
