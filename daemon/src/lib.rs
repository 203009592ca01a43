//! gpusnapd: the gpusnap node daemon's library.
//!
//! * [`buffer_pool`]: bounded, aligned I/O buffers.
//! * [`storage`]: the narrow file-system interface and its backends
//!   (io_uring, pwrite pool, buffered; fault injection; power-loss simulation).
//! * [`store`]: snapshots on disk: layout, manifest, commit protocol,
//!   recovery, retention, verified reads.

pub mod buffer_pool;
pub mod metrics;
pub mod storage;
pub mod store;
