//! Names on disk: `<root>/<job>/<rank>/step-<N>/` and what is valid in them.
//!
//! Besides job directories the root holds `.claiming-<job>` directories
//! while a job is being claimed (see `owners`): a job directory appears
//! only by renaming one of those, its OWNER already inside. Their names
//! start with a dot, which no job name may, so they are never listed as
//! jobs; start-up recovery removes any a crash left.

use std::fmt;
use std::path::{Path, PathBuf};

/// Suffix of a snapshot directory still being written.
pub const PARTIAL_SUFFIX: &str = ".partial";
/// Suffix of a committed snapshot directory being removed (retention, or a
/// commit whose last fsync failed). Renamed first, so a crash mid-removal
/// never leaves a half-deleted directory under a committed name.
pub const TRASH_SUFFIX: &str = ".trash";
/// Prefix of every snapshot directory.
pub const STEP_PREFIX: &str = "step-";
/// The safetensors data file inside a snapshot directory.
pub const DATA_FILE: &str = "state.safetensors";
/// The manifest inside a snapshot directory.
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// Longest job name, in bytes.
pub const JOB_NAME_LEN_MAX: usize = 128;
/// Prefix of a job directory being built by a claim, in the root.
pub const CLAIM_PREFIX: &str = ".claiming-";

/// The name a claim builds `job`'s directory under before renaming it.
pub fn claim_dir_name(job: &str) -> String {
    format!("{CLAIM_PREFIX}{job}")
}

/// Why a job name or snapshot id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "job name {0:?} is not 1-{JOB_NAME_LEN_MAX} characters of A-Z a-z 0-9 '_' '-' '.' not starting with '.'"
    )]
    BadJob(String),
}

/// Checks that `job` is safe as one path component.
pub fn validate_job(job: &str) -> Result<(), NameError> {
    let ok = !job.is_empty()
        && job.len() <= JOB_NAME_LEN_MAX
        && !job.starts_with('.')
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(NameError::BadJob(job.chars().take(160).collect()))
    }
}

/// One snapshot: a job's rank at a step.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId {
    pub job: String,
    pub rank: u32,
    pub step: u64,
}

impl SnapshotId {
    pub fn new(job: impl Into<String>, rank: u32, step: u64) -> Result<Self, NameError> {
        let job = job.into();
        validate_job(&job)?;
        Ok(SnapshotId { job, rank, step })
    }

    /// `<root>/<job>`
    pub fn job_dir(&self, root: &Path) -> PathBuf {
        root.join(&self.job)
    }

    /// `<root>/<job>/<rank>`
    pub fn rank_dir(&self, root: &Path) -> PathBuf {
        self.job_dir(root).join(self.rank.to_string())
    }

    /// `<root>/<job>/<rank>/step-<N>`
    pub fn dir(&self, root: &Path) -> PathBuf {
        self.rank_dir(root).join(step_dir_name(self.step))
    }

    /// `<root>/<job>/<rank>/step-<N>.partial`
    pub fn partial_dir(&self, root: &Path) -> PathBuf {
        self.rank_dir(root)
            .join(format!("{}{PARTIAL_SUFFIX}", step_dir_name(self.step)))
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/step-{}", self.job, self.rank, self.step)
    }
}

pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step}")
}

/// The step of a committed snapshot directory name (`step-42` -> 42).
/// Leading zeros and anything but digits are refused, so each step has one name.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    parse_canonical_u64(name.strip_prefix(STEP_PREFIX)?)
}

/// The rank of a rank directory name.
pub fn parse_rank_dir(name: &str) -> Option<u32> {
    u32::try_from(parse_canonical_u64(name)?).ok()
}

fn parse_canonical_u64(digits: &str) -> Option<u64> {
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if canonical { digits.parse().ok() } else { None }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use super::*;

    #[test]
    fn claim_directories_are_never_job_names() {
        let name = claim_dir_name("llama-7b");
        assert_eq!(name, ".claiming-llama-7b");
        assert!(validate_job(&name).is_err());
    }

    #[test]
    fn layout_matches_design() {
        let id = SnapshotId::new("llama-7b", 3, 1200).expect("id");
        let root = Path::new("/r");
        assert_eq!(id.dir(root), Path::new("/r/llama-7b/3/step-1200"));
        assert_eq!(
            id.partial_dir(root),
            Path::new("/r/llama-7b/3/step-1200.partial")
        );
    }

    #[test]
    fn names_that_could_escape_or_collide_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "ü",
            &"x".repeat(129),
        ] {
            assert!(validate_job(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "llama-7b", "run_2.v3", &"x".repeat(128)] {
            assert!(validate_job(good).is_ok(), "{good:?}");
        }
        assert_eq!(parse_step_dir("step-0"), Some(0));
        assert_eq!(parse_step_dir("step-42"), Some(42));
        for bad in ["step-", "step-042", "step-4.partial", "step--1", "Step-1"] {
            assert_eq!(parse_step_dir(bad), None, "{bad}");
        }
        assert_eq!(parse_rank_dir("7"), Some(7));
        assert_eq!(parse_rank_dir("4294967296"), None);
    }
}
