//! The contract between the gpusnap client library and `gpusnapd`: the wire
//! protocol, the tensor vocabulary both sides (and the on-disk format)
//! share, and the staging description. Nothing here does I/O.
//!
//! * [`Dtype`], [`TensorSpec`]: what a trainer registers and a snapshot
//!   stores.
//! * [`frame`]: the framing; [`message`]: every request and reply;
//!   [`staging`]: [`StagingInfo`] and [`StagingMemory`]; [`attach`]: what
//!   the client's devices did to staging ([`AttachReport`]); [`version`]: the
//!   versions and the handshake rule; [`OsError`]: errno values on the
//!   wire; [`convert`]: the integer conversions of a 64-bit build.
//!
//! # Framing
//! A stream Unix socket carries frames: a 4-byte little-endian body length,
//! then that many bytes of JSON (one [`Request`] from the client, one
//! [`Reply`] from the daemon). A length of 0 or over [`FRAME_BYTES_MAX`] is a
//! protocol error. The daemon's staging `memfd` travels as `SCM_RIGHTS`
//! ancillary data on the first byte of the [`ReplyBody::Registered`] frame
//! (its [`StagingInfo::memory`] says what it is).
//!
//! # Conversation
//! * Every request carries an `id`, positive and strictly increasing on its
//!   connection; every request gets exactly one reply with the same `id`, in
//!   request order. Replies with `id` 0 are events ([`ReplyBody::Committed`],
//!   [`ReplyBody::Failed`]) and may arrive between any two replies.
//! * `Hello` first: the daemon answers `Welcome` or an error
//!   (`VersionMismatch`) and closes; [`version`] has the rule.
//! * `Register` once per connection, before `Begin` and `Restore`. The reply
//!   `Registered` says where each tensor sits in a staging slot.
//! * `Attached { devices }` (since version 3) once per registration, after
//!   `Registered`: what attaching each of the client's devices did to the
//!   staging mapping ([`AttachReport`]: page-locked, how many bytes in how
//!   long, or unpinned and why). Answered `AttachNoted`; the daemon exports
//!   it as metrics and in `Status`. A report that breaks a bound
//!   ([`check_reports`]), a second one, or one on a connection of an older
//!   version is a `Protocol` error; one before `Register` is
//!   `NotRegistered`.
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
//!   `NoSnapshot`. Since version 4 the daemon may restore from the object
//!   store (the remote tier): `source` [`RestoreSource::Remote`], the
//!   snapshot downloaded into the local store and read from there. A
//!   snapshot that fails verification is passed over for the next older
//!   step, and `walked_back` ([`WalkBack`]) names each step passed over
//!   and why, newest first; a version-3 client is told a remote restore as
//!   `Disk`, without `walked_back`.
//! * `List`, `Status` and `Describe { job, rank, step }` need no
//!   registration and may be sent at any point after `Hello`, also while a
//!   capture or a restore is open (they touch no slot). `Describe` is
//!   answered with `Described`: the committed snapshot's world size and
//!   tensor table, in the order of its data file, read from its manifest
//!   alone (the data file is not read). A job of another uid is refused
//!   with `PermissionDenied` (root may describe any), a step that is not
//!   committed with `NotFound`, a manifest that does not check with
//!   `Corrupt`.
//! * Since version 4, `Listing` also says, per job, the steps complete in
//!   the object store (`remote_complete`), or why it could not be listed
//!   (`remote_error`); `Status` says the remote tier's state (`remote`:
//!   [`RemoteStatus`], one [`RemoteRankStatus`] per uploading rank). Both
//!   are omitted when empty or off, and a client of version 3 or older gets
//!   neither.
//! * A malformed, oversized, unknown or out-of-order request gets an `Error`
//!   with kind `Protocol` (or `TooLarge`) and the connection is closed; when
//!   the request's `id` could not be read, that `Error` has `id` 0. Other
//!   errors (a shape mismatch, a missing snapshot) leave it open. The daemon
//!   may also close with an `id` 0 `Error` of kind `ShuttingDown` (it is
//!   stopping) or `Busy` (too many connections).
//! * A connection that closes during a capture leaves nothing written; one
//!   that closes after `Captured` still has its snapshot committed.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod attach;
pub mod convert;
mod dtype;
pub mod frame;
pub mod message;
mod os_error;
pub mod staging;
mod tensor;
pub mod version;

pub use attach::{
    ATTACH_DEVICES_MAX, AttachReport, AttachReportError, DEVICE_NAME_BYTES_MAX,
    PIN_REASON_BYTES_MAX, PinState, check_reports,
};
pub use dtype::{Dtype, UnknownDtype};
pub use frame::{
    FRAME_BYTES_MAX, FRAME_HEADER_BYTES, FrameError, body_len, decode, encode, frame_len,
};
pub use message::{
    DEFAULT_SOCKET, ErrorKind, JobStatus, JobSteps, RemoteRankStatus, RemoteStatus, Reply,
    ReplyBody, Request, RequestBody, RestoreSource, SessionStatus, SnapshotInfo, StatusInfo,
    WalkBack,
};
pub use os_error::OsError;
pub use staging::{BusyPolicy, StagingInfo, StagingMemory};
pub use tensor::{NAME_LEN_MAX, RANK_MAX, TensorSpec, TensorSpecError};
pub use version::{
    PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, VersionMismatch, encode_reply, negotiate,
};
