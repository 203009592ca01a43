//! `gpusnap-bench remote`: the remote (S3) tier against the plain
//! object-store client, each figure beside its peer in the same run (see
//! benches/README.md). The S3 server is SeaweedFS on loopback (the
//! testkit's `S3Server`), so the figures measure gpusnap's overhead, not a
//! network.
//!
//! Order:
//!
//! ```text
//! S3 server #1 (upload figure)
//! commit one snapshot of --size into a local store (Source::Stream)
//! --repeats x (odd rounds in this order, even rounds the other way round):
//!     drop cache, transfer::upload (pread, CRCs checked, put; manifest)   -> ours
//!     drop cache, plain multipart upload of the same file (pread + put)  -> peer
//! kill server #1, remove its data
//! S3 server #2; fill the trainer's state
//! gpusnapd without [remote]: --snapshots snapshots back to back   -> persist without
//! the same config again, a plain uploader sending the upload figure's
//!     file again and again beside it from the first commit on     -> persist beside plain
//! remove the local stores
//! gpusnapd with [remote]:    the same, uploads overlapping        -> persist with
//!     wait until the last step is complete in the object store; SIGTERM
//! --repeats x:
//!     drop cache, HEAD + parallel ranged GETs of its data object  -> peer
//!     drop cache, fresh gpusnapd (empty root, same bucket), restore(latest):
//!         source remote, every byte verified                      -> ours
//! ```

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use gpusnap::ClientConfig;
use gpusnap::proto::RestoreSource;
use gpusnap_proto::convert::{to_u64, to_usize};
use gpusnapd::config::ByteSize;
use gpusnapd::remote::keys::Keys;
use gpusnapd::remote::transfer::{self, Tier, Uploaded};
use gpusnapd::remote::{Credentials, RemoteConfig};
use gpusnapd::store::{Snapshot, SnapshotId, Source, Store, StoreConfig};
use gpusnapd_testkit::{DaemonProcess, S3Server, SocketPath};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStoreExt, PutPayload, RetryConfig};

use crate::daemon::{
    JOB, binary, connect, daemon_config, restore_checked, snapshot_and_commit, start_daemon,
    stop_daemon, with_log,
};
use crate::e2e_report::SnapshotRun;
use crate::remote_report::{DaemonUploads, DownloadRun, NOTE, RemoteReport, Targets, UploadRun};
use crate::state::TrainerState;
use crate::sys;
use crate::units::human_bytes;
use crate::workdir::{CacheDropper, WorkDir};

/// The state's size under `--smoke`.
pub const SMOKE_SIZE_BYTES: u64 = 64 << 20;
/// Key prefix of the daemons' objects.
const DAEMON_PREFIX: &str = "bench";
/// Key prefix of the upload figure's objects.
const UPLOAD_PREFIX: &str = "bench-upload";
/// Memory the run needs besides three copies of the state.
const MEMORY_MARGIN_BYTES: u64 = 1 << 30;
/// What one test server holds: the testkit starts weed with at most 64
/// volumes of 128 MiB, and deleted objects free nothing until a vacuum;
/// some room is left for the volumes' other contents.
const SERVER_CAPACITY_BYTES: u64 = 7 << 30;
/// Longest wait for the last step to be complete in the object store,
/// past the run's own time per GB.
const COMPLETE_WAIT_BASE: Duration = Duration::from_secs(120);
/// How often that wait looks.
const POLL: Duration = Duration::from_millis(100);
/// The word pattern of the upload figure's snapshot.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// What `remote` was asked to do.
#[derive(Debug, Clone)]
pub struct RemoteBench {
    pub size_bytes: u64,
    pub part_bytes: u64,
    pub concurrency: usize,
    pub repeats: usize,
    pub snapshots: usize,
    pub smoke: bool,
    pub keep: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    /// Where the S3 servers keep their data (see [`ServerDir`]).
    pub server_dir: Option<PathBuf>,
    pub gpusnapd: Option<PathBuf>,
}

/// A fresh directory for the S3 servers' data, removed on drop: under
/// `--server-dir`, else under /dev/shm when that is tmpfs (a remote server
/// writes to its own disks, not to the one the local store persists to,
/// so the server's writes are kept off it), else in the run's directory.
#[derive(Debug)]
struct ServerDir {
    path: PathBuf,
    in_memory: bool,
}

