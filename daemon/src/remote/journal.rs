//! The multipart uploads this daemon has open, on local disk, so that an
//! upload cut short by a crash or a kill is aborted at the next start
//! instead of leaking parts in the bucket (S3 keeps an unfinished upload's
//! parts, and bills them, until it is completed or aborted; there is no
//! portable way to list them).
//!
//! `<store root>/.remote-uploads/<sha256 of the key, 32 hex>.json` holds
//! `{"key": ..., "upload_id": ...}`, written to a temporary name and
//! renamed. The root's dot-names are never jobs. A crash between the
//! server's answer to the create and the journal's write leaks one upload;
//! a bucket lifecycle rule (`AbortIncompleteMultipartUpload`) catches that
//! case.
//!
//! The journal's directory is held open, and checked (`fstat`) before each
//! use: when an operator removed the store root from under the daemon, the
//! root is found again by path ([`Root`]) and the directory made again in
//! it, so uploads resume without a restart once the root is back.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use crate::remote::bucket::RemoteError;
use crate::remote::marker::sha256_hex;
use crate::storage::beneath::{Beneath, BeneathError, Kind};
use crate::storage::root::Root;

/// The journal's directory under the store root.
pub const JOURNAL_DIR: &str = ".remote-uploads";
/// Most entries read back at start (more is not this daemon's doing).
const ENTRIES_MAX: usize = 100_000;
/// Largest entry read back.
const ENTRY_LEN_MAX: u64 = 64 << 10;
const DIR_MODE: Mode = Mode::from_bits_truncate(0o750);
const FILE_MODE: Mode = Mode::from_bits_truncate(0o640);

/// One open upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenUpload {
    pub key: String,
    pub upload_id: String,
}

/// The journal directory. Every file in it is reached beneath the store
/// root without following a symbolic link ([`Beneath`]): a link planted at
/// the journal directory, or at an entry, is refused, so the start-up
/// clean-up (which removes entries that do not parse) can never remove
/// anything outside the root.
#[derive(Debug, Clone)]
pub struct Journal {
    dirs: Arc<Dirs>,
}

/// The store root and the journal's directory in it, held open.
#[derive(Debug)]
struct Dirs {
    root: Root,
    /// `<root>/.remote-uploads`.
    path: PathBuf,
    held: RwLock<Arc<Beneath>>,
}

