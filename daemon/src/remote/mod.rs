//! The remote tier: committed snapshots uploaded to an S3-compatible object
//! store in the background, complete steps marked there, and restores of a
//! rank that has no usable local snapshot (a replaced node, a corrupt
//! disk) served from it.
//!
//! * [`config`]: the `[remote]` table and the credentials.
//! * [`keys`]: the object layout.
//! * [`bucket`]: the `object_store` S3 client, our retries with a deadline,
//!   and [`RemoteError`].
//! * [`transfer`]: one rank's snapshot up (verified parts, manifest last)
//!   and down (verified ranged GETs into the local store).
//! * [`marker`], [`catalog`]: the job-level `COMPLETE` marker, listing,
//!   retention.
//! * [`uploader`]: the daemon's background uploader ([`Remote`]).
//! * [`throttle`], [`journal`]: the bandwidth cap; the open multipart
//!   uploads, aborted at the next start.
//!
//! The failure model: the object store may be down, slow, throttling,
//! refusing our credentials or missing its bucket, at any moment and for
//! any time. None of it fails or slows a local snapshot: the persist lanes
//! only record that a step committed ([`Remote::committed`], a map update
//! under a short lock) and the uploader, a task of its own, reads the
//! committed files with its own buffers. What fails is retried with backoff
//! until a deadline, then reported (log, `gpusnap_remote_*` metrics,
//! `gpusnapctl status`) and tried again later. Nothing half-uploaded is a
//! snapshot: a data object without its manifest is not listed as one, a
//! step without its marker is not complete, and retention deletes a step's
//! marker before its manifests and its manifests before its data.

pub mod bucket;
pub mod catalog;
pub mod config;
pub mod journal;
pub mod keys;
pub mod marker;
pub mod throttle;
pub mod transfer;
pub mod uploader;

pub use bucket::{Bucket, RemoteError};
pub use config::{Credentials, RemoteConfig};
pub use transfer::{Limits, Tier};
pub use uploader::Remote;
