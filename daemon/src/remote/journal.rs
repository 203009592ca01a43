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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::remote::bucket::RemoteError;
use crate::remote::marker::sha256_hex;

/// The journal's directory under the store root.
pub const JOURNAL_DIR: &str = ".remote-uploads";
/// Most entries read back at start (more is not this daemon's doing).
const ENTRIES_MAX: usize = 100_000;
/// Largest entry read back.
const ENTRY_LEN_MAX: u64 = 64 << 10;

/// One open upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenUpload {
    pub key: String,
    pub upload_id: String,
}

/// The journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal under `root`, created if absent.
    pub fn open(root: &Path) -> Result<Journal, RemoteError> {
        let dir = root.join(JOURNAL_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| RemoteError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Journal { dir })
    }

    fn entry_path(&self, key: &str) -> PathBuf {
        let digest = sha256_hex(key.as_bytes());
        self.dir.join(format!("{}.json", &digest[..32]))
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RemoteError + '_ {
        move |source| RemoteError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Records `upload` as open (before its first part is sent).
    pub fn record(&self, upload: &OpenUpload) -> Result<(), RemoteError> {
        let path = self.entry_path(&upload.key);
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(upload).expect("an entry always serializes");
        std::fs::write(&tmp, bytes).map_err(Self::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(Self::io(&path))
    }

    /// Forgets `key`'s upload (completed or aborted).
    pub fn forget(&self, key: &str) -> Result<(), RemoteError> {
        let path = self.entry_path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io(&path)(e)),
        }
    }

    /// Every recorded upload; an entry that does not parse is removed with
    /// a warning (it names nothing that could be aborted).
    pub fn open_uploads(&self) -> Result<Vec<OpenUpload>, RemoteError> {
        let mut found = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(Self::io(&self.dir))?;
        for entry in entries.take(ENTRIES_MAX) {
            let path = entry.map_err(Self::io(&self.dir))?.path();
            let parsed = std::fs::metadata(&path)
                .ok()
                .filter(|m| m.is_file() && m.len() <= ENTRY_LEN_MAX)
                .and_then(|_| std::fs::read(&path).ok())
                .and_then(|b| serde_json::from_slice::<OpenUpload>(&b).ok());
            match parsed {
                Some(upload) if path.extension().is_some_and(|e| e == "json") => found.push(upload),
                _ => {
                    tracing::warn!(path = %path.display(), "removing an unreadable entry of the remote upload journal");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
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
}
