//! [`ChunkChecksum`]: the chunk CRC32 behind one trait.
//!
//! The daemon's commit, read and hot-tier paths compute and check chunk
//! CRCs only through this trait (the store holds an
//! `Arc<dyn ChunkChecksum>`, [`CpuCrc32`] by default). This is where a GPU
//! checksum kernel plugs in: an implementation that computes the same CRC32
//! on the device (for staging that lives in GPU memory) implements this
//! trait, is installed in the store in place of [`CpuCrc32`], and must equal
//! [`crate::reference`] on every input; the tests of this module are the
//! body such an implementation runs too.
//!
//! The streaming form ([`ChunkChecksum::update`]) continues a running CRC
//! with one more piece, so a chunk can be checksummed in pieces (through a
//! small bounce buffer, for memory that may not be borrowed as a slice) and
//! equal the CRC of the whole chunk.

use std::fmt;

/// The CRC32 of no bytes, where a running CRC starts.
pub const CRC32_EMPTY: u32 = 0;

/// The CRC32 of snapshot chunks. Every implementation computes exactly
/// [`crate::reference::chunk_crc32`]; only where and how fast differ.
pub trait ChunkChecksum: Send + Sync + fmt::Debug {
    /// A short name for logs ("cpu-crc32fast").
    fn name(&self) -> &'static str;

    /// Continues the running CRC `crc` (the CRC of the bytes so far,
    /// [`CRC32_EMPTY`] for none) with `piece`: the result is the CRC of the
    /// bytes so far followed by `piece`.
    fn update(&self, crc: u32, piece: &[u8]) -> u32;

    /// CRC32 of one whole chunk.
    fn chunk_crc32(&self, chunk: &[u8]) -> u32 {
        self.update(CRC32_EMPTY, chunk)
    }

    /// CRC32 of every `chunk_bytes` chunk of `data`, in order (the last may
    /// be shorter). Panics if `chunk_bytes` is 0.
    fn chunk_crc32s(&self, data: &[u8], chunk_bytes: usize) -> Vec<u32> {
        assert!(chunk_bytes > 0, "chunk size must be positive");
        data.chunks(chunk_bytes)
            .map(|c| self.chunk_crc32(c))
            .collect()
    }
}

/// The CPU implementation: `crc32fast` (SIMD where the CPU has it), equal
/// to the reference by construction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuCrc32;

impl ChunkChecksum for CpuCrc32 {
    fn name(&self) -> &'static str {
        "cpu-crc32fast"
    }

    fn update(&self, crc: u32, piece: &[u8]) -> u32 {
        let mut hasher = crc32fast::Hasher::new_with_initial(crc);
        hasher.update(piece);
        hasher.finalize()
    }

    fn chunk_crc32(&self, chunk: &[u8]) -> u32 {
        crate::reference::chunk_crc32(chunk)
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use super::*;
    use crate::reference;
    use proptest::prelude::*;

    /// The body every implementation of the trait must pass.
    fn equals_the_reference(imp: &dyn ChunkChecksum, data: &[u8], chunk: usize, cuts: &[usize]) {
        assert_eq!(imp.chunk_crc32(data), reference::chunk_crc32(data));
        assert_eq!(
            imp.chunk_crc32s(data, chunk),
            reference::chunk_crc32s(data, chunk)
        );
        // Any split into pieces gives the CRC of the whole.
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        points.sort_unstable();
        let mut crc = CRC32_EMPTY;
        let mut at = 0;
        for p in points.into_iter().chain([data.len()]) {
            crc = imp.update(crc, &data[at..p]);
            at = p;
        }
        assert_eq!(crc, reference::chunk_crc32(data));
    }

    #[test]
    fn cpu_crc32_known_vector_in_one_piece_and_in_pieces() {
        let imp = CpuCrc32;
        assert_eq!(imp.chunk_crc32(b"123456789"), 0xCBF4_3926);
        let crc = imp.update(imp.update(CRC32_EMPTY, b"1234"), b"56789");
        assert_eq!(crc, 0xCBF4_3926);
        assert_eq!(imp.update(CRC32_EMPTY, b""), CRC32_EMPTY);
        assert!(imp.chunk_crc32s(&[], 4096).is_empty());
    }

    proptest! {
        #[test]
        fn cpu_crc32_equals_the_reference(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            chunk in 1usize..5000,
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            equals_the_reference(&CpuCrc32, &data, chunk, &cuts);
        }
    }
}
