//! Protocol versions: what each one added, and the rule the handshake
//! enforces.
//!
//! # Versions
//! * 1: the first (`Hello` to `Describe`).
//! * 2: `StagingInfo::memory` says what kind of memory staging is (version
//!   1 implies a host memfd); `Error` and `Failed` carry the OS error
//!   behind a failure (`os_error`, omitted when there is none).
//! * 3: the request `Attached { devices }`, answered `AttachNoted`: after
//!   `Registered`, what attaching each device did to staging (page-locked,
//!   or unpinned and why; [`crate::attach`]); `Status` sessions carry it
//!   (`staging_pinning`). A version-2 client never sends it, and its
//!   `Status` has no `staging_pinning`.
//! * 4: restores from the object store (`RestoreSource::Remote`) and
//!   walk-back past snapshots that fail verification
//!   (`Restored::walked_back`); `Listing` says the steps complete remotely
//!   (`remote_complete`, `remote_error`); `Status` says the remote tier's
//!   state (`remote`).
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

use crate::frame::{self, FrameError};
use crate::message::Reply;

/// The version this build speaks (what its client sends in `Hello`).
pub const PROTOCOL_VERSION: u32 = 4;
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
///
/// Each older version has a module that says, message by message, what
/// differs from the next version up; a reply that does not differ is
/// encoded as it is. The next protocol version adds such a module for the
/// version it replaces, and an older version's encoding goes through each
/// step in turn.
pub fn encode_reply(reply: &Reply, version: u32) -> Result<Vec<u8>, FrameError> {
    match version {
        PROTOCOL_VERSION => frame::encode(reply),
        3 => v3::encode(reply),
        2 => v2::encode(reply),
        1 => v1::encode(reply),
        other => Err(FrameError::NotInVersion {
            what: "any reply".into(),
            version: other,
        }),
    }
}

/// Version 3's words for the replies version 4 changed: `restored`
/// without `walked_back`, and a restore from the object store
/// (`RestoreSource::Remote`) said as `disk`: the daemon downloads the
/// snapshot into the local store and reads the bytes from that copy, so
/// `disk` is where they were read (version 3 has no word for the object
/// store); `listing` without `remote_complete` and `remote_error` (only the
/// local steps, as a version-3 daemon lists them); `status` without
/// `remote`. Borrowed views with version 3's fields in version 3's order,
/// as in [`v1`]. Every other reply is said as it is.
mod v3 {
    use serde::Serialize;

    use crate::frame::{self, FrameError};
    use crate::message::{
        JobStatus, JobSteps, Reply, ReplyBody, RestoreSource, SessionStatus, SnapshotInfo,
        StatusInfo,
    };

