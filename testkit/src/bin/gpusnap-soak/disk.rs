//! The store as it lies on disk, read without the daemon: what is in
//! progress there (partial snapshots and how far each got, retention's
//! trash, ownership claims), and a committed snapshot's tensors read
//! straight from its safetensors file, so the checker's byte comparison
//! does not go through the code it checks.
//!
//! The layout is the store's documented one: `<root>/<job>/<rank>/step-<N>`
//! holding `state.safetensors` and `MANIFEST.json`; `step-<N>.partial` while
//! it is written; `step-<N>.trash` while retention removes it;
//! `<root>/.claiming-<job>` while a job directory is claimed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const DATA_FILE: &str = "state.safetensors";
const MANIFEST_FILE: &str = "MANIFEST.json";
const PARTIAL_SUFFIX: &str = ".partial";
const TRASH_SUFFIX: &str = ".trash";
const CLAIM_PREFIX: &str = ".claiming-";
/// Largest safetensors header this reader accepts.
const HEADER_MAX: u64 = 1 << 20;

/// Why the store could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Format { path: PathBuf, why: String },
}

impl DiskError {
    /// Whether the file or directory was not there (removed by retention).
    pub fn is_not_found(&self) -> bool {
        matches!(self, DiskError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// What is in progress in the store, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InProgress {
    /// `.partial` directories with nothing in them yet.
    pub partial_empty: u64,
    /// `.partial` directories with a data file and no manifest.
    pub partial_data: u64,
    /// `.partial` directories with a manifest.
    pub partial_manifest: u64,
    /// Retention's `.trash` directories.
    pub trash: u64,
    /// Ownership claims (`.claiming-<job>`).
    pub claiming: u64,
}

impl InProgress {
    /// Whether nothing is in progress at all.
    pub fn is_clean(&self) -> bool {
        *self == InProgress::default()
    }
}

fn names(dir: &Path) -> Result<Vec<String>, DiskError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DiskError::Io {
                what: "listing",
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    Ok(entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

/// Counts what is in progress under `root`. Directories that vanish while
/// they are looked at (the daemon moving on) count as what they were seen
/// as last.
pub fn in_progress(root: &Path) -> Result<InProgress, DiskError> {
    let mut found = InProgress::default();
    for job in names(root)? {
        if job.starts_with(CLAIM_PREFIX) {
            found.claiming += 1;
            continue;
        }
        let job_dir = root.join(&job);
        if job.starts_with('.') || !job_dir.is_dir() {
            continue;
        }
        for rank in names(&job_dir)? {
            let rank_dir = job_dir.join(&rank);
            if !rank_dir.is_dir() {
                continue;
            }
            for name in names(&rank_dir)? {
                if name.ends_with(TRASH_SUFFIX) {
                    found.trash += 1;
                } else if name.ends_with(PARTIAL_SUFFIX) {
                    let inside = names(&rank_dir.join(&name))?;
                    if inside.iter().any(|n| n == MANIFEST_FILE) {
                        found.partial_manifest += 1;
                    } else if inside.iter().any(|n| n == DATA_FILE) {
                        found.partial_data += 1;
                    } else {
                        found.partial_empty += 1;
                    }
                }
            }
        }
    }
    Ok(found)
}

/// The steps of every `step-<N>` directory of `job` on disk, by rank:
/// what would be listed if every one of them were a valid snapshot.
pub fn committed_steps(
    root: &Path,
    job: &str,
) -> Result<BTreeMap<u32, std::collections::BTreeSet<u64>>, DiskError> {
    let mut out = BTreeMap::new();
    let job_dir = root.join(job);
    for rank in names(&job_dir)? {
        let Ok(r) = rank.parse::<u32>() else { continue };
        let steps = out.entry(r).or_insert_with(std::collections::BTreeSet::new);
        for name in names(&job_dir.join(&rank))? {
            if let Some(step) = name
                .strip_prefix("step-")
                .and_then(|n| n.parse::<u64>().ok())
            {
                steps.insert(step);
            }
        }
    }
    Ok(out)
}

/// The committed snapshot directory of (job, rank, step).
pub fn snapshot_dir(root: &Path, job: &str, rank: u32, step: u64) -> PathBuf {
    root.join(job)
        .join(rank.to_string())
        .join(format!("step-{step}"))
}

/// Every tensor of a committed snapshot's data file, by name: its bytes,
/// read through the safetensors header (`u64` length, JSON, data section).
pub fn read_tensors(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>, DiskError> {
    let path = dir.join(DATA_FILE);
    let bytes = std::fs::read(&path).map_err(|source| DiskError::Io {
        what: "reading",
        path: path.clone(),
        source,
    })?;
    let bad = |why: String| DiskError::Format {
        path: path.clone(),
        why,
    };
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("shorter than the header length".to_owned()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > HEADER_MAX {
        return Err(bad(format!("a header of {header_len} bytes")));
    }
    let data_start = 8 + usize::try_from(header_len).map_err(|e| bad(e.to_string()))?;
    let header = bytes
        .get(8..data_start)
        .ok_or_else(|| bad("shorter than its header".to_owned()))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header.trim_ascii_end()).map_err(|e| bad(e.to_string()))?;
    let data = &bytes[data_start..];
    let mut out = BTreeMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = entry
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
            .ok_or_else(|| bad(format!("tensor {name} has no data_offsets")))?;
        let range = usize::try_from(offsets.0).map_err(|e| bad(e.to_string()))?
            ..usize::try_from(offsets.1).map_err(|e| bad(e.to_string()))?;
        let tensor = data
            .get(range)
            .ok_or_else(|| bad(format!("tensor {name} lies past the end of the file")))?;
        out.insert(name, tensor.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_progress_tells_each_kind_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        assert!(in_progress(root).expect("scan").is_clean());
        let rank = root.join("j").join("0");
        for name in [
            "step-1",
            "step-2.partial",
            "step-3.partial",
            "step-4.partial",
            "step-0.trash",
        ] {
            std::fs::create_dir_all(rank.join(name)).expect("mkdir");
        }
        std::fs::write(rank.join("step-3.partial").join(DATA_FILE), b"x").expect("data");
        std::fs::write(rank.join("step-4.partial").join(DATA_FILE), b"x").expect("data");
        std::fs::write(rank.join("step-4.partial").join(MANIFEST_FILE), b"{}").expect("manifest");
        std::fs::create_dir(root.join(".claiming-k")).expect("claim");
        let committed = committed_steps(root, "j").expect("steps");
        assert_eq!(committed.len(), 1);
        assert_eq!(committed[&0].iter().copied().collect::<Vec<_>>(), vec![1]);
        let found = in_progress(root).expect("scan");
        assert_eq!(
            found,
            InProgress {
                partial_empty: 1,
                partial_data: 1,
                partial_manifest: 1,
                trash: 1,
                claiming: 1
            }
        );
    }

    #[test]
    fn tensors_are_read_by_their_offsets_and_a_short_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let header = br#"{"__metadata__":{"k":"v"},"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}   "#;
        let mut file = u64::try_from(header.len())
            .expect("len")
            .to_le_bytes()
            .to_vec();
        file.extend_from_slice(header);
        file.extend_from_slice(&[1, 2, 3, 4, 5]);
        std::fs::write(dir.path().join(DATA_FILE), &file).expect("write");
        let t = read_tensors(dir.path()).expect("read");
        assert_eq!(t["a"], vec![1, 2, 3]);
        assert_eq!(t["b"], vec![4, 5]);
        file.truncate(file.len() - 1);
        std::fs::write(dir.path().join(DATA_FILE), &file).expect("write");
        assert!(matches!(
            read_tensors(dir.path()),
            Err(DiskError::Format { .. })
        ));
        let missing = read_tensors(&dir.path().join("nope")).expect_err("missing");
        assert!(missing.is_not_found());
    }
}
