//! One sample of every message, named; the golden files hold their frames.

use gpusnap_proto::{
    AttachReport, BusyPolicy, Dtype, ErrorKind, JobStatus, JobSteps, OsError, PinState,
    RemoteRankStatus, RemoteStatus, ReplyBody, RequestBody, RestoreSource, SessionStatus,
    SnapshotInfo, StagingInfo, StagingMemory, StatusInfo, TensorSpec, WalkBack,
};

fn tensors() -> Vec<TensorSpec> {
    vec![
        TensorSpec::new("model.w", Dtype::BF16, [4, 3]),
        TensorSpec::new("step", Dtype::I64, []),
    ]
}

/// What a client with a host device and two CUDA devices (one refused
/// the pinning the other made: the registration is shared) reports.
fn attach_reports() -> Vec<AttachReport> {
    vec![
        AttachReport::new("host", PinState::NotNeeded),
        AttachReport::new(
            "cuda:0",
            PinState::Pinned {
                bytes: 3 * 4096,
                pin_ns: 1_500_000,
            },
        ),
        AttachReport::new(
            "cuda:1",
            PinState::Unpinned {
                reason: "page-locking 12288 bytes of staging at offset 0 was refused: CUDA_ERROR_OUT_OF_MEMORY".into(),
            },
        ),
    ]
}

/// Every request of `version`, each with its name.
pub fn requests(version: u32) -> Vec<(&'static str, RequestBody)> {
    let mut all = vec![
        (
            "hello",
            RequestBody::Hello {
                protocol_version: version,
                client: "gpusnap-rs 0.1.0".into(),
            },
        ),
        (
            "register",
            RequestBody::Register {
                job: "llama".into(),
                rank: 1,
                world_size: 2,
                tensors: tensors(),
            },
        ),
        ("begin", RequestBody::Begin { step: 40 }),
        (
            "chunk_filled",
            RequestBody::ChunkFilled { step: 40, seq: 3 },
        ),
        (
            "captured",
            RequestBody::Captured {
                step: 40,
                capture_ns: 1_500_000,
                stall_ns: 2_000_000,
            },
        ),
        (
            "abort",
            RequestBody::Abort {
                step: 40,
                reason: "copy failed".into(),
            },
        ),
        ("restore_step", RequestBody::Restore { step: Some(30) }),
        ("restore_latest", RequestBody::Restore { step: None }),
        ("release", RequestBody::Release { slot: 1 }),
        (
            "list_job",
            RequestBody::List {
                job: Some("llama".into()),
            },
        ),
        ("list_all", RequestBody::List { job: None }),
        ("status", RequestBody::Status),
        (
            "describe",
            RequestBody::Describe {
                job: "llama".into(),
                rank: 0,
                step: 30,
            },
        ),
    ];
    if version >= 3 {
        all.push((
            "attached",
            RequestBody::Attached {
                devices: attach_reports(),
            },
        ));
    }
    all
}

fn staging() -> StagingInfo {
    StagingInfo {
        memory: StagingMemory::HostMemfd,
        memfd_bytes: 3 * 4096,
        slots: 2,
        slot_bytes: 4096,
        data_bytes: 32,
        offsets: vec![0, 24],
        ring_offset: 8192,
        ring_chunks: 1,
        chunk_bytes: 4096,
        policy: BusyPolicy::Stream,
    }
}

fn status(version: u32) -> StatusInfo {
    StatusInfo {
        daemon_version: "0.1.0".into(),
        uptime_s: 3600,
        io_backend: "io_uring".into(),
        clients_connected: 1,
        staging_bytes_used: 12288,
        staging_budget_bytes: 1 << 34,
        hot_tier_bytes: 32,
        hot_tier_budget_bytes: 1 << 33,
        snapshots_in_flight: 0,
        sessions: vec![SessionStatus {
            job: "llama".into(),
            rank: 1,
            uid: 1000,
            pid: 4242,
            tensors: 2,
            staging_bytes: 12288,
            slots: 2,
            slots_busy: 1,
            // Versions before 3 say the session without it.
            staging_pinning: attach_reports(),
        }],
        jobs: vec![JobStatus {
            job: "llama".into(),
            uid: 1000,
            last_committed_step: Some(30),
            in_flight: 0,
            hot_step: Some(30),
        }],
        // Versions before 4 have no remote tier to say.
        remote: (version >= 4).then(|| RemoteStatus {
            endpoint: "https://s3.eu-west-1.amazonaws.com".into(),
            bucket: "gpusnap-llama".into(),
            reachable: true,
            last_error: None,
            uploads: 2,
            failures: 0,
            ranks: vec![RemoteRankStatus {
                job: "llama".into(),
                rank: 1,
                uploaded: Some(20),
                behind_steps: 1,
                behind_s: 42,
            }],
        }),
    }
}