impl ServerDir {
    fn choose(explicit: Option<&Path>, work: &Path) -> Result<ServerDir, String> {
        let shm = Path::new("/dev/shm");
        let base = match explicit {
            Some(dir) => dir.to_path_buf(),
            None if sys::is_tmpfs(shm).unwrap_or(false) => shm.to_path_buf(),
            None => work.to_path_buf(),
        };
        let path = crate::workdir::fresh_under(&base)?;
        let in_memory =
            sys::is_tmpfs(&path).map_err(|e| format!("statfs {}: {e}", path.display()))?;
        Ok(ServerDir { path, in_memory })
    }
}

impl Drop for ServerDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

/// Runs the benchmark. Any failure of gpusnap or of a peer (an upload, a
/// commit, a restore from the wrong source or with wrong bytes, a GET) is
/// an `Err`.
pub fn run(args: &RemoteBench) -> Result<RemoteReport, String> {
    if args.snapshots == 0 || args.repeats == 0 {
        return Err("--snapshots and --repeats must be at least 1".into());
    }
    let started = Instant::now();
    let binary = binary(args.gpusnapd.as_deref())?;
    let work = WorkDir::choose(args.keep.as_deref(), args.dir.as_deref())?;
    for sub in ["upload-store", "store-without", "store-with"] {
        crate::workdir::refuse_existing(&work.path.join(sub))?;
    }
    // Dropped after the servers (declared before them).
    let servers = ServerDir::choose(args.server_dir.as_deref(), &work.path)?;
    check_room(args, servers.in_memory)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-s3")
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let cache = CacheDropper::new();
    let (specs, _) = crate::tensors::planned_tensor_set(args.size_bytes)?;
    eprintln!(
        "remote bench: {} in {} tensors, parts of {}, concurrency {}, in {}",
        human_bytes(args.size_bytes),
        specs.len(),
        human_bytes(args.part_bytes),
        args.concurrency,
        work.path.display()
    );
    eprintln!("note: {NOTE}");
    eprintln!(
        "S3 server data in {}{}",
        servers.path.display(),
        if servers.in_memory { " (tmpfs)" } else { "" }
    );
    let mut report = new_report(args, &work.path, &binary, &cache, specs.len());
    report.server_dir = servers.path.display().to_string();
    report.server_in_memory = servers.in_memory;

    // ---- 1. upload: transfer::upload vs a plain multipart upload ----
    let upload_file = upload_figure(
        args,
        &work.path,
        &servers.path,
        &runtime,
        &cache,
        &specs,
        &mut report,
    )?;

    // ---- 2. persist without and with uploads; 3. download + restore ----
    let t = Instant::now();
    let server = start_server(&servers.path.join("s3"))?;
    eprintln!(
        "S3 server #2 up at {} in {:.1} s",
        server.endpoint(),
        t.elapsed().as_secs_f64()
    );
    let remote = remote_config(&server, DAEMON_PREFIX, args)?;
    report.endpoint = server.endpoint();
    report.remote_config = serde_json::to_value(&remote).map_err(|e| e.to_string())?;
    let state = TrainerState::new(specs)?;
    state.fill(0);
    let socket = SocketPath::in_dir(&work.path)
        .map_err(|e| format!("a socket path for {}: {e}", work.path.display()))?;
    let copy_threads = ClientConfig::new(JOB).copy_threads;
    let without = daemon_config(
        socket.path(),
        &work.path.join("store-without"),
        args.size_bytes,
    )?;
    let mut with = daemon_config(
        socket.path(),
        &work.path.join("store-with"),
        args.size_bytes,
    )?;
    with.remote = remote.clone();
    report.config_without = serde_json::to_value(&without).map_err(|e| e.to_string())?;
    report.config_with = serde_json::to_value(&with).map_err(|e| e.to_string())?;

    let last_step = to_u64(args.snapshots);
    let mut daemon = start_daemon(&binary, &work.path, "gpusnapd-without", &without)?;
    report.snapshots_without =
        persist_run(&daemon, &state, args, copy_threads, "without", &mut |_| {})?;
    stop_daemon(&mut daemon)?;
    drop(daemon);
    remove_dir(&without.store.root)?;

    // The same daemon config, a plain uploader beside it from the first
    // commit on, as the daemon's own uploader starts.
    let plain = plain_client(&remote)?;
    let file =
        std::fs::File::open(&upload_file).map_err(|e| format!("{}: {e}", upload_file.display()))?;
    let file = Arc::new(file);
    let file_len = report.file_bytes;
    let mut daemon = start_daemon(&binary, &work.path, "gpusnapd-beside-plain", &without)?;
    let mut beside: Option<PlainUploads> = None;
    let runs = persist_run(
        &daemon,
        &state,
        args,
        copy_threads,
        "beside plain",
        &mut |step| {
            if step == 1 {
                beside = Some(PlainUploads::start(
                    runtime.handle().clone(),
                    plain.clone(),
                    Arc::clone(&file),
                    file_len,
                    args.clone(),
                ));
            }
        },
    );
    let times = beside.map(PlainUploads::stop).transpose();
    report.snapshots_beside_plain = runs?;
    report.plain_beside_upload_s = times?.unwrap_or_default();
    stop_daemon(&mut daemon)?;
    drop(daemon);
    drop(file);
    remove_dir(&without.store.root)?;
    remove_dir(&work.path.join("upload-store"))?;
    eprintln!(
        "plain uploads beside the daemon: {} of {} (s): {:?}",
        report.plain_beside_upload_s.len(),
        human_bytes(file_len),
        report.plain_beside_upload_s
    );

    let mut daemon = start_daemon(&binary, &work.path, "gpusnapd-with", &with)?;
    report.snapshots_with = persist_run(&daemon, &state, args, copy_threads, "with", &mut |_| {})?;
    report.daemon_uploads = wait_complete(&daemon, last_step, args.size_bytes)?;
    eprintln!(
        "step {last_step} complete in the object store {:.2} s after its commit",
        report.daemon_uploads.last_step_complete_after_s
    );
    stop_daemon(&mut daemon)?;
    drop(daemon);

    let data_key = Keys::new(&remote.prefix)
        .data(&SnapshotId::new(JOB, 0, last_step).map_err(|e| format!("snapshot id: {e}"))?);
    for round in 1..=args.repeats {
        cache.drop_cache();
        let t = Instant::now();
        let fetched = runtime.block_on(ranged_gets(&plain, &data_key, args))?;
        let ranged_gets_s = t.elapsed().as_secs_f64();
        let root = work.path.join(format!("store-restore-{round}"));
        crate::workdir::refuse_existing(&root)?;
        let mut config = daemon_config(socket.path(), &root, args.size_bytes)?;
        config.remote = remote.clone();
        let mut daemon = start_daemon(
            &binary,
            &work.path,
            &format!("gpusnapd-restore-{round}"),
            &config,
        )?;
        let mut client = connect(&daemon, copy_threads)?;
        state.register(&mut client)?;
        client
            .sync_registration()
            .map_err(|e| with_log(&format!("registering: {e}"), &daemon))?;
        cache.drop_cache();
        let restore = restore_checked(&mut client, &state, last_step, RestoreSource::Remote)
            .map_err(|e| with_log(&e, &daemon))?;
        drop(client);
        stop_daemon(&mut daemon)?;
        drop(daemon);
        remove_dir(&root)?;
        eprintln!(
            "download round {round}: ranged GETs {ranged_gets_s:.3} s ({:.1} MB/s), \
             restore from remote on a fresh daemon {:.3} s (daemon fill {:.3} s, copy {:.3} s), verified",
            fetched as f64 / 1e6 / ranged_gets_s,
            restore.wall_s,
            restore.daemon_fill_s,
            restore.copy_s
        );
        report.downloads.push(DownloadRun {
            ranged_gets_s,
            ranged_gets_mb_per_s: fetched as f64 / 1e6 / ranged_gets_s,
            ranged_gets_bytes: fetched,
            restore,
        });
    }
    drop(server);
    report.wall_s = started.elapsed().as_secs_f64();
    report.summarize();
    Ok(report)
}

