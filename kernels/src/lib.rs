//! gpusnap kernels.
//!
//! The CUDA sources compiled at run time with NVRTC live beside this crate;
//! each one has a plain-Rust reference here that defines what it computes and
//! that tests compare it against. The first reference is the snapshot
//! checksum: the CRC32 (IEEE, as `crc32fast` computes it) of every
//! `chunk_bytes`-sized chunk of a snapshot's data section, the last chunk
//! being the shorter remainder. The manifest stores exactly this list.

pub mod reference;
