//! A strict CUDA driver double: a shared library that stands in for
//! `libcuda.so`, implemented on host memory, so the client's CUDA backend
//! (cudarc with dynamic loading) can be tested where no GPU is. A testing
//! tool: the product never loads it. See `README.md` for what it models.
//!
//! Layout: `errors` (the `CUresult` table), `config` (environment and fault
//! specs), `control` (faults, call counts, violations, delay), `memory`
//! (device address spaces, allocator), `host` (page-locked ranges),
//! `completion`, `stream` (workers and ordering), `event`, `context`,
//! `capture`, `driver` (the tables behind one lock), and `api/*` (the
//! exported functions, under their ABI names).

pub mod api;
pub mod capture;
pub mod completion;
pub mod config;
pub mod context;
pub mod control;
pub mod driver;
pub mod errors;
pub mod event;
pub mod ffi;
pub mod functions;
pub mod host;
pub mod memory;
pub mod stream;

pub use api::capture::*;
pub use api::context::*;
pub use api::control::*;
pub use api::copy::*;
pub use api::device::*;
pub use api::error::*;
pub use api::event::*;
pub use api::host::*;
pub use api::memory::*;
pub use api::pointer::*;
pub use api::stream::*;
