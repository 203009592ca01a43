//! The store root's descriptor, and what happens when an operator removes
//! the root directory from under the running daemon.
//!
//! [`OsStorage`](super::os::OsStorage) resolves every path beneath one
//! descriptor of the root ([`Beneath`]), opened at start-up. After an
//! `rm -rf` of the root that descriptor names a deleted directory: nothing
//! can be made beneath it again (every `mkdir` and create fails with
//! `ENOENT`), and a directory made again at the same path is never seen,
//! so the daemon would fail every snapshot until it is restarted.
//!
//! So [`Root::current`], called before each storage operation, `fstat`s
//! the held descriptor (no path lookup). A link count of 0 says the
//! directory was removed; then the root is opened again by its path:
//!
//! * something is there (the operator made the directory again, or mounted
//!   the store's file system there): it replaces the held descriptor, with
//!   a warning in the log, and the operation goes on beneath it;
//! * nothing is there: the operation fails with [`RootError::Missing`]
//!   (`ENOENT`, naming the root), which the snapshot or request reports.
//!   gpusnapd does not make the directory itself: a root that vanished
//!   while it ran was removed on purpose or by mistake, and either way it
//!   is the operator's to put back (with the owner and mode it should
//!   have).
//!
//! Only a removed root is reopened. A root renamed elsewhere (`mv`) still
//! has its links: the daemon goes on in it where it now is, and its
//! snapshots stay intact there.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use super::beneath::{Beneath, BeneathError};

/// Why the store root cannot be used now.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The root was removed, and nothing is at its path.
    #[error(
        "the store root {} was removed while gpusnapd runs, and nothing is at that path now; no snapshot can be written or read until the directory is there again (mkdir it, or mount the store's file system there); gpusnapd then uses it without a restart",
        .root.display()
    )]
    Missing { root: PathBuf },
    /// The root was removed, and what is at its path now cannot be opened
    /// as a directory.
    #[error(
        "the store root {} was removed while gpusnapd runs; what is at that path now cannot be used: {source}",
        .root.display()
    )]
    Reopen {
        root: PathBuf,
        #[source]
        source: BeneathError,
    },
    /// The held descriptor could not be checked.
    #[error("checking the store root {}: {source}", .root.display())]
    Check {
        root: PathBuf,
        #[source]
        source: BeneathError,
    },
}

impl RootError {
    /// The OS error behind this one: `ENOENT` for a missing root.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            RootError::Missing { .. } => Some(libc::ENOENT),
            RootError::Reopen { source, .. } | RootError::Check { source, .. } => {
                source.raw_os_error()
            }
        }
    }
}

/// The store root: its path, and the descriptor every path beneath it is
/// resolved from, reopened by path once the directory it names is removed.
#[derive(Debug)]
pub struct Root {
    path: PathBuf,
    held: RwLock<Arc<Beneath>>,
    /// Whether the root was found missing since it was last opened (so the
    /// loss is logged once, not at every operation).
    missing: AtomicBool,
}

impl Root {
    /// Opens the directory at `path` ([`Beneath::open`]).
    pub fn open(path: &Path) -> Result<Root, BeneathError> {
        Ok(Root {
            path: path.to_path_buf(),
            held: RwLock::new(Arc::new(Beneath::open(path)?)),
            missing: AtomicBool::new(false),
        })
    }

    /// The root's path, as configured.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory to resolve beneath: the held one while it exists;
    /// once it was removed, the directory now at the root's path (opened
    /// once per call, no retries), or [`RootError::Missing`].
    pub fn current(&self) -> Result<Arc<Beneath>, RootError> {
        let held = Arc::clone(&self.held.read().unwrap_or_else(PoisonError::into_inner));
        if !self.removed(&held)? {
            return Ok(held);
        }
        let mut slot = self.held.write().unwrap_or_else(PoisonError::into_inner);
        // Another operation may have reopened it meanwhile.
        if !Arc::ptr_eq(&slot, &held) && !self.removed(&slot)? {
            return Ok(Arc::clone(&slot));
        }
        match Beneath::open(&self.path) {
            Ok(fresh) => {
                tracing::warn!(
                    root = %self.path.display(),
                    "the store root was removed from under gpusnapd and is there again; using the directory now at that path"
                );
                self.missing.store(false, Ordering::Relaxed);
                *slot = Arc::new(fresh);
                Ok(Arc::clone(&slot))
            }
            Err(e) if e.is_not_found() => {
                if !self.missing.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        root = %self.path.display(),
                        "the store root was removed from under gpusnapd; every snapshot fails until the directory is there again"
                    );
                }
                Err(RootError::Missing {
                    root: self.path.clone(),
                })
            }
            Err(source) => Err(RootError::Reopen {
                root: self.path.clone(),
                source,
            }),
        }
    }

    fn removed(&self, beneath: &Beneath) -> Result<bool, RootError> {
        beneath.is_removed().map_err(|source| RootError::Check {
            root: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;

    use super::*;

    fn scratch_root() -> (tempfile::TempDir, PathBuf, Root) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root");
        std::fs::create_dir(&path).unwrap();
        let root = Root::open(&path).unwrap();
        (dir, path, root)
    }

    fn create(beneath: &Beneath, path: &Path) {
        beneath
            .open_file(
                path,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                Some(Mode::from_bits_truncate(0o640)),
            )
            .unwrap();
    }

    #[test]
    fn a_root_in_place_is_never_reopened() {
        let (_dir, path, root) = scratch_root();
        let first = root.current().unwrap();
        create(&first, &path.join("a"));
        assert!(Arc::ptr_eq(&first, &root.current().unwrap()));
        assert!(!first.is_removed().unwrap());
    }

    #[test]
    fn a_removed_root_is_missing_until_made_again_then_used() {
        let (_dir, path, root) = scratch_root();
        let old = root.current().unwrap();
        create(&old, &path.join("before"));
        std::fs::remove_dir_all(&path).unwrap();
        assert!(old.is_removed().unwrap());
        for _ in 0..2 {
            let e = root.current().unwrap_err();
            assert!(
                matches!(&e, RootError::Missing { root } if *root == path),
                "{e:?}"
            );
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
            let message = e.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("removed"), "{message}");
        }
        std::fs::create_dir(&path).unwrap();
        let fresh = root.current().unwrap();
        assert!(!Arc::ptr_eq(&old, &fresh));
        create(&fresh, &path.join("after"));
        assert!(path.join("after").is_file(), "made in the new directory");
        assert!(Arc::ptr_eq(&fresh, &root.current().unwrap()));
    }

    #[test]
    fn a_file_where_the_removed_root_was_is_refused_naming_it() {
        let (_dir, path, root) = scratch_root();
        std::fs::remove_dir(&path).unwrap();
        std::fs::write(&path, b"not a directory").unwrap();
        let e = root.current().unwrap_err();
        assert!(matches!(e, RootError::Reopen { .. }), "{e:?}");
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn a_moved_root_is_used_where_it_went() {
        let (dir, path, root) = scratch_root();
        let held = root.current().unwrap();
        let moved = dir.path().join("moved");
        std::fs::rename(&path, &moved).unwrap();
        std::fs::create_dir(&path).unwrap();
        let still = root.current().unwrap();
        assert!(Arc::ptr_eq(&held, &still), "a moved root is not removed");
        create(&still, &path.join("f"));
        assert!(moved.join("f").is_file());
        assert!(!path.join("f").exists());
    }
}
