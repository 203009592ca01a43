//! The running daemon: shared state, the control socket, the accept loop and
//! an orderly stop.
//!
//! Stop (SIGTERM): systemd hears STOPPING=1, the socket stops accepting,
//! every connection is closed (a capture in progress leaves nothing
//! written), then what was captured is persisted until the
//! `shutdown_deadline_s` passes. Exit 0 either way; what did not commit in
//! time was never acknowledged as committed. Closing is bounded: every wait
//! of a connection (a slot, the rank's persists, a ring chunk) ends with
//! `ShuttingDown` when the daemon stops, and connections still open after
//! [`CONNECTIONS_CLOSE_MAX`] (a write to a client that does not read) are
//! aborted, their guards releasing what they held.
//!
//! A panic in a connection task ends that connection only: everything it
//! held is a guard ([`RankHold`](crate::ranks::RankHold), [`SessionEntry`],
//! the slot guards of [`crate::staging`], the connected-clients count), so
//! dropping the task releases it; the accept loop logs the panic and goes
//! on. Panics in the persist engine are caught there (see
//! [`crate::persist`]). The daemon is built with `panic = "unwind"` on
//! purpose: aborting would drop every other trainer's connection for one
//! bad request.
//!
//! * [`conn`]: one connection, its state machine and its loop;
//!   [`capture`]: `Begin`, `ChunkFilled`, `Captured`, `Abort`;
//!   [`query`]: `List`, `Describe`, `Status`, read-only;
//!   [`errors`]: every error in its wire form; [`wire`]: frames.

pub mod capture;
pub mod conn;
pub mod errors;
pub mod query;
pub mod wire;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gpusnap_proto::convert::{gauge, to_u64};

use crate::config::Config;
use crate::hot_tier::HotTier;
use crate::metrics::Metrics;
use crate::owners::Owners;
use crate::persist::{Engine, SessionCore};
use crate::ranks::{RankKey, Ranks};
use crate::remote::Remote;
use crate::staging::StagingBudget;
use crate::store::{Store, StoreError};
use crate::testing::Hooks;

