//! Protocol versions: what each one added, and the rule the handshake
//! enforces.
//!
//! # Versions
//! * 1: the first (`Hello` to `Describe`).
//! * 2: `StagingInfo::memory` says what kind of memory staging is (version
//!   1 implies a host memfd); `Error` and `Failed` carry the OS error
//!   behind a failure (`os_error`, omitted when there is none).
//!
//! # The handshake
//! A client says `Hello` with the one version it speaks
//! ([`PROTOCOL_VERSION`] of its build). A daemon serves every version from
//! [`PROTOCOL_VERSION_MIN`] to its own [`PROTOCOL_VERSION`]
//! ([`negotiate`]): it answers `Welcome` with the client's version and
//! speaks that version on the connection for its whole life, encoding each
//! reply for it ([`encode_reply`]). A client older than the daemon's
//! minimum, or newer than the daemon, is refused with `VersionMismatch`
//! naming both versions, and the connection closes. A client accepts a
//! `Welcome` only for its own version.
//!
//! So daemons are upgraded before clients: a new daemon keeps serving the
//! trainers that were started against the old one.
//!
//! # Changing the protocol
//! * Anything a peer of the previous version would refuse or misread (a
//!   new message, a new field in a message it decodes, a field whose
//!   meaning changes) raises [`PROTOCOL_VERSION`].
//! * A request of an older version still decodes, unchanged in meaning,
//!   with the new types (new request fields are optional), and
//!   [`encode_reply`] says every reply the old way, or refuses what the old
//!   version cannot say.
//! * Each version a daemon serves has a golden file of frames in
//!   `proto/tests/golden/`, decoded and re-encoded byte for byte by the
//!   tests; a version's file never changes once released. Dropping a
//!   version raises [`PROTOCOL_VERSION_MIN`] and deletes its file.

use serde_json::Value;

use crate::frame::{self, FrameError};
use crate::message::Reply;

/// The version this build speaks (what its client sends in `Hello`).
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest version a daemon of this build still serves.
pub const PROTOCOL_VERSION_MIN: u32 = 1;

/// A client's `Hello` version that a daemon cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the client speaks protocol version {client}; this daemon serves versions {PROTOCOL_VERSION_MIN} to {PROTOCOL_VERSION}{}",
    if *.client > PROTOCOL_VERSION { " (upgrade the daemon before its clients)" } else { " (upgrade the client)" }
)]
pub struct VersionMismatch {
    pub client: u32,
}

/// The version a daemon speaks with a client whose `Hello` said `client`.
pub fn negotiate(client: u32) -> Result<u32, VersionMismatch> {
    if (PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&client) {
        Ok(client)
    } else {
        Err(VersionMismatch { client })
    }
}

/// The frame of `reply` as protocol `version` says it (a version this
/// build serves). [`FrameError::NotInVersion`] when that version cannot
/// say it (a kind of staging memory it predates).
pub fn encode_reply(reply: &Reply, version: u32) -> Result<Vec<u8>, FrameError> {
    match version {
        PROTOCOL_VERSION => frame::encode(reply),
        1 => {
            let mut value = serde_json::to_value(reply)?;
            to_version_1(&mut value)?;
            frame::frame(serde_json::to_vec(&value)?)
        }
        other => Err(FrameError::NotInVersion {
            what: "any reply".into(),
            version: other,
        }),
    }
}

/// Rewrites a version-2 reply as version 1 says it: no `memory` in
/// `registered` (only a host memfd can be said), no `os_error`. Key order
/// is kept (serde_json's `preserve_order`), so the bytes are those a
/// version-1 daemon wrote.
fn to_version_1(reply: &mut Value) -> Result<(), FrameError> {
    let Some(body) = reply.get_mut("body").and_then(Value::as_object_mut) else {
        return Ok(());
    };
    match body.get("type").and_then(Value::as_str) {
        Some("registered") => {
            let host = serde_json::to_value(crate::StagingMemory::HostMemfd)?;
            match body.shift_remove("memory") {
                Some(memory) if memory == host => {}
                memory => {
                    return Err(FrameError::NotInVersion {
                        what: format!("staging memory {}", describe(memory.as_ref())),
                        version: 1,
                    });
                }
            }
        }
        Some("error" | "failed") => {
            body.shift_remove("os_error");
        }
        _ => {}
    }
    Ok(())
}

fn describe(value: Option<&Value>) -> String {
    value.map_or_else(|| "(none)".to_owned(), Value::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_serves_its_range_and_refuses_the_rest_naming_both() {
        assert_eq!(negotiate(1), Ok(1));
        assert_eq!(negotiate(PROTOCOL_VERSION), Ok(PROTOCOL_VERSION));
        let newer = negotiate(PROTOCOL_VERSION + 1).expect_err("newer client");
        assert!(newer.to_string().contains("upgrade the daemon"), "{newer}");
        let older = negotiate(0).expect_err("older client");
        assert!(older.to_string().contains("upgrade the client"), "{older}");
    }
}
