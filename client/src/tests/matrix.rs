//! One test body, every device: [`device_matrix!`] runs a body (a function
//! taking `&dyn Memory`) once per device the client can copy with, after
//! candle's `test_device!` (`candle-core/src/test_utils.rs`).
//!
//! A [`Memory`] is what a body needs from a device: a client that copies
//! with it, buffers of its memory filled with given bytes, a way to read
//! them back, and a copy failure to inject. [`OnHost`] keeps its buffers in
//! [`HostTensor`]s copied by the [`HostDevice`]; [`OnDouble`] in
//! [`DoubleBuffer`]s copied by the strict [`DoubleDevice`], whose
//! violations fail the test after the body.
//!
//! [`OnCuda`](super::cuda::OnCuda) keeps its buffers in CUDA device
//! memory copied by the CUDA backend, on a real GPU or on the project's
//! CUDA driver double; where neither is usable, its arm skips (counted, and
//! refused under `GPUSNAP_REQUIRE_CUDA=1`: see [`super::cuda`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::cuda::FaultyCudaBuffer;
use super::double::{DoubleBuffer, DoubleDevice};
use crate::device::{
    AttachedStaging, CaptureCopy, CopyTicket, Device, DeviceBuffer, HostDevice, RestoreCopy,
    StagingRegion, StreamOrder,
};
use crate::{Buffer, Client, ClientConfig, Dtype, Error, HostTensor, Result};

/// Runs each named body on every device: `device_matrix!(a, b)` makes the
/// tests `a::host`, `a::double`, `a::cuda`, `b::host`, `b::double` and
/// `b::cuda`. A body is a `fn(&dyn Memory)` in the same module.
macro_rules! device_matrix {
    ($($body:ident),* $(,)?) => {$(
        mod $body {
            use $crate::tests::matrix::Memory as _;

            #[test]
            fn host() {
                let memory = $crate::tests::matrix::OnHost::new();
                super::$body(&memory);
                memory.check();
            }

            #[test]
            fn double() {
                let memory = $crate::tests::matrix::OnDouble::new();
                super::$body(&memory);
                memory.check();
            }

            #[test]
            fn cuda() {
                let Some(memory) = $crate::tests::cuda::OnCuda::new() else {
                    return;
                };
                super::$body(&memory);
                memory.check();
            }
        }
    )*};
}

pub(crate) use device_matrix;

/// What a test body needs from the device under test.
pub trait Memory {
    /// A client on `config` whose buffers from [`Memory::buffer`] are
    /// copied by this device.
    fn client(&self, config: ClientConfig) -> Client;

    /// A buffer of this device's memory, of `dtype` and `shape`, holding
    /// `bytes`.
    fn buffer(&self, dtype: Dtype, shape: &[u64], bytes: &[u8]) -> TestBuffer;

    /// The next capture's copies fail, from their ticket, with `reason`.
    fn fail_next_capture(&self, reason: &str);

    /// Lets the copies started so far run without anyone waiting for them
    /// (the host device's always do; the double holds them until then).
    fn let_copies_run(&self);

    /// Fails the test if the device saw a misuse.
    fn check(&self);
}

/// A buffer a body registers, and reads or writes as the trainer would.
pub enum TestBuffer {
    Host(HostTensor),
    Double(Arc<DoubleBuffer>),
    Cuda(Arc<FaultyCudaBuffer>),
}

impl TestBuffer {
    /// What to register.
    pub fn buffer(&self) -> Buffer {
        match self {
            TestBuffer::Host(t) => Buffer::Host(t.clone()),
            TestBuffer::Double(b) => Buffer::Device(Arc::clone(b) as Arc<dyn DeviceBuffer>),
            TestBuffer::Cuda(b) => Buffer::Device(Arc::clone(b) as Arc<dyn DeviceBuffer>),
        }
    }

    /// The bytes now.
    pub fn contents(&self) -> Vec<u8> {
        match self {
            TestBuffer::Host(t) => t.read().to_vec(),
            TestBuffer::Double(b) => b.contents(),
            TestBuffer::Cuda(b) => b.contents(),
        }
    }

    /// Overwrites the bytes.
    pub fn overwrite(&self, bytes: &[u8]) {
        match self {
            TestBuffer::Host(t) => t.write().copy_from_slice(bytes),
            TestBuffer::Double(b) => b.overwrite(bytes),
            TestBuffer::Cuda(b) => b.overwrite(bytes),
        }
    }
}

