//! Where a benchmark runs and how it keeps the page cache out of its
//! figures: a scratch directory on the real disk (never tmpfs), and
//! dropping clean cached pages before each timed read or write.

use std::path::{Path, PathBuf};

use crate::sys;

/// The directory a run works in; removed on drop when the run made it.
#[derive(Debug)]
pub struct WorkDir {
    pub path: PathBuf,
    remove: bool,
}

impl WorkDir {
    pub fn choose(keep: Option<&Path>, dir: Option<&Path>) -> Result<WorkDir, String> {
        let (path, remove) = match (keep, dir) {
            (Some(keep), _) => (keep.to_path_buf(), false),
            (None, Some(dir)) => (fresh_under(dir)?, true),
            (None, None) => {
                // The repository's target/ is on the disk the project lives on;
                // /var/tmp when that is tmpfs.
                let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/gpusnap-bench");
                std::fs::create_dir_all(&target)
                    .map_err(|e| format!("mkdir {}: {e}", target.display()))?;
                let tmpfs = sys::is_tmpfs(&target)
                    .map_err(|e| format!("statfs {}: {e}", target.display()))?;
                let base = if tmpfs {
                    PathBuf::from("/var/tmp")
                } else {
                    target
                };
                (fresh_under(&base)?, true)
            }
        };
        std::fs::create_dir_all(&path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        let work = WorkDir {
            path: path
                .canonicalize()
                .map_err(|e| format!("{}: {e}", path.display()))?,
            remove,
        };
        if sys::is_tmpfs(&work.path).map_err(|e| format!("statfs {}: {e}", work.path.display()))? {
            return Err(format!(
                "{} is on tmpfs (memory): disk throughput cannot be measured there; pass --dir on a disk",
                work.path.display()
            ));
        }
        Ok(work)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove
            && let Err(e) = std::fs::remove_dir_all(&self.path)
        {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

/// A new, empty directory under `base`.
pub fn fresh_under(base: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(base).map_err(|e| format!("mkdir {}: {e}", base.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let path = base.join(format!("run-{stamp}-{}", std::process::id()));
    std::fs::create_dir(&path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
    Ok(path)
}

/// Drops the page cache, or remembers (and says once) that it cannot.
#[derive(Debug)]
pub struct CacheDropper {
    pub works: bool,
}

impl CacheDropper {
    pub fn new() -> Self {
        let works = match sys::drop_page_cache() {
            Ok(()) => true,
            Err(e) => {
                eprintln!(
                    "warning: cannot drop the page cache (/proc/sys/vm/drop_caches: {e}); \
                     reads may be served from memory (run as root)"
                );
                false
            }
        };
        CacheDropper { works }
    }

    pub fn drop_cache(&self) {
        if self.works {
            // It worked once; a later failure is not worth stopping the run.
            let _ = sys::drop_page_cache();
        } else {
            // SAFETY: sync takes no arguments and cannot fail.
            unsafe { libc::sync() };
        }
    }
}

/// An error when `root` exists: a `--keep` directory must not hold an
/// earlier run's files.
pub fn refuse_existing(root: &Path) -> Result<(), String> {
    if root.exists() {
        return Err(format!(
            "{} already exists; give --keep an empty directory",
            root.display()
        ));
    }
    Ok(())
}
