//! The names of the driver functions the double exports, for call counting
//! and fault rules (which refuse a name the double does not export, so a typo
//! in a test's fault spec fails loudly instead of never firing).

/// Every exported driver function, by its ABI name.
pub const EXPORTED: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetUuid_v2",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuDevicePrimaryCtxGetState",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxPushCurrent_v2",
    "cuCtxPopCurrent_v2",
    "cuCtxGetDevice",
    "cuCtxSynchronize",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetInfo_v2",
    "cuMemGetAddressRange_v2",
    "cuMemsetD8_v2",
    "cuMemsetD8Async",
    "cuMemcpyDtoH_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoD_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemHostRegister_v2",
    "cuMemHostUnregister",
    "cuMemHostAlloc",
    "cuMemAllocHost_v2",
    "cuMemFreeHost",
    "cuMemHostGetDevicePointer_v2",
    "cuPointerGetAttribute",
    "cuPointerGetAttributes",
    "cuStreamCreate",
    "cuStreamCreateWithPriority",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamQuery",
    "cuStreamWaitEvent",
    "cuStreamGetCtx",
    "cuStreamGetCtx_v2",
    "cuStreamGetFlags",
    "cuLaunchHostFunc",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventRecordWithFlags",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuEventElapsedTime_v2",
    "cuStreamBeginCapture_v2",
    "cuStreamIsCapturing",
    "cuStreamEndCapture",
    "cuGraphDestroy",
    "cuGetErrorName",
    "cuGetErrorString",
];

/// The functions that put an operation on a stream: only these take an
/// `@async` fault (the operation fails when it runs).
pub const ENQUEUING: &[&str] = &[
    "cuMemsetD8_v2",
    "cuMemsetD8Async",
    "cuMemcpyDtoH_v2",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoD_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuLaunchHostFunc",
    "cuEventRecord",
    "cuEventRecordWithFlags",
    "cuStreamWaitEvent",
];

/// The exported name equal to `name`, with a static lifetime.
pub fn lookup(name: &str) -> Option<&'static str> {
    EXPORTED.iter().copied().find(|n| *n == name)
}

/// Whether an `@async` fault may be put on `name`.
pub fn is_enqueuing(name: &str) -> bool {
    ENQUEUING.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_enqueuing_ones_are_exported() {
        for (i, n) in EXPORTED.iter().enumerate() {
            assert!(!EXPORTED[..i].contains(n), "{n} listed twice");
        }
        for n in ENQUEUING {
            assert!(lookup(n).is_some(), "{n}");
        }
    }
}
