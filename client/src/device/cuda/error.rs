//! The CUDA backend's errors: why the driver cannot be used at all
//! ([`CudaError::NoCudaDriver`], [`CudaError::NoDevice`],
//! [`CudaError::CudaDriverTooOld`]), a driver call that failed (its name
//! and its `CUresult`'s name, as cudarc's and candle's errors keep them),
//! and what the backend refuses before it calls the driver (a pointer that
//! is not device memory, a snapshot during graph capture).

use cudarc::driver::sys::CUresult;

/// What went wrong in the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// No CUDA driver library could be loaded (no `libcuda.so` on the
    /// library path), or it lacks a function this backend calls.
    #[error("no usable CUDA driver: {reason}")]
    NoCudaDriver { reason: String },
    /// The driver loaded, but sees no device (or not the one asked for).
    #[error("no CUDA device: {reason}")]
    NoDevice { reason: String },
    /// The driver is older than the CUDA version this build calls.
    #[error(
        "the CUDA driver supports CUDA {}, this build needs {} or newer",
        version_name(*found),
        version_name(*required)
    )]
    CudaDriverTooOld { found: i32, required: i32 },
    /// A driver call failed.
    #[error("{call} failed: {name} ({description})")]
    Driver {
        /// The driver function, e.g. `cuMemHostRegister_v2`.
        call: &'static str,
        /// The `CUresult`'s name, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
        name: String,
        /// The driver's own text for it (`cuGetErrorString`).
        description: String,
        /// The `CUresult` value.
        code: u32,
    },
    /// A registered pointer is not device memory this backend can copy, or
    /// the registered extent does not lie inside one allocation.
    #[error("tensor {tensor:?}: {reason}")]
    InvalidPointer { tensor: String, reason: String },
    /// A trainer stream handed to a capture or restore is unusable.
    #[error("stream {stream:#x} of CUDA device {device}: {reason}")]
    InvalidStream {
        device: u32,
        stream: u64,
        reason: String,
    },
    /// A snapshot or restore was asked for while the trainer's stream is
    /// capturing a CUDA graph: copies enqueued there would become part of
    /// the graph instead of running.
    #[error(
        "stream {stream:#x} of CUDA device {device} is capturing a CUDA graph: snapshots and restores must be requested outside graph capture"
    )]
    GraphCapture { device: u32, stream: u64 },
    /// Staging could not be page-locked and the configuration requires it.
    #[error("staging could not be page-locked, and pinning is required: {reason}")]
    PinningRequired { reason: String },
    /// cudarc panicked where it could not find what it needed (caught at
    /// the backend's boundary; never expected once the driver probed fine).
    #[error("the CUDA bindings panicked in {call}: {message}")]
    Panicked { call: &'static str, message: String },
}

/// `13000` as `13.0`.
fn version_name(version: i32) -> String {
    format!("{}.{}", version / 1000, (version % 1000) / 10)
}

impl CudaError {
    /// The error of driver call `call` returning `code`; its description
    /// comes from the driver when the driver has one.
    pub(crate) fn driver(call: &'static str, code: CUresult) -> CudaError {
        CudaError::Driver {
            call,
            name: format!("{code:?}"),
            description: super::driver::error_string(code),
            code: code as u32,
        }
    }

    /// This error, naming tensor `name` where it concerns a pointer that
    /// was checked before its tensor was known (as
    /// [`CudaDevice::of_pointer`](super::CudaDevice::of_pointer)'s).
    #[must_use]
    pub fn for_tensor(self, name: &str) -> CudaError {
        match self {
            CudaError::InvalidPointer { tensor, reason } if tensor.is_empty() => {
                CudaError::InvalidPointer {
                    tensor: name.to_owned(),
                    reason,
                }
            }
            other => other,
        }
    }

    /// The `CUresult` name of a failed driver call.
    pub fn driver_code_name(&self) -> Option<&str> {
        match self {
            CudaError::Driver { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// `CUresult` to `Result`, keeping the call's name.
pub(crate) trait Check {
    fn check(self, call: &'static str) -> Result<(), CudaError>;
}

impl Check for CUresult {
    fn check(self, call: &'static str) -> Result<(), CudaError> {
        match self {
            CUresult::CUDA_SUCCESS => Ok(()),
            code => Err(CudaError::driver(call, code)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pointer_error_names_its_tensor_once_known() {
        let e = CudaError::InvalidPointer {
            tensor: String::new(),
            reason: "0x10 is not memory the CUDA driver knows".into(),
        };
        assert_eq!(
            e.for_tensor("w").to_string(),
            "tensor \"w\": 0x10 is not memory the CUDA driver knows"
        );
        let named = CudaError::InvalidPointer {
            tensor: "a".into(),
            reason: "r".into(),
        };
        assert_eq!(named.clone().for_tensor("b"), named, "a name is kept");
        let other = CudaError::NoDevice { reason: "r".into() };
        assert_eq!(other.clone().for_tensor("b"), other);
    }

    #[test]
    fn versions_read_as_cuda_releases() {
        let e = CudaError::CudaDriverTooOld {
            found: 12040,
            required: 13000,
        };
        assert_eq!(
            e.to_string(),
            "the CUDA driver supports CUDA 12.4, this build needs 13.0 or newer"
        );
    }

    #[test]
    fn a_driver_error_names_the_call_and_the_result() {
        let e = CudaError::Driver {
            call: "cuMemHostRegister_v2",
            name: format!("{:?}", CUresult::CUDA_ERROR_OUT_OF_MEMORY),
            description: "out of memory".into(),
            code: CUresult::CUDA_ERROR_OUT_OF_MEMORY as u32,
        };
        assert_eq!(
            e.to_string(),
            "cuMemHostRegister_v2 failed: CUDA_ERROR_OUT_OF_MEMORY (out of memory)"
        );
        assert_eq!(e.driver_code_name(), Some("CUDA_ERROR_OUT_OF_MEMORY"));
        assert_eq!(CUresult::CUDA_SUCCESS.check("cuInit"), Ok(()));
    }
}
