//! The bodies of gpusnap's fuzz targets, one public function per target.
//!
//! Each takes one input, decodes it or drives the code under test with it,
//! and asserts that code's invariants: errors are `Err`, never a panic,
//! and what is accepted is consistent (each module says exactly what it
//! checks). The cargo-fuzz project in `fuzz/` wraps each in a libFuzzer
//! target of the same name; `tests/replay.rs` runs every committed corpus
//! file and every input that ever crashed through them, as a regression
//! test.
//!
//! * [`frame()`] tests the frame decoder ([`gpusnap_proto::body_len`], `decode`,
//!   `encode`, `encode_reply`).
//! * [`requests()`] tests the daemon's request state machine, in process.
//! * [`manifest()`] tests `Manifest::parse` and its checks.
//! * [`safetensors()`] tests the snapshot reader of `gpusnapctl inspect|verify`.
//! * [`config()`] tests `Config::parse`.
//! * [`staging_info()`] tests `StagingInfo::check`, the client's check of the
//!   daemon's staging description.

pub mod alloc;
pub mod config;
pub mod cursor;
pub mod frame;
pub mod manifest;
pub mod requests;
pub mod safetensors;
pub mod staging_info;

pub use config::config;
pub use frame::frame;
pub use manifest::manifest;
pub use requests::requests;
pub use safetensors::safetensors;
pub use staging_info::staging_info;

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target by name (the names of `fuzz/fuzz_targets/*.rs` and of the
/// folders under `fuzz/corpus/` and `fuzz/artifacts/`).
pub const TARGETS: [(&str, Body); 6] = [
    ("frame", frame),
    ("requests", requests),
    ("manifest", manifest),
    ("safetensors", safetensors),
    ("config", config),
    ("staging_info", staging_info),
];
