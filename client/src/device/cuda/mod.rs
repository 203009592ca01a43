//! The CUDA backend: copies between CUDA device memory and the daemon's
//! staging, on a copy stream per device, ordered after the trainer's
//! stream with events, through the trainer's primary context.
//!
//! * [`driver`]: finds the driver once per process (no library, no
//!   device, a driver too old: a typed error, never a panic) and catches
//!   what cudarc could still panic on.
//! * [`context`]: the primary context, a guard making it current, owned
//!   streams and events.
//! * [`pinned`]: page-locking staging at attach, shared by the devices of
//!   one registration.
//! * [`buffer`]: device memory checked with the driver at registration.
//! * [`device`]: [`CudaDevice`], the [`Device`](crate::Device) itself.
//! * [`ticket`]: copies in flight.
//! * [`memory`]: [`DeviceMemory`], device memory gpusnap allocates (for
//!   tools, benchmarks and tests).

mod buffer;
mod context;
mod device;
mod driver;
mod error;
mod memory;
mod pinned;
mod ticket;

pub use buffer::CudaBuffer;
pub use device::CudaDevice;
pub use driver::REQUIRED_DRIVER_VERSION;
pub use error::CudaError;
pub use memory::DeviceMemory;

#[cfg(test)]
mod tests;
