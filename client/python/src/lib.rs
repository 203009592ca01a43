//! `gpusnap._native`: the compiled half of the `gpusnap` Python package.
//!
//! * [`client::NativeClient`] (`gpusnap._native.Client`): the client crate's
//!   `Client` for Python, with the GIL released during every copy and wait.
//! * [`cuda::cuda_driver`] (`gpusnap._native.cuda_driver`): whether CUDA
//!   tensors can be copied here, and the driver's version.
//! * [`errors`]: the exception tree, rooted at `gpusnap.Error`.
//!
//! Everything that knows torch or numpy is Python, in `python/gpusnap/`.

mod client;
mod convert;
mod cuda;
mod errors;

use pyo3::prelude::*;

/// Sends the client crate's log (reconnects, failed finishes) to stderr,
/// filtered by `GPUSNAP_LOG` (default `warn`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPUSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Another extension may have installed a subscriber already: keep it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PROTOCOL_VERSION", gpusnap::proto::PROTOCOL_VERSION)?;
    m.add("DEFAULT_SOCKET", gpusnap::proto::DEFAULT_SOCKET)?;
    m.add_class::<client::NativeClient>()?;
    m.add_function(wrap_pyfunction!(client::_panic_inside_a_call, m)?)?;
    m.add_function(wrap_pyfunction!(cuda::cuda_driver, m)?)?;
    errors::register(m)?;
    Ok(())
}
