//! `gpusnap._native.cuda_driver()`: whether this process can copy CUDA
//! tensors, and with which driver (the probe the client crate makes once
//! per process).

use gpusnap::device::cuda::CudaDevice;
use pyo3::prelude::*;
use serde_json::{Value, json};

use crate::convert::to_python;

/// {"available": bool, "reason": str | None, "version": int | None,
/// "devices": int | None, "library": str | None}: `reason` says why not
/// when unavailable (no driver library, no device, a driver too old).
#[pyfunction]
pub fn cuda_driver(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let probed = py.detach(|| {
        let devices = CudaDevice::count()?;
        let version = CudaDevice::driver_version()?;
        let library = CudaDevice::driver_library()?;
        Ok::<_, gpusnap::device::cuda::CudaError>((devices, version, library))
    });
    let value: Value = match probed {
        Ok((devices, version, library)) => json!({
            "available": devices > 0,
            "reason": if devices > 0 { Value::Null } else { json!("the driver sees no device") },
            "version": version,
            "devices": devices,
            "library": library,
        }),
        Err(e) => json!({
            "available": false,
            "reason": e.to_string(),
            "version": null,
            "devices": null,
            "library": null,
        }),
    };
    to_python(py, &value)
}