impl Journal {
    /// The journal under `root`, created if absent.
    pub fn open(root: &Path) -> Result<Journal, RemoteError> {
        std::fs::create_dir_all(root).map_err(|source| RemoteError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let store_root = Root::open(root).map_err(Self::beneath(root))?;
        let path = root.join(JOURNAL_DIR);
        let dir = Self::make_dir(&store_root, &path)?;
        Ok(Journal {
            dirs: Arc::new(Dirs {
                root: store_root,
                path,
                held: RwLock::new(dir),
            }),
        })
    }

    /// Makes the journal's directory at `path` (if absent) beneath the
    /// store root as it is now, and opens it.
    fn make_dir(root: &Root, path: &Path) -> Result<Arc<Beneath>, RemoteError> {
        let store_root = root.current().map_err(|e| RemoteError::Io {
            path: root.path().to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        match store_root.create_dir(path, DIR_MODE) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(Self::beneath(path)(e)),
        }
        let dir = store_root.subdir(path).map_err(Self::beneath(path))?;
        Ok(Arc::new(dir))
    }

    /// The journal's directory: the one held while it exists; once it was
    /// removed (with the store root, by an operator), made again beneath
    /// the root now at its path, or the error that the root is missing.
    fn dir(&self) -> Result<Arc<Beneath>, RemoteError> {
        let dirs = &*self.dirs;
        let held = Arc::clone(&dirs.held.read().unwrap_or_else(PoisonError::into_inner));
        if !held.is_removed().map_err(Self::beneath(&dirs.path))? {
            return Ok(held);
        }
        let mut slot = dirs.held.write().unwrap_or_else(PoisonError::into_inner);
        if !Arc::ptr_eq(&slot, &held) && !slot.is_removed().map_err(Self::beneath(&dirs.path))? {
            return Ok(Arc::clone(&slot));
        }
        let fresh = Self::make_dir(&dirs.root, &dirs.path)?;
        tracing::warn!(
            path = %dirs.path.display(),
            "the remote upload journal's directory was removed from under gpusnapd; made it again"
        );
        *slot = Arc::clone(&fresh);
        Ok(fresh)
    }

    fn entry_path(&self, key: &str) -> PathBuf {
        let digest = sha256_hex(key.as_bytes());
        self.dirs.path.join(format!("{}.json", &digest[..32]))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RemoteError + '_ {
        move |source| RemoteError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A journal file's error: the OS error as it came, or the refusal (a
    /// link in the way) as the error's text.
    fn beneath(path: &Path) -> impl FnOnce(BeneathError) -> RemoteError + '_ {
        move |e| RemoteError::Io {
            path: path.to_path_buf(),
            source: match e {
                BeneathError::Io { source, .. } => source,
                other => std::io::Error::other(other),
            },
        }
    }

    /// Records `upload` as open (before its first part is sent).
    pub fn record(&self, upload: &OpenUpload) -> Result<(), RemoteError> {
        let path = self.entry_path(&upload.key);
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(upload).expect("an entry always serializes");
        let dir = self.dir()?;
        let mut file = dir
            .open_file(
                &tmp,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC,
                Some(FILE_MODE),
            )
            .map_err(Self::beneath(&tmp))?;
        file.write_all(&bytes).map_err(Self::io(&tmp))?;
        drop(file);
        dir.rename(&tmp, &path).map_err(Self::beneath(&path))
    }

    /// Forgets `key`'s upload (completed or aborted).
    pub fn forget(&self, key: &str) -> Result<(), RemoteError> {
        let path = self.entry_path(key);
        match self.dir()?.remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(Self::beneath(&path)(e)),
        }
    }

    /// Every recorded upload; an entry that does not parse is removed with
    /// a warning (it names nothing that could be aborted; a link is
    /// unlinked, never followed).
    pub fn open_uploads(&self) -> Result<Vec<OpenUpload>, RemoteError> {
        let mut found = Vec::new();
        let held = self.dir()?;
        let dir = held.path();
        let entries = held.read_dir(dir).map_err(Self::beneath(dir))?;
        for entry in entries.into_iter().take(ENTRIES_MAX) {
            let path = dir.join(&entry.name);
            let parsed = (entry.kind == Kind::File)
                .then(|| Self::read_entry(&held, &path))
                .flatten()
                .and_then(|b| serde_json::from_slice::<OpenUpload>(&b).ok());
            match parsed {
                Some(upload) if path.extension().is_some_and(|e| e == "json") => found.push(upload),
                _ => {
                    tracing::warn!(path = %path.display(), "removing an unreadable entry of the remote upload journal");
                    let _ = held.remove_file(&path);
                }
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    /// An entry's bytes, `None` if it cannot be read or is too long.
    fn read_entry(dir: &Beneath, path: &Path) -> Option<Vec<u8>> {
        let file = dir.open_file(path, OFlag::O_RDONLY, None).ok()?;
        let len = file.metadata().ok()?.len();
        if len > ENTRY_LEN_MAX {
            return None;
        }
        let mut bytes = Vec::new();
        file.take(ENTRY_LEN_MAX + 1).read_to_end(&mut bytes).ok()?;
        (gpusnap_proto::convert::to_u64(bytes.len()) <= ENTRY_LEN_MAX).then_some(bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests unwrap known data")]
mod tests {
    use super::*;

    #[test]
    fn recorded_uploads_are_listed_until_forgotten_and_junk_is_dropped() {
        let root = tempfile::tempdir().unwrap();
        let journal = Journal::open(root.path()).unwrap();
        let a = OpenUpload {
            key: "p/j/0/step-1/state.safetensors".into(),
            upload_id: "u1".into(),
        };
        let b = OpenUpload {
            key: "p/j/1/step-1/state.safetensors".into(),
            upload_id: "u2".into(),
        };
        journal.record(&a).unwrap();
        journal.record(&b).unwrap();
        std::fs::write(root.path().join(JOURNAL_DIR).join("junk.json"), b"{").unwrap();
        assert_eq!(journal.open_uploads().unwrap(), vec![a.clone(), b.clone()]);
        assert!(!root.path().join(JOURNAL_DIR).join("junk.json").exists());
        journal.forget(&a.key).unwrap();
        journal.forget(&a.key).unwrap();
        let again = Journal::open(root.path()).unwrap();
        assert_eq!(again.open_uploads().unwrap(), vec![b]);
    }

    /// The regression: a link planted at the journal directory made the
    /// start-up clean-up remove every file of the directory it pointed to
    /// that did not parse as an entry, and `record` write there.
    #[test]
    fn a_link_planted_at_the_journal_directory_is_refused_and_nothing_outside_is_removed() {
        let scratch = tempfile::tempdir().unwrap();
        let root = scratch.path().join("root");
        let outside = scratch.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"not an entry").unwrap();
        std::os::unix::fs::symlink(&outside, root.join(JOURNAL_DIR)).unwrap();
        let error = Journal::open(&root).unwrap_err().to_string();
        assert!(error.contains("symbolic link"), "{error}");
        assert!(error.contains(JOURNAL_DIR), "{error}");
        assert_eq!(
            std::fs::read(outside.join("precious")).unwrap(),
            b"not an entry"
        );
    }

    #[test]
    fn a_store_root_removed_and_made_again_gets_its_journal_back_without_a_restart() {
        let scratch = tempfile::tempdir().unwrap();
        let root = scratch.path().join("root");
        let journal = Journal::open(&root).unwrap();
        let a = OpenUpload {
            key: "p/j/0/step-1/state.safetensors".into(),
            upload_id: "u1".into(),
        };
        journal.record(&a).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        let missing = journal.record(&a).unwrap_err().to_string();
        assert!(missing.contains("was removed"), "{missing}");
        assert!(journal.open_uploads().is_err(), "a missing root listed");
        std::fs::create_dir(&root).unwrap();
        assert_eq!(journal.open_uploads().unwrap(), Vec::new());
        journal.record(&a).unwrap();
        assert!(
            root.join(JOURNAL_DIR).is_dir(),
            "the directory was not made again"
        );
        assert_eq!(journal.open_uploads().unwrap(), vec![a.clone()]);
        journal.forget(&a.key).unwrap();
        assert_eq!(journal.open_uploads().unwrap(), Vec::new());
    }

    #[test]
    fn a_link_planted_as_an_entry_is_unlinked_not_followed() {
        let scratch = tempfile::tempdir().unwrap();
        let root = scratch.path().join("root");
        let outside = scratch.path().join("outside.json");
        std::fs::write(&outside, br#"{"key":"k","upload_id":"u"}"#).unwrap();
        let journal = Journal::open(&root).unwrap();
        let entry = root.join(JOURNAL_DIR).join("planted.json");
        std::os::unix::fs::symlink(&outside, &entry).unwrap();
        assert_eq!(journal.open_uploads().unwrap(), Vec::new());
        assert!(std::fs::symlink_metadata(&entry).is_err(), "the link stays");
        assert!(outside.exists(), "the link's target was removed");
    }
}
