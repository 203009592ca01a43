//! The running daemon: shared state, the control socket, the accept loop and
//! an orderly stop.
//!
//! Stop (SIGTERM): systemd hears STOPPING=1, the socket stops accepting,
//! every connection is closed (a capture in progress leaves nothing
//! written), then what was captured is persisted until the
//! `shutdown_deadline_s` passes. Exit 0 either way; what did not commit in
//! time was never acknowledged as committed.

pub mod conn;
pub mod wire;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::hot_tier::HotTier;
use crate::metrics::Metrics;
use crate::owners::Owners;
use crate::persist::{Engine, SessionCore};
use crate::ranks::Ranks;
use crate::staging::StagingBudget;
use crate::store::{Store, StoreError};

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
    /// Flips to true once: the daemon is stopping.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    pub started: Instant,
    sessions: Mutex<HashMap<u64, Arc<SessionCore>>>,
    clients: AtomicU64,
    next_conn: AtomicU64,
}

impl Daemon {
    /// Opens the store (choosing the I/O backend and running start-up
    /// recovery) and builds the shared state.
    pub fn open(config: Config) -> Result<Arc<Daemon>, ServerError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::new()?);
        let store = Arc::new(Store::open(config.store.clone())?);
        metrics
            .io_backend
            .with_label_values(&[store.storage().backend().name()])
            .set(1);
        let ranks = Arc::new(Ranks::default());
        let listing = store.list(None)?;
        for s in &listing.snapshots {
            let m = &s.manifest;
            ranks.seed(&(m.job.clone(), m.rank), m.step);
            let g = metrics
                .last_committed_step
                .with_label_values(&[m.job.as_str()]);
            g.set(g.get().max(i64::try_from(m.step).unwrap_or(i64::MAX)));
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
            Arc::clone(&metrics),
        ));
        let engine = Engine::new(
            Arc::clone(&store),
            Arc::clone(&hot),
            Arc::clone(&ranks),
            Arc::clone(&metrics),
            config.persist.concurrent_writes,
        );
        let (shutdown, _) = tokio::sync::watch::channel(false);
        Ok(Arc::new(Daemon {
            config,
            store,
            metrics,
            budget,
            hot,
            owners: Owners::default(),
            ranks,
            engine,
            shutdown,
            started: Instant::now(),
            sessions: Mutex::new(HashMap::new()),
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

    fn sessions_insert(&self, id: u64, core: Arc<SessionCore>) {
        self.lock_sessions().insert(id, core);
    }

    fn sessions_remove(&self, id: u64) {
        self.lock_sessions().remove(&id);
    }

    fn sessions_snapshot(&self) -> Vec<Arc<SessionCore>> {
        let mut all: Vec<_> = self.lock_sessions().values().cloned().collect();
        all.sort_by_key(|c| c.conn_id);
        all
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<SessionCore>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
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
                let clients = daemon.clients.fetch_add(1, Ordering::SeqCst) + 1;
                daemon.metrics.clients_connected.set(i64::try_from(clients).unwrap_or(i64::MAX));
                let id = daemon.next_conn.fetch_add(1, Ordering::SeqCst);
                let d = Arc::clone(&daemon);
                let over = clients > d.config.daemon.max_clients as u64;
                connections.spawn(async move {
                    if over {
                        refuse_over_limit(stream, d.config.daemon.max_clients).await;
                    } else {
                        conn::serve(Arc::clone(&d), id, stream).await;
                    }
                    let left = d.clients.fetch_sub(1, Ordering::SeqCst) - 1;
                    d.metrics.clients_connected.set(i64::try_from(left).unwrap_or(i64::MAX));
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
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
    while connections.join_next().await.is_some() {}
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
        .unwrap_or(false);
    if !drained {
        tracing::error!(
            in_flight = daemon.engine.in_flight(),
            "shutdown deadline passed with snapshots still persisting; they are not committed and start-up recovery removes their partial directories"
        );
    }
    if let Some(task) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    tracing::info!("gpusnapd stopped");
    Ok(())
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