/// Why the daemon cannot start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("metrics: {0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("socket {path}: {why}")]
    Socket { path: PathBuf, why: String },
    #[error("metrics listener {addr}: {source}")]
    MetricsListen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("remote tier: {0}")]
    Remote(#[from] crate::remote::RemoteError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Everything connections and the engine share.
#[derive(Debug)]
pub struct Daemon {
    pub config: Config,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub budget: Arc<StagingBudget>,
    pub hot: Arc<HotTier>,
    pub owners: Owners,
    pub ranks: Arc<Ranks>,
    pub engine: Arc<Engine>,
    /// The object-store tier (`[remote]`), when enabled.
    pub remote: Option<Arc<Remote>>,
    /// Test-only fault injection (`[testing]`); unarmed in production.
    pub hooks: Arc<Hooks>,
    /// Flips to true once: the daemon is stopping.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    pub started: Instant,
    pub sessions: Arc<Sessions>,
    clients: AtomicU64,
    next_conn: AtomicU64,
}

impl Daemon {
    /// Opens the store (choosing the I/O backend and running start-up
    /// recovery) and builds the shared state.
    pub fn open(config: Config) -> Result<Arc<Daemon>, ServerError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new()?);
        // The latency backend when `[testing] delays` asks (validated above:
        // only with GPUSNAP_TESTING=1).
        let mut store = crate::testing::open_store(config.store.clone(), config.testing.as_ref())?;
        // Job directories appear only through claims, with their OWNER
        // inside (`crate::owners`): a commit never makes one.
        store.set_job_dirs(crate::store::JobDirs::Claimed);
        let store = Arc::new(store);
        metrics
            .io_backend
            .with_label_values(&[store.storage().backend().name()])
            .set(1);
        let ranks = Arc::new(Ranks::default());
        let listing = store.list(None)?;
        for s in &listing.snapshots {
            let m = &s.manifest;
            ranks.seed(&RankKey::new(m.job.clone(), m.rank), m.step);
            let g = metrics
                .last_committed_step
                .with_label_values(&[m.job.as_str()]);
            g.set(g.get().max(gauge(m.step)));
        }
        for invalid in &listing.invalid {
            tracing::warn!(dir = %invalid.dir.display(), error = %invalid.error, "a directory named like a snapshot is not one; it is never restored (gpusnapctl verify tells more)");
        }
        tracing::info!(
            root = %store.root().display(),
            backend = %store.storage().backend(),
            snapshots = listing.snapshots.len(),
            "store open"
        );
        let budget = StagingBudget::new(config.staging.budget_bytes.0, Arc::clone(&metrics));
        let hot = Arc::new(HotTier::new(
            config.hot_tier.budget_bytes.0,
            Arc::clone(store.checksum()),
            Arc::clone(&metrics),
        ));
        let hooks = Arc::new(Hooks::new(config.testing.as_ref()));
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let remote = if config.remote.enabled {
            let remote = Remote::open(
                &config.remote,
                Arc::clone(&store),
                Some(Arc::clone(&hot)),
                Arc::clone(&metrics),
                shutdown.subscribe(),
            )?;
            tracing::info!(
                endpoint = %config.remote.endpoint,
                bucket = %config.remote.bucket,
                prefix = %config.remote.prefix,
                "remote tier enabled"
            );
            Some(Arc::new(remote))
        } else {
            None
        };
        let engine = Engine::new(
            Arc::clone(&store),
            Arc::clone(&hot),
            Arc::clone(&ranks),
            Arc::clone(&metrics),
            Arc::clone(&hooks),
            &config.persist,
            remote.clone(),
        );
        Ok(Arc::new(Daemon {
            config,
            store,
            metrics,
            budget,
            hot,
            owners: Owners::default(),
            ranks,
            engine,
            remote,
            hooks,
            shutdown,
            started: Instant::now(),
            sessions: Arc::new(Sessions::default()),
            clients: AtomicU64::new(0),
            next_conn: AtomicU64::new(1),
        }))
    }

    pub fn clients_connected(&self) -> u64 {
        self.clients.load(Ordering::SeqCst)
    }

    pub fn is_stopping(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// The registered connections, as status reports them.
#[derive(Debug, Default)]
pub struct Sessions {
    by_conn: Mutex<HashMap<u64, Arc<SessionCore>>>,
}

/// A registration's entry in [`Sessions`]; removed when dropped.
#[derive(Debug)]
#[must_use = "the session is removed when the entry is dropped"]
pub struct SessionEntry {
    sessions: Arc<Sessions>,
    conn_id: u64,
}

impl Sessions {
    /// Lists `core` until the returned entry is dropped.
    pub fn enter(self: &Arc<Self>, core: Arc<SessionCore>) -> SessionEntry {
        let conn_id = core.conn_id;
        let before = self.lock().insert(conn_id, core);
        assert!(before.is_none(), "connection {conn_id} registered twice");
        SessionEntry {
            sessions: Arc::clone(self),
            conn_id,
        }
    }

    /// Every session, oldest connection first.
    pub fn snapshot(&self) -> Vec<Arc<SessionCore>> {
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by_key(|c| c.conn_id);
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SessionCore>>> {
        self.by_conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for SessionEntry {
    fn drop(&mut self) {
        let removed = self.sessions.lock().remove(&self.conn_id);
        // Never a panic in a Drop (a second one while unwinding aborts the
        // daemon): logged, and failing debug builds when not unwinding.
        if removed.is_none() {
            tracing::error!(
                conn = self.conn_id,
                "a session removed twice from the listing"
            );
        }
        debug_assert!(
            removed.is_some() || std::thread::panicking(),
            "session {} removed twice",
            self.conn_id
        );
    }
}

/// One accepted connection in the connected-clients count, until dropped
/// (its task ends, however it ends).
#[derive(Debug)]
struct ClientCount {
    daemon: Arc<Daemon>,
    /// Clients connected with this one.
    clients: u64,
}

impl ClientCount {
    fn enter(daemon: &Arc<Daemon>) -> ClientCount {
        let clients = daemon.clients.fetch_add(1, Ordering::SeqCst) + 1;
        daemon.metrics.clients_connected.set(gauge(clients));
        ClientCount {
            daemon: Arc::clone(daemon),
            clients,
        }
    }
}

impl Drop for ClientCount {
    fn drop(&mut self) {
        let left = self.daemon.clients.fetch_sub(1, Ordering::SeqCst) - 1;
        self.daemon.metrics.clients_connected.set(gauge(left));
    }
}

/// Logs how a connection task ended: a panic loudly and counted (what it
/// held was released as it was dropped), a cancellation as a warning.
fn connection_ended(metrics: &Metrics, joined: Result<(), tokio::task::JoinError>) {
    match joined {
        Ok(()) => {}
        Err(e) if e.is_panic() => {
            metrics.count_panic(crate::metrics::PanicSite::Connection);
            let panic = errors::panic_message(&*e.into_panic());
            tracing::error!(%panic, "a connection task panicked; it held nothing any more, and the daemon goes on serving");
        }
        Err(e) => tracing::warn!(error = %e, "a connection task was cancelled"),
    }
}

/// The control socket and whether this process made its file.
#[derive(Debug)]
pub struct ControlSocket {
    pub listener: StdUnixListener,
    /// Set when the daemon bound the path itself (removed at exit); unset for
    /// a socket systemd passed in.
    pub owned_path: Option<PathBuf>,
}

/// Takes the first socket systemd passed (`LISTEN_FDS`), or binds the
/// configured path: a stale socket file is replaced, a live one (another
/// daemon) is an error; mode and group as configured.
pub fn control_socket(config: &Config) -> Result<ControlSocket, ServerError> {
    let path = &config.daemon.socket;
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0 {
        let err = |why: String| ServerError::Socket {
            path: PathBuf::from("LISTEN_FDS#0"),
            why,
        };
        let listener = fds
            .take_unix_listener(0)
            .map_err(|e| err(format!("not a Unix stream listener: {e}")))?
            .ok_or_else(|| err("already taken".into()))?;
        tracing::info!("using the socket passed by systemd");
        return Ok(ControlSocket {
            listener,
            owned_path: None,
        });
    }
    let err = |why: String| ServerError::Socket {
        path: path.clone(),
        why,
    };
    if let Some(parent) = path.parent()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(|e| err(format!("creating its directory: {e}")))?;
    }
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(err("another daemon is listening on it".into())),
            Err(_) => std::fs::remove_file(path)
                .map_err(|e| err(format!("removing a stale socket: {e}")))?,
        }
    }
    let listener = StdUnixListener::bind(path).map_err(|e| err(e.to_string()))?;
    let mode = config
        .socket_mode()
        .map_err(|why| err(format!("daemon.socket_mode: {why}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err(format!("chmod {mode:o}: {e}")))?;
    if let Some(group) = &config.daemon.socket_group {
        let gid = resolve_group(group).map_err(|why| err(format!("daemon.socket_group: {why}")))?;
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| err(format!("chown to group {group}: {e}")))?;
    }
    tracing::info!(socket = %path.display(), mode = format!("{mode:o}"), "listening");
    Ok(ControlSocket {
        listener,
        owned_path: Some(path.clone()),
    })
}

fn resolve_group(group: &str) -> Result<nix::unistd::Gid, String> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(nix::unistd::Gid::from_raw(n));
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(format!("no group named {group:?}")),
        Err(e) => Err(format!("looking up group {group:?}: {e}")),
    }
}

/// Serves until `stop` resolves, then stops in order (see the module doc).
pub async fn serve(
    daemon: Arc<Daemon>,
    socket: ControlSocket,
    metrics_listener: Option<tokio::net::TcpListener>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    socket.listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(socket.listener)?;
    let metrics_task = metrics_listener.map(|l| {
        let metrics = Arc::clone(&daemon.metrics);
        let d = Arc::clone(&daemon);
        let healthy: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || !d.is_stopping());
        let mut stopped = daemon.shutdown.subscribe();
        tokio::spawn(async move {
            let until = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::metrics::serve(l, metrics, healthy, until).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        })
    });
    // The uploader runs beside the connections and never blocks them: a
    // lane's commit tells it (`Remote::committed`), and it stops with the
    // daemon (an upload cut short leaves no manifest, so nothing listed).
    let remote_task = daemon
        .remote
        .as_ref()
        .map(|remote| tokio::spawn(Arc::clone(remote).run(daemon.shutdown.subscribe())));
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "sd_notify READY failed");
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "gpusnapd ready");
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let counted = ClientCount::enter(&daemon);
                let id = daemon.next_conn.fetch_add(1, Ordering::SeqCst);
                let d = Arc::clone(&daemon);
                let over = counted.clients > to_u64(d.config.daemon.max_clients);
                connections.spawn(async move {
                    let _counted = counted;
                    if over {
                        refuse_over_limit(stream, d.config.daemon.max_clients).await;
                    } else {
                        conn::serve(d, id, stream).await;
                    }
                });
            }
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                connection_ended(&daemon.metrics, joined);
            }
        }
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
        tracing::warn!(error = %e, "sd_notify STOPPING failed");
    }
    tracing::info!("stopping: no new connections; closing the open ones");
    drop(listener);
    if let Some(path) = &socket.owned_path {
        let _ = std::fs::remove_file(path);
    }
    daemon.shutdown.send_replace(true);
    close_connections(&daemon.metrics, &mut connections).await;
    let deadline = Duration::from_secs(daemon.config.daemon.shutdown_deadline_s);
    let engine = Arc::clone(&daemon.engine);
    let in_flight = engine.in_flight();
    if in_flight > 0 {
        tracing::info!(
            in_flight,
            deadline_s = deadline.as_secs(),
            "finishing captured snapshots"
        );
    }
    let drained = tokio::task::spawn_blocking(move || engine.wait_drained(deadline))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "waiting for the persists to drain failed");
            false
        });
    if !drained {
        tracing::error!(
            in_flight = daemon.engine.in_flight(),
            "shutdown deadline passed with snapshots still persisting; they are not committed and start-up recovery removes their partial directories"
        );
    }
    if let Some(task) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    if let Some(task) = remote_task
        && tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
    {
        tracing::warn!(
            "the remote uploader did not stop in 5 s; its open upload is aborted at the next start"
        );
    }
    tracing::info!("gpusnapd stopped");
    Ok(())
}

