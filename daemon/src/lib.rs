//! gpusnapd: the gpusnap node daemon's library.
//!
//! * [`config`]: the TOML configuration, every key checked at start.
//! * [`server`]: the control socket, connections, the request state machine.
//! * [`staging`]: the sealed memfd each registration captures into, reached
//!   only through slot handles ([`shared_memory`]), never a slice.
//! * [`persist`]: the engine that commits captured slots to the store.
//! * [`hot_tier`]: the newest snapshot of each (job, rank) kept in memory.
//! * [`restore`]: filling a staging slot from the hot tier or the disk.
//! * [`ranks`], [`owners`]: per-(job, rank) state and job ownership by uid.
//! * [`metrics`]: Prometheus metrics and the `/metrics` endpoint.
//! * [`testing`]: the test-only fault injection and latency backend of the
//!   `[testing]` table.
//! * [`shared_memory`]: handles on memory another process writes.
//! * [`buffer_pool`]: bounded, aligned I/O buffers.
//! * [`storage`]: the narrow file-system interface and its backends
//!   (io_uring, pwrite pool, buffered; fault injection; power-loss simulation).
//! * [`store`]: snapshots on disk: layout, manifest, commit protocol,
//!   recovery, retention, verified reads.

pub mod buffer_pool;
pub mod config;
pub mod hot_tier;
pub mod metrics;
pub mod owners;
pub mod persist;
pub mod ranks;
pub mod remote;
pub mod restore;
pub mod server;
pub mod shared_memory;
pub mod staging;
pub mod storage;
pub mod store;
pub mod testing;