/// Refuses a run that does not fit in a test server (see
/// [`SERVER_CAPACITY_BYTES`]) or in memory (the trainer's state, one
/// staging slot, the hot tier, and the server's objects when they are on
/// tmpfs).
fn check_room(args: &RemoteBench, server_in_memory: bool) -> Result<(), String> {
    // The first server: ours and the peer's per round; the second: the
    // daemon's snapshots and the plain uploads beside the other daemon.
    let objects = to_u64(
        args.repeats
            .saturating_mul(2)
            .max(args.snapshots.saturating_mul(2)),
    );
    let stored = args.size_bytes.saturating_mul(objects);
    let in_memory = if server_in_memory { stored } else { 0 };
    let need = args
        .size_bytes
        .saturating_mul(3)
        .saturating_add(in_memory)
        .saturating_add(MEMORY_MARGIN_BYTES);
    if let Some(available) = sys::mem_available_bytes()
        && need > available
    {
        return Err(format!(
            "the run holds three copies of the state (trainer, one staging slot, hot tier), {} \
             of objects in the S3 server's tmpfs and a {} margin: {}, but only {} is available; \
             pass a smaller --size, or --server-dir on a disk",
            human_bytes(in_memory),
            human_bytes(MEMORY_MARGIN_BYTES),
            human_bytes(need),
            human_bytes(available)
        ));
    }
    if stored > SERVER_CAPACITY_BYTES {
        return Err(format!(
            "one S3 server would hold {} ({} objects of --size: 2 x --repeats on the first, \
             2 x --snapshots on the second), more than the {} a test server holds; pass a smaller \
             --size, --repeats or --snapshots",
            human_bytes(stored),
            objects,
            human_bytes(SERVER_CAPACITY_BYTES)
        ));
    }
    Ok(())
}

