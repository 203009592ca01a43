//! One `#[ignore]`d test of the current test binary run as another user:
//! how the end-to-end tests play a trainer of another uid (or one outside
//! the socket's group) against the real daemon. Needs root.
//!
//! The child learns the daemon's socket from [`ENV_SOCKET`] and what to do
//! from [`ENV_ROLE`]; its test function reads both and panics (failing the
//! child) when a check does not hold.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The daemon's socket, for the child.
pub const ENV_SOCKET: &str = "GPUSNAP_E2E_SOCKET";
/// The child's role: which of its scripted parts to play.
pub const ENV_ROLE: &str = "GPUSNAP_E2E_ROLE";

/// The socket named by [`ENV_SOCKET`], in the child.
pub fn socket() -> PathBuf {
    std::env::var_os(ENV_SOCKET)
        .expect("the parent names the socket")
        .into()
}

/// The role named by [`ENV_ROLE`], in the child.
pub fn role() -> String {
    std::env::var(ENV_ROLE).expect("the parent names the role")
}

/// The ignored test `test` of a copy of this test binary, runnable by other
/// users.
pub struct ChildTest {
    exe: PathBuf,
    test: &'static str,
}

impl ChildTest {
    /// Copies this test binary into `scratch` (the build tree may sit under
    /// a directory only root can enter, such as /root) and opens `scratch`
    /// to other users (mode 0755), so they reach the copy and the socket in
    /// it.
    pub fn new(scratch: &Path, test: &'static str) -> ChildTest {
        std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o755))
            .expect("chmod scratch");
        let exe = scratch.join(format!("{test}-exe"));
        std::fs::copy(std::env::current_exe().expect("exe"), &exe).expect("copy test binary");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        ChildTest { exe, test }
    }

    /// The child as `uid:gid`, playing `role` against the daemon at `socket`.
    pub fn command(&self, socket: &Path, role: &str, uid: u32, gid: u32) -> Command {
        let mut command = Command::new(&self.exe);
        command
            .args(["--ignored", "--exact", self.test, "--nocapture"])
            .env(ENV_SOCKET, socket)
            .env(ENV_ROLE, role)
            .uid(uid)
            .gid(gid);
        command
    }

    /// Runs the child to its end and asserts that it passed, showing its
    /// output when it did not.
    #[track_caller]
    pub fn run(&self, socket: &Path, role: &str, uid: u32, gid: u32) {
        let out = self
            .command(socket, role, uid, gid)
            .output()
            .expect("spawn the child test");
        assert!(
            out.status.success(),
            "{role} (uid {uid}, gid {gid}) failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
