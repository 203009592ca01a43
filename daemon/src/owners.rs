//! Who owns each job: the uid of the first client that registered it,
//! recorded durably in `<root>/<job>/OWNER` (decimal uid and a newline) so
//! that isolation outlives daemon restarts. A client sees and touches only
//! the jobs of its own uid; root sees all. A job directory without an OWNER
//! file (written by hand or by an older daemon) belongs to root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::store::{Store, StoreError};

/// The owner file inside a job directory.
pub const OWNER_FILE: &str = "OWNER";
const OWNER_LEN_MAX: u64 = 32;

/// Why an ownership question cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("job {job:?} belongs to uid {owner}, not {uid}")]
    NotOwner { job: String, owner: u32, uid: u32 },
    #[error("{path}: not an owner record ({why})")]
    Malformed { path: PathBuf, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The ownership records, cached.
#[derive(Debug, Default)]
pub struct Owners {
    cache: Mutex<HashMap<String, u32>>,
}

impl Owners {
    /// The owner of `job`, `None` if nobody has registered it yet.
    pub fn owner(&self, store: &Store, job: &str) -> Result<Option<u32>, OwnerError> {
        if let Some(uid) = self.lock().get(job) {
            return Ok(Some(*uid));
        }
        let job_dir = store.root().join(job);
        let path = job_dir.join(OWNER_FILE);
        let owner = match store.storage().read_file_limited(&path, OWNER_LEN_MAX) {
            Ok(bytes) => Some(parse(&path, &bytes)?),
            Err(e) if e.is_not_found() => {
                if store
                    .storage()
                    .metadata(&job_dir)
                    .map_err(StoreError::from)?
                    .is_some()
                {
                    Some(0)
                } else {
                    None
                }
            }
            Err(e) => return Err(StoreError::from(e).into()),
        };
        if let Some(uid) = owner {
            self.lock().insert(job.to_owned(), uid);
        }
        Ok(owner)
    }

    /// Checks that `uid` may use `job`, claiming it durably for `uid` when it
    /// is new.
    pub fn claim(&self, store: &Store, job: &str, uid: u32) -> Result<(), OwnerError> {
        let _serial = CLAIMING.lock().unwrap_or_else(PoisonError::into_inner);
        match self.owner(store, job)? {
            Some(owner) if owner == uid || uid == 0 => Ok(()),
            Some(owner) => Err(OwnerError::NotOwner {
                job: job.to_owned(),
                owner,
                uid,
            }),
            None => {
                let job_dir = store.root().join(job);
                store.ensure_dir_durable(&job_dir)?;
                let path = job_dir.join(OWNER_FILE);
                store
                    .storage()
                    .write_file_synced(&path, format!("{uid}\n").as_bytes())
                    .map_err(StoreError::from)?;
                store
                    .storage()
                    .sync_dir(&job_dir)
                    .map_err(StoreError::from)?;
                self.lock().insert(job.to_owned(), uid);
                tracing::info!(job, uid, "job claimed");
                Ok(())
            }
        }
    }

    /// Whether `uid` may see `job`.
    pub fn visible(&self, store: &Store, job: &str, uid: u32) -> bool {
        uid == 0 || matches!(self.owner(store, job), Ok(Some(owner)) if owner == uid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Claims run one at a time, so two first registrations of a job cannot
/// both think they created it.
static CLAIMING: Mutex<()> = Mutex::new(());

fn parse(path: &Path, bytes: &[u8]) -> Result<u32, OwnerError> {
    let malformed = |why: &str| OwnerError::Malformed {
        path: path.to_path_buf(),
        why: why.to_owned(),
    };
    let text = std::str::from_utf8(bytes).map_err(|_| malformed("not UTF-8"))?;
    text.strip_suffix('\n')
        .ok_or_else(|| malformed("no trailing newline"))?
        .parse()
        .map_err(|_| malformed("not a decimal uid"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    #[test]
    fn first_registration_claims_and_others_are_refused_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StoreConfig {
            root: dir.path().to_path_buf(),
            io_backend: crate::storage::probe::BackendChoice::Buffered,
            ..StoreConfig::default()
        };
        let store = Store::open(config).expect("store");
        let owners = Owners::default();
        assert_eq!(owners.owner(&store, "j").expect("ask"), None);
        owners.claim(&store, "j", 1000).expect("claim");
        owners.claim(&store, "j", 1000).expect("own job again");
        owners.claim(&store, "j", 0).expect("root may use any job");
        assert!(matches!(
            owners.claim(&store, "j", 1001),
            Err(OwnerError::NotOwner { owner: 1000, .. })
        ));
        let fresh = Owners::default();
        assert_eq!(fresh.owner(&store, "j").expect("ask"), Some(1000));
        assert!(fresh.visible(&store, "j", 1000) && !fresh.visible(&store, "j", 1001));
        std::fs::create_dir(dir.path().join("legacy")).expect("mkdir");
        assert_eq!(fresh.owner(&store, "legacy").expect("ask"), Some(0));
        std::fs::create_dir_all(dir.path().join("bad")).expect("mkdir");
        std::fs::write(dir.path().join("bad").join(OWNER_FILE), b"x\n").expect("write");
        assert!(matches!(
            fresh.owner(&store, "bad"),
            Err(OwnerError::Malformed { .. })
        ));
    }
}