fn new_report(
    args: &RemoteBench,
    dir: &Path,
    gpusnapd: &Path,
    cache: &CacheDropper,
    tensors: usize,
) -> RemoteReport {
    RemoteReport {
        benchmark: "remote",
        note: NOTE,
        upload_mb_per_s: None,
        plain_upload_mb_per_s: None,
        upload_vs_plain: None,
        persist_with_uploads_mb_per_s: None,
        persist_without_uploads_mb_per_s: None,
        persist_with_vs_without: None,
        persist_beside_plain_uploads_mb_per_s: None,
        persist_with_vs_beside_plain: None,
        daemon_upload_mb_per_s: None,
        plain_beside_upload_mb_per_s: None,
        daemon_upload_vs_plain_beside: None,
        client_persist_with_uploads_mb_per_s: None,
        client_persist_without_uploads_mb_per_s: None,
        client_persist_with_vs_without: None,
        restore_remote_s: None,
        restore_remote_mb_per_s: None,
        ranged_gets_s: None,
        ranged_gets_mb_per_s: None,
        ranged_gets_vs_restore: None,
        targets: Targets::default(),
        meets_upload_target: None,
        meets_persist_target: None,
        size_bytes: args.size_bytes,
        file_bytes: 0,
        tensors,
        part_bytes: args.part_bytes,
        concurrency: args.concurrency,
        repeats: args.repeats,
        snapshots_requested: args.snapshots,
        smoke: args.smoke,
        page_cache_dropped: cache.works,
        endpoint: String::new(),
        remote_config: serde_json::Value::Null,
        config_without: serde_json::Value::Null,
        config_with: serde_json::Value::Null,
        date: sys::utc_now(),
        host: sys::host(),
        kernel: sys::kernel(),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        dir: dir.display().to_string(),
        server_dir: String::new(),
        server_in_memory: false,
        gpusnapd: gpusnapd.display().to_string(),
        wall_s: 0.0,
        uploads: Vec::new(),
        snapshots_without: Vec::new(),
        snapshots_with: Vec::new(),
        snapshots_beside_plain: Vec::new(),
        plain_beside_upload_s: Vec::new(),
        daemon_uploads: DaemonUploads::default(),
        downloads: Vec::new(),
        errors: Vec::new(),
    }
}

