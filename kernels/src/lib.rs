//! gpusnap kernels: what the snapshot's compute steps calculate, and the
//! seam where a GPU implementation of each plugs in.
//!
//! There are no GPU kernels yet. Each computation has a plain-Rust reference
//! in [`reference`](mod@reference) that defines it, and a trait that the daemon calls it
//! through, with a CPU implementation equal to the reference. A GPU kernel
//! later implements the same trait and is tested against the reference with
//! the same test body: the conformance check each computation exports
//! ([`check_against_reference`] for the checksum).
//!
//! The first computation is the snapshot checksum ([`checksum`]): the CRC32
//! (IEEE, as `crc32fast` computes it) of every `chunk_bytes`-sized chunk of
//! a snapshot's data section, the last chunk being the shorter remainder.
//! The manifest stores exactly this list.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod checksum;
pub mod reference;

pub use checksum::{CRC32_EMPTY, ChunkChecksum, CpuCrc32, check_against_reference, check_case};