/// Host memory, copied by the host device (behind a wrapper that can fail
/// a capture's ticket).
pub struct OnHost {
    device: Arc<FaultyHost>,
}

impl OnHost {
    pub fn new() -> OnHost {
        OnHost {
            device: Arc::new(Faulty::new(
                Arc::new(HostDevice::new(2).with_piece_bytes(64 << 10)),
                "host",
            )),
        }
    }
}

impl Memory for OnHost {
    fn client(&self, config: ClientConfig) -> Client {
        Client::with_device(config, Arc::clone(&self.device) as Arc<dyn Device>).expect("connect")
    }

    fn buffer(&self, dtype: Dtype, shape: &[u64], bytes: &[u8]) -> TestBuffer {
        let t = HostTensor::zeros(dtype, shape.to_vec()).expect("zeros");
        t.write().copy_from_slice(bytes);
        TestBuffer::Host(t)
    }

    fn fail_next_capture(&self, reason: &str) {
        self.device.fail_next(reason);
    }

    fn let_copies_run(&self) {}

    fn check(&self) {}
}

/// Device memory of the strict double; host buffers of the same client go
/// to a host device.
pub struct OnDouble {
    pub device: Arc<DoubleDevice>,
}

impl OnDouble {
    pub fn new() -> OnDouble {
        OnDouble {
            device: DoubleDevice::new(),
        }
    }
}

impl Memory for OnDouble {
    fn client(&self, config: ClientConfig) -> Client {
        let host = Arc::new(HostDevice::new(config.copy_threads));
        Client::with_device(config, host).expect("connect")
    }

    fn buffer(&self, _dtype: Dtype, _shape: &[u64], bytes: &[u8]) -> TestBuffer {
        TestBuffer::Double(self.device.buffer(bytes))
    }

    fn fail_next_capture(&self, reason: &str) {
        self.device.fail_next_capture(reason);
    }

    fn let_copies_run(&self) {
        self.device.release();
    }

    fn check(&self) {
        self.device.check();
    }
}

/// A device, except that an armed capture's ticket fails after its copies
/// ran (an asynchronous copy error, as a device reports one; works on a
/// real GPU too, where faults cannot be injected).
#[derive(Debug)]
pub struct Faulty<D> {
    pub inner: D,
    backend: &'static str,
    fail_next: Mutex<Option<String>>,
}

impl<D> Faulty<D> {
    pub fn new(inner: D, backend: &'static str) -> Faulty<D> {
        Faulty {
            inner,
            backend,
            fail_next: Mutex::new(None),
        }
    }

    /// The next capture's ticket fails with `reason`.
    pub fn fail_next(&self, reason: &str) {
        *self.fail_next.lock().expect("fail") = Some(reason.to_owned());
    }
}

/// The host device behind [`Faulty`].
pub type FaultyHost = Faulty<Arc<HostDevice>>;

/// A ticket that fails, from `wait`, after its copies ran: an asynchronous
/// copy error, as a device reports one (the matrix's devices fail so).
pub struct FailingTicket {
    pub inner: Box<dyn CopyTicket>,
    pub backend: &'static str,
    pub reason: String,
}

impl CopyTicket for FailingTicket {
    fn is_done(&self) -> bool {
        self.inner.is_done()
    }

    fn wait(self: Box<Self>) -> Result<Duration> {
        self.inner.wait()?;
        Err(Error::BackendUnavailable {
            backend: self.backend,
            reason: self.reason,
        })
    }

    fn order_streams_after(&self) -> Result<bool> {
        self.inner.order_streams_after()
    }
}

impl<T: Device + ?Sized> Device for Faulty<Arc<T>> {
    fn name(&self) -> &'static str {
        "faulty"
    }

    fn attach(&self, staging: &StagingRegion) -> Result<Box<dyn AttachedStaging>> {
        self.inner.attach(staging)
    }

    fn capture(
        &self,
        copies: Vec<CaptureCopy>,
        order: &StreamOrder,
    ) -> Result<Box<dyn CopyTicket>> {
        let ticket = self.inner.capture(copies, order)?;
        Ok(match self.fail_next.lock().expect("fail").take() {
            None => ticket,
            Some(reason) => Box::new(FailingTicket {
                inner: ticket,
                backend: self.backend,
                reason,
            }),
        })
    }

    fn restore(
        &self,
        copies: Vec<RestoreCopy>,
        order: &StreamOrder,
    ) -> Result<Box<dyn CopyTicket>> {
        self.inner.restore(copies, order)
    }
}
