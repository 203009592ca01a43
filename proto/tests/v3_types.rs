//! The reply types of protocol version 3, frozen as `gpusnap-proto`
//! defined them in the last version-3 build (before the remote tier of
//! version 4: `RestoreSource::Remote`, `Restored::walked_back`,
//! `Listing::remote_complete` and `remote_error`, `StatusInfo::remote`),
//! `deny_unknown_fields` and all: what a version-3 client decodes. The
//! golden test decodes every version-3 reply frame with these and
//! re-encodes it byte for byte, so a daemon's version-3 words are proven
//! to be ones a version-3 client accepts.
//! Never edit this file: it is a record, not code that evolves.

#![allow(
    dead_code,
    reason = "a record of the version-3 types; fields are only decoded"
)]

use gpusnap_proto::{OsError, TensorSpec};
use serde::{Deserialize, Serialize};

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
    },
    NoSnapshot,
    Released,
    Listing {
        snapshots: Vec<SnapshotInfo>,
        /// Per job: steps every rank of its world has committed.
        complete: Vec<JobSteps>,
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

/// Where a registration's tensors sit in the staging memfd.
///
/// The memfd holds `slots` slots of `slot_bytes` each (slot `i` at
/// `i * slot_bytes`), then the stream ring at `ring_offset`: `ring_chunks`
/// chunks of `chunk_bytes`. A slot holds the data section (`data_bytes`
/// bytes) exactly as it is written to disk; tensor `i` (registration order)
/// is at `offsets[i]` within a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagingInfo {
    /// What the staging memory is and how the client maps it. Since
    /// version 2 (version 1 knows only a host memfd, and says nothing).
    pub memory: StagingMemory,
    pub memfd_bytes: u64,
    pub slots: u32,
    pub slot_bytes: u64,
    pub data_bytes: u64,
    pub offsets: Vec<u64>,
    pub ring_offset: u64,
    pub ring_chunks: u32,
    pub chunk_bytes: u64,
    pub policy: BusyPolicy,
}

/// What kind of memory a registration's staging is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StagingMemory {
    /// A sealed `memfd` in host memory, passed with `SCM_RIGHTS` on the
    /// `Registered` frame; the client maps it shared and read-write.
    HostMemfd,
}

/// What the daemon does with a `Begin` while every slot is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusyPolicy {
    /// Wait for a slot.
    Block,
    /// Refuse this snapshot (the client is told; a metric counts it).
    Skip,
    /// Capture through the bounded ring while the disk drains it.
    Stream,
}

/// Where a restore's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestoreSource {
    /// The hot tier: the newest snapshot kept in the daemon's memory.
    Memory,
    /// The store on disk.
    Disk,
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

/// What attaching one device did to the registration's staging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachReport {
    /// The device: `"host"`, `"cuda:0"`. Printable ASCII, no spaces, at
    /// most 64 bytes.
    pub device: String,
    pub pin: PinState,
}

/// Whether a device page-locked the staging mapping for its copies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum PinState {
    /// The device copies with plain memory access (host memory), or the
    /// staging is empty.
    NotNeeded,
    /// Page-locked: `bytes` of the mapping, in `pin_ns`.
    Pinned { bytes: u64, pin_ns: u64 },
    /// The driver refused to page-lock it; `reason` is its refusal.
    Unpinned { reason: String },
}
