//! Every request and reply, and the records they carry.

use serde::{Deserialize, Serialize};

use crate::TensorSpec;
use crate::attach::AttachReport;
use crate::os_error::OsError;
use crate::staging::StagingInfo;

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/gpusnap/gpusnapd.sock";

/// One message from the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub id: u64,
    pub body: RequestBody,
}

/// What the client asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RequestBody {
    Hello {
        protocol_version: u32,
        /// Free text for logs ("gpusnap-rs 0.1.0", "gpusnap-py ...").
        client: String,
    },
    Register {
        job: String,
        rank: u32,
        world_size: u32,
        /// In registration order; `Registered::offsets` follows this order.
        tensors: Vec<TensorSpec>,
    },
    Begin {
        step: u64,
    },
    ChunkFilled {
        step: u64,
        seq: u64,
    },
    Captured {
        step: u64,
        /// Time the copies took, measured by the client.
        capture_ns: u64,
        /// Time the trainer was blocked by this snapshot (waiting for a
        /// slot, the copies, the ring), measured by the client.
        stall_ns: u64,
    },
    Abort {
        step: u64,
        reason: String,
    },
    Restore {
        /// `None`: the newest committed step of this (job, rank).
        step: Option<u64>,
    },
    Release {
        slot: u32,
    },
    List {
        /// `None`: every job this client may see.
        job: Option<String>,
    },
    Status,
    /// What the committed snapshot of (job, rank, step) holds.
    Describe {
        job: String,
        rank: u32,
        step: u64,
    },
    /// What attaching each device did to this registration's staging
    /// (page-locked or not, and why), sent once after `Registered`.
    /// Since version 3.
    Attached {
        devices: Vec<AttachReport>,
    },
}

impl RequestBody {
    /// Every request's name, as [`RequestBody::name`] says it (the golden
    /// tests keep the two equal).
    pub const NAMES: [&'static str; 12] = [
        "hello",
        "register",
        "begin",
        "chunk_filled",
        "captured",
        "abort",
        "restore",
        "release",
        "list",
        "status",
        "describe",
        "attached",
    ];

    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            RequestBody::Hello { .. } => "hello",
            RequestBody::Register { .. } => "register",
            RequestBody::Begin { .. } => "begin",
            RequestBody::ChunkFilled { .. } => "chunk_filled",
            RequestBody::Captured { .. } => "captured",
            RequestBody::Abort { .. } => "abort",
            RequestBody::Restore { .. } => "restore",
            RequestBody::Release { .. } => "release",
            RequestBody::List { .. } => "list",
            RequestBody::Status => "status",
            RequestBody::Describe { .. } => "describe",
            RequestBody::Attached { .. } => "attached",
        }
    }
}

/// One message from the daemon. `id` 0: an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub id: u64,
    pub body: ReplyBody,
}

/// What the daemon answers or announces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReplyBody {
    Welcome {
        protocol_version: u32,
        daemon_version: String,
        /// The uid the daemon authenticated this connection as.
        uid: u32,
    },
    /// The staging memfd rides on this frame.
    Registered(StagingInfo),
    Slot {
        step: u64,
        slot: u32,
    },
    Stream {
        step: u64,
        /// Chunks the data section is cut into.
        chunks: u64,
    },
    Skipped {
        step: u64,
        reason: String,
    },
    ChunkFree {
        step: u64,
        seq: u64,
    },
    Accepted {
        step: u64,
    },
    Aborted {
        step: u64,
    },
    Restored {
        step: u64,
        slot: u32,
        source: RestoreSource,
        bytes: u64,
        /// Time the daemon took to fill the slot.
        elapsed_ns: u64,
        /// Newer steps passed over because they failed verification,
        /// newest first. Since version 4; omitted when empty.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        walked_back: Vec<WalkBack>,
    },
    NoSnapshot,
    Released,
    Listing {
        snapshots: Vec<SnapshotInfo>,
        /// Per job: steps every rank of its world has committed.
        complete: Vec<JobSteps>,
        /// Per job: steps complete in the object store (a `COMPLETE`
        /// marker naming every rank). Since version 4; omitted when empty.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        remote_complete: Vec<JobSteps>,
        /// Why the object store could not be listed (the listing then
        /// holds only local steps). Since version 4; omitted when `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote_error: Option<String>,
    },
    Status(Box<StatusInfo>),
    /// The answer to `Describe`.
    Described {
        job: String,
        rank: u32,
        step: u64,
        world_size: u32,
        /// The snapshot's tensors in the order of its data file (packed by
        /// element size, largest first; not necessarily registration order).
        tensors: Vec<TensorSpec>,
    },
    Error {
        kind: ErrorKind,
        message: String,
        /// The operating system's error behind it (a failed read of a
        /// snapshot, a full disk at registration), when there is one.
        /// Since version 2; omitted when `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        os_error: Option<OsError>,
    },
    /// Event: the snapshot of `step` is durable.
    Committed {
        step: u64,
        bytes: u64,
        persist_ns: u64,
    },
    /// Event: the snapshot of `step` was not committed; older ones stand.
    Failed {
        step: u64,
        kind: ErrorKind,
        message: String,
        /// The operating system's error that failed it (ENOSPC, EIO,
        /// EDQUOT...), when there is one. Since version 2; omitted when
        /// `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        os_error: Option<OsError>,
    },
    /// The answer to `Attached`: the report is recorded. Since version 3.
    AttachNoted,
}

