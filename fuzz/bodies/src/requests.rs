//! Target `requests`: the daemon's request state machine, driven in
//! process through its real connection code ([`conn::serve`]) over a
//! socket pair, by sequences of frames.
//!
//! Three daemons (one per busy policy: block, skip, stream) are opened on
//! a store under `/dev/shm` with small budgets, with one single-threaded
//! runtime for the process; every [`FRESH_EVERY`] inputs they are replaced
//! by new ones on empty stores. The input's first byte picks the daemon. The
//! rest is at most [`FRAMES_MAX`] frames: each a request the input builds
//! (every request type, with fields from small sets and raw numbers, ids
//! mostly rising) or raw bytes behind a true or a hostile length header.
//! The frames are written, the socket is half-closed, and every reply is
//! read until the daemon closes the connection.
//!
//! Invariants: the connection ends by itself within [`CONN_MAX`] (no
//! hang), its task does not panic and the daemon counts no caught panic;
//! every reply is one well-formed frame of JSON with an `id` and a
//! `body`, and decodes as a `Reply` when the connection speaks the newest
//! version; once the connection is gone and the persists have drained, the
//! daemon holds nothing of it: no session, every (job, rank) it registered
//! free to register again, and no staging budget in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use gpusnap_proto::{
    AttachReport, BusyPolicy, Dtype, FRAME_BYTES_MAX, FRAME_HEADER_BYTES, PROTOCOL_VERSION,
    PROTOCOL_VERSION_MIN, PinState, Reply, Request, RequestBody, TensorSpec,
};
use gpusnapd::config::{ByteSize, Config};
use gpusnapd::metrics::PanicSite;
use gpusnapd::ranks::RankKey;
use gpusnapd::server::{Daemon, conn};
use gpusnapd::storage::probe::BackendChoice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cursor::Cursor;

/// Most frames in one input.
pub const FRAMES_MAX: usize = 32;
/// Longest one connection may take from its first frame to its close.
pub const CONN_MAX: Duration = Duration::from_secs(20);
/// Longest the persists of one input may take to drain after it.
const DRAIN_MAX: Duration = Duration::from_secs(20);
/// The jobs requests name (and, now and then, a name from the input).
const JOBS: [&str; 3] = ["a", "b", "job-c"];
/// Most tensors in one registration, and the largest dimension.
const TENSORS_MAX: usize = 4;
const DIM_MAX: u8 = 64;
/// Inputs run on one set of daemons before the next input gets new ones
/// on empty stores. Snapshots pile up otherwise (every job name an input
/// makes up keeps its own), and `List` without a job reads
/// every one: the harness slowed down as it ran. An input still meets the
/// snapshots, owners and rank steps the inputs before it left, up to this
/// many of them.
const FRESH_EVERY: u32 = 32;

/// The daemons and the runtime their connections run on.
struct Harness {
    runtime: tokio::runtime::Runtime,
    /// This process's store directory; each daemon's store is a folder in it.
    root: PathBuf,
    daemons: Vec<Arc<Daemon>>,
    /// Inputs run on the current daemons.
    inputs: u32,
    next_conn: u64,
}

impl Harness {
    /// The daemons for the next input: every [`FRESH_EVERY`] inputs, new
    /// ones on empty stores (see [`FRESH_EVERY`]).
    fn daemons(&mut self) -> &[Arc<Daemon>] {
        if self.inputs >= FRESH_EVERY {
            // The previous input's connection, persists and staging are all
            // gone (`after` checked), so nothing writes to these stores.
            self.daemons.clear();
            self.daemons = open_daemons(&self.runtime, &self.root);
            self.inputs = 0;
        }
        self.inputs += 1;
        &self.daemons
    }
}

/// The three daemons, one per busy policy, each on an empty store in
/// `root`.
fn open_daemons(runtime: &tokio::runtime::Runtime, root: &Path) -> Vec<Arc<Daemon>> {
    [BusyPolicy::Block, BusyPolicy::Skip, BusyPolicy::Stream]
        .into_iter()
        .map(|policy| {
            let dir = root.join(policy.name());
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("removing the old store {}: {e}", dir.display()),
            }
            let config = daemon_config(&dir, policy);
            runtime
                .block_on(async { Daemon::open(config) })
                .expect("a daemon on tmpfs")
        })
        .collect()
}

fn harness() -> &'static Mutex<Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN installs no
        // handler code; it only keeps a write to a socket the daemon
        // closed from killing the process (libFuzzer's `main`, unlike
        // Rust's, leaves SIGPIPE at its default), as the daemon's own
        // binary has it.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
        let root = store_root();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let daemons = open_daemons(&runtime, &root);
        Mutex::new(Harness {
            runtime,
            root,
            daemons,
            inputs: 0,
            next_conn: 1,
        })
    })
}