/// How long the open connections get to close once the daemon is stopping:
/// every wait of theirs has a shutdown branch, so only a write to a client
/// that does not read holds one longer.
pub const CONNECTIONS_CLOSE_MAX: Duration = Duration::from_secs(5);

/// Waits (at most [`CONNECTIONS_CLOSE_MAX`]) for every connection task to
/// end, then aborts those left: each is dropped at its next await, and its
/// guards release what it held. Waits as long again for the aborted ones.
async fn close_connections(metrics: &Metrics, connections: &mut tokio::task::JoinSet<()>) {
    async fn join_all(metrics: &Metrics, connections: &mut tokio::task::JoinSet<()>) {
        while let Some(joined) = connections.join_next().await {
            connection_ended(metrics, joined);
        }
    }
    if tokio::time::timeout(CONNECTIONS_CLOSE_MAX, join_all(metrics, connections))
        .await
        .is_ok()
    {
        return;
    }
    tracing::warn!(
        open = connections.len(),
        wait_s = CONNECTIONS_CLOSE_MAX.as_secs(),
        "connections still open after the close wait (a client that does not read?); aborting them"
    );
    connections.abort_all();
    if tokio::time::timeout(CONNECTIONS_CLOSE_MAX, join_all(metrics, connections))
        .await
        .is_err()
    {
        tracing::error!(
            open = connections.len(),
            "aborted connection tasks did not end; leaving them to the runtime's shutdown"
        );
    }
}

async fn refuse_over_limit(stream: tokio::net::UnixStream, limit: usize) {
    let (_, mut wr) = stream.into_split();
    let reply = gpusnap_proto::Reply {
        id: 0,
        body: gpusnap_proto::ReplyBody::error(
            gpusnap_proto::ErrorKind::Busy,
            format!("the daemon serves at most {limit} connections (daemon.max_clients)"),
        ),
    };
    // Before any handshake: the oldest version's words, which every
    // client reads.
    let _ = wire::write_reply(&mut wr, &reply, gpusnap_proto::PROTOCOL_VERSION_MIN).await;
}