impl ReplyBody {
    /// Every reply's and event's name, as [`ReplyBody::name`] says it (the
    /// golden tests keep the two equal).
    pub const NAMES: [&'static str; 18] = [
        "welcome",
        "registered",
        "slot",
        "stream",
        "skipped",
        "chunk_free",
        "accepted",
        "aborted",
        "restored",
        "no_snapshot",
        "released",
        "listing",
        "status",
        "described",
        "error",
        "committed",
        "failed",
        "attach_noted",
    ];

    /// An error reply of `kind` with no OS error behind it.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> ReplyBody {
        ReplyBody::Error {
            kind,
            message: message.into(),
            os_error: None,
        }
    }

    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            ReplyBody::Welcome { .. } => "welcome",
            ReplyBody::Registered(_) => "registered",
            ReplyBody::Slot { .. } => "slot",
            ReplyBody::Stream { .. } => "stream",
            ReplyBody::Skipped { .. } => "skipped",
            ReplyBody::ChunkFree { .. } => "chunk_free",
            ReplyBody::Accepted { .. } => "accepted",
            ReplyBody::Aborted { .. } => "aborted",
            ReplyBody::Restored { .. } => "restored",
            ReplyBody::NoSnapshot => "no_snapshot",
            ReplyBody::Released => "released",
            ReplyBody::Listing { .. } => "listing",
            ReplyBody::Status(_) => "status",
            ReplyBody::Described { .. } => "described",
            ReplyBody::Error { .. } => "error",
            ReplyBody::Committed { .. } => "committed",
            ReplyBody::Failed { .. } => "failed",
            ReplyBody::AttachNoted => "attach_noted",
        }
    }
}

/// Where a restore's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreSource {
    /// The hot tier: the newest snapshot kept in the daemon's memory.
    Memory,
    /// The store on disk.
    Disk,
    /// The object store (the remote tier): downloaded into the local
    /// store, then read from there. Since version 4 (an older version
    /// says it as [`RestoreSource::Disk`], where the bytes were read).
    Remote,
}

impl RestoreSource {
    pub const fn name(self) -> &'static str {
        match self {
            RestoreSource::Memory => "memory",
            RestoreSource::Disk => "disk",
            RestoreSource::Remote => "remote",
        }
    }
}

/// A newer step a restore passed over: its snapshot, read from `source`,
/// failed verification (`reason`: what failed). Since version 4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalkBack {
    pub step: u64,
    pub source: RestoreSource,
    pub reason: String,
}

/// The kind of a daemon error; the client maps each to its own variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed, unknown or out-of-order message; the connection closes.
    Protocol,
    /// A frame over the size limit; the connection closes.
    TooLarge,
    /// The client speaks another protocol version; the connection closes.
    VersionMismatch,
    /// `Begin` or `Restore` before `Register`.
    NotRegistered,
    /// Bad tensor specs, job name, rank or world size.
    InvalidRegistration,
    /// Another connection holds this (job, rank).
    Busy,
    /// The job belongs to another uid.
    PermissionDenied,
    /// The registration does not fit the staging budget.
    StagingFull,
    /// A restore's snapshot does not hold exactly the registered tensors.
    Mismatch,
    /// The requested step does not exist.
    NotFound,
    /// A checksum or structure check failed.
    Corrupt,
    /// The disk refused (full, I/O error, failed sync).
    Storage,
    /// The daemon is stopping.
    ShuttingDown,
    /// Waiting for something the daemon needed took too long.
    Timeout,
    /// A bug or an unexpected condition in the daemon.
    Internal,
}

