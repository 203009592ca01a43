//! Copies routed to the devices of their buffers: one registration mixes
//! memory kinds, so each snapshot's (or restore's) copies are grouped by
//! the device that copies each buffer, every device's copies are started
//! (each returns a ticket), and the whole is done when every ticket is.

use std::sync::Arc;

use crate::device::{CaptureCopy, CopyTicket, Device, RestoreCopy, Tickets};
use crate::error::Result;

/// Starts `copies` (each with the index of its device in `devices`).
pub(crate) fn capture(
    devices: &[Arc<dyn Device>],
    copies: impl IntoIterator<Item = (usize, CaptureCopy)>,
) -> Result<Tickets> {
    start(devices, copies, |device, group| device.capture(group))
}

/// Starts `copies` (each with the index of its device in `devices`).
pub(crate) fn restore(
    devices: &[Arc<dyn Device>],
    copies: impl IntoIterator<Item = (usize, RestoreCopy)>,
) -> Result<Tickets> {
    start(devices, copies, |device, group| device.restore(group))
}

fn start<C>(
    devices: &[Arc<dyn Device>],
    copies: impl IntoIterator<Item = (usize, C)>,
    start_one: impl Fn(&dyn Device, Vec<C>) -> Result<Box<dyn CopyTicket>>,
) -> Result<Tickets> {
    let groups: Vec<Vec<C>> = if let [_] = devices {
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
    };
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
