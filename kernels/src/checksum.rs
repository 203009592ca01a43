//! [`ChunkChecksum`]: the chunk CRC32 behind one trait.
//!
//! The daemon's commit, read and hot-tier paths compute and check chunk
//! CRCs only through this trait (the store holds an
//! `Arc<dyn ChunkChecksum>`, [`CpuCrc32`] by default). This is where a GPU
//! checksum kernel plugs in: an implementation that computes the same CRC32
//! on the device (for staging that lives in GPU memory) implements this
//! trait, is installed in the store in place of [`CpuCrc32`], and must equal
//! [`crate::reference`] on every input. [`check_against_reference`] is the
//! conformance check its test calls (on deterministic inputs, and
//! [`check_case`] on any one input, which a property test feeds), exactly as
//! [`CpuCrc32`]'s tests do here.
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

/// Checks `imp` against [`crate::reference`] on one input: the CRC of
/// `data` whole, of each of its `chunk_bytes` chunks, and of `data` fed in
/// pieces split at `cuts` (each taken modulo `data.len() + 1`) through
/// [`ChunkChecksum::update`]. Panics, naming `imp` and the case, at the
/// first difference. `chunk_bytes` must be positive.
pub fn check_case(imp: &dyn ChunkChecksum, data: &[u8], chunk_bytes: usize, cuts: &[usize]) {
    let name = imp.name();
    let len = data.len();
    assert_eq!(
        imp.chunk_crc32(data),
        crate::reference::chunk_crc32(data),
        "{name}: the CRC32 of {len} bytes"
    );
    assert_eq!(
        imp.chunk_crc32s(data, chunk_bytes),
        crate::reference::chunk_crc32s(data, chunk_bytes),
        "{name}: the CRC32s of {len} bytes in {chunk_bytes}-byte chunks"
    );
    // Any split into pieces gives the CRC of the whole.
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
    points.sort_unstable();
    let mut crc = CRC32_EMPTY;
    let mut at = 0;
    for p in points.iter().copied().chain([len]) {
        let Some(piece) = data.get(at..p) else {
            unreachable!("cut points are sorted and at most the length");
        };
        crc = imp.update(crc, piece);
        at = p;
    }
    assert_eq!(
        crc,
        crate::reference::chunk_crc32(data),
        "{name}: the CRC32 of {len} bytes fed in pieces cut at {points:?}"
    );
}

/// The conformance check of a [`ChunkChecksum`] implementation: the
/// standard check value, the empty input, and [`check_case`] over
/// deterministic inputs (lengths around 4096-byte boundaries up to 1 MiB
/// and more, chunk sizes from 1 byte to 1 MiB, a few splits each). Every
/// implementation's test calls it (the CPU one's below; a GPU one's runs it
/// where a GPU is). Panics at the first difference.
pub fn check_against_reference(imp: &dyn ChunkChecksum) {
    let name = imp.name();
    assert_eq!(
        imp.chunk_crc32(b"123456789"),
        0xCBF4_3926,
        "{name}: the CRC-32/ISO-HDLC check value"
    );
    assert_eq!(
        imp.update(CRC32_EMPTY, b""),
        CRC32_EMPTY,
        "{name}: no bytes"
    );
    assert!(
        imp.chunk_crc32s(&[], 4096).is_empty(),
        "{name}: no bytes have no chunks"
    );
    // A fixed xorshift stream: the same inputs on every run and machine.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let lengths = [
        0,
        1,
        3,
        4095,
        4096,
        4097,
        65_536 + 7,
        (1 << 20) - 1,
        (1 << 20) + 4096 + 13,
    ];
    let chunk_sizes = [1usize, 7, 4096, 65_536, 1 << 20];
    for len in lengths {
        let data: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        for chunk_bytes in chunk_sizes {
            // Chunks of a byte over a megabyte are slow and add nothing.
            if chunk_bytes == 1 && len > 65_536 {
                continue;
            }
            // Cut points of 24 bits (any offset of these inputs).
            let cuts: Vec<usize> = (0..4)
                .map(|_| {
                    let [a, b, c, ..] = next().to_le_bytes();
                    usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16
                })
                .collect();
            check_case(imp, &data, chunk_bytes, &cuts);
        }
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
    use proptest::prelude::*;

    #[test]
    fn cpu_crc32_passes_the_conformance_check() {
        check_against_reference(&CpuCrc32);
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

    /// A checksum that is wrong on one input: the conformance check finds it.
    #[derive(Debug)]
    struct WrongOnLongInputs;

    impl ChunkChecksum for WrongOnLongInputs {
        fn name(&self) -> &'static str {
            "wrong-on-long-inputs"
        }

        fn update(&self, crc: u32, piece: &[u8]) -> u32 {
            let right = CpuCrc32.update(crc, piece);
            if piece.len() > 100_000 {
                right ^ 1
            } else {
                right
            }
        }
    }

    #[test]
    fn the_conformance_check_catches_a_wrong_implementation() {
        let caught = std::panic::catch_unwind(|| check_against_reference(&WrongOnLongInputs));
        let message = caught.expect_err("a wrong CRC is caught");
        let text = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(text.contains("wrong-on-long-inputs"), "{text}");
    }

    proptest! {
        #[test]
        fn cpu_crc32_equals_the_reference(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            chunk in 1usize..5000,
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            check_case(&CpuCrc32, &data, chunk, &cuts);
        }
    }
}