impl ErrorKind {
    /// Every kind, in declaration order (a test keeps the list complete
    /// and each [`name`](ErrorKind::name) equal to its wire form).
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::Protocol,
        ErrorKind::TooLarge,
        ErrorKind::VersionMismatch,
        ErrorKind::NotRegistered,
        ErrorKind::InvalidRegistration,
        ErrorKind::Busy,
        ErrorKind::PermissionDenied,
        ErrorKind::StagingFull,
        ErrorKind::Mismatch,
        ErrorKind::NotFound,
        ErrorKind::Corrupt,
        ErrorKind::Storage,
        ErrorKind::ShuttingDown,
        ErrorKind::Timeout,
        ErrorKind::Internal,
    ];

    /// The kind's name as the wire says it (`"storage"`), for messages,
    /// logs and the Python exceptions' `kind`.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::VersionMismatch => "version_mismatch",
            ErrorKind::NotRegistered => "not_registered",
            ErrorKind::InvalidRegistration => "invalid_registration",
            ErrorKind::Busy => "busy",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::StagingFull => "staging_full",
            ErrorKind::Mismatch => "mismatch",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Storage => "storage",
            ErrorKind::ShuttingDown => "shutting_down",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Internal => "internal",
        }
    }

    /// Whether the daemon closes the connection after this error.
    pub const fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorKind::Protocol | ErrorKind::TooLarge | ErrorKind::VersionMismatch
        )
    }
}

/// One committed snapshot, as `List` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    pub job: String,
    pub rank: u32,
    pub world_size: u32,
    pub step: u64,
    pub bytes: u64,
    pub tensors: u64,
    pub created_unix_ms: u64,
}

/// Steps of one job that every rank has committed, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSteps {
    pub job: String,
    pub steps: Vec<u64>,
}

/// What `gpusnapctl status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusInfo {
    pub daemon_version: String,
    pub uptime_s: u64,
    pub io_backend: String,
    pub clients_connected: u64,
    pub staging_bytes_used: u64,
    pub staging_budget_bytes: u64,
    pub hot_tier_bytes: u64,
    pub hot_tier_budget_bytes: u64,
    pub snapshots_in_flight: u64,
    pub sessions: Vec<SessionStatus>,
    pub jobs: Vec<JobStatus>,
    /// The remote tier's state. Since version 4; omitted when the remote
    /// tier is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteStatus>,
}

/// The remote tier (the S3 object store snapshots are uploaded to), as
/// `Status` reports it. Since version 4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteStatus {
    /// The object store's endpoint URL.
    pub endpoint: String,
    pub bucket: String,
    /// Whether the last request to the object store got an answer.
    pub reachable: bool,
    /// The last error the object store gave, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Snapshots uploaded since the daemon started.
    pub uploads: u64,
    /// Uploads that failed since the daemon started.
    pub failures: u64,
    /// One entry per (job, rank) the daemon uploads for.
    pub ranks: Vec<RemoteRankStatus>,
}

/// How far one (job, rank)'s uploads are behind its local commits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteRankStatus {
    pub job: String,
    pub rank: u32,
    /// The newest step uploaded, `None` before the first.
    pub uploaded: Option<u64>,
    /// Committed steps not uploaded yet.
    pub behind_steps: u64,
    /// Seconds since the oldest committed step not uploaded yet was
    /// committed (0 when none is behind).
    pub behind_s: u64,
}

/// One registered connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionStatus {
    pub job: String,
    pub rank: u32,
    pub uid: u32,
    pub pid: i32,
    pub tensors: u64,
    pub staging_bytes: u64,
    pub slots: u32,
    pub slots_busy: u32,
    /// What attaching each of the client's devices did to its staging, as
    /// the client reported it (`Attached`); empty until it did (a client
    /// older than version 3 never does). Since version 3; absent in an
    /// older version's status, which reads as empty.
    #[serde(default)]
    pub staging_pinning: Vec<AttachReport>,
}

