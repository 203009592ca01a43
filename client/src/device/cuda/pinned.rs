//! Page-locking a registration's staging mapping for CUDA copies
//! (`cuMemHostRegister`, portable, so every device's context sees it), once
//! per mapping per process however many CUDA devices attach to it, in
//! pieces of at most [`piece_bytes`] (drivers refuse single registrations
//! past a few hundred GiB), undone before the mapping is unmapped (the
//! last guard's `Drop`; registered memory that is unmapped first poisons
//! the address range for later registrations).
//!
//! Pinning is what makes copies run at the link's speed; it is paid once,
//! at registration, logged with its rate. If the driver refuses (memory
//! limits, too many registrations), copies still work from pageable
//! memory, only slower and synchronously: [`PinPolicy::Prefer`] goes on
//! with a warning naming the reason and reports [`Pinning::Unpinned`];
//! [`PinPolicy::Require`] fails the registration with that reason.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use cudarc::driver::sys::{self, CUresult};

use super::context::PrimaryContext;
use super::error::{Check, CudaError};
use crate::device::{PinPolicy, Pinning, StagingRegion};

/// Bytes of one `cuMemHostRegister` call at most: 64 GiB (drivers of the
/// R580 line accept up to 512 GiB; LMCache registers 64 GiB pieces).
pub(crate) const DEFAULT_PIECE_BYTES: usize = 64 << 30;

static PIECE_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_PIECE_BYTES);

/// The largest piece registered in one call now.
pub(crate) fn piece_bytes() -> usize {
    PIECE_BYTES.load(Ordering::Relaxed)
}

/// Sets the piece size (a multiple of the page size), for tests of
/// piecewise registration.
#[cfg(test)]
pub(crate) fn set_piece_bytes(bytes: usize) {
    assert!(
        bytes > 0 && bytes.is_multiple_of(page_size()),
        "{bytes} is not a page multiple"
    );
    PIECE_BYTES.store(bytes, Ordering::Relaxed);
}

#[cfg(test)]
fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// One mapping's registration, shared by the devices attached to it.
#[derive(Debug)]
struct Registration {
    /// The context that registered it (and unregisters it).
    ctx: Arc<PrimaryContext>,
    /// Starts of the pieces this process registered (and must unregister).
    pieces: Vec<usize>,
    outcome: Pinning,
    users: usize,
}

/// Registrations by mapping base address.
static REGISTRATIONS: Mutex<Option<HashMap<usize, Registration>>> = Mutex::new(None);

fn registrations() -> MutexGuard<'static, Option<HashMap<usize, Registration>>> {
    // A panic while holding the lock left the map consistent (every change
    // is one insert or remove).
    REGISTRATIONS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A device's share of a mapping's registration; the last share to drop
/// unregisters it.
#[derive(Debug)]
pub(crate) struct PinGuard {
    base: usize,
    outcome: Pinning,
}

impl PinGuard {
    pub(crate) fn pinning(&self) -> Pinning {
        self.outcome.clone()
    }
}

/// Page-locks `region` (or shares the registration another CUDA device of
/// this process made of it).
pub(crate) fn pin(
    ctx: &Arc<PrimaryContext>,
    region: &StagingRegion,
    policy: PinPolicy,
) -> Result<PinGuard, CudaError> {
    let base = region.as_ptr() as usize;
    let mut map = registrations();
    let map = map.get_or_insert_with(HashMap::new);
    if let Some(existing) = map.get_mut(&base) {
        if policy == PinPolicy::Require
            && let Pinning::Unpinned { reason } = &existing.outcome
        {
            return Err(CudaError::PinningRequired {
                reason: reason.clone(),
            });
        }
        existing.users += 1;
        return Ok(PinGuard {
            base,
            outcome: existing.outcome.clone(),
        });
    }
    let (pieces, outcome) = register(ctx, region)?;
    if let (PinPolicy::Require, Pinning::Unpinned { reason }) = (policy, &outcome) {
        return Err(CudaError::PinningRequired {
            reason: reason.clone(),
        });
    }
    map.insert(
        base,
        Registration {
            ctx: Arc::clone(ctx),
            pieces,
            outcome: outcome.clone(),
            users: 1,
        },
    );
    Ok(PinGuard { base, outcome })
}

/// Registers `region` piece by piece; on a refusal, undoes the pieces
/// registered so far and reports the region unpinned.
fn register(
    ctx: &PrimaryContext,
    region: &StagingRegion,
) -> Result<(Vec<usize>, Pinning), CudaError> {
    if region.is_empty() {
        return Ok((Vec::new(), Pinning::NotNeeded));
    }
    let _current = ctx.enter()?;
    let started = Instant::now();
    let piece = piece_bytes();
    let base = region.as_ptr() as usize;
    let mut pieces = Vec::new();
    let mut offset = 0;
    while offset < region.len() {
        let len = piece.min(region.len() - offset);
        let start = base + offset;
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: `start..start + len` lies inside the region, a live shared
        // mapping for as long as the registration (the guard, held by the
        // mapping) lives; the driver pins those pages.
        match unsafe { sys::cuMemHostRegister_v2(start as *mut std::ffi::c_void, len, flags) } {
            CUresult::CUDA_SUCCESS => pieces.push(start),
            // Someone else in this process page-locked it already: pinned,
            // but not ours to unregister.
            CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED => {}
            code => {
                let refused = CudaError::driver("cuMemHostRegister_v2", code);
                unregister(&pieces);
                let reason = format!(
                    "page-locking {} bytes of staging at offset {offset} was refused: {refused}",
                    len
                );
                tracing::warn!(
                    device = ctx.ordinal(),
                    %reason,
                    "staging is not page-locked: CUDA copies to and from it run slower, synchronously"
                );
                return Ok((Vec::new(), Pinning::Unpinned { reason }));
            }
        }
        offset += len;
    }
    let seconds = started.elapsed().as_secs_f64();
    let bytes = region.len() as u64;
    tracing::info!(
        device = ctx.ordinal(),
        bytes,
        pieces = pieces.len(),
        seconds,
        gb_per_s = bytes as f64 / seconds.max(1e-9) / 1e9,
        "staging page-locked for CUDA copies"
    );
    Ok((pieces, Pinning::Pinned { bytes, seconds }))
}

/// Unregisters `pieces` (errors logged: nothing else can be done).
fn unregister(pieces: &[usize]) {
    for &start in pieces {
        // SAFETY: `start` is the base of a registration this process made
        // and has not undone; the mapping is still mapped (the guard drops
        // before the mapping is unmapped).
        if let Err(e) = unsafe { sys::cuMemHostUnregister(start as *mut std::ffi::c_void) }
            .check("cuMemHostUnregister")
        {
            tracing::warn!(error = %e, "unregistering staging failed");
        }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut map = registrations();
        let Some(map) = map.as_mut() else { return };
        let Some(registration) = map.get_mut(&self.base) else {
            tracing::error!(base = self.base, "a staging registration went missing");
            return;
        };
        registration.users -= 1;
        if registration.users > 0 {
            return;
        }
        let registration = map.remove(&self.base).expect("found above");
        match registration.ctx.enter() {
            Ok(_current) => unregister(&registration.pieces),
            Err(e) => tracing::warn!(error = %e, "cannot unregister staging"),
        }
    }
}