    #[derive(Serialize)]
    struct Frame<B> {
        id: u64,
        body: B,
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename = "restored")]
    struct Restored {
        step: u64,
        slot: u32,
        source: RestoreSource,
        bytes: u64,
        elapsed_ns: u64,
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename = "listing")]
    struct Listing<'a> {
        snapshots: &'a [SnapshotInfo],
        complete: &'a [JobSteps],
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename = "status")]
    struct Status<'a> {
        daemon_version: &'a str,
        uptime_s: u64,
        io_backend: &'a str,
        clients_connected: u64,
        staging_bytes_used: u64,
        staging_budget_bytes: u64,
        hot_tier_bytes: u64,
        hot_tier_budget_bytes: u64,
        snapshots_in_flight: u64,
        sessions: &'a [SessionStatus],
        jobs: &'a [JobStatus],
    }

    pub(super) fn encode(reply: &Reply) -> Result<Vec<u8>, FrameError> {
        let id = reply.id;
        match &reply.body {
            ReplyBody::Restored {
                step,
                slot,
                source,
                bytes,
                elapsed_ns,
                walked_back: _,
            } => frame::encode(&Frame {
                id,
                body: Restored {
                    step: *step,
                    slot: *slot,
                    source: source_v3(*source),
                    bytes: *bytes,
                    elapsed_ns: *elapsed_ns,
                },
            }),
            ReplyBody::Listing {
                snapshots,
                complete,
                remote_complete: _,
                remote_error: _,
            } => frame::encode(&Frame {
                id,
                body: Listing {
                    snapshots,
                    complete,
                },
            }),
            ReplyBody::Status(info) => frame::encode(&Frame {
                id,
                body: status(info),
            }),
            // No wildcard: a reply added later must decide here what
            // version 3 says for it.
            ReplyBody::Welcome { .. }
            | ReplyBody::Registered(_)
            | ReplyBody::Slot { .. }
            | ReplyBody::Stream { .. }
            | ReplyBody::Skipped { .. }
            | ReplyBody::ChunkFree { .. }
            | ReplyBody::Accepted { .. }
            | ReplyBody::Aborted { .. }
            | ReplyBody::NoSnapshot
            | ReplyBody::Released
            | ReplyBody::Described { .. }
            | ReplyBody::Error { .. }
            | ReplyBody::Committed { .. }
            | ReplyBody::Failed { .. }
            | ReplyBody::AttachNoted => frame::encode(reply),
        }
    }

    /// The object store is said as the local store the bytes were read
    /// from after the download.
    fn source_v3(source: RestoreSource) -> RestoreSource {
        match source {
            RestoreSource::Memory => RestoreSource::Memory,
            RestoreSource::Disk | RestoreSource::Remote => RestoreSource::Disk,
        }
    }

    fn status(info: &StatusInfo) -> Status<'_> {
        // Destructured so a field added later must be decided on here.
        let StatusInfo {
            daemon_version,
            uptime_s,
            io_backend,
            clients_connected,
            staging_bytes_used,
            staging_budget_bytes,
            hot_tier_bytes,
            hot_tier_budget_bytes,
            snapshots_in_flight,
            sessions,
            jobs,
            remote: _,
        } = info;
        Status {
            daemon_version,
            uptime_s: *uptime_s,
            io_backend,
            clients_connected: *clients_connected,
            staging_bytes_used: *staging_bytes_used,
            staging_budget_bytes: *staging_budget_bytes,
            hot_tier_bytes: *hot_tier_bytes,
            hot_tier_budget_bytes: *hot_tier_budget_bytes,
            snapshots_in_flight: *snapshots_in_flight,
            sessions,
            jobs,
        }
    }
}

/// Version 2's words for the replies version 3 changed: `status` sessions
/// without `staging_pinning` (and, as in [`v3`], without `remote`);
/// `attach_noted` (the answer to a request version 2 does not have) cannot
/// be said. Borrowed views with version 2's fields in version 2's order,
/// as in [`v1`]. Every other reply is said as version 3 says it ([`v3`]).
mod v2 {
    use serde::Serialize;

    use crate::frame::{self, FrameError};
    use crate::message::{JobStatus, Reply, ReplyBody, SessionStatus, StatusInfo};

    #[derive(Serialize)]
    struct Frame<B> {
        id: u64,
        body: B,
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename = "status")]
    struct Status<'a> {
        daemon_version: &'a str,
        uptime_s: u64,
        io_backend: &'a str,
        clients_connected: u64,
        staging_bytes_used: u64,
        staging_budget_bytes: u64,
        hot_tier_bytes: u64,
        hot_tier_budget_bytes: u64,
        snapshots_in_flight: u64,
        sessions: Vec<Session<'a>>,
        jobs: &'a [JobStatus],
    }

    #[derive(Serialize)]
    struct Session<'a> {
        job: &'a str,
        rank: u32,
        uid: u32,
        pid: i32,
        tensors: u64,
        staging_bytes: u64,
        slots: u32,
        slots_busy: u32,
    }

    pub(super) fn encode(reply: &Reply) -> Result<Vec<u8>, FrameError> {
        let id = reply.id;
        match &reply.body {
            ReplyBody::Status(info) => frame::encode(&Frame {
                id,
                body: status(info),
            }),
            ReplyBody::AttachNoted => Err(FrameError::NotInVersion {
                what: "attach_noted".into(),
                version: 2,
            }),
            // No wildcard: a reply added later must decide here what
            // version 2 says for it.
            ReplyBody::Welcome { .. }
            | ReplyBody::Registered(_)
            | ReplyBody::Slot { .. }
            | ReplyBody::Stream { .. }
            | ReplyBody::Skipped { .. }
            | ReplyBody::ChunkFree { .. }
            | ReplyBody::Accepted { .. }
            | ReplyBody::Aborted { .. }
            | ReplyBody::Restored { .. }
            | ReplyBody::NoSnapshot
            | ReplyBody::Released
            | ReplyBody::Listing { .. }
            | ReplyBody::Described { .. }
            | ReplyBody::Error { .. }
            | ReplyBody::Committed { .. }
            | ReplyBody::Failed { .. } => super::v3::encode(reply),
        }
    }

    fn status(info: &StatusInfo) -> Status<'_> {
        Status {
            daemon_version: &info.daemon_version,
            uptime_s: info.uptime_s,
            io_backend: &info.io_backend,
            clients_connected: info.clients_connected,
            staging_bytes_used: info.staging_bytes_used,
            staging_budget_bytes: info.staging_budget_bytes,
            hot_tier_bytes: info.hot_tier_bytes,
            hot_tier_budget_bytes: info.hot_tier_budget_bytes,
            snapshots_in_flight: info.snapshots_in_flight,
            sessions: info.sessions.iter().map(session).collect(),
            jobs: &info.jobs,
        }
    }

    fn session(s: &SessionStatus) -> Session<'_> {
        // Destructured so a field added later must be decided on here.
        let SessionStatus {
            job,
            rank,
            uid,
            pid,
            tensors,
            staging_bytes,
            slots,
            slots_busy,
            staging_pinning: _,
        } = s;
        Session {
            job,
            rank: *rank,
            uid: *uid,
            pid: *pid,
            tensors: *tensors,
            staging_bytes: *staging_bytes,
            slots: *slots,
            slots_busy: *slots_busy,
        }
    }
}

