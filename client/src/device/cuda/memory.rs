//! [`DeviceMemory`]: device memory gpusnap allocates itself, for tools,
//! benchmarks and tests that have no framework to allocate tensors with
//! (a trainer registers its framework's memory instead). Reads and writes
//! are synchronous copies on the legacy default stream, so they are
//! ordered after everything queued there, the waits a capture or restore
//! put there included.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr};

use super::buffer::CudaBuffer;
use super::device::CudaDevice;
use super::error::{Check, CudaError};

/// `len` bytes of one device's memory (`cuMemAlloc`), freed on drop.
#[derive(Debug)]
pub struct DeviceMemory {
    device: Arc<CudaDevice>,
    ptr: CUdeviceptr,
    len: usize,
}

impl DeviceMemory {
    /// Allocates `len` bytes (at least one is allocated) on `device`.
    pub fn new(device: &Arc<CudaDevice>, len: usize) -> Result<DeviceMemory, CudaError> {
        let _current = device.context().enter()?;
        let mut ptr: CUdeviceptr = 0;
        // SAFETY: a context is current; the out-pointer is a live local.
        unsafe { sys::cuMemAlloc_v2(&mut ptr, len.max(1)) }.check("cuMemAlloc_v2")?;
        Ok(DeviceMemory {
            device: Arc::clone(device),
            ptr,
            len,
        })
    }

    /// The device address of the first byte.
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Bytes allocated.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device it is on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), CudaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(CudaError::InvalidPointer {
                tensor: String::new(),
                reason: format!("{len} bytes at offset {offset} of {} bytes", self.len),
            }),
        }
    }

    /// Copies `bytes` to `offset` (on the legacy default stream, waiting).
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), CudaError> {
        self.check_range(offset, bytes.len())?;
        if bytes.is_empty() {
            return Ok(());
        }
        let _current = self.device.context().enter()?;
        let to = self.ptr + crate::proto::convert::to_u64(offset);
        // SAFETY: the range is inside this allocation (checked); the source
        // is a live slice of that length.
        unsafe { sys::cuMemcpyHtoD_v2(to, bytes.as_ptr().cast(), bytes.len()) }
            .check("cuMemcpyHtoD_v2")
    }

    /// Copies `len` bytes from `offset` (on the legacy default stream,
    /// waiting).
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>, CudaError> {
        self.check_range(offset, len)?;
        let mut bytes = vec![0u8; len];
        if len == 0 {
            return Ok(bytes);
        }
        let _current = self.device.context().enter()?;
        let from = self.ptr + crate::proto::convert::to_u64(offset);
        // SAFETY: the range is inside this allocation (checked); the
        // destination is a live buffer of that length.
        unsafe { sys::cuMemcpyDtoH_v2(bytes.as_mut_ptr().cast(), from, len) }
            .check("cuMemcpyDtoH_v2")?;
        Ok(bytes)
    }

    /// The whole allocation as a buffer to register under `name`; the
    /// buffer keeps the memory allocated.
    pub fn buffer(self: &Arc<Self>, name: &str) -> Result<Arc<CudaBuffer>, CudaError> {
        let keep = Arc::clone(self);
        // SAFETY: the buffer holds `keep`, so the memory stays allocated for
        // as long as the buffer lives.
        unsafe {
            self.device
                .buffer(name, self.ptr, self.len, Some(Box::new(keep)))
        }
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        let freed = self.device.context().enter().and_then(|_current| {
            // SAFETY: allocated by `new`, freed once; every buffer over it
            // holds this allocation, so none is left.
            unsafe { sys::cuMemFree_v2(self.ptr) }.check("cuMemFree_v2")
        });
        if let Err(e) = freed {
            tracing::warn!(error = %e, "freeing device memory failed");
        }
    }
}