/// This process's store directory under `/dev/shm` (memory, fast), after
/// removing those of fuzz processes that are gone.
fn store_root() -> PathBuf {
    let base = Path::new("/dev/shm");
    let prefix = "gpusnap-fuzz-requests-";
    if let Ok(entries) = std::fs::read_dir(base) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(prefix)
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: signal 0 only asks whether the process exists.
            let gone = unsafe { libc::kill(pid, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            if gone {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let root = base.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("a store root in /dev/shm");
    root
}

/// A daemon's configuration: small budgets and chunks, short waits, no
/// metrics listener, buffered I/O (tmpfs has no O_DIRECT).
fn daemon_config(root: &Path, policy: BusyPolicy) -> Config {
    let mut config = Config::default();
    config.store.root = root.to_path_buf();
    config.store.io_backend = BackendChoice::Buffered;
    config.store.io_buffer_bytes = 4096;
    config.store.io_pool_bytes = 1 << 20;
    config.store.queue_depth = 4;
    config.store.keep_snapshots = 2;
    config.metrics.listen = String::new();
    config.staging.budget_bytes = ByteSize(16 << 20);
    config.staging.policy = policy;
    config.staging.stream_ring_bytes = ByteSize(4 * 4096);
    config.hot_tier.budget_bytes = ByteSize(1 << 20);
    config.daemon.slot_wait_s = 2;
    config.daemon.hello_wait_s = 5;
    config.daemon.reply_wait_s = 5;
    config.daemon.frame_bytes_max = 64 << 10;
    config.persist.write_wait_s = 5;
    config
}

/// What one input does on its connection.
#[derive(Debug, Default)]
struct Script {
    frames: Vec<Vec<u8>>,
    /// The version the connection speaks: the first frame's `Hello`'s, when
    /// it is one the daemon serves.
    version: Option<u32>,
    /// The (job, rank) pairs registrations named.
    keys: Vec<RankKey>,
}

/// Drives one connection with the frames of `data` (see the module doc).
pub fn requests(data: &[u8]) {
    let mut input = Cursor::new(data);
    let pick = usize::from(input.u8()) % 3;
    let script = script(&mut input);
    let mut h = harness().lock().unwrap_or_else(PoisonError::into_inner);
    let conn_id = h.next_conn;
    h.next_conn += 1;
    let daemon = Arc::clone(h.daemons().get(pick).expect("three daemons"));
    let panics_before = panics(&daemon);
    h.runtime.block_on(drive(&daemon, conn_id, &script));
    assert_eq!(panics(&daemon), panics_before, "the daemon caught a panic");
    after(&daemon, &script);
}

/// The panics the daemon caught and counted, at every site.
fn panics(daemon: &Daemon) -> u64 {
    [PanicSite::Connection, PanicSite::Lane, PanicSite::Stream]
        .into_iter()
        .map(|site| {
            daemon
                .metrics
                .panics_total
                .with_label_values(&[site.name()])
                .get()
        })
        .sum()
}

/// Writes the frames, half-closes, reads every reply until the daemon
/// closes; all within [`CONN_MAX`].
async fn drive(daemon: &Arc<Daemon>, conn_id: u64, script: &Script) {
    let (server, client) = tokio::net::UnixStream::pair().expect("a socket pair");
    let task = tokio::spawn(conn::serve(Arc::clone(daemon), conn_id, server));
    let (mut rd, mut wr) = client.into_split();
    let write = async move {
        for frame in &script.frames {
            if wr.write_all(frame).await.is_err() {
                break;
            }
        }
        // Half-closed: the daemon sees the end of the requests.
        let _ = wr.shutdown().await;
        wr
    };
    let read = read_replies(&mut rd, script.version);
    let all = async { tokio::join!(write, read, task) };
    let (_, (), joined) = tokio::time::timeout(CONN_MAX, all)
        .await
        .expect("the connection ended by itself (a hang otherwise)");
    if let Err(e) = joined {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Reads replies until the daemon closes, checking each frame.
async fn read_replies(rd: &mut tokio::net::unix::OwnedReadHalf, version: Option<u32>) {
    loop {
        let mut header = [0u8; FRAME_HEADER_BYTES];
        match rd.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
            // The daemon closed with requests of ours still unread (after
            // a refusal that closes the connection): the kernel resets.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("reading a reply header: {e}"),
        }
        let len = u32::from_le_bytes(header);
        assert!(len > 0 && len <= FRAME_BYTES_MAX, "a reply of {len} bytes");
        let mut body = vec![0u8; usize::try_from(len).expect("u32 fits")];
        rd.read_exact(&mut body)
            .await
            .expect("a reply's body follows its header");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("a reply is JSON");
        assert!(
            value
                .get("id")
                .and_then(serde_json::Value::as_u64)
                .is_some()
        );
        assert!(value.get("body").is_some_and(serde_json::Value::is_object));
        if version == Some(PROTOCOL_VERSION) {
            let reply: Result<Reply, _> = serde_json::from_slice(&body);
            assert!(reply.is_ok(), "a newest-version reply decodes: {value}");
        }
    }
}

/// What must hold once the connection is gone and its persists drained.
fn after(daemon: &Arc<Daemon>, script: &Script) {
    assert!(
        daemon.engine.wait_drained(DRAIN_MAX),
        "the persists drained in time"
    );
    assert!(
        daemon.sessions.snapshot().is_empty(),
        "no session outlives its connection"
    );
    for key in &script.keys {
        let hold = daemon.ranks.acquire(key, u64::MAX);
        assert!(hold.is_ok(), "{key} is free again");
    }
    // A lane gives its staging back as its thread ends, just after the
    // last persist: a bounded wait for that.
    let deadline = Instant::now() + DRAIN_MAX;
    while daemon.budget.used_bytes() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} staging bytes still held",
            daemon.budget.used_bytes()
        );
        std::thread::yield_now();
    }
}

/// Decodes the input into frames (see the module doc).
fn script(input: &mut Cursor<'_>) -> Script {
    let mut s = Script::default();
    let mut id = 0u64;
    while s.frames.len() < FRAMES_MAX && !input.is_empty() {
        let op = input.u8();
        // The id: the next one, mostly; now and then a repeat or any.
        id = match op >> 6 {
            0..=2 => id.wrapping_add(1),
            _ => match input.u8() % 2 {
                0 => id,
                _ => input.num(),
            },
        };
        let body = match op % 16 {
            0 | 13 => {
                let protocol_version = u32::from(input.u8() % 6);
                if s.frames.is_empty()
                    && (PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&protocol_version)
                {
                    s.version = Some(protocol_version);
                }
                RequestBody::Hello {
                    protocol_version,
                    client: "fuzz".to_owned(),
                }
            }
            1 => {
                let (job, rank, world_size) = (
                    job(input),
                    u32::from(input.u8() % 4),
                    u32::from(input.u8() % 5),
                );
                s.keys.push(RankKey::new(job.clone(), rank));
                RequestBody::Register {
                    job,
                    rank,
                    world_size,
                    tensors: tensors(input),
                }
            }
            2 | 14 => RequestBody::Begin { step: step(input) },
            3 => RequestBody::ChunkFilled {
                step: step(input),
                seq: u64::from(input.u8() % 8),
            },
            4 | 15 => RequestBody::Captured {
                step: step(input),
                capture_ns: input.num(),
                stall_ns: input.num(),
            },
            5 => RequestBody::Abort {
                step: step(input),
                reason: input.string(8),
            },
            6 => RequestBody::Restore {
                step: (input.u8() % 2 == 1).then(|| step(input)),
            },
            7 => RequestBody::Release {
                slot: u32::from(input.u8() % 4),
            },
            8 => RequestBody::List {
                job: (input.u8() % 2 == 1).then(|| job(input)),
            },
            9 => RequestBody::Status,
            10 => RequestBody::Describe {
                job: job(input),
                rank: u32::from(input.u8() % 4),
                step: step(input),
            },
            11 => RequestBody::Attached {
                devices: attach_reports(input),
            },
            _ => {
                s.frames.push(raw_frame(input));
                continue;
            }
        };
        let frame = gpusnap_proto::encode(&Request { id, body }).expect("a request encodes");
        s.frames.push(frame);
    }
    s
}

/// A frame of raw bytes: a true length header, or one of the input's.
fn raw_frame(input: &mut Cursor<'_>) -> Vec<u8> {
    let len = usize::from(input.u8());
    let body = input.bytes(len);
    let header = match input.u8() % 4 {
        0 => input.u32(),
        _ => u32::try_from(body.len()).expect("short"),
    };
    let mut frame = header.to_le_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

fn job(input: &mut Cursor<'_>) -> String {
    match input.u8() % 8 {
        7 => input.string(10),
        n => JOBS[usize::from(n) % JOBS.len()].to_owned(),
    }
}

fn step(input: &mut Cursor<'_>) -> u64 {
    match input.u8() % 8 {
        7 => input.u64(),
        n => u64::from(n),
    }
}

fn tensors(input: &mut Cursor<'_>) -> Vec<TensorSpec> {
    let count = usize::from(input.u8()) % (TENSORS_MAX + 1);
    (0..count)
        .map(|i| {
            let dtype = Dtype::ALL[usize::from(input.u8()) % Dtype::ALL.len()];
            let dims = usize::from(input.u8() % 3);
            let shape: Vec<u64> = (0..dims)
                .map(|_| u64::from(input.u8() % (DIM_MAX + 1)))
                .collect();
            let name = match input.u8() % 8 {
                0 => "t0".to_owned(),
                1 => input.string(6),
                _ => format!("t{i}"),
            };
            TensorSpec::new(name, dtype, shape)
        })
        .collect()
}

fn attach_reports(input: &mut Cursor<'_>) -> Vec<AttachReport> {
    let count = usize::from(input.u8() % 4);
    (0..count)
        .map(|_| {
            let pin = match input.u8() % 3 {
                0 => PinState::NotNeeded,
                1 => PinState::Pinned {
                    bytes: input.num(),
                    pin_ns: input.num(),
                },
                _ => PinState::Unpinned {
                    reason: input.string(8),
                },
            };
            let device = match input.u8() % 3 {
                0 => "host".to_owned(),
                1 => "cuda:0".to_owned(),
                _ => input.string(8),
            };
            AttachReport { device, pin }
        })
        .collect()
}
