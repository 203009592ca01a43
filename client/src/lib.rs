//! gpusnap client library: what a trainer links to snapshot its state into
//! `gpusnapd` and restore it.
//!
//! * [`Client`]: connect, [`register`](Client::register) buffers,
//!   [`snapshot`](Client::snapshot) (or [`snapshot_begin`](Client::snapshot_begin)
//!   to overlap the copies with training), [`wait_committed`](Client::wait_committed),
//!   [`restore`](Client::restore), [`list`](Client::list),
//!   [`describe`](Client::describe), [`status`](Client::status).
//! * [`HostTensor`], [`RawBuffer`], [`Buffer`]: what can be registered
//!   (a [`device::DeviceBuffer`] too: memory only its device copies).
//! * [`Device`], [`HostDevice`]: what copies between buffers and staging,
//!   attached to each registration's staging, asynchronously behind a
//!   [`device::CopyTicket`]; each buffer is copied by its own device.
//! * [`Backoff`]: the pauses of every retry loop, under one deadline.
//! * [`proto`]: the wire protocol the client and `gpusnapd` speak (the
//!   `gpusnap-proto` crate, re-exported).
//! * [`Dtype`], [`TensorSpec`]: the tensor vocabulary both sides share
//!   (from `gpusnap-proto`).

mod background;
mod backoff;
mod buffer;
mod client;
mod conn;
pub mod device;
mod error;
mod handle;
mod route;
mod session;
mod staging;
mod window;

#[cfg(test)]
mod tests;

pub use backoff::Backoff;
pub use buffer::{Buffer, HOST_ALIGN_BYTES, HostRead, HostTensor, HostWrite, RawBuffer};
pub use client::{
    CaptureInfo, Client, ClientConfig, CommitInfo, Description, Listing, RestoreInfo,
    SnapshotHandle, SnapshotOutcome, Step,
};
pub use device::{Device, HostDevice, PinPolicy, Pinning, StreamOrder};
pub use error::{Error, Result};
pub use gpusnap_proto as proto;
pub use gpusnap_proto::{Dtype, TensorSpec, TensorSpecError, UnknownDtype};