/// Version 1's words for the replies version 2 changed: `registered`
/// without `memory` (version 1 knows only a host memfd), `error` and
/// `failed` without `os_error`. Each is a borrowed view with version 1's
/// fields in version 1's order, so the bytes are those a version-1 daemon
/// wrote (the golden file was written by one), with no copy of the reply.
/// Every other reply is said as version 2 says it ([`v2`]), which says
/// what it does not change as version 3 does ([`v3`]).
mod v1 {
    use serde::Serialize;

    use crate::frame::{self, FrameError};
    use crate::message::{ErrorKind, Reply, ReplyBody};
    use crate::staging::{BusyPolicy, StagingInfo, StagingMemory};

    #[derive(Serialize)]
    struct Frame<B> {
        id: u64,
        body: B,
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename = "registered")]
    struct Registered<'a> {
        memfd_bytes: u64,
        slots: u32,
        slot_bytes: u64,
        data_bytes: u64,
        offsets: &'a [u64],
        ring_offset: u64,
        ring_chunks: u32,
        chunk_bytes: u64,
        policy: BusyPolicy,
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename = "error")]
    struct Error<'a> {
        kind: ErrorKind,
        message: &'a str,
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename = "failed")]
    struct Failed<'a> {
        step: u64,
        kind: ErrorKind,
        message: &'a str,
    }

    pub(super) fn encode(reply: &Reply) -> Result<Vec<u8>, FrameError> {
        let id = reply.id;
        match &reply.body {
            ReplyBody::Registered(info) => frame::encode(&Frame {
                id,
                body: registered(info)?,
            }),
            ReplyBody::Error {
                kind,
                message,
                os_error: _,
            } => frame::encode(&Frame {
                id,
                body: Error {
                    kind: *kind,
                    message,
                },
            }),
            ReplyBody::Failed {
                step,
                kind,
                message,
                os_error: _,
            } => frame::encode(&Frame {
                id,
                body: Failed {
                    step: *step,
                    kind: *kind,
                    message,
                },
            }),
            // No wildcard: a reply added later must decide here what
            // version 1 says for it.
            ReplyBody::Welcome { .. }
            | ReplyBody::AttachNoted
            | ReplyBody::Slot { .. }
            | ReplyBody::Stream { .. }
            | ReplyBody::Skipped { .. }
            | ReplyBody::ChunkFree { .. }
            | ReplyBody::Accepted { .. }
            | ReplyBody::Aborted { .. }
            | ReplyBody::Restored { .. }
            | ReplyBody::NoSnapshot
            | ReplyBody::Released
            | ReplyBody::Listing { .. }
            | ReplyBody::Status(_)
            | ReplyBody::Described { .. }
            | ReplyBody::Committed { .. } => super::v2::encode(reply),
        }
    }

    fn registered(info: &StagingInfo) -> Result<Registered<'_>, FrameError> {
        match info.memory {
            StagingMemory::HostMemfd => Ok(Registered {
                memfd_bytes: info.memfd_bytes,
                slots: info.slots,
                slot_bytes: info.slot_bytes,
                data_bytes: info.data_bytes,
                offsets: &info.offsets,
                ring_offset: info.ring_offset,
                ring_chunks: info.ring_chunks,
                chunk_bytes: info.chunk_bytes,
                policy: info.policy,
            }),
        }
    }
}

