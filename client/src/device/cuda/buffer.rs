//! A registered range of CUDA device memory ([`CudaBuffer`]), checked with
//! the driver when it is made: the pointer is device memory
//! (`cuPointerGetAttribute`: memory type, device ordinal, context), and the
//! whole extent lies inside one allocation (`cuMemGetAddressRange`). A bad
//! pointer is an error at registration naming the tensor, never a fault at
//! snapshot time.

use std::any::Any;
use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr, CUpointer_attribute, CUresult};

use super::device::CudaDevice;
use super::error::CudaError;
use crate::device::{Device, DeviceBuffer};

/// `len` bytes of device memory at `ptr` on one CUDA device, registered
/// under `name`. It never reads the memory; the device's copies do.
pub struct CudaBuffer {
    device: Arc<CudaDevice>,
    name: String,
    ptr: CUdeviceptr,
    len: usize,
    /// What keeps the memory allocated (a Python tensor, say), dropped
    /// with the buffer, after every copy that used it finished.
    _keep_alive: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaBuffer({:?}: {:#x}, {} bytes, device {})",
            self.name,
            self.ptr,
            self.len,
            self.device.ordinal()
        )
    }
}

impl CudaBuffer {
    /// Checks `ptr..ptr + len` with the driver and wraps it. `keep_alive`
    /// is held (and dropped) with the buffer.
    ///
    /// # Safety
    /// The memory stays allocated, and is not freed and reused for
    /// something else, for as long as the buffer lives (holding its owner
    /// in `keep_alive` is the usual way): copies are enqueued to it by
    /// address.
    pub(crate) unsafe fn new(
        device: Arc<CudaDevice>,
        name: &str,
        ptr: CUdeviceptr,
        len: usize,
        keep_alive: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<CudaBuffer, CudaError> {
        if len > 0 {
            check_extent(&device, name, ptr, len)?;
        }
        Ok(CudaBuffer {
            device,
            name: name.to_owned(),
            ptr,
            len,
            _keep_alive: keep_alive,
        })
    }

    /// The device address of the first byte.
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// The name it was registered under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device it lives on.
    pub fn cuda_device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// The address of byte `offset`, for a copy of `len` bytes from there
    /// (the caller's range is inside: sources and targets are sliced only
    /// within their buffer).
    pub(crate) fn address(&self, offset: usize, len: usize) -> Result<CUdeviceptr, CudaError> {
        let inside = offset.checked_add(len).is_some_and(|end| end <= self.len);
        if !inside {
            return Err(CudaError::InvalidPointer {
                tensor: self.name.clone(),
                reason: format!(
                    "a copy of {len} bytes at offset {offset} lies outside its {} bytes",
                    self.len
                ),
            });
        }
        Ok(self.ptr + crate::proto::convert::to_u64(offset))
    }
}

impl DeviceBuffer for CudaBuffer {
    fn device(&self) -> Arc<dyn Device> {
        Arc::clone(&self.device) as Arc<dyn Device>
    }

    fn byte_len(&self) -> usize {
        self.len
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn overlaps(&self, other: &dyn DeviceBuffer) -> bool {
        let Some(other) = other.as_any().downcast_ref::<CudaBuffer>() else {
            return false;
        };
        let (a, b) = (self.ptr, other.ptr);
        let (a_end, b_end) = (
            a + crate::proto::convert::to_u64(self.len),
            b + crate::proto::convert::to_u64(other.len),
        );
        self.len > 0 && other.len > 0 && a < b_end && b < a_end
    }
}

/// The driver's view of one pointer.
fn attribute<T: Default>(attribute: CUpointer_attribute, ptr: CUdeviceptr) -> Result<T, CUresult> {
    let mut value = T::default();
    // SAFETY: `value` is a live local of the type the attribute reports
    // (the callers pair each attribute with its documented type: an
    // unsigned int, an int, a CUcontext).
    let code =
        unsafe { sys::cuPointerGetAttribute((&raw mut value).cast::<c_void>(), attribute, ptr) };
    match code {
        CUresult::CUDA_SUCCESS => Ok(value),
        code => Err(code),
    }
}

/// A context handle as the attribute query writes it.
#[derive(Debug, Clone, Copy)]
struct ContextHandle(sys::CUcontext);

impl Default for ContextHandle {
    fn default() -> ContextHandle {
        ContextHandle(std::ptr::null_mut())
    }
}

/// Checks that `ptr..ptr + len` is memory of `device` this backend can
/// copy, inside one allocation.
fn check_extent(
    device: &CudaDevice,
    name: &str,
    ptr: CUdeviceptr,
    len: usize,
) -> Result<(), CudaError> {
    let refuse = |reason: String| CudaError::InvalidPointer {
        tensor: name.to_owned(),
        reason,
    };
    let _current = device.context().enter()?;
    let memory_type: u32 =
        match attribute(CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr) {
            Ok(t) => t,
            Err(CUresult::CUDA_ERROR_INVALID_VALUE) => {
                return Err(refuse(format!(
                    "{ptr:#x} is not memory the CUDA driver knows (not a device pointer)"
                )));
            }
            Err(code) => return Err(CudaError::driver("cuPointerGetAttribute", code)),
        };
    if memory_type == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32 {
        return Err(refuse(format!(
            "{ptr:#x} is host memory: register it as a host buffer"
        )));
    }
    if memory_type != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32
        && memory_type != sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED as u32
    {
        return Err(refuse(format!(
            "{ptr:#x} is CUDA memory of type {memory_type}, not device memory"
        )));
    }
    let ordinal: i32 = attribute(
        CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
        ptr,
    )
    .map_err(|code| CudaError::driver("cuPointerGetAttribute", code))?;
    if u32::try_from(ordinal).ok() != Some(device.ordinal()) {
        return Err(refuse(format!(
            "{ptr:#x} is memory of CUDA device {ordinal}, not of device {}",
            device.ordinal()
        )));
    }
    let context: ContextHandle = attribute(CUpointer_attribute::CU_POINTER_ATTRIBUTE_CONTEXT, ptr)
        .map_err(|code| CudaError::driver("cuPointerGetAttribute", code))?;
    // Memory mapped through the virtual memory API belongs to no context.
    if !context.0.is_null() && context.0 != device.context().raw() {
        return Err(refuse(format!(
            "{ptr:#x} belongs to a CUDA context other than device {}'s primary context (the one PyTorch uses)",
            device.ordinal()
        )));
    }
    let (mut base, mut size): (CUdeviceptr, usize) = (0, 0);
    // SAFETY: both out-pointers are live locals.
    match unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) } {
        CUresult::CUDA_SUCCESS => {}
        CUresult::CUDA_ERROR_NOT_FOUND => {
            return Err(refuse(format!("{ptr:#x} is inside no allocation")));
        }
        code => return Err(CudaError::driver("cuMemGetAddressRange_v2", code)),
    }
    let end = ptr.checked_add(crate::proto::convert::to_u64(len));
    let allocation_end = base + crate::proto::convert::to_u64(size);
    match end {
        Some(end) if end <= allocation_end => Ok(()),
        _ => Err(refuse(format!(
            "{len} bytes at {ptr:#x} run {} bytes past the end of their allocation ({size} bytes at {base:#x})",
            ptr.saturating_add(crate::proto::convert::to_u64(len)) - allocation_end
        ))),
    }
}
