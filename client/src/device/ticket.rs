//! Copies in flight: a device's [`CopyTicket`], and [`Tickets`], the
//! client's set of them for one capture or restore (one per device).

use std::fmt;
use std::time::Duration;

use crate::error::Result;

/// The copies one [`Device::capture`](super::Device::capture) or
/// [`Device::restore`](super::Device::restore) call started.
///
/// A ticket outlives that call, so it owns (through the sources, targets
/// and spans its copies hold) everything they touch. Dropping a ticket that
/// was not waited for must not return while a copy still touches memory: it
/// cancels what has not started and waits, bounded and logged, for what
/// has, like an `io_uring` ring's `Drop`.
pub trait CopyTicket: Send {
    /// Whether every copy has finished (successfully or not). Never blocks.
    fn is_done(&self) -> bool;

    /// Waits for every copy; returns the time from the start of the copies
    /// to the end of the last one, or the first copy's error.
    fn wait(self: Box<Self>) -> Result<Duration>;

    /// Makes the trainer's streams (those the copies were ordered after)
    /// wait for the copies on the device, without blocking the host; false
    /// when this device has no streams to order (the host device: its
    /// copies are ordered by the buffers' leases).
    fn order_streams_after(&self) -> Result<bool> {
        Ok(false)
    }
}

/// The tickets of one capture or restore, one per device used.
pub(crate) struct Tickets {
    tickets: Vec<Box<dyn CopyTicket>>,
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tickets({} in flight)", self.tickets.len())
    }
}

impl Tickets {
    pub(crate) fn with_capacity(devices: usize) -> Tickets {
        Tickets {
            tickets: Vec::with_capacity(devices),
        }
    }

    pub(crate) fn push(&mut self, ticket: Box<dyn CopyTicket>) {
        self.tickets.push(ticket);
    }

    /// Makes the trainer's streams wait for every device's copies that
    /// have streams (without blocking the host).
    pub(crate) fn order_streams_after(&self) -> Result<()> {
        for ticket in &self.tickets {
            ticket.order_streams_after()?;
        }
        Ok(())
    }

    /// Whether every device's copies finished.
    pub(crate) fn is_done(&self) -> bool {
        self.tickets.iter().all(|t| t.is_done())
    }

    /// Waits for every ticket, also after one failed (their copies touch
    /// memory); the longest copy time, or the first error.
    pub(crate) fn wait(self) -> Result<Duration> {
        let mut longest = Duration::ZERO;
        let mut first_error = None;
        for ticket in self.tickets {
            match ticket.wait() {
                Ok(took) => longest = longest.max(took),
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some(e);
                    } else {
                        tracing::warn!(error = %e, "a further copy error");
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(longest),
        }
    }
}
