//! [`CudaTicket`]: the copies one capture or restore enqueued on a CUDA
//! device's copy stream, between a timed start event and a done event.
//!
//! The ticket owns the copies (their sources or targets hold the buffers,
//! their spans the staging mapping), so nothing they touch goes away while
//! the device may still touch it: dropping a ticket that was not waited for
//! waits for the done event first.

use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys::CUstream;

use super::context::{self, Event};
use super::device::CudaDevice;
use crate::device::CopyTicket;
use crate::error::Result;

/// Which way the copies go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Capture,
    Restore,
}

/// Copies in flight on one CUDA device.
pub(crate) struct CudaTicket<C> {
    device: Arc<CudaDevice>,
    direction: Direction,
    /// `None` once waited for.
    copies: Option<Vec<C>>,
    /// The trainer's stream the copies were ordered after.
    trainer: CUstream,
    start: Event,
    done: Event,
}

// SAFETY: the stream handle is a plain value any thread may pass to the
// driver; the rest is `Send` (copies are `Send`, events and the device are).
unsafe impl<C: Send> Send for CudaTicket<C> {}

impl<C> std::fmt::Debug for CudaTicket<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaTicket({:?} on device {}, {})",
            self.direction,
            self.device.ordinal(),
            if self.copies.is_some() {
                "in flight"
            } else {
                "waited"
            }
        )
    }
}

impl<C> CudaTicket<C> {
    pub(crate) fn new(
        device: Arc<CudaDevice>,
        direction: Direction,
        copies: Vec<C>,
        trainer: CUstream,
        start: Event,
        done: Event,
    ) -> CudaTicket<C> {
        CudaTicket {
            device,
            direction,
            copies: Some(copies),
            trainer,
            start,
            done,
        }
    }

    /// Makes the trainer's stream wait, on the device, for the copies.
    pub(crate) fn order_streams_after(&self) -> Result<()> {
        let _current = self.device.context().enter()?;
        Ok(context::wait_event(self.trainer, &self.done)?)
    }

    /// Waits on the host for the copies; their time on the copy stream.
    fn finish(&mut self) -> Result<Duration> {
        // An event's wait needs no current context; the elapsed time does.
        let current = self.device.context().enter();
        let waited = self.done.synchronize();
        // Whatever the result, the device no longer touches the copies.
        self.copies = None;
        waited?;
        let _current = current?;
        let millis = self.done.millis_since(&self.start)?;
        Ok(Duration::from_secs_f64(f64::from(millis.max(0.0)) / 1e3))
    }
}

impl<C: Send> CopyTicket for CudaTicket<C> {
    fn is_done(&self) -> bool {
        // An error is reported by `wait`: done as far as polling goes.
        self.done.is_complete().unwrap_or(true)
    }

    fn wait(mut self: Box<Self>) -> Result<Duration> {
        self.finish()
    }

    fn order_streams_after(&self) -> Result<bool> {
        CudaTicket::order_streams_after(self)?;
        Ok(true)
    }
}

impl<C> Drop for CudaTicket<C> {
    fn drop(&mut self) {
        if self.copies.is_none() {
            return;
        }
        if let Err(e) = self.finish() {
            tracing::warn!(
                device = self.device.ordinal(),
                direction = ?self.direction,
                error = %e,
                "CUDA copies of a ticket dropped unwaited failed"
            );
        }
    }
}