/// A server in `dir`, its credentials file made private (the daemon warns
/// about one others can read).
fn start_server(dir: &Path) -> Result<S3Server, String> {
    use std::os::unix::fs::PermissionsExt;
    let server =
        S3Server::start(dir).map_err(|e| format!("starting the S3 server (SeaweedFS): {e}"))?;
    let creds = server.credentials_file();
    std::fs::set_permissions(creds, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod 0600 {}: {e}", creds.display()))?;
    Ok(server)
}

fn remove_dir(dir: &Path) -> Result<(), String> {
    std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))
}

/// The `[remote]` table for `server` under `prefix`: the testkit's
/// connection keys, the daemon's default timeouts (not the tests' short
/// ones), and the run's part size and concurrency.
fn remote_config(
    server: &S3Server,
    prefix: &str,
    args: &RemoteBench,
) -> Result<RemoteConfig, String> {
    let mut table = toml::Table::new();
    for (key, text) in server.remote_settings(prefix) {
        let parsed: toml::Table = toml::from_str(&format!("v = {text}"))
            .map_err(|e| format!("remote.{key} = {text}: {e}"))?;
        let value = parsed
            .get("v")
            .cloned()
            .ok_or_else(|| format!("remote.{key} = {text}: no value"))?;
        table.insert(key.to_owned(), value);
    }
    let mut config: RemoteConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e| format!("the testkit's [remote] settings: {e}"))?;
    let defaults = RemoteConfig::default();
    config.request_timeout_s = defaults.request_timeout_s;
    config.retry_deadline_s = defaults.retry_deadline_s;
    config.part_bytes = ByteSize(args.part_bytes);
    config.concurrency = args.concurrency;
    config
        .validate()
        .map_err(|e| format!("the benchmark's [remote] table: {e}"))?;
    Ok(config)
}

/// The peer's client: object_store's AmazonS3 for the same bucket, with
/// the same credentials, timeouts and retries as the tier's `Bucket`.
fn plain_client(config: &RemoteConfig) -> Result<AmazonS3, String> {
    let credentials = Credentials::load(config.credentials_file.as_deref(), |k| {
        std::env::var(k).ok()
    })
    .map_err(|e| e.to_string())?;
    let options = ClientOptions::new()
        .with_allow_http(config.is_http())
        .with_timeout(config.request_timeout())
        .with_connect_timeout(Duration::from_secs(5).min(config.request_timeout()));
    let retry = RetryConfig {
        max_retries: 2,
        retry_timeout: config.request_timeout(),
        ..RetryConfig::default()
    };
    AmazonS3Builder::new()
        .with_endpoint(&config.endpoint)
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_access_key_id(&credentials.access_key_id)
        .with_secret_access_key(&credentials.secret_access_key)
        .with_virtual_hosted_style_request(false)
        .with_client_options(options)
        .with_retry(retry)
        .build()
        .map_err(|e| format!("the plain S3 client: {e}"))
}

