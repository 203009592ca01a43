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
    /// What the tickets already waited for by
    /// [`order_or_wait`](Tickets::order_or_wait) came to.
    settled: Settled,
}

/// The longest copy time and the first error of tickets waited for.
#[derive(Default)]
struct Settled {
    longest: Duration,
    first_error: Option<crate::error::Error>,
}

impl Settled {
    fn add(&mut self, waited: Result<Duration>) {
        match waited {
            Ok(took) => self.longest = self.longest.max(took),
            Err(e) if self.first_error.is_none() => self.first_error = Some(e),
            Err(e) => tracing::warn!(error = %e, "a further copy error"),
        }
    }

    fn into_result(self) -> Result<Duration> {
        match self.first_error {
            Some(e) => Err(e),
            None => Ok(self.longest),
        }
    }
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
            settled: Settled::default(),
        }
    }

    pub(crate) fn push(&mut self, ticket: Box<dyn CopyTicket>) {
        self.tickets.push(ticket);
    }

    /// What the host must do before the trainer's thread goes on while
    /// the copies finish elsewhere: the trainer's streams are made to wait
    /// for every device's copies that have streams (without blocking the
    /// host), and the copies of devices without streams (host memory,
    /// whose buffers may have no lease to hold the trainer's writes back:
    /// a [`RawBuffer`](crate::RawBuffer)) are waited for here. Their
    /// outcome is kept for [`wait`](Tickets::wait). An error: a device's
    /// streams could not be ordered (the tickets not waited for yet are
    /// kept, so the caller can still wait for them on the host).
    pub(crate) fn order_or_wait(&mut self) -> Result<()> {
        let mut ordered = Vec::with_capacity(self.tickets.len());
        let mut tickets = std::mem::take(&mut self.tickets).into_iter();
        while let Some(ticket) = tickets.next() {
            match ticket.order_streams_after() {
                Ok(true) => ordered.push(ticket),
                Ok(false) => self.settled.add(ticket.wait()),
                Err(e) => {
                    ordered.push(ticket);
                    ordered.extend(tickets);
                    self.tickets = ordered;
                    return Err(e);
                }
            }
        }
        self.tickets = ordered;
        Ok(())
    }

    /// Whether every device's copies finished.
    pub(crate) fn is_done(&self) -> bool {
        self.tickets.iter().all(|t| t.is_done())
    }

    /// Waits for every ticket, also after one failed (their copies touch
    /// memory); the longest copy time, or the first error (of these or of
    /// those [`order_or_wait`](Tickets::order_or_wait) waited for).
    pub(crate) fn wait(self) -> Result<Duration> {
        let Tickets {
            tickets,
            mut settled,
        } = self;
        for ticket in tickets {
            settled.add(ticket.wait());
        }
        settled.into_result()
    }
}
