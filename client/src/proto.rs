//! The wire protocol between the client library and `gpusnapd`.
//!
//! # Framing
//! A stream Unix socket carries frames: a 4-byte little-endian body length,
//! then that many bytes of JSON (one [`Request`] from the client, one
//! [`Reply`] from the daemon). A length of 0 or over [`FRAME_BYTES_MAX`] is a
//! protocol error. The daemon's staging `memfd` travels as `SCM_RIGHTS`
//! ancillary data on the first byte of the [`ReplyBody::Registered`] frame.
//!
//! # Conversation
//! * Every request carries an `id`, positive and strictly increasing on its
//!   connection; every request gets exactly one reply with the same `id`, in
//!   request order. Replies with `id` 0 are events ([`ReplyBody::Committed`],
//!   [`ReplyBody::Failed`]) and may arrive between any two replies.
//! * `Hello` first: the daemon answers `Welcome` or an error
//!   (`VersionMismatch`) and closes.
//! * `Register` once per connection, before `Begin` and `Restore`. The reply
//!   `Registered` says where each tensor sits in a staging slot.
//! * Capture: `Begin { step }` is answered with `Slot` (copy the data section
//!   into that slot, then send `Captured`), `Stream` (the slots are busy and
//!   the policy is `stream`: copy the data section chunk by chunk into the
//!   ring, sending `ChunkFilled` for each, then `Captured`), or `Skipped`
//!   (policy `skip`). With policy `block` the `Slot` reply waits for a slot.
//!   `Abort` instead of `Captured` gives the slot back with nothing written.
//!   `Captured` is answered with `Accepted`; the outcome comes later as the
//!   event `Committed` or `Failed` for that step.
//! * Stream chunk `k` holds data bytes `k * chunk_bytes ..` (the last one
//!   shorter) and goes at ring position `k % ring_chunks`. The client may have
//!   `ring_chunks` chunks filled and not yet answered; the reply `ChunkFree`
//!   to `ChunkFilled { seq: k }` says position `k % ring_chunks` may be
//!   reused.
//! * `Restore` is answered with `Restored` (the data is in `slot`, laid out as
//!   `Registered` said; the slot is lent to the client until `Release`) or
//!   `NoSnapshot`.
//! * `List`, `Status` and `Describe { job, rank, step }` need no
//!   registration and may be sent at any point after `Hello`, also while a
//!   capture or a restore is open (they touch no slot). `Describe` is
//!   answered with `Described`: the committed snapshot's world size and
//!   tensor table, in the order of its data file, read from its manifest
//!   alone (the data file is not read). A job of another uid is refused
//!   with `PermissionDenied` (root may describe any), a step that is not
//!   committed with `NotFound`, a manifest that does not check with
//!   `Corrupt`. An older daemon that does not know `Describe` answers it
//!   as an unknown request (`Protocol`, and closes).
//! * A malformed, oversized, unknown or out-of-order request gets an `Error`
//!   with kind `Protocol` (or `TooLarge`) and the connection is closed; when
//!   the request's `id` could not be read, that `Error` has `id` 0. Other
//!   errors (a shape mismatch, a missing snapshot) leave it open. The daemon
//!   may also close with an `id` 0 `Error` of kind `ShuttingDown` (it is
//!   stopping) or `Busy` (too many connections).
//! * A connection that closes during a capture leaves nothing written; one
//!   that closes after `Captured` still has its snapshot committed.

use serde::{Deserialize, Serialize};

use crate::TensorSpec;

/// The version both sides must speak. Rules: any change to a message's
/// fields or meaning bumps it; the daemon refuses other versions.
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest frame body, in bytes (a registration of many tensors is the
/// largest message).
pub const FRAME_BYTES_MAX: u32 = 64 << 20;
/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;
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
}

impl RequestBody {
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
    },
}