/// The upload figure on a server of its own, killed (and its data
/// removed) afterwards.
fn upload_figure(
    args: &RemoteBench,
    work: &Path,
    servers: &Path,
    runtime: &tokio::runtime::Runtime,
    cache: &CacheDropper,
    specs: &[gpusnap::TensorSpec],
    report: &mut RemoteReport,
) -> Result<PathBuf, String> {
    let t = Instant::now();
    let server_dir = servers.join("s3-upload");
    let server = start_server(&server_dir)?;
    eprintln!(
        "S3 server #1 up at {} in {:.1} s",
        server.endpoint(),
        t.elapsed().as_secs_f64()
    );
    let config = remote_config(&server, UPLOAD_PREFIX, args)?;
    // Kept for as long as the tier is used: a dropped sender reads as
    // "stopping".
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let mut tier = Tier::open(&config, None, stopping, None)
        .map_err(|e| format!("opening the remote tier: {e}"))?;
    let plain = plain_client(&config)?;

    let store_root = work.join("upload-store");
    let store = Store::open(StoreConfig {
        root: store_root.clone(),
        ..StoreConfig::default()
    })
    .map_err(|e| format!("opening the local store {}: {e}", store_root.display()))?;
    let id = SnapshotId::new(JOB, 0, 1).map_err(|e| format!("snapshot id: {e}"))?;
    let t = Instant::now();
    let mut fill = |offset: u64, buf: &mut [u8]| {
        pattern_into(offset, buf);
        Ok(())
    };
    store
        .write_snapshot(&id, specs, 1, Source::Stream(&mut fill))
        .map_err(|e| format!("committing the upload figure's snapshot: {e}"))?;
    let snapshot = store
        .find(JOB, 0, Some(1))
        .map_err(|e| format!("finding the committed snapshot: {e}"))?;
    let file_len = snapshot.manifest.file_len;
    report.file_bytes = file_len;
    eprintln!(
        "committed a {} data file into the local store in {:.1} s",
        human_bytes(file_len),
        t.elapsed().as_secs_f64()
    );
    let ours_parts = transfer::plan_parts(&snapshot.manifest, args.part_bytes).len();
    let data_path = snapshot.data_path();
    let file = Arc::new(
        std::fs::File::open(&data_path).map_err(|e| format!("{}: {e}", data_path.display()))?,
    );
    let mb = file_len as f64 / 1e6;
    for round in 1..=args.repeats {
        // Every round's objects under keys of their own: an upload whose
        // manifest is there already is not sent again.
        tier.keys = Keys::new(&format!("{UPLOAD_PREFIX}/ours-{round}"));
        let key = ObjectPath::from(format!(
            "{UPLOAD_PREFIX}/plain-{round}/{}",
            gpusnapd::store::paths::DATA_FILE
        ));
        let ours = || {
            cache.drop_cache();
            evict(&file)?;
            runtime.block_on(upload_ours(&tier, &snapshot, &store, file_len))
        };
        let plain = || {
            cache.drop_cache();
            evict(&file)?;
            let t = Instant::now();
            let parts = runtime.block_on(plain_upload(&plain, &file, file_len, &key, args))?;
            Ok::<_, String>((t.elapsed().as_secs_f64(), parts))
        };
        // Odd rounds ours first, even rounds the peer first: neither
        // always follows the other.
        let (ours_s, (plain_s, plain_parts)) = if round % 2 == 1 {
            let o = ours()?;
            (o, plain()?)
        } else {
            let p = plain()?;
            (ours()?, p)
        };
        eprintln!(
            "upload round {round}: ours {ours_s:.3} s = {:.1} MB/s, plain multipart {plain_s:.3} s = {:.1} MB/s",
            mb / ours_s,
            mb / plain_s
        );
        report.uploads.push(UploadRun {
            ours_s,
            ours_mb_per_s: mb / ours_s,
            plain_s,
            plain_mb_per_s: mb / plain_s,
            ours_parts,
            plain_parts,
        });
    }
    drop(file);
    drop(tier);
    drop(store);
    drop(server);
    remove_dir(&server_dir)?;
    Ok(data_path)
}

/// `transfer::upload` of `snapshot`, timed; it must send every byte.
async fn upload_ours(
    tier: &Tier,
    snapshot: &Snapshot,
    store: &Store,
    file_len: u64,
) -> Result<f64, String> {
    let t = Instant::now();
    let uploaded = transfer::upload(tier, snapshot, store.checksum())
        .await
        .map_err(|e| format!("transfer::upload: {e}"))?;
    let s = t.elapsed().as_secs_f64();
    match uploaded {
        Uploaded::Sent { bytes, .. } if bytes == file_len => Ok(s),
        other => Err(format!(
            "transfer::upload did not send the {file_len}-byte file: {other:?}"
        )),
    }
}

