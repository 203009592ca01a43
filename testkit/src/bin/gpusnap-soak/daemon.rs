//! The real `gpusnapd` of the campaign, on the testkit launcher: one config
//! per mode (plain, or parked at a commit step through `testing.delays`),
//! started again on the same socket and store after each kill.

use std::path::{Path, PathBuf};

use gpusnapd_testkit::{
    DaemonProcess, Defaults, Launch, LaunchError, Settings, SettingsError, Waits,
};

use crate::stoppoint::Target;

/// The staging budget of the campaign's daemon.
pub const STAGING_BUDGET_BYTES: u64 = 64 << 20;
/// Its hot tier budget.
pub const HOT_TIER_BUDGET_BYTES: u64 = 32 << 20;

/// The file in the work directory holding the running daemon's pid.
pub const PID_FILE: &str = "gpusnapd.pid";

/// How the daemon is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The campaign's config, nothing injected.
    Plain,
    /// `testing.delays` parks each persist at `Target`, one persist at a
    /// time ([`crate::stoppoint`]).
    Park(Target),
}

/// The daemon, running or not, and how often it was started and stopped.
#[derive(Debug)]
pub struct DaemonCtl {
    binary: PathBuf,
    dir: PathBuf,
    base: Settings,
    waits: Waits,
    process: Option<DaemonProcess>,
    mode: Option<Mode>,
    /// Starts so far.
    pub starts: u64,
    /// Orderly stops (SIGTERM) made to change the mode.
    pub orderly_stops: u64,
    /// Orderly stops that did not exit 0.
    pub unclean_stops: Vec<String>,
}

/// Why the daemon could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Settings(#[from] SettingsError),
}

impl DaemonCtl {
    /// The campaign's daemon: `binary` with its config, log and socket in
    /// `dir`, its store at `store`, keeping `keep` snapshots per rank.
    pub fn new(
        binary: &Path,
        dir: &Path,
        store: &Path,
        keep: u64,
    ) -> Result<DaemonCtl, DaemonError> {
        let defaults = Defaults::load()?;
        let mut base = defaults.config;
        base.set_path("daemon", "socket", &dir.join("gpusnapd.sock"))?;
        base.set_path("store", "root", store)?;
        base.apply(&[
            ("daemon", "log_level", "\"warn\""),
            ("daemon", "slot_wait_s", "20"),
            ("daemon", "shutdown_deadline_s", "10"),
            ("metrics", "listen", "\"\""),
            ("staging", "budget_bytes", &STAGING_BUDGET_BYTES.to_string()),
            (
                "hot_tier",
                "budget_bytes",
                &HOT_TIER_BUDGET_BYTES.to_string(),
            ),
            ("store", "keep_snapshots", &keep.to_string()),
        ])?;
        Ok(DaemonCtl {
            binary: binary.to_path_buf(),
            dir: dir.to_path_buf(),
            base,
            waits: defaults.waits,
            process: None,
            mode: None,
            starts: 0,
            orderly_stops: 0,
            unclean_stops: Vec::new(),
        })
    }

    /// `store.io_pool_bytes` of the config.
    pub fn io_pool_bytes(&self) -> u64 {
        self.base
            .get("store", "io_pool_bytes")
            .and_then(toml::Value::as_integer)
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0)
    }

    /// The control socket trainers and the observer connect to.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("gpusnapd.sock")
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(DaemonProcess::pid)
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_tail(lines))
            .unwrap_or_default()
    }

    /// Starts the daemon in `mode` (it must not be running).
    pub fn start(&mut self, mode: Mode) -> Result<u32, DaemonError> {
        let mut settings = self.base.clone();
        if let Mode::Park(target) = mode {
            settings.set_toml("testing", "delays", &target.delays_toml())?;
            settings.set("persist", "concurrent_writes", 1)?;
        }
        // The stopped process of the previous config goes first.
        self.process = None;
        let process = Launch::new(&self.binary, &self.dir, settings, self.waits).start()?;
        let pid = process.pid().ok_or(LaunchError::NotRunning)?;
        self.process = Some(process);
        // For tests/soak's clean-up, should this process die without
        // killing the daemon (its own SIGKILL, an interrupt).
        let pid_path = self.dir.join(PID_FILE);
        std::fs::write(&pid_path, format!("{pid}\n")).map_err(|source| LaunchError::Io {
            what: "writing",
            path: pid_path,
            source,
        })?;
        self.mode = Some(mode);
        self.starts += 1;
        Ok(pid)
    }

    /// Makes sure the daemon runs in `mode`: started if it is not running,
    /// stopped in order (SIGTERM) and started again if it runs in another.
    pub fn ensure(&mut self, mode: Mode) -> Result<(), DaemonError> {
        if self.pid().is_some() && self.mode == Some(mode) {
            return Ok(());
        }
        if let Some(process) = self.process.as_mut().filter(|p| p.is_running()) {
            let status = process.stop()?;
            self.orderly_stops += 1;
            if !status.success() {
                self.unclean_stops.push(format!(
                    "an orderly stop exited {status}; log:\n{}",
                    process.log_tail(20)
                ));
            }
        }
        self.start(mode)?;
        Ok(())
    }

    /// SIGKILLs the daemon and reaps it.
    pub fn kill(&mut self) -> Result<(), DaemonError> {
        if let Some(process) = self.process.as_mut() {
            process.kill()?;
        }
        Ok(())
    }

    /// Stops the daemon in order at the end of the campaign: its exit.
    pub fn stop(&mut self) -> Result<Option<std::process::ExitStatus>, DaemonError> {
        match self.process.as_mut().filter(|p| p.is_running()) {
            Some(p) => Ok(Some(p.stop()?)),
            None => Ok(None),
        }
    }

    /// Whether the daemon exited without being killed (a zombie child).
    pub fn exited_by_itself(&self) -> bool {
        let Some(pid) = self.pid() else {
            return false;
        };
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised name, which may hold spaces.
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
            Err(_) => true,
        }
    }
}