#[cfg(test)]
#[expect(clippy::indexing_slicing, reason = "tests slice known frames")]
mod tests {
    use super::*;
    use crate::message::{ReplyBody, RestoreSource, WalkBack};

    #[test]
    fn a_daemon_serves_its_range_and_refuses_the_rest_naming_both() {
        assert_eq!(negotiate(1), Ok(1));
        assert_eq!(negotiate(2), Ok(2));
        assert_eq!(negotiate(3), Ok(3));
        assert_eq!(negotiate(4), Ok(4));
        assert_eq!(negotiate(PROTOCOL_VERSION), Ok(PROTOCOL_VERSION));
        let newer = negotiate(PROTOCOL_VERSION + 1).expect_err("newer client");
        assert!(newer.to_string().contains("upgrade the daemon"), "{newer}");
        let older = negotiate(0).expect_err("older client");
        assert!(older.to_string().contains("upgrade the client"), "{older}");
    }

    fn status_with_pinning() -> Reply {
        use crate::attach::{AttachReport, PinState};
        use crate::message::{SessionStatus, StatusInfo};
        Reply {
            id: 4,
            body: ReplyBody::Status(Box::new(StatusInfo {
                daemon_version: "0.1.0".into(),
                uptime_s: 1,
                io_backend: "pwrite".into(),
                clients_connected: 1,
                staging_bytes_used: 8192,
                staging_budget_bytes: 1 << 30,
                hot_tier_bytes: 0,
                hot_tier_budget_bytes: 1 << 30,
                snapshots_in_flight: 0,
                sessions: vec![SessionStatus {
                    job: "j".into(),
                    rank: 0,
                    uid: 1000,
                    pid: 7,
                    tensors: 1,
                    staging_bytes: 8192,
                    slots: 2,
                    slots_busy: 0,
                    staging_pinning: vec![AttachReport::new(
                        "cuda:0",
                        PinState::Unpinned {
                            reason: "refused".into(),
                        },
                    )],
                }],
                jobs: Vec::new(),
                remote: None,
            })),
        }
    }

