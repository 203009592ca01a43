//! Where a daemon listens: its Unix socket (a path `sockaddr_un` can hold)
//! and a free loopback port for its metrics.

use std::path::{Path, PathBuf};

/// Longest socket path `sockaddr_un` takes (108 bytes with the NUL).
pub const SOCKET_PATH_MAX: usize = 107;

/// Where short socket directories go when the scratch directory's path is
/// too long.
const SHORT_BASE: &str = "/tmp";

/// A daemon's socket path; when the directory asked for was too deep, the
/// socket lives in a fresh directory under /tmp, removed when this drops.
#[derive(Debug)]
pub struct SocketPath {
    path: PathBuf,
    short_dir: Option<tempfile::TempDir>,
}

impl SocketPath {
    /// `dir/gpusnapd.sock` when that fits, else `/tmp/gpusnapd-sock-*/gpusnapd.sock`
    /// (a directory only its owner can enter: give a shallower `dir` when
    /// other users must reach the socket).
    pub fn in_dir(dir: &Path) -> std::io::Result<SocketPath> {
        let inside = dir.join("gpusnapd.sock");
        if inside.as_os_str().len() <= SOCKET_PATH_MAX {
            return Ok(SocketPath {
                path: inside,
                short_dir: None,
            });
        }
        let short = tempfile::Builder::new()
            .prefix("gpusnapd-sock-")
            .tempdir_in(SHORT_BASE)?;
        let path = short.path().join("gpusnapd.sock");
        assert!(
            path.as_os_str().len() <= SOCKET_PATH_MAX,
            "{} is too long for a socket",
            path.display()
        );
        Ok(SocketPath {
            path,
            short_dir: Some(short),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the socket had to move out of the directory asked for.
    pub fn is_elsewhere(&self) -> bool {
        self.short_dir.is_some()
    }
}

/// A port on 127.0.0.1 that was free a moment ago (another process may
/// take it before the daemon binds it; nothing can close that window
/// short of passing the daemon a bound socket).
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deep_directory_gets_a_short_socket_that_is_removed_with_it() {
        let deep = PathBuf::from(format!("/var/tmp/{}", "d".repeat(120)));
        let socket = SocketPath::in_dir(&deep).expect("a socket path");
        assert!(socket.is_elsewhere());
        assert!(socket.path().as_os_str().len() <= SOCKET_PATH_MAX);
        let parent = socket.path().parent().expect("parent").to_path_buf();
        assert!(parent.is_dir());
        drop(socket);
        assert!(!parent.exists(), "{} left behind", parent.display());
    }

    #[test]
    fn a_shallow_directory_keeps_its_socket_inside() {
        let socket = SocketPath::in_dir(Path::new("/var/tmp/x")).expect("a socket path");
        assert!(!socket.is_elsewhere());
        assert_eq!(socket.path(), Path::new("/var/tmp/x/gpusnapd.sock"));
    }

    #[test]
    fn a_path_of_exactly_the_limit_stays_inside() {
        // "/" + name + "/gpusnapd.sock" is 107 bytes.
        let name = "n".repeat(SOCKET_PATH_MAX - 1 - "/gpusnapd.sock".len());
        let dir = PathBuf::from(format!("/{name}"));
        let socket = SocketPath::in_dir(&dir).expect("a socket path");
        assert_eq!(socket.path().as_os_str().len(), SOCKET_PATH_MAX);
        assert!(!socket.is_elsewhere());
    }

    #[test]
    fn a_free_port_can_be_bound() {
        let port = free_port().expect("port");
        assert_ne!(port, 0);
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("still free");
    }
}
