//! The real `gpusnapd` as a child process: its config written from
//! [`Settings`] into a scratch directory, started until its socket answers,
//! stopped with SIGTERM (SIGKILL after a bounded wait), killed, started
//! again on the same config and root, its log and `/metrics` read.
//!
//! Nothing is ever left running: dropping a [`DaemonProcess`] kills and
//! reaps a daemon that is still up, and a start that fails kills what it
//! spawned.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::endpoints::{SocketPath, free_port};
use crate::http::{self, HttpError};
use crate::settings::{Settings, SettingsError, Waits};

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(20);
/// Lines of the log an error message carries.
const LOG_TAIL_LINES: usize = 40;
/// Environment a daemon must not inherit: systemd's socket activation and
/// readiness protocol, and a log filter that would override the config's.
const ENV_REMOVED: [&str; 4] = ["LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET", "RUST_LOG"];

/// Why a daemon could not be started, stopped or killed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("finding a free port for metrics.listen: {0}")]
    Port(#[source] std::io::Error),
    #[error("starting {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("gpusnapd exited at start ({status}); its log:\n{log}")]
    ExitedAtStart { status: ExitStatus, log: String },
    #[error("gpusnapd did not listen on {} within {wait:?} (killed); its log:\n{log}", socket.display())]
    StartTimeout {
        socket: PathBuf,
        wait: Duration,
        log: String,
    },
    #[error("gpusnapd did not exit within {limit:?} of SIGTERM (killed); its log:\n{log}")]
    StopTimeout { limit: Duration, log: String },
    #[error("gpusnapd (pid {pid}) was not reaped within {limit:?} of SIGKILL")]
    NotReaped { pid: u32, limit: Duration },
    #[error("gpusnapd is not running")]
    NotRunning,
    #[error("gpusnapd is already running (pid {pid})")]
    AlreadyRunning { pid: u32 },
    #[error("signalling or waiting for gpusnapd (pid {pid}): {source}")]
    Wait {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// What to start: the binary, the directory its config and log go in
/// (`<dir>/<name>.toml`, `<dir>/<name>.log`), its settings and the waits.
#[derive(Debug, Clone)]
pub struct Launch {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub name: String,
    pub settings: Settings,
    pub waits: Waits,
}

impl Launch {
    /// A daemon named `gpusnapd` in `dir`.
    pub fn new(binary: &Path, dir: &Path, settings: Settings, waits: Waits) -> Launch {
        Launch {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            name: "gpusnapd".to_owned(),
            settings,
            waits,
        }
    }

    /// The file names' stem (two daemons in one directory need two).
    pub fn named(mut self, name: &str) -> Launch {
        name.clone_into(&mut self.name);
        self
    }

    /// Fills in what the settings leave out (`daemon.socket` in `dir`,
    /// `metrics.listen` on a free loopback port, `store.root` as
    /// `dir/store`), writes the config and starts the daemon on it.
    /// `daemon.shutdown_deadline_s` must be set: it bounds [`DaemonProcess::stop`].
    pub fn start(self) -> Result<DaemonProcess, LaunchError> {
        let Launch {
            binary,
            dir,
            name,
            mut settings,
            waits,
        } = self;
        let mut socket_dir = None;
        if settings.get("daemon", "socket").is_none() {
            let socket = SocketPath::in_dir(&dir).map_err(|source| LaunchError::Io {
                what: "making a socket directory for",
                path: dir.clone(),
                source,
            })?;
            settings.set_path("daemon", "socket", socket.path())?;
            socket_dir = Some(socket);
        }
        if settings.get("metrics", "listen").is_none() {
            let port = free_port().map_err(LaunchError::Port)?;
            settings.set("metrics", "listen", format!("127.0.0.1:{port}"))?;
        }
        if settings.get("store", "root").is_none() {
            settings.set_path("store", "root", &dir.join("store"))?;
        }
        let socket = settings.path("daemon", "socket")?;
        let metrics_addr = settings.string("metrics", "listen")?.to_owned();
        let root = settings.path("store", "root")?;
        let stop_limit = settings.seconds("daemon", "shutdown_deadline_s")? + waits.stop_grace;

        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, settings.to_toml()?).map_err(|source| LaunchError::Io {
            what: "writing",
            path: config_path.clone(),
            source,
        })?;
        let mut daemon = DaemonProcess {
            child: None,
            binary,
            settings,
            socket,
            metrics_addr,
            root,
            config_path,
            log_path: dir.join(format!("{name}.log")),
            stop_limit,
            waits,
            _socket_dir: socket_dir,
        };
        daemon.spawn()?;
        Ok(daemon)
    }
}

/// One daemon, running or stopped, on one config.
#[derive(Debug)]
pub struct DaemonProcess {
    /// First, so that it is gone before the socket directory is removed
    /// (`Drop` kills it before any field drops anyway).
    child: Option<Child>,
    binary: PathBuf,
    settings: Settings,
    socket: PathBuf,
    metrics_addr: String,
    root: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    stop_limit: Duration,
    waits: Waits,
    _socket_dir: Option<SocketPath>,
}

impl DaemonProcess {
    /// Starts the binary on this config (again, after a stop or a kill:
    /// same socket, same root) and waits until its socket accepts a
    /// connection. A daemon that exits first, or does not listen in time
    /// (then killed), is an error carrying its log.
    pub fn spawn(&mut self) -> Result<(), LaunchError> {
        if let Some(child) = &self.child {
            return Err(LaunchError::AlreadyRunning { pid: child.id() });
        }
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| LaunchError::Io { what, path, source }
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(io("opening", &self.log_path))?;
        let log_err = log.try_clone().map_err(io("opening", &self.log_path))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for name in ENV_REMOVED {
            command.env_remove(name);
        }
        let child = command.spawn().map_err(|source| LaunchError::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        let pid = child.id();
        self.child = Some(child);

        let deadline = Instant::now() + self.waits.start;
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .map(Child::try_wait)
                .transpose()
                .map_err(|source| LaunchError::Wait { pid, source })?
                .flatten();
            if let Some(status) = exited {
                self.child = None;
                return Err(LaunchError::ExitedAtStart {
                    status,
                    log: self.log_tail(LOG_TAIL_LINES),
                });
            }
            if Instant::now() >= deadline {
                self.kill()?;
                return Err(LaunchError::StartTimeout {
                    socket: self.socket.clone(),
                    wait: self.waits.start,
                    log: self.log_tail(LOG_TAIL_LINES),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, then waits up to `daemon.shutdown_deadline_s` and the stop
    /// grace for the exit: its status (whatever it is; the caller judges
    /// it). No exit in that time: SIGKILL, reaped, and an error.
    pub fn stop(&mut self) -> Result<ExitStatus, LaunchError> {
        let mut child = self.child.take().ok_or(LaunchError::NotRunning)?;
        let pid = child.id();
        let wait_error = |source| LaunchError::Wait { pid, source };
        signal(&child, Signal::SIGTERM).map_err(wait_error)?;
        if let Some(status) = wait_bounded(&mut child, self.stop_limit).map_err(wait_error)? {
            return Ok(status);
        }
        self.child = Some(child);
        self.kill()?;
        Err(LaunchError::StopTimeout {
            limit: self.stop_limit,
            log: self.log_tail(LOG_TAIL_LINES),
        })
    }

    /// SIGKILL and reap: the exit status. A daemon not reaped within the
    /// kill wait stays here (`Drop` tries again) and is an error.
    pub fn kill(&mut self) -> Result<ExitStatus, LaunchError> {
        let mut child = self.child.take().ok_or(LaunchError::NotRunning)?;
        let pid = child.id();
        let wait_error = |source| LaunchError::Wait { pid, source };
        signal(&child, Signal::SIGKILL).map_err(wait_error)?;
        match wait_bounded(&mut child, self.waits.kill).map_err(wait_error)? {
            Some(status) => Ok(status),
            None => {
                self.child = Some(child);
                Err(LaunchError::NotReaped {
                    pid,
                    limit: self.waits.kill,
                })
            }
        }
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The settings as written (with the socket, port and root filled in).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `metrics.listen`: `127.0.0.1:<port>`.
    pub fn metrics_addr(&self) -> &str {
        &self.metrics_addr
    }

    /// `store.root`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Where the daemon's stdout and stderr go (appended across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far (a log that cannot be read says why).
    pub fn log(&self) -> String {
        match std::fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => format!("(cannot read {}: {e})", self.log_path.display()),
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all.get(all.len().saturating_sub(lines)..)
            .unwrap_or_default()
            .join("\n")
    }

    /// `GET path` on the metrics listener: status and body.
    pub fn http_get(&self, path: &str) -> Result<(u16, String), HttpError> {
        http::http_get(&self.metrics_addr, path)
    }

    /// The body of `GET /metrics` (a status other than 200 is an error).
    pub fn metrics(&self) -> Result<String, HttpError> {
        http::http_get_ok(&self.metrics_addr, "/metrics")
    }

    /// The value of one sample of `/metrics` (`name{labels}`), if exported.
    pub fn metric(&self, series: &str) -> Result<Option<f64>, HttpError> {
        http::sample(&self.metrics()?, series)
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Err(e) = self.kill() {
            eprintln!("gpusnapd-testkit: {e}");
        }
    }
}

fn signal(child: &Child, signal: Signal) -> std::io::Result<()> {
    let pid = i32::try_from(child.id()).map_err(std::io::Error::other)?;
    // The child is not reaped yet, so its pid cannot have been reused.
    nix::sys::signal::kill(Pid::from_raw(pid), signal).map_err(std::io::Error::from)
}

/// The child's exit status once it exits within `limit`, else `None`.
fn wait_bounded(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}