/// The peer: a multipart upload of `file` as a plain client does it:
/// `concurrency` parts of `part_bytes` in flight, each read with pread and
/// put. Returns the parts sent.
async fn plain_upload(
    store: &AmazonS3,
    file: &Arc<std::fs::File>,
    len: u64,
    key: &ObjectPath,
    args: &RemoteBench,
) -> Result<usize, String> {
    let request = |what: &str, e: &dyn std::fmt::Display| format!("plain {what} {key}: {e}");
    let id = store
        .create_multipart(key)
        .await
        .map_err(|e| request("create_multipart", &e))?;
    let ranges = split(len, args.part_bytes);
    let count = ranges.len();
    let parts: Vec<PartId> = futures::stream::iter(ranges.into_iter().enumerate())
        .map(|(index, range)| {
            let file = Arc::clone(file);
            let id = &id;
            async move {
                let bytes = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; to_usize(range.end - range.start)];
                    file.read_exact_at(&mut buf, range.start)
                        .map(|()| Bytes::from(buf))
                })
                .await
                .map_err(|e| request("read", &e))?
                .map_err(|e| request("pread", &e))?;
                store
                    .put_part(key, id, index, PutPayload::from(bytes))
                    .await
                    .map_err(|e| request("put_part", &e))
            }
        })
        .buffered(args.concurrency)
        .try_collect()
        .await?;
    store
        .complete_multipart(key, &id, parts)
        .await
        .map_err(|e| request("complete_multipart", &e))?;
    Ok(count)
}

/// The peer of the restore: HEAD, then the whole object by ranged GETs of
/// `part_bytes`, `concurrency` in flight, kept in memory. Returns the
/// bytes fetched.
async fn ranged_gets(
    store: &AmazonS3,
    key: &ObjectPath,
    args: &RemoteBench,
) -> Result<u64, String> {
    let meta = store
        .head(key)
        .await
        .map_err(|e| format!("plain HEAD {key}: {e}"))?;
    let pieces: Vec<Bytes> = futures::stream::iter(split(meta.size, args.part_bytes))
        .map(|range| async move {
            store
                .get_range(key, range)
                .await
                .map_err(|e| format!("plain ranged GET {key}: {e}"))
        })
        .buffered(args.concurrency)
        .try_collect()
        .await?;
    let fetched: u64 = pieces.iter().map(|p| to_u64(p.len())).sum();
    if fetched != meta.size {
        return Err(format!(
            "the ranged GETs of {key} returned {fetched} bytes of {}",
            meta.size
        ));
    }
    Ok(fetched)
}

/// Drops `file`'s pages from the page cache (clean after its commit), so
/// the next read of it comes from the disk; needs no root.
fn evict(file: &std::fs::File) -> Result<(), String> {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    posix_fadvise(file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)
        .map_err(|e| format!("posix_fadvise(DONTNEED): {e}"))
}

/// `0..len` in pieces of `part` bytes (the last shorter).
fn split(len: u64, part: u64) -> Vec<Range<u64>> {
    (0..len.div_ceil(part))
        .map(|i| i * part..((i + 1) * part).min(len))
        .collect()
}

/// The upload figure's data: a word pattern from the data offset.
fn pattern_into(offset: u64, buf: &mut [u8]) {
    let mut word = offset / 8;
    let mut skip = to_usize(offset % 8);
    let mut at = 0;
    while at < buf.len() {
        let bytes = word.wrapping_mul(GOLDEN).rotate_left(17).to_le_bytes();
        let take = (8 - skip).min(buf.len() - at);
        if let (Some(dst), Some(src)) = (buf.get_mut(at..at + take), bytes.get(skip..skip + take)) {
            dst.copy_from_slice(src);
        }
        at += take;
        skip = 0;
        word += 1;
    }
}

/// A plain uploader beside a daemon: the upload figure's file sent again
/// and again with [`plain_upload`] (at most `--snapshots` times, each under
/// keys of its own) until stopped.
#[derive(Debug)]
struct PlainUploads {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<f64>, String>>,
}

impl PlainUploads {
    fn start(
        runtime: tokio::runtime::Handle,
        client: AmazonS3,
        file: Arc<std::fs::File>,
        len: u64,
        args: RemoteBench,
    ) -> PlainUploads {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut times = Vec::new();
            while !stopped.load(Ordering::Relaxed) && times.len() < args.snapshots {
                let key = ObjectPath::from(format!(
                    "{UPLOAD_PREFIX}/beside-{}/{}",
                    times.len() + 1,
                    gpusnapd::store::paths::DATA_FILE
                ));
                // Read from the disk each time, as the daemon reads each
                // newly committed file.
                evict(&file)?;
                let t = Instant::now();
                runtime.block_on(plain_upload(&client, &file, len, &key, &args))?;
                times.push(t.elapsed().as_secs_f64());
            }
            Ok(times)
        });
        PlainUploads { stop, thread }
    }

    /// Stops after the upload in flight; the time of each one sent.
    fn stop(self) -> Result<Vec<f64>, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| "the plain uploader thread panicked".to_owned())?
    }
}

