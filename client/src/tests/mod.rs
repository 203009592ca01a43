//! Client tests against a fake daemon.

mod fake;

mod describe;
mod faults;
mod handshake;
mod reconnect;
mod restore;
mod snapshot;
mod stream;
