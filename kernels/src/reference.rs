//! Plain-Rust references of the kernels: the definitions that every
//! implementation (CPU or GPU) is tested against.

/// Number of chunks a data section of `data_len` bytes has with `chunk_bytes`
/// per chunk. A 0-byte section has no chunks.
pub fn chunk_count(data_len: u64, chunk_bytes: u64) -> u64 {
    assert!(chunk_bytes > 0, "chunk size must be positive");
    data_len.div_ceil(chunk_bytes)
}

/// CRC32 of one chunk.
pub fn chunk_crc32(chunk: &[u8]) -> u32 {
    crc32fast::hash(chunk)
}

/// CRC32 of every chunk of `data`, in order.
pub fn chunk_crc32s(data: &[u8], chunk_bytes: usize) -> Vec<u32> {
    assert!(chunk_bytes > 0, "chunk size must be positive");
    data.chunks(chunk_bytes).map(chunk_crc32).collect()
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
    fn known_vector() {
        // The standard CRC-32/ISO-HDLC check value.
        assert_eq!(chunk_crc32(b"123456789"), 0xCBF4_3926);
        assert!(chunk_crc32s(&[], 4096).is_empty());
        assert_eq!(chunk_count(0, 4096), 0);
        assert_eq!(chunk_count(4097, 4096), 2);
    }

    proptest! {
        #[test]
        fn chunk_list_matches_count_and_each_chunk(data in proptest::collection::vec(any::<u8>(), 0..5000), chunk in 1usize..700) {
            let crcs = chunk_crc32s(&data, chunk);
            prop_assert_eq!(crcs.len() as u64, chunk_count(data.len() as u64, chunk as u64));
            for (i, crc) in crcs.iter().enumerate() {
                let start = i * chunk;
                let end = (start + chunk).min(data.len());
                prop_assert_eq!(*crc, crc32fast::hash(&data[start..end]));
            }
        }
    }
}
