//! Copies routed to the devices of their buffers: one registration mixes
//! memory kinds, so each snapshot's (or restore's) copies are grouped by
//! the device that copies each buffer, every device's copies are started
//! (each returns a ticket), and the whole is done when every ticket is.
//! Where the caller waits at once ([`capture_and_wait`], [`restore_and_wait`]),
//! the last device's copies run through its `*_and_wait` call (on the
//! calling thread, for the host device) while the others' tickets run.

use std::sync::Arc;
use std::time::Duration;

use crate::device::{CaptureCopy, CopyTicket, Device, RestoreCopy, StreamOrder, Tickets};
use crate::error::Result;

/// Starts `copies` (each with the index of its device in `devices`).
pub(crate) fn capture(
    devices: &[Arc<dyn Device>],
    copies: impl IntoIterator<Item = (usize, CaptureCopy)>,
    order: &StreamOrder,
) -> Result<Tickets> {
    let groups = group(devices, copies);
    start(devices, groups, |device, group| {
        device.capture(group, order)
    })
}

/// Copies `copies` and returns when they are done (the longest device's
/// time).
pub(crate) fn capture_and_wait(
    devices: &[Arc<dyn Device>],
    copies: impl IntoIterator<Item = (usize, CaptureCopy)>,
    order: &StreamOrder,
) -> Result<Duration> {
    run(
        devices,
        group(devices, copies),
        |device, group| device.capture(group, order),
        |device, group| device.capture_and_wait(group, order),
    )
}

/// Copies `copies` and returns when they are done (the longest device's
/// time).
pub(crate) fn restore_and_wait(
    devices: &[Arc<dyn Device>],
    copies: impl IntoIterator<Item = (usize, RestoreCopy)>,
    order: &StreamOrder,
) -> Result<Duration> {
    run(
        devices,
        group(devices, copies),
        |device, group| device.restore(group, order),
        |device, group| device.restore_and_wait(group, order),
    )
}

/// `copies` grouped by device: one group per entry of `devices`.
fn group<C>(
    devices: &[Arc<dyn Device>],
    copies: impl IntoIterator<Item = (usize, C)>,
) -> Vec<Vec<C>> {
    if let [_] = devices {
        // The common case, one device: no regrouping.
        vec![
            copies
                .into_iter()
                .map(|(device, copy)| {
                    debug_assert_eq!(device, 0, "a copy for a device the client does not have");
                    copy
                })
                .collect(),
        ]
    } else {
        let mut groups: Vec<Vec<C>> = devices.iter().map(|_| Vec::new()).collect();
        for (device, copy) in copies {
            groups
                .get_mut(device)
                .expect("every registered tensor's device is in the client's list")
                .push(copy);
        }
        groups
    }
}

/// Starts every non-empty group on its device.
fn start<C>(
    devices: &[Arc<dyn Device>],
    groups: Vec<Vec<C>>,
    start_one: impl Fn(&dyn Device, Vec<C>) -> Result<Box<dyn CopyTicket>>,
) -> Result<Tickets> {
    let mut tickets = Tickets::with_capacity(devices.len());
    for (device, group) in devices.iter().zip(groups) {
        if group.is_empty() {
            continue;
        }
        match start_one(&**device, group) {
            Ok(ticket) => tickets.push(ticket),
            Err(e) => {
                // The devices started before this one copy still: wait for
                // them (their copies touch the buffers and staging).
                if let Err(other) = tickets.wait() {
                    tracing::warn!(error = %other, "a copy started beside a failed one failed too");
                }
                return Err(e);
            }
        }
    }
    Ok(tickets)
}

/// Starts every non-empty group but the last, runs the last with
/// `run_one` (which returns when its copies are done), then waits for the
/// others: the longest time, or the first error (every started copy is
/// waited for either way).
fn run<C>(
    devices: &[Arc<dyn Device>],
    mut groups: Vec<Vec<C>>,
    start_one: impl Fn(&dyn Device, Vec<C>) -> Result<Box<dyn CopyTicket>>,
    run_one: impl FnOnce(&dyn Device, Vec<C>) -> Result<Duration>,
) -> Result<Duration> {
    let Some(last) = groups.iter().rposition(|g| !g.is_empty()) else {
        return Ok(Duration::ZERO);
    };
    let last_group = std::mem::take(groups.get_mut(last).expect("found above"));
    let tickets = start(devices, groups, start_one)?;
    let device = devices.get(last).expect("one group per device");
    let here = run_one(&**device, last_group);
    let others = tickets.wait();
    match (here, others) {
        (Ok(a), Ok(b)) => Ok(a.max(b)),
        (Err(e), others) => {
            if let Err(other) = others {
                tracing::warn!(error = %other, "a copy beside a failed one failed too");
            }
            Err(e)
        }
        (Ok(_), Err(e)) => Err(e),
    }
}
