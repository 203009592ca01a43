//! Object keys of the remote tier, and what a listed key is.
//!
//! ```text
//! <prefix>/<job>/<rank>/step-<N>/state.safetensors   the local data file, unchanged
//! <prefix>/<job>/<rank>/step-<N>/MANIFEST.json       the local manifest, unchanged; put last
//! <prefix>/<job>/step-<N>/COMPLETE                   the job-level marker (see `marker`)
//! ```
//!
//! Job names are already safe path segments (`store::paths::validate_job`),
//! and the prefix is checked at start, so a key never needs encoding.

use object_store::path::Path as ObjectPath;

use crate::store::SnapshotId;
use crate::store::paths::{self, DATA_FILE, MANIFEST_FILE};

/// The job-level marker's file name.
pub const MARKER_FILE: &str = "COMPLETE";

/// The keys of one job's snapshots under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// What one listed key of a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Object {
    Data { rank: u32, step: u64 },
    Manifest { rank: u32, step: u64 },
    Marker { step: u64 },
}

impl Object {
    pub fn step(self) -> u64 {
        match self {
            Object::Data { step, .. } | Object::Manifest { step, .. } | Object::Marker { step } => {
                step
            }
        }
    }
}

impl Keys {
    /// Keys under `prefix` (a checked `remote.prefix`; may be empty).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    fn key(&self, rest: &str) -> ObjectPath {
        let joined = if self.prefix.is_empty() {
            rest.to_owned()
        } else {
            format!("{}/{rest}", self.prefix)
        };
        // A checked prefix and job name and fixed names: always valid.
        ObjectPath::parse(&joined).expect("checked names make valid keys")
    }

    /// `<prefix>/<job>`: every object of the job.
    pub fn job(&self, job: &str) -> ObjectPath {
        self.key(job)
    }

    pub fn data(&self, id: &SnapshotId) -> ObjectPath {
        self.key(&format!(
            "{}/{}/{}/{DATA_FILE}",
            id.job,
            id.rank,
            paths::step_dir_name(id.step)
        ))
    }

    pub fn manifest(&self, id: &SnapshotId) -> ObjectPath {
        self.key(&format!(
            "{}/{}/{}/{MANIFEST_FILE}",
            id.job,
            id.rank,
            paths::step_dir_name(id.step)
        ))
    }

    /// `<prefix>/<job>/OWNER`: the uid that owns the job, as the local
    /// `OWNER` file says it; written once, before the job's first upload.
    pub fn owner(&self, job: &str) -> ObjectPath {
        self.key(&format!("{job}/{}", crate::owners::OWNER_FILE))
    }

    pub fn marker(&self, job: &str, step: u64) -> ObjectPath {
        self.key(&format!(
            "{job}/{}/{MARKER_FILE}",
            paths::step_dir_name(step)
        ))
    }

    /// What `key` (listed under [`Keys::job`] of `job`) is; `None` for
    /// anything else (an operator's file, an unfinished multipart upload's
    /// temporary name on some servers), which the tier never touches.
    pub fn parse(&self, job: &str, key: &ObjectPath) -> Option<Object> {
        let job_prefix = self.job(job);
        let rest = key.prefix_match(&job_prefix)?;
        let parts: Vec<String> = rest.map(|p| p.as_ref().to_owned()).collect();
        match parts.as_slice() {
            [step, file] if file == MARKER_FILE => Some(Object::Marker {
                step: paths::parse_step_dir(step)?,
            }),
            [rank, step, file] => {
                let rank = paths::parse_rank_dir(rank)?;
                let step = paths::parse_step_dir(step)?;
                match file.as_str() {
                    DATA_FILE => Some(Object::Data { rank, step }),
                    MANIFEST_FILE => Some(Object::Manifest { rank, step }),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The jobs named by top-level entries under the prefix (listed with a
    /// delimiter).
    pub fn job_of(&self, common_prefix: &ObjectPath) -> Option<String> {
        let base = if self.prefix.is_empty() {
            ObjectPath::default()
        } else {
            self.key("")
        };
        let mut rest = common_prefix.prefix_match(&base)?;
        let job = rest.next()?.as_ref().to_owned();
        (rest.next().is_none() && paths::validate_job(&job).is_ok()).then_some(job)
    }

    /// Where jobs are listed from.
    pub fn root(&self) -> Option<ObjectPath> {
        (!self.prefix.is_empty()).then(|| self.key(""))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests unwrap known data")]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout_and_parse_back() {
        let keys = Keys::new("team/gpusnap");
        let id = SnapshotId::new("llama", 3, 1200).unwrap();
        assert_eq!(
            keys.data(&id).as_ref(),
            "team/gpusnap/llama/3/step-1200/state.safetensors"
        );
        assert_eq!(
            keys.manifest(&id).as_ref(),
            "team/gpusnap/llama/3/step-1200/MANIFEST.json"
        );
        assert_eq!(
            keys.marker("llama", 1200).as_ref(),
            "team/gpusnap/llama/step-1200/COMPLETE"
        );
        assert_eq!(
            keys.parse("llama", &keys.data(&id)),
            Some(Object::Data {
                rank: 3,
                step: 1200
            })
        );
        assert_eq!(
            keys.parse("llama", &keys.manifest(&id)),
            Some(Object::Manifest {
                rank: 3,
                step: 1200
            })
        );
        assert_eq!(
            keys.parse("llama", &keys.marker("llama", 1200)),
            Some(Object::Marker { step: 1200 })
        );
        for other in [
            "team/gpusnap/llama/3/step-1200/notes.txt",
            "team/gpusnap/llama/3/step-012/MANIFEST.json",
            "team/gpusnap/llama/x/step-1/MANIFEST.json",
            "team/gpusnap/llama/step-1/OTHER",
            "team/gpusnap/llamas/3/step-1/MANIFEST.json",
            "team/gpusnap/llama/3/step-1/MANIFEST.json/extra",
        ] {
            assert_eq!(
                keys.parse("llama", &ObjectPath::parse(other).unwrap()),
                None,
                "{other}"
            );
        }
        assert_eq!(
            keys.job_of(&ObjectPath::parse("team/gpusnap/llama").unwrap()),
            Some("llama".into())
        );
        assert_eq!(
            keys.job_of(&ObjectPath::parse("team/gpusnap/.x").unwrap()),
            None
        );
        assert_eq!(keys.root().unwrap().as_ref(), "team/gpusnap");
    }

    #[test]
    fn an_empty_prefix_puts_jobs_at_the_top() {
        let keys = Keys::new("");
        let id = SnapshotId::new("j", 0, 1).unwrap();
        assert_eq!(keys.data(&id).as_ref(), "j/0/step-1/state.safetensors");
        assert_eq!(keys.marker("j", 1).as_ref(), "j/step-1/COMPLETE");
        assert_eq!(
            keys.parse("j", &keys.marker("j", 1)),
            Some(Object::Marker { step: 1 })
        );
        assert_eq!(
            keys.job_of(&ObjectPath::parse("j").unwrap()),
            Some("j".into())
        );
        assert_eq!(keys.root(), None);
    }
}
