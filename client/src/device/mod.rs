//! What copies between registered buffers and staging memory.
//!
//! A [`Device`] is attached to each registration's staging mapping once
//! ([`Device::attach`], before the first copy, undone when the guard it
//! returns drops), then receives lists of copies whose destinations
//! (capture) or sources (restore) are [`StagingSpan`]s: disjoint regions of
//! the daemon's staging memfd, mapped into this process. It starts them and
//! returns a [`CopyTicket`] at once; the client waits for the ticket (or
//! polls it) before it tells the daemon the data is there. Where the client
//! would wait at once (a stream chunk, a restore), it calls
//! [`Device::capture_and_wait`] / [`Device::restore_and_wait`], which a
//! device may run on the calling thread.
//!
//! Every piece of a copy is owned: a [`Source`] holds the read lease of its
//! buffer, a [`Target`] the write lease, a span the mapping. A ticket that
//! outlives the call that made it therefore keeps alive everything its
//! copies touch, and dropping a ticket that was not waited for waits for the
//! copies still running (see [`CopyTicket`]).
//!
//! Copies are routed per buffer: a registration may mix host buffers
//! ([`Buffer::Host`](crate::Buffer::Host), [`Buffer::Raw`](crate::Buffer::Raw),
//! always copied by the client's host device) and device buffers
//! ([`Buffer::Device`](crate::Buffer::Device), copied by the [`Device`] that
//! [`DeviceBuffer::device`] names). The client groups each snapshot's copies
//! by device, starts every device's copies, and the capture is done when all
//! their tickets are.
//!
//! [`HostDevice`] copies with `memcpy` on a pool of threads it keeps for its
//! lifetime. [`cuda::CudaDevice`] implements the same trait: `attach`
//! page-locks the mapping (`cuMemHostRegister`), `capture` enqueues
//! device-to-host copies of its [`DeviceSource`]s on its copy stream after
//! an event on the trainer's stream ([`StreamOrder`]) and returns a ticket
//! over the event recorded after them.

pub mod cuda;
mod host;
mod memory;
mod order;
mod pool;
mod span;
mod ticket;

use std::fmt;
use std::time::Duration;

pub use host::HostDevice;
pub(crate) use host::default_threads as host_default_threads;
pub use memory::{DeviceBuffer, DeviceSource, DeviceTarget, Source, Target};
pub use order::StreamOrder;
pub use span::{StagingRegion, StagingSpan};
pub use ticket::CopyTicket;
pub(crate) use ticket::Tickets;

pub use crate::buffer::{HostSource, HostTarget};
use crate::error::Result;

/// Copies buffers into staging and back.
///
/// # Contract
/// * `attach` is called once per registration, before any copy into or out
///   of that registration's mapping; the guard it returns is dropped before
///   the mapping is unmapped, and after every ticket of the registration
///   finished.
/// * `capture` and `restore` start the copies and return without waiting
///   for them. Each copy's two sides have equal lengths.
/// * A device drops every source, target and span it was given before its
///   ticket reports done: the leases they hold keep the trainer's writers
///   (capture) or readers (restore) waiting, and the client reuses staging
///   as soon as the ticket is done.
pub trait Device: Send + Sync + fmt::Debug {
    /// A short name for logs ("host", "cuda").
    fn name(&self) -> &'static str;

    /// The device among the others of its kind ("cuda:0"), for what the
    /// client tells the daemon about staging; [`name`](Device::name)
    /// unless the device says more.
    fn label(&self) -> String {
        self.name().to_owned()
    }

    /// Prepares `staging` (one registration's mapping) for this device's
    /// copies: where CUDA page-locks and registers it. A failure fails the
    /// registration. The returned guard undoes it when dropped.
    fn attach(&self, staging: &StagingRegion) -> Result<Box<dyn AttachedStaging>>;

    /// Starts copying every `src` into its `dst`, after the work queued on
    /// the trainer's streams in `order` (a device without streams ignores
    /// it). On an error (from this call or from the ticket) staging holds
    /// partial data and the caller aborts the snapshot.
    fn capture(&self, copies: Vec<CaptureCopy>, order: &StreamOrder)
    -> Result<Box<dyn CopyTicket>>;

    /// Starts copying every staging `src` into its `dst` buffer, after the
    /// work queued on `order`'s streams; the work queued there later waits
    /// for the copies.
    fn restore(&self, copies: Vec<RestoreCopy>, order: &StreamOrder)
    -> Result<Box<dyn CopyTicket>>;

    /// [`capture`](Device::capture), then waits for its ticket: what the
    /// client calls where it would wait at once (each stream chunk). A
    /// device may run the copies on the calling thread instead of handing
    /// them to its own (the host device runs one batch there and wakes a
    /// pool thread only for each further one).
    fn capture_and_wait(&self, copies: Vec<CaptureCopy>, order: &StreamOrder) -> Result<Duration> {
        self.capture(copies, order)?.wait()
    }

    /// [`restore`](Device::restore), then waits for its ticket (a restore
    /// copies out of its slot and waits at once).
    fn restore_and_wait(&self, copies: Vec<RestoreCopy>, order: &StreamOrder) -> Result<Duration> {
        self.restore(copies, order)?.wait()
    }
}

/// What [`Device::attach`] set up for one registration; dropping it undoes
/// that (CUDA: `cuMemHostUnregister`).
pub trait AttachedStaging: Send + Sync + fmt::Debug {
    /// Whether the device page-locked the staging mapping for its copies.
    fn pinning(&self) -> Pinning {
        Pinning::NotNeeded
    }
}

/// Whether a registration's staging may stay pageable when a device that
/// copies faster from page-locked memory (CUDA) cannot page-lock it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PinPolicy {
    /// Go on unpinned (copies are slower, and synchronous), with a warning
    /// naming the reason and [`Pinning::Unpinned`] reported.
    #[default]
    Prefer,
    /// Fail the registration with the reason.
    Require,
}

/// What attaching a device did to a registration's staging.
#[derive(Debug, Clone, PartialEq)]
pub enum Pinning {
    /// The device copies with plain memory access (the host device), or
    /// the staging is empty.
    NotNeeded,
    /// Page-locked: `bytes` in `seconds`.
    Pinned { bytes: u64, seconds: f64 },
    /// The driver refused to page-lock it; copies use pageable memory.
    Unpinned { reason: String },
}

/// One capture copy: `src` into `dst`, of equal lengths.
#[derive(Debug)]
pub struct CaptureCopy {
    pub src: Source,
    pub dst: StagingSpan,
}

/// One restore copy: `src` into `dst`, of equal lengths.
#[derive(Debug)]
pub struct RestoreCopy {
    pub src: StagingSpan,
    pub dst: Target,
}

/// Whether two handles name the same device (the same object).
pub(crate) fn same_device(a: &std::sync::Arc<dyn Device>, b: &std::sync::Arc<dyn Device>) -> bool {
    std::ptr::addr_eq(std::sync::Arc::as_ptr(a), std::sync::Arc::as_ptr(b))
}