/// Every reply and event of `version`, each with its name (`+os_error`:
/// the variant carrying an OS error, which version 1 says without it).
pub fn replies(version: u32) -> Vec<(&'static str, ReplyBody)> {
    let mut all = vec![
        (
            "welcome",
            ReplyBody::Welcome {
                protocol_version: version,
                daemon_version: "0.1.0".into(),
                uid: 1000,
            },
        ),
        ("registered", ReplyBody::Registered(staging())),
        ("slot", ReplyBody::Slot { step: 40, slot: 1 }),
        ("stream", ReplyBody::Stream { step: 40, chunks: 1 }),
        (
            "skipped",
            ReplyBody::Skipped {
                step: 40,
                reason: "every staging slot (2) is still persisting an earlier step (policy skip)"
                    .into(),
            },
        ),
        ("chunk_free", ReplyBody::ChunkFree { step: 40, seq: 3 }),
        ("accepted", ReplyBody::Accepted { step: 40 }),
        ("aborted", ReplyBody::Aborted { step: 40 }),
        (
            "restored",
            if version >= 4 {
                // Step 40 in the local store failed its checksum; step 30
                // came from the object store.
                ReplyBody::Restored {
                    step: 30,
                    slot: 0,
                    source: RestoreSource::Remote,
                    bytes: 32,
                    elapsed_ns: 900_000,
                    walked_back: vec![WalkBack {
                        step: 40,
                        source: RestoreSource::Disk,
                        reason: "the checksum of state.safetensors does not match its manifest"
                            .into(),
                    }],
                }
            } else {
                ReplyBody::Restored {
                    step: 30,
                    slot: 0,
                    source: RestoreSource::Disk,
                    bytes: 32,
                    elapsed_ns: 900_000,
                    walked_back: Vec::new(),
                }
            },
        ),
        ("no_snapshot", ReplyBody::NoSnapshot),
        ("released", ReplyBody::Released),
        (
            "listing",
            ReplyBody::Listing {
                snapshots: vec![SnapshotInfo {
                    job: "llama".into(),
                    rank: 0,
                    world_size: 2,
                    step: 30,
                    bytes: 4128,
                    tensors: 2,
                    created_unix_ms: 1_796_295_190_000,
                }],
                complete: vec![JobSteps {
                    job: "llama".into(),
                    steps: vec![20, 30],
                }],
                // Versions before 4 list only the local steps.
                remote_complete: if version >= 4 {
                    vec![JobSteps {
                        job: "llama".into(),
                        steps: vec![10, 20],
                    }]
                } else {
                    Vec::new()
                },
                remote_error: None,
            },
        ),
        ("status", ReplyBody::Status(Box::new(status(version)))),
        (
            "described",
            ReplyBody::Described {
                job: "llama".into(),
                rank: 0,
                step: 30,
                world_size: 2,
                tensors: tensors(),
            },
        ),
        (
            "error",
            ReplyBody::Error {
                kind: ErrorKind::Mismatch,
                message: "tensor \"step\" is registered but not in the snapshot of step 30".into(),
                os_error: None,
            },
        ),
        (
            "error+os_error",
            ReplyBody::Error {
                kind: ErrorKind::Storage,
                message: "read /var/lib/gpusnap/llama/0/step-30/state.safetensors: Input/output error (os error 5)".into(),
                os_error: Some(OsError::EIO),
            },
        ),
        (
            "committed",
            ReplyBody::Committed {
                step: 40,
                bytes: 4128,
                persist_ns: 3_000_000,
            },
        ),
        (
            "failed",
            ReplyBody::Failed {
                step: 40,
                kind: ErrorKind::Internal,
                message: "the persist of step 40 panicked".into(),
                os_error: None,
            },
        ),
        (
            "failed+os_error",
            ReplyBody::Failed {
                step: 40,
                kind: ErrorKind::Storage,
                message: "write state.safetensors: No space left on device (os error 28)".into(),
                os_error: Some(OsError::ENOSPC),
            },
        ),
    ];
    if version >= 3 {
        all.push(("attach_noted", ReplyBody::AttachNoted));
    }
    all
}