/// One daemon's persist figure: register, then `--snapshots` snapshots back
/// to back (each waited on until committed, the next taken at once);
/// `committed(step)` after each commit.
fn persist_run(
    daemon: &DaemonProcess,
    state: &TrainerState,
    args: &RemoteBench,
    copy_threads: usize,
    what: &str,
    committed: &mut dyn FnMut(u64),
) -> Result<Vec<SnapshotRun>, String> {
    let mut client = connect(daemon, copy_threads)?;
    state.register(&mut client)?;
    client
        .sync_registration()
        .map_err(|e| with_log(&format!("registering: {e}"), daemon))?;
    let mut runs = Vec::new();
    for step in 1..=to_u64(args.snapshots) {
        let run = snapshot_and_commit(&mut client, state, step, args.size_bytes)
            .map_err(|e| with_log(&e, daemon))?;
        eprintln!(
            "step {step} ({what} uploads): persist {:.3} s (daemon's) = {:.1} MB/s, {:.3} s captured to committed",
            run.daemon_persist_s,
            args.size_bytes as f64 / 1e6 / run.daemon_persist_s,
            run.persist_s
        );
        runs.push(run);
        committed(step);
    }
    Ok(runs)
}

/// Waits until the daemon reports `step` complete in the object store
/// (`gpusnap_remote_complete_step`), then reads its upload figures.
fn wait_complete(
    daemon: &DaemonProcess,
    step: u64,
    size_bytes: u64,
) -> Result<DaemonUploads, String> {
    let metric = |series: &str| {
        daemon
            .metric(series)
            .map_err(|e| with_log(&format!("scraping /metrics: {e}"), daemon))
    };
    let started = Instant::now();
    let limit = COMPLETE_WAIT_BASE + Duration::from_secs(size_bytes.div_ceil(1 << 30) * 60);
    let complete = format!("gpusnap_remote_complete_step{{job=\"{JOB}\"}}");
    loop {
        if metric(&complete)?.is_some_and(|s| s >= step as f64) {
            break;
        }
        if started.elapsed() > limit {
            return Err(with_log(
                &format!(
                    "step {step} was not complete in the object store within {} s",
                    limit.as_secs()
                ),
                daemon,
            ));
        }
        std::thread::sleep(POLL);
    }
    let last_step_complete_after_s = started.elapsed().as_secs_f64();
    let uploads = |outcome: &str| {
        metric(&format!(
            "gpusnap_remote_uploads_total{{job=\"{JOB}\",outcome=\"{outcome}\"}}"
        ))
    };
    let sum = metric(&format!(
        "gpusnap_remote_upload_seconds_sum{{job=\"{JOB}\"}}"
    ))?;
    let count = metric(&format!(
        "gpusnap_remote_upload_seconds_count{{job=\"{JOB}\"}}"
    ))?;
    Ok(DaemonUploads {
        uploaded: Some(uploads("uploaded")?.unwrap_or(0.0)),
        skipped: Some(uploads("skipped")?.unwrap_or(0.0)),
        upload_seconds_mean: match (sum, count) {
            (Some(s), Some(n)) if n > 0.0 => Some(s / n),
            _ => None,
        },
        upload_bytes_total: metric(&format!(
            "gpusnap_remote_upload_bytes_total{{job=\"{JOB}\"}}"
        ))?,
        last_step_complete_after_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_object_once() {
        assert_eq!(split(10, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(split(8, 4), vec![0..4, 4..8]);
        assert!(split(0, 4).is_empty());
    }

    #[test]
    fn the_pattern_does_not_depend_on_how_it_is_cut() {
        let mut whole = vec![0u8; 100];
        pattern_into(3, &mut whole);
        let mut cut = vec![0u8; 100];
        let (a, b) = cut.split_at_mut(13);
        pattern_into(3, a);
        pattern_into(16, b);
        assert_eq!(whole, cut);
    }
}
