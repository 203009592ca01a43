//! The host backend: `memcpy`, spread over a few threads by bytes.

use std::ops::Range;

use super::{CaptureCopy, Device, RestoreCopy, Source, StagingSpan, Target};
use crate::error::Result;

/// Copies with `memcpy`. Sets larger than one piece are cut into pieces of
/// at most `piece_bytes` (so one huge tensor goes parallel too) and spread
/// over up to `threads` scoped threads, each taking a contiguous run of
/// pieces of about equal bytes.
#[derive(Debug, Clone)]
pub struct HostDevice {
    threads: usize,
    piece_bytes: usize,
}

impl HostDevice {
    /// Default piece size: 16 MiB.
    pub const PIECE_BYTES: usize = 16 << 20;

    /// A host device copying on up to `threads` threads (at least 1).
    pub fn new(threads: usize) -> HostDevice {
        HostDevice {
            threads: threads.max(1),
            piece_bytes: Self::PIECE_BYTES,
        }
    }

    /// The same device with another piece size (at least 1 byte).
    pub fn with_piece_bytes(mut self, piece_bytes: usize) -> HostDevice {
        self.piece_bytes = piece_bytes.max(1);
        self
    }

    /// Threads copies may use.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn run<P: Send>(&self, pieces: Vec<(usize, P)>, copy: impl Fn(P) + Sync) {
        let sizes: Vec<usize> = pieces.iter().map(|(len, _)| *len).collect();
        let groups = partition(&sizes, self.threads, self.piece_bytes);
        let mut pieces = pieces.into_iter().map(|(_, p)| p);
        let mut work: Vec<Vec<P>> = groups
            .iter()
            .map(|range| pieces.by_ref().take(range.len()).collect())
            .collect();
        let copy = &copy;
        match work.pop() {
            None => {}
            Some(last) if work.is_empty() => last.into_iter().for_each(copy),
            Some(last) => std::thread::scope(|scope| {
                for group in work {
                    scope.spawn(move || group.into_iter().for_each(copy));
                }
                last.into_iter().for_each(copy);
            }),
        }
    }
}

impl Default for HostDevice {
    fn default() -> HostDevice {
        HostDevice::new(default_threads())
    }
}

/// `min(4, available_parallelism)`.
pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

impl Device for HostDevice {
    fn name(&self) -> &'static str {
        "host"
    }

    fn capture(&self, copies: Vec<CaptureCopy<'_>>) -> Result<()> {
        let mut pieces = Vec::new();
        for CaptureCopy { src, dst } in copies {
            let Source::Host(mut src) = src;
            let mut dst = dst;
            assert_eq!(src.len(), dst.len(), "capture copy of unequal lengths");
            while src.len() > self.piece_bytes {
                let (head, tail) = src.split_at(self.piece_bytes);
                let (dhead, dtail) = dst.split_at(self.piece_bytes);
                pieces.push((head.len(), (head, dhead)));
                (src, dst) = (tail, dtail);
            }
            pieces.push((src.len(), (src, dst)));
        }
        self.run(pieces, |(src, mut dst): (&[u8], StagingSpan<'_>)| {
            dst.copy_from(src)
        });
        Ok(())
    }

    fn restore(&self, copies: Vec<RestoreCopy<'_>>) -> Result<()> {
        let mut pieces = Vec::new();
        for RestoreCopy { src, dst } in copies {
            let Target::Host(mut dst) = dst;
            let mut src = src;
            assert_eq!(src.len(), dst.len(), "restore copy of unequal lengths");
            while dst.len() > self.piece_bytes {
                let (head, tail) = dst.split_at_mut(self.piece_bytes);
                let (shead, stail) = src.split_at(self.piece_bytes);
                pieces.push((head.len(), (shead, head)));
                (src, dst) = (stail, tail);
            }
            pieces.push((dst.len(), (src, dst)));
        }
        self.run(pieces, |(src, dst): (StagingSpan<'_>, &mut [u8])| {
            src.copy_to(dst)
        });
        Ok(())
    }
}

/// Cuts pieces of `sizes` bytes (in order) into at most `threads`
/// contiguous groups of about equal bytes, none (but the last) under
/// `min_group_bytes`. Returns the index ranges; together they cover every
/// piece once, in order.
pub(crate) fn partition(
    sizes: &[usize],
    threads: usize,
    min_group_bytes: usize,
) -> Vec<Range<usize>> {
    let total: usize = sizes.iter().sum();
    let target = total.div_ceil(threads.max(1)).max(min_group_bytes).max(1);
    let mut groups = Vec::new();
    let (mut start, mut acc) = (0, 0);
    for (i, &size) in sizes.iter().enumerate() {
        acc += size;
        if acc >= target {
            groups.push(start..i + 1);
            (start, acc) = (i + 1, 0);
        }
    }
    if start < sizes.len() {
        groups.push(start..sizes.len());
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::NonNull;

    #[test]
    fn one_large_tensor_is_cut_into_pieces_spread_over_every_thread() {
        // A 2 GiB tensor in 16 MiB pieces: 128 pieces, 4 groups of 32.
        let sizes = vec![HostDevice::PIECE_BYTES; 128];
        let groups = partition(&sizes, 4, HostDevice::PIECE_BYTES);
        assert_eq!(groups, vec![0..32, 32..64, 64..96, 96..128]);
        // Uneven pieces: every piece covered once, at most `threads` groups.
        let sizes = [5, 1, 1, 9, 3, 3, 3, 2];
        let groups = partition(&sizes, 3, 1);
        assert!(groups.len() <= 3, "{groups:?}");
        let covered: Vec<usize> = groups.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(covered, (0..sizes.len()).collect::<Vec<_>>());
        // Small sets stay on one thread.
        assert_eq!(partition(&[100, 200], 4, 1 << 20), vec![0..2]);
        assert!(partition(&[], 4, 1).is_empty());
    }

    #[test]
    fn capture_and_restore_copy_exact_bytes_through_many_pieces() {
        let src: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        let small: Vec<u8> = vec![7; 10];
        let mut staging = vec![0u8; src.len() + small.len()];
        let device = HostDevice::new(4).with_piece_bytes(4096);
        let base = NonNull::new(staging.as_mut_ptr()).expect("non-null");
        // SAFETY: `staging` outlives the spans, which cover it without overlap,
        // and it is not otherwise touched until they are dropped.
        let (a, b) = unsafe { StagingSpan::new(base, staging.len()) }.split_at(src.len());
        device
            .capture(vec![
                CaptureCopy {
                    src: Source::Host(&src),
                    dst: a,
                },
                CaptureCopy {
                    src: Source::Host(&small),
                    dst: b,
                },
            ])
            .expect("capture");
        assert_eq!(&staging[..src.len()], &src[..]);
        assert_eq!(&staging[src.len()..], &small[..]);

        let mut back = vec![0u8; src.len()];
        let base = NonNull::new(staging.as_mut_ptr()).expect("non-null");
        // SAFETY: as above.
        let (a, _) = unsafe { StagingSpan::new(base, staging.len()) }.split_at(src.len());
        device
            .restore(vec![RestoreCopy {
                src: a,
                dst: Target::Host(&mut back),
            }])
            .expect("restore");
        assert_eq!(back, src);
    }
}
