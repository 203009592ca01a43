//! Runs the real `gpusnapd` for the daemon's end-to-end tests and the
//! benchmarks, the way `client/python/tests/conftest.py` runs it for the
//! Python tests (through `testkit/python/gpusnapd_testkit.py`, on the same
//! `testkit/defaults.toml`).
//!
//! * [`Defaults`]: the shared test config (small buffers, short waits) and
//!   the launcher's waits; a test changes single keys on top
//!   ([`Settings::apply`]), a benchmark brings its whole config
//!   ([`Settings::from_config`]).
//! * [`Launch`] / [`DaemonProcess`]: the binary (passed in: the daemon's
//!   tests give `env!("CARGO_BIN_EXE_gpusnapd")`) started on a generated
//!   config in a scratch directory, waited for until its socket answers,
//!   stopped (SIGTERM, a bounded wait, then SIGKILL), killed, started again
//!   on the same root; its log; `/metrics`. Dropping one kills and reaps a
//!   daemon still running.
//! * [`S3Server`]: a real S3-compatible server for the remote-tier tests
//!   (SeaweedFS's `weed`, installed by `tests/seaweedfs-install`) on
//!   loopback ports in a scratch directory, with the bucket
//!   [`S3Server::BUCKET`], a credentials file and the daemon's `[remote]`
//!   settings for it; killed and restarted on the same data; a small
//!   blocking client (list, get, put, delete) to look at what was written.
//! * [`http_get`], [`sample`], [`free_port`], [`SocketPath`] (a path
//!   `sockaddr_un` holds).
//! * [`root_or_skip`], [`cuda_or_skip`]: the root-only and CUDA test
//!   protocol (`GPUSNAP_REQUIRE_ROOT`, `GPUSNAP_REQUIRE_CUDA`,
//!   `GPUSNAP_SKIP_LOG`).

mod endpoints;
mod http;
mod process;
mod s3;
mod settings;
mod skip;

pub use endpoints::{SOCKET_PATH_MAX, SocketPath, free_port};
pub use http::{HttpError, http_get, http_get_ok, sample};
pub use process::{DaemonProcess, Launch, LaunchError};
pub use s3::{S3Error, S3Server};
pub use settings::{DEFAULTS_TOML, Defaults, Settings, SettingsError, Waits};
pub use skip::{REQUIRE_CUDA_ENV, REQUIRE_ROOT_ENV, SKIP_LOG_ENV, cuda_or_skip, root_or_skip};
