//! Client tests against a fake daemon.

pub(crate) mod cuda;
mod double;
mod fake;
mod matrix;

mod describe;
mod faults;
mod handshake;
mod reconnect;
mod restore;
mod snapshot;
mod stream;
