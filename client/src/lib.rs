//! gpusnap client library: what a trainer links to snapshot its state into
//! `gpusnapd` and restore it.
//!
//! * [`Client`]: connect, [`register`](Client::register) buffers,
//!   [`snapshot`](Client::snapshot) (or [`snapshot_begin`](Client::snapshot_begin)
//!   to overlap the copies with training), [`wait_committed`](Client::wait_committed),
//!   [`restore`](Client::restore), [`list`](Client::list),
//!   [`describe`](Client::describe), [`status`](Client::status).
//! * [`HostTensor`], [`RawBuffer`], [`Buffer`]: what can be registered.
//! * [`Device`], [`HostDevice`]: what copies between buffers and staging.
//! * [`proto`]: the wire protocol the client and `gpusnapd` speak.
//! * [`Dtype`], [`TensorSpec`]: the tensor vocabulary both sides share.

mod buffer;
mod client;
mod conn;
pub mod device;
mod dtype;
mod error;
mod handle;
pub mod proto;
mod session;

mod staging;
mod tensor;

#[cfg(test)]
mod tests;

pub use buffer::{Buffer, HOST_ALIGN_BYTES, HostRead, HostTensor, HostWrite, RawBuffer};
pub use client::{
    CaptureInfo, Client, ClientConfig, CommitInfo, Description, Listing, RestoreInfo,
    SnapshotHandle, SnapshotOutcome, Step,
};
pub use device::{Device, HostDevice};
pub use dtype::{Dtype, UnknownDtype};
pub use error::{Error, Result};
pub use tensor::{TensorSpec, TensorSpecError};
