//! The real `gpusnapd` as a child process: a generated TOML config in the
//! run's directory, start (waits until the socket answers), SIGTERM stop,
//! restart on the same root, a scrape of `/metrics`. A daemon still running
//! when its value is dropped (an error path) is killed and reaped, so a run
//! never leaves one behind.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gpusnapd::config::Config;

/// How long a daemon may take to listen.
const START_WAIT: Duration = Duration::from_secs(60);
/// Extra time past `shutdown_deadline_s` before a stop turns into SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// Longest socket path `sockaddr_un` takes (108 bytes with the NUL).
const SOCKET_PATH_MAX: usize = 107;

/// The `gpusnapd` binary: `--gpusnapd`, else the one beside this
/// executable (`benches/run` builds both into `target/release/`).
pub fn binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("locating gpusnap-bench: {e}"))?
            .with_file_name("gpusnapd"),
    };
    if !path.is_file() {
        return Err(format!(
            "{} is not there; build it (cargo build --release -p gpusnapd, as benches/run does) or pass --gpusnapd",
            path.display()
        ));
    }
    Ok(path)
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("binding 127.0.0.1:0 for the metrics port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("metrics port: {e}"))
}

/// A socket path for `dir`: inside it when short enough, else in a fresh
/// directory under /tmp (sockaddr_un holds 107 bytes).
pub fn socket_path(dir: &Path) -> Result<PathBuf, String> {
    let inside = dir.join("gpusnapd.sock");
    if inside.as_os_str().len() <= SOCKET_PATH_MAX {
        return Ok(inside);
    }
    let short = crate::workdir::fresh_under(Path::new("/tmp"))?;
    Ok(short.join("gpusnapd.sock"))
}

/// One daemon: its config file and log in `dir`.
#[derive(Debug)]
pub struct DaemonProc {
    binary: PathBuf,
    pub config: Config,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl DaemonProc {
    /// Writes `config` as `dir/<name>.toml` (checked first, as the daemon
    /// will) and starts the daemon on it.
    pub fn start(
        binary: &Path,
        dir: &Path,
        name: &str,
        config: Config,
    ) -> Result<DaemonProc, String> {
        config
            .validate()
            .map_err(|e| format!("the generated daemon config is invalid: {e}"))?;
        let text =
            toml::to_string(&config).map_err(|e| format!("writing the daemon config: {e}"))?;
        let config_path = dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, text)
            .map_err(|e| format!("writing {}: {e}", config_path.display()))?;
        let mut daemon = DaemonProc {
            binary: binary.to_path_buf(),
            config,
            config_path,
            log_path: dir.join(format!("{name}.log")),
            child: None,
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    pub fn socket(&self) -> &Path {
        &self.config.daemon.socket
    }

    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "gpusnapd is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("{}: {e}", self.log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", self.log_path.display()))?;
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        loop {
            if UnixStream::connect(self.socket()).is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "gpusnapd exited at start ({status}); its log:\n{}",
                    self.log_tail()
                ));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "gpusnapd did not listen on {} within {START_WAIT:?}; its log:\n{}",
                    self.socket().display(),
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits for the orderly exit; an exit other than 0, or
    /// none within the shutdown deadline and a grace, is an error.
    pub fn stop(&mut self) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else {
            return Err("gpusnapd is not running".into());
        };
        signal(&child, libc::SIGTERM);
        let limit = Duration::from_secs(self.config.daemon.shutdown_deadline_s) + STOP_GRACE;
        let deadline = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(status),
                Ok(Some(status)) => {
                    return Err(format!(
                        "gpusnapd exited with {status} on SIGTERM; its log:\n{}",
                        self.log_tail()
                    ));
                }
                Ok(None) if Instant::now() > deadline => {
                    signal(&child, libc::SIGKILL);
                    let _ = child.wait();
                    return Err(format!(
                        "gpusnapd did not exit within {limit:?} of SIGTERM (killed)"
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("waiting for gpusnapd: {e}")),
            }
        }
    }

    /// SIGKILL and reap (error paths only).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// The last lines of the daemon's log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines
            .get(lines.len().saturating_sub(30)..)
            .unwrap_or_default()
            .join("\n")
    }

    /// The body of `GET /metrics`.
    pub fn metrics(&self) -> Result<String, String> {
        http_get(&self.config.metrics.listen, "/metrics")
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if self.child.is_some() {
            eprintln!("e2e: stopping gpusnapd (SIGKILL) after an error");
            self.kill();
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) on the pid of our own unreaped child (it cannot have
    // been reused); no memory is passed.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A bare HTTP/1.1 GET on loopback: the body of a 200 reply.
fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let what = format!("GET http://{addr}{path}");
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| format!("{what}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("{what}: {e}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{what}: {e}"))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("{what}: {e}"))?;
    let status = reply.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("{what}: status {status:?}"));
    }
    Ok(reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// The value of the sample `name{labels}` (labels exactly as exported) in
/// a Prometheus text body.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_series_exactly() {
        let body = "# HELP x\ngpusnap_stall_seconds_sum{job=\"bench\"} 0.25\n\
                    gpusnap_stall_seconds_count{job=\"bench\"} 5\n";
        assert_eq!(
            sample(body, "gpusnap_stall_seconds_sum{job=\"bench\"}"),
            Some(0.25)
        );
        assert_eq!(
            sample(body, "gpusnap_stall_seconds_count{job=\"bench\"}"),
            Some(5.0)
        );
        assert_eq!(sample(body, "gpusnap_stall_seconds_sum{job=\"x\"}"), None);
    }

    #[test]
    fn long_directories_get_a_short_socket() {
        let long = PathBuf::from(format!("/var/tmp/{}", "d".repeat(120)));
        let socket = socket_path(&long).expect("a socket path");
        assert!(socket.as_os_str().len() <= SOCKET_PATH_MAX);
        if let Some(parent) = socket.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        let short = socket_path(Path::new("/var/tmp/x")).expect("a socket path");
        assert_eq!(short, Path::new("/var/tmp/x/gpusnapd.sock"));
    }
}