/// One job known to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobStatus {
    pub job: String,
    pub uid: u32,
    pub last_committed_step: Option<u64>,
    pub in_flight: u64,
    pub hot_step: Option<u64>,
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, reason = "tests slice known frames")]
mod tests {
    use super::*;
    use crate::{Dtype, FRAME_BYTES_MAX, FrameError, decode, encode, frame_len};

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let req = Request {
            id: 7,
            body: RequestBody::Register {
                job: "j".into(),
                rank: 0,
                world_size: 1,
                tensors: vec![TensorSpec::new("w", Dtype::F32, [2, 3])],
            },
        };
        let frame = encode(&req).expect("small");
        let len = frame_len(frame[..4].try_into().expect("4 bytes")).expect("len");
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode::<Request>(&frame[4..]).expect("decode"), req);
        assert!(matches!(frame_len([0; 4]), Err(FrameError::Empty)));
        assert!(matches!(
            frame_len((FRAME_BYTES_MAX + 1).to_le_bytes()),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(decode::<Request>(br#"{"id":1,"body":{"type":"nope"}}"#).is_err());
        assert!(decode::<Request>(br#"{"id":1,"body":{"type":"status"},"x":1}"#).is_err());
    }

    #[test]
    fn every_error_kind_is_listed_once_and_named_as_the_wire_names_it() {
        // A new kind fails to compile here: list it in `ALL` too.
        let reminder = |kind: ErrorKind| match kind {
            ErrorKind::Protocol
            | ErrorKind::TooLarge
            | ErrorKind::VersionMismatch
            | ErrorKind::NotRegistered
            | ErrorKind::InvalidRegistration
            | ErrorKind::Busy
            | ErrorKind::PermissionDenied
            | ErrorKind::StagingFull
            | ErrorKind::Mismatch
            | ErrorKind::NotFound
            | ErrorKind::Corrupt
            | ErrorKind::Storage
            | ErrorKind::ShuttingDown
            | ErrorKind::Timeout
            | ErrorKind::Internal => {}
        };
        let mut names = std::collections::HashSet::new();
        for kind in ErrorKind::ALL {
            reminder(kind);
            let wire = serde_json::to_string(&kind).expect("serialize");
            assert_eq!(wire, format!("\"{}\"", kind.name()), "{kind:?}");
            assert_eq!(
                serde_json::from_str::<ErrorKind>(&wire).expect("parse"),
                kind
            );
            assert!(names.insert(kind.name()), "{kind:?} listed twice");
        }
    }

    #[test]
    fn describe_and_described_round_trip() {
        let req = Request {
            id: 9,
            body: RequestBody::Describe {
                job: "j".into(),
                rank: 3,
                step: 40,
            },
        };
        assert_eq!(req.body.name(), "describe");
        let frame = encode(&req).expect("small");
        assert_eq!(decode::<Request>(&frame[4..]).expect("decode"), req);
        assert_eq!(
            decode::<Request>(
                br#"{"id":2,"body":{"type":"describe","job":"j","rank":1,"step":5}}"#
            )
            .expect("decode"),
            Request {
                id: 2,
                body: RequestBody::Describe {
                    job: "j".into(),
                    rank: 1,
                    step: 5
                }
            }
        );
        assert!(
            decode::<Request>(br#"{"id":2,"body":{"type":"describe","job":"j","rank":1}}"#)
                .is_err(),
            "step is required"
        );
        assert!(
            decode::<Request>(
                br#"{"id":2,"body":{"type":"describe","job":"j","rank":1,"step":5,"x":0}}"#
            )
            .is_err(),
            "unknown fields are refused"
        );

        let reply = Reply {
            id: 9,
            body: ReplyBody::Described {
                job: "j".into(),
                rank: 3,
                step: 40,
                world_size: 8,
                tensors: vec![
                    TensorSpec::new("w", Dtype::F32, [2, 3]),
                    TensorSpec::new("step", Dtype::I64, []),
                    TensorSpec::new("emb", Dtype::BF16, [4, 0]),
                ],
            },
        };
        assert_eq!(reply.body.name(), "described");
        let frame = encode(&reply).expect("small");
        assert_eq!(decode::<Reply>(&frame[4..]).expect("decode"), reply);
        let text = std::str::from_utf8(&frame[4..]).expect("JSON");
        assert!(text.contains(r#""type":"described""#), "{text}");
        assert!(text.contains(r#""dtype":"BF16""#), "{text}");
    }
}