    #[test]
    fn versions_before_3_say_status_without_pinning_and_cannot_say_attach_noted() {
        let reply = status_with_pinning();
        let current = encode_reply(&reply, PROTOCOL_VERSION).expect("current");
        let current = std::str::from_utf8(&current[4..]).expect("JSON").to_owned();
        assert!(
            current.contains(r#""staging_pinning":[{"device":"cuda:0""#),
            "{current}"
        );
        for version in [1, 2] {
            let old = encode_reply(&reply, version).expect("an older status");
            let old = std::str::from_utf8(&old[4..]).expect("JSON");
            assert!(!old.contains("staging_pinning"), "v{version}: {old}");
            // Everything else is said as version 3 says it.
            let stripped = current.replace(
                r#","staging_pinning":[{"device":"cuda:0","pin":{"state":"unpinned","reason":"refused"}}]"#,
                "",
            );
            assert_eq!(old, stripped, "v{version}");
            // And the current types read it, as a status without pinning.
            let read: Reply = serde_json::from_str(old).expect("an older status reads");
            let ReplyBody::Status(status) = read.body else {
                panic!("{read:?}")
            };
            assert!(status.sessions[0].staging_pinning.is_empty(), "v{version}");
            let noted = Reply {
                id: 5,
                body: ReplyBody::AttachNoted,
            };
            assert!(
                matches!(
                    encode_reply(&noted, version),
                    Err(FrameError::NotInVersion { .. })
                ),
                "v{version}"
            );
        }
        let noted = Reply {
            id: 5,
            body: ReplyBody::AttachNoted,
        };
        let frame = encode_reply(&noted, 3).expect("version 3 says it");
        assert_eq!(&frame[4..], br#"{"id":5,"body":{"type":"attach_noted"}}"#);
    }

    fn restored(source: RestoreSource, walked_back: Vec<WalkBack>) -> Reply {
        Reply {
            id: 6,
            body: ReplyBody::Restored {
                step: 30,
                slot: 1,
                source,
                bytes: 4096,
                elapsed_ns: 1_000,
                walked_back,
            },
        }
    }

    #[test]
    fn versions_before_4_say_a_remote_restore_as_disk_without_walked_back() {
        let walked = vec![WalkBack {
            step: 40,
            source: RestoreSource::Remote,
            reason: "checksum mismatch".into(),
        }];
        let remote = restored(RestoreSource::Remote, walked.clone());
        let current = encode_reply(&remote, PROTOCOL_VERSION).expect("current");
        let text = std::str::from_utf8(&current[4..]).expect("JSON");
        assert!(text.contains(r#""source":"remote""#), "{text}");
        assert!(
            text.contains(
                r#""walked_back":[{"step":40,"source":"remote","reason":"checksum mismatch"}]"#
            ),
            "{text}"
        );
        let disk = frame::encode(&restored(RestoreSource::Disk, Vec::new())).expect("v3 bytes");
        assert_eq!(
            std::str::from_utf8(&disk[4..]).expect("JSON"),
            r#"{"id":6,"body":{"type":"restored","step":30,"slot":1,"source":"disk","bytes":4096,"elapsed_ns":1000}}"#
        );
        for version in [3, 2, 1] {
            let old = encode_reply(&remote, version).expect("an older restore");
            assert_eq!(old, disk, "v{version}: {}", String::from_utf8_lossy(&old));
            // A disk restore that walked back is said the same way.
            let walked_disk = restored(RestoreSource::Disk, walked.clone());
            assert_eq!(encode_reply(&walked_disk, version).expect("old"), disk);
            // A memory restore stays one.
            let memory = restored(RestoreSource::Memory, walked.clone());
            let said = encode_reply(&memory, version).expect("old");
            assert_eq!(
                said,
                frame::encode(&restored(RestoreSource::Memory, Vec::new())).expect("bytes")
            );
        }
    }

    #[test]
    fn versions_before_4_say_the_listing_without_remote_steps() {
        use crate::message::JobSteps;
        let listing = |remote_complete: Vec<JobSteps>, remote_error: Option<String>| Reply {
            id: 7,
            body: ReplyBody::Listing {
                snapshots: Vec::new(),
                complete: vec![JobSteps {
                    job: "j".into(),
                    steps: vec![10],
                }],
                remote_complete,
                remote_error,
            },
        };
        let remote = listing(
            vec![JobSteps {
                job: "j".into(),
                steps: vec![10, 20],
            }],
            Some("timed out".into()),
        );
        let current = encode_reply(&remote, PROTOCOL_VERSION).expect("current");
        let text = std::str::from_utf8(&current[4..]).expect("JSON");
        assert!(text.contains(r#""remote_complete":[{"job":"j","steps":[10,20]}]"#));
        assert!(text.contains(r#""remote_error":"timed out""#));
        let local = frame::encode(&listing(Vec::new(), None)).expect("v3 bytes");
        for version in [3, 2, 1] {
            assert_eq!(
                encode_reply(&remote, version).expect("an older listing"),
                local,
                "v{version}"
            );
        }
    }

    #[test]
    fn versions_before_4_say_status_without_remote() {
        use crate::message::{RemoteRankStatus, RemoteStatus};
        let plain = status_with_pinning();
        let mut reply = plain.clone();
        let ReplyBody::Status(info) = &mut reply.body else {
            unreachable!()
        };
        info.remote = Some(RemoteStatus {
            endpoint: "http://127.0.0.1:9000".into(),
            bucket: "ckpt".into(),
            reachable: false,
            last_error: Some("connection refused".into()),
            uploads: 3,
            failures: 1,
            ranks: vec![RemoteRankStatus {
                job: "j".into(),
                rank: 0,
                uploaded: Some(20),
                behind_steps: 1,
                behind_s: 12,
            }],
        });
        let current = encode_reply(&reply, PROTOCOL_VERSION).expect("current");
        let text = std::str::from_utf8(&current[4..]).expect("JSON");
        assert!(text.contains(r#""remote":{"endpoint":"http://127.0.0.1:9000""#));
        assert_eq!(
            encode_reply(&reply, 3).expect("v3"),
            frame::encode(&plain).expect("v3 bytes"),
            "v3 says it without remote, else as it is"
        );
        for version in [2, 1] {
            assert_eq!(
                encode_reply(&reply, version).expect("old"),
                encode_reply(&plain, version).expect("old"),
                "v{version}"
            );
        }
    }
}