impl ReplyBody {
    pub fn is_event(&self) -> bool {
        matches!(self, ReplyBody::Committed { .. } | ReplyBody::Failed { .. })
    }
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

impl StagingInfo {
    /// Checks the description against itself and the registered tensors'
    /// lengths, so a client never copies outside the memfd.
    pub fn check(&self, tensor_bytes: &[u64]) -> Result<(), String> {
        if self.offsets.len() != tensor_bytes.len() {
            return Err(format!(
                "{} offsets for {} tensors",
                self.offsets.len(),
                tensor_bytes.len()
            ));
        }
        for (i, (&off, &len)) in self.offsets.iter().zip(tensor_bytes).enumerate() {
            let end = off.checked_add(len).ok_or("offset overflow")?;
            if end > self.data_bytes {
                return Err(format!(
                    "tensor {i} ends at {end}, past the {}-byte data section",
                    self.data_bytes
                ));
            }
        }
        if self.slots == 0 || self.slot_bytes < self.data_bytes {
            return Err(format!(
                "{} slots of {} bytes cannot hold {} bytes",
                self.slots, self.slot_bytes, self.data_bytes
            ));
        }
        let slots_end = u64::from(self.slots)
            .checked_mul(self.slot_bytes)
            .ok_or("slot overflow")?;
        let ring_end = u64::from(self.ring_chunks)
            .checked_mul(self.chunk_bytes)
            .and_then(|r| r.checked_add(self.ring_offset))
            .ok_or("ring overflow")?;
        if self.ring_offset < slots_end || ring_end > self.memfd_bytes {
            return Err(format!(
                "slots end at {slots_end}, ring spans {}..{ring_end}, memfd is {} bytes",
                self.ring_offset, self.memfd_bytes
            ));
        }
        if self.chunk_bytes == 0 {
            return Err("chunk_bytes is 0".into());
        }
        // No two tensors share a byte: parallel copies must never race.
        let mut spans: Vec<(u64, u64)> = self
            .offsets
            .iter()
            .zip(tensor_bytes)
            .filter(|(_, len)| **len > 0)
            .map(|(&off, &len)| (off, off + len))
            .collect();
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(format!(
                "tensors at {}..{} and {}..{} overlap",
                w[0].0, w[0].1, w[1].0, w[1].1
            ));
        }
        Ok(())
    }

    /// Data bytes `(start, end)` of stream chunk `seq`.
    pub fn chunk_range(&self, seq: u64) -> (u64, u64) {
        let start = seq.saturating_mul(self.chunk_bytes);
        (
            start.min(self.data_bytes),
            start.saturating_add(self.chunk_bytes).min(self.data_bytes),
        )
    }

    /// Number of stream chunks of the data section.
    pub fn chunk_count(&self) -> u64 {
        self.data_bytes.div_ceil(self.chunk_bytes.max(1))
    }

    /// Offset in the memfd of ring position for chunk `seq`.
    pub fn ring_position(&self, seq: u64) -> u64 {
        self.ring_offset + (seq % u64::from(self.ring_chunks.max(1))) * self.chunk_bytes
    }
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

impl BusyPolicy {
    pub const fn name(self) -> &'static str {
        match self {
            BusyPolicy::Block => "block",
            BusyPolicy::Skip => "skip",
            BusyPolicy::Stream => "stream",
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
}

impl RestoreSource {
    pub const fn name(self) -> &'static str {
        match self {
            RestoreSource::Memory => "memory",
            RestoreSource::Disk => "disk",
        }
    }
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

/// Why a frame cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the {FRAME_BYTES_MAX}-byte limit")]
    TooLarge { len: u32 },
    #[error("empty frame")]
    Empty,
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// The body length a frame header announces, checked against the limit.
pub fn frame_len(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { len });
    }
    usize::try_from(len).map_err(|_| FrameError::TooLarge { len })
}

/// Header and body of one message; a message over the frame limit is an
/// error, never a frame the other side must refuse.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(message)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= FRAME_BYTES_MAX)
        .ok_or(FrameError::TooLarge {
            len: u32::try_from(body.len()).unwrap_or(u32::MAX),
        })?;
    assert!(len > 0, "JSON is never empty");
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Parses one frame body.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dtype;

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
        assert!(!reply.body.is_event());
        let frame = encode(&reply).expect("small");
        assert_eq!(decode::<Reply>(&frame[4..]).expect("decode"), reply);
        let text = std::str::from_utf8(&frame[4..]).expect("JSON");
        assert!(text.contains(r#""type":"described""#), "{text}");
        assert!(text.contains(r#""dtype":"BF16""#), "{text}");
    }

    #[test]
    fn staging_info_check_refuses_descriptions_outside_the_memfd() {
        let good = StagingInfo {
            memfd_bytes: 3 * 8192,
            slots: 2,
            slot_bytes: 8192,
            data_bytes: 100,
            offsets: vec![0, 64],
            ring_offset: 16384,
            ring_chunks: 2,
            chunk_bytes: 4096,
            policy: BusyPolicy::Stream,
        };
        good.check(&[64, 36]).expect("consistent");
        assert!(good.check(&[64, 37]).is_err(), "tensor past data section");
        assert!(good.check(&[64]).is_err(), "offset count");
        let mut overlapping = good.clone();
        overlapping.offsets = vec![0, 60];
        assert!(
            overlapping
                .check(&[64, 36])
                .unwrap_err()
                .contains("overlap")
        );
        let mut ring_past_end = good.clone();
        ring_past_end.ring_chunks = 3;
        assert!(ring_past_end.check(&[64, 36]).is_err());
        assert_eq!(good.chunk_count(), 1);
        assert_eq!(good.chunk_range(0), (0, 100));
        assert_eq!(good.ring_position(3), 16384 + 4096);
    }
}
