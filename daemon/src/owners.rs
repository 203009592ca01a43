//! Who owns each job: the uid of the first client that registered it,
//! recorded durably in `<root>/<job>/OWNER` (decimal uid and a newline) so
//! that isolation outlives daemon restarts. A client sees and touches only
//! the jobs of its own uid; root sees all. A job directory without a valid
//! OWNER is refused ([`OwnerError::BadOwner`], naming the directory): it was
//! not made by a claim, or was damaged, and guessing an owner would hand the
//! job to the wrong user.
//!
//! # Why a claim cannot lock its user out
//!
//! A job directory appears with its OWNER already inside and durable. A
//! claim builds the directory under a temporary name in the root,
//! `.claiming-<job>` (never listed as a job: no job name starts with a dot):
//!
//! 1. `mkdir <root>/.claiming-<job>`;
//! 2. write `OWNER` in it and fdatasync it;
//! 3. fsync the temporary directory: OWNER's entry is durable in it;
//! 4. rename it to `<root>/<job>`: the job appears all at once;
//! 5. fsync the root: the rename is durable.
//!
//! A crash or power cut before step 4 leaves at most the temporary
//! directory, which start-up recovery removes (`Store::recover`): the job is
//! unclaimed, and the next registration, by anyone, claims it. From step 4
//! on, `<root>/<job>` exists only as the renamed directory, whose OWNER was
//! made durable (steps 2 and 3) before the rename, so wherever it is seen,
//! before or after a power cut, it has its owner. A power cut between 4 and
//! 5 may undo the rename (the job is unclaimed again) but never keeps a job
//! directory without its OWNER. A failed claim removes its temporary
//! directory; nothing is ever written into an existing job directory.
//!
//! Claims are serialized within the daemon, and the daemon's store never
//! creates a job directory (`JobDirs::Claimed`): a commit whose job
//! directory vanished after its claim fails (`StoreError::JobMissing`)
//! instead of making the job again without its OWNER. The cache of owners
//! is checked against the disk at each claim: a registration whose job
//! directory was removed since (by an operator, with the whole store or
//! alone) claims the job anew, as it would after a restart.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::storage::StorageError;
use crate::store::paths::{self, claim_dir_name};
use crate::store::{Store, StoreError};

/// The owner file inside a job directory.
pub const OWNER_FILE: &str = "OWNER";
const OWNER_LEN_MAX: u64 = 32;

/// What is wrong with a job directory's owner record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OwnerProblem {
    #[error("has no OWNER file")]
    Missing,
    #[error("is not a directory")]
    NotADirectory,
    #[error("has an OWNER file longer than {OWNER_LEN_MAX} bytes")]
    TooLong,
    #[error("has an OWNER file that is not UTF-8")]
    NotUtf8,
    #[error("has an OWNER file without its trailing newline")]
    NoNewline,
    #[error("has an OWNER file that is not a decimal uid")]
    NotAUid,
}

/// Why an ownership question cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("job {job:?} belongs to uid {owner}, not {uid}")]
    NotOwner { job: String, owner: u32, uid: u32 },
    #[error(
        "job directory {dir} {why}, so gpusnapd does not know whose it is and refuses it; write its owner's uid and a newline into {dir}/OWNER, or move the directory away"
    )]
    BadOwner { dir: PathBuf, why: OwnerProblem },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<StorageError> for OwnerError {
    fn from(e: StorageError) -> Self {
        OwnerError::Store(e.into())
    }
}

/// A step of a claim, reported to the stop-point hook (tests kill a
/// claiming process at each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClaimStep {
    TempCreated,
    OwnerWritten,
    TempSynced,
    Renamed,
    RootSynced,
}

impl ClaimStep {
    pub const ALL: [ClaimStep; 5] = [
        ClaimStep::TempCreated,
        ClaimStep::OwnerWritten,
        ClaimStep::TempSynced,
        ClaimStep::Renamed,
        ClaimStep::RootSynced,
    ];
}

/// Called at each claim step with the job's name; `None` in production.
pub type ClaimStopPoint = Arc<dyn Fn(&str, ClaimStep) + Send + Sync>;

/// The ownership records, cached.
#[derive(Default)]
pub struct Owners {
    cache: Mutex<HashMap<String, u32>>,
    stop_point: Option<ClaimStopPoint>,
}

impl fmt::Debug for Owners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Owners")
            .field("cached", &self.lock().len())
            .field("stop_point", &self.stop_point.is_some())
            .finish()
    }
}

impl Owners {
    /// Owners whose claims call `hook` at each step.
    pub fn with_stop_point(hook: ClaimStopPoint) -> Owners {
        Owners {
            cache: Mutex::default(),
            stop_point: Some(hook),
        }
    }

    /// The owner of `job`, `None` if nobody has claimed it yet. A job
    /// directory without a valid OWNER is [`OwnerError::BadOwner`].
    pub fn owner(&self, store: &Store, job: &str) -> Result<Option<u32>, OwnerError> {
        paths::validate_job(job).map_err(StoreError::from)?;
        if let Some(uid) = self.lock().get(job) {
            return Ok(Some(*uid));
        }
        let dir = store.root().join(job);
        let bad = |why| OwnerError::BadOwner {
            dir: dir.clone(),
            why,
        };
        match store.storage().metadata(&dir)? {
            None => return Ok(None),
            Some(m) if !m.is_dir => return Err(bad(OwnerProblem::NotADirectory)),
            Some(_) => {}
        }
        let bytes = match store
            .storage()
            .read_file_limited(&dir.join(OWNER_FILE), OWNER_LEN_MAX)
        {
            Ok(bytes) => bytes,
            Err(e) if e.is_not_found() => return Err(bad(OwnerProblem::Missing)),
            Err(StorageError::TooLarge { .. }) => return Err(bad(OwnerProblem::TooLong)),
            Err(e) => return Err(e.into()),
        };
        let uid = parse(&bytes).map_err(bad)?;
        self.lock().insert(job.to_owned(), uid);
        Ok(Some(uid))
    }

    /// Checks that `uid` may use `job`, claiming it durably for `uid` when it
    /// is new (the sequence of the module doc).
    pub fn claim(&self, store: &Store, job: &str, uid: u32) -> Result<(), OwnerError> {
        let _serial = CLAIMING.lock().unwrap_or_else(PoisonError::into_inner);
        self.forget_if_removed(store, job)?;
        match self.owner(store, job)? {
            Some(owner) if owner == uid || uid == 0 => Ok(()),
            Some(owner) => Err(OwnerError::NotOwner {
                job: job.to_owned(),
                owner,
                uid,
            }),
            None => {
                self.create(store, job, uid)?;
                self.lock().insert(job.to_owned(), uid);
                tracing::info!(job, uid, "job claimed");
                Ok(())
            }
        }
    }

    /// Whether `uid` may see `job`. A job whose owner cannot be read (an
    /// I/O error, a directory without a valid OWNER) is not visible to
    /// anyone but root, and the reason is logged naming the job.
    pub fn visible(&self, store: &Store, job: &str, uid: u32) -> bool {
        if uid == 0 {
            return true;
        }
        match self.owner(store, job) {
            Ok(owner) => owner == Some(uid),
            Err(error) => {
                tracing::warn!(job, uid, %error, "cannot tell who owns the job; it is hidden from this client");
                false
            }
        }
    }

    /// Drops the cached owner of `job` when its directory is gone (an
    /// operator removed it, or the whole store, while the daemon runs), so
    /// the claim that follows makes it again instead of trusting the cache
    /// and leaving every commit to fail with `StoreError::JobMissing`.
    fn forget_if_removed(&self, store: &Store, job: &str) -> Result<(), OwnerError> {
        paths::validate_job(job).map_err(StoreError::from)?;
        if !self.lock().contains_key(job) {
            return Ok(());
        }
        if store.storage().metadata(&store.root().join(job))?.is_none() {
            self.lock().remove(job);
            tracing::warn!(
                job,
                "the job's directory was removed while gpusnapd runs; claiming it anew"
            );
        }
        Ok(())
    }

    /// Makes `<root>/<job>` appear with `uid` in its OWNER.
    fn create(&self, store: &Store, job: &str, uid: u32) -> Result<(), OwnerError> {
        let storage = store.storage();
        let root = store.root();
        let temp = root.join(claim_dir_name(job));
        // Left by an earlier claim of this process that failed and could
        // not clean up (a crash's leftovers are gone since start-up).
        if storage.metadata(&temp)?.is_some() {
            storage.remove_dir_all(&temp)?;
        }
        storage.create_dir(&temp)?;
        self.stop_point(job, ClaimStep::TempCreated);
        let made = self.fill_and_rename(store, job, uid, &temp);
        if let Err(e) = &made {
            tracing::error!(job, uid, error = %e, "claim failed; removing its temporary directory");
            match storage.remove_dir_all(&temp) {
                Ok(()) => {}
                Err(r) if r.is_not_found() => {}
                Err(r) => {
                    tracing::error!(dir = %temp.display(), error = %r, "could not remove a failed claim's directory; the next claim or start-up recovery removes it");
                }
            }
        }
        made
    }

    fn fill_and_rename(
        &self,
        store: &Store,
        job: &str,
        uid: u32,
        temp: &Path,
    ) -> Result<(), OwnerError> {
        let storage = store.storage();
        storage.write_file_synced(&temp.join(OWNER_FILE), format!("{uid}\n").as_bytes())?;
        self.stop_point(job, ClaimStep::OwnerWritten);
        storage.sync_dir(temp)?;
        self.stop_point(job, ClaimStep::TempSynced);
        storage.rename(temp, &store.root().join(job))?;
        self.stop_point(job, ClaimStep::Renamed);
        storage.sync_dir(store.root())?;
        self.stop_point(job, ClaimStep::RootSynced);
        Ok(())
    }

    fn stop_point(&self, job: &str, step: ClaimStep) {
        if let Some(hook) = &self.stop_point {
            hook(job, step);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Claims run one at a time, so two first registrations of a job cannot
/// both think they created it.
static CLAIMING: Mutex<()> = Mutex::new(());

/// An `OWNER` file's uid (decimal digits and a newline); the remote tier
/// reads its `OWNER` object with the same rule.
pub(crate) fn parse(bytes: &[u8]) -> Result<u32, OwnerProblem> {
    let text = std::str::from_utf8(bytes).map_err(|_| OwnerProblem::NotUtf8)?;
    let digits = text.strip_suffix('\n').ok_or(OwnerProblem::NoNewline)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OwnerProblem::NotAUid);
    }
    digits.parse().map_err(|_| OwnerProblem::NotAUid)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use super::*;
    use crate::buffer_pool::BufferPool;
    use crate::storage::Storage;
    use crate::storage::sim::SimStorage;
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
        assert_eq!(
            std::fs::read(dir.path().join("j").join(OWNER_FILE)).expect("OWNER"),
            b"1000\n"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["j"], "no temporary directory is left");
        let fresh = Owners::default();
        assert_eq!(fresh.owner(&store, "j").expect("ask"), Some(1000));
        assert!(fresh.visible(&store, "j", 1000) && !fresh.visible(&store, "j", 1001));
        assert!(fresh.visible(&store, "j", 0));
        assert!(matches!(
            fresh.owner(&store, "../j"),
            Err(OwnerError::Store(StoreError::Name(_)))
        ));
    }

    #[test]
    fn a_job_directory_without_a_valid_owner_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StoreConfig {
            root: dir.path().to_path_buf(),
            io_backend: crate::storage::probe::BackendChoice::Buffered,
            ..StoreConfig::default()
        };
        let store = Store::open(config).expect("store");
        let owners = Owners::default();
        std::fs::create_dir(dir.path().join("legacy")).expect("mkdir");
        let cases: [(&str, &[u8], OwnerProblem); 5] = [
            ("bad", b"x\n", OwnerProblem::NotAUid),
            ("torn", b"10", OwnerProblem::NoNewline),
            ("empty", b"", OwnerProblem::NoNewline),
            ("signed", b"+5\n", OwnerProblem::NotAUid),
            ("long", &[b'1'; 40], OwnerProblem::TooLong),
        ];
        for (job, bytes, _) in &cases {
            std::fs::create_dir(dir.path().join(job)).expect("mkdir");
            std::fs::write(dir.path().join(job).join(OWNER_FILE), bytes).expect("write");
        }
        std::fs::write(dir.path().join("file"), b"").expect("write");
        let expected = cases.iter().map(|(job, _, why)| (*job, *why)).chain([
            ("legacy", OwnerProblem::Missing),
            ("file", OwnerProblem::NotADirectory),
        ]);
        for (job, why) in expected {
            for uid in [0, 1000] {
                let err = owners.claim(&store, job, uid).expect_err("refused");
                let OwnerError::BadOwner {
                    dir: named,
                    why: got,
                } = &err
                else {
                    panic!("{job}: {err}");
                };
                assert_eq!((named, *got), (&dir.path().join(job), why), "{job}");
                assert!(
                    err.to_string()
                        .contains(&dir.path().join(job).display().to_string())
                );
                assert!(!owners.visible(&store, job, 1000));
            }
        }
    }

    const ROOT: &str = "/snapshots";

    fn sim_store(sim: &SimStorage) -> Store {
        let config = StoreConfig {
            root: ROOT.into(),
            queue_depth: 2,
            io_buffer_bytes: 4096,
            io_pool_bytes: 4 * 4096,
            ..StoreConfig::default()
        };
        let pool = BufferPool::new(config.io_pool_bytes, config.io_buffer_bytes).expect("pool");
        Store::with_storage(config, Arc::new(sim.clone()), pool).expect("store")
    }

    /// Power cut at every mutating operation of a claim: after a reboot and
    /// recovery the job is unclaimed (and anyone may claim it) or owned by
    /// the claimer, never a directory nobody may use; no temporary directory
    /// survives recovery.
    #[test]
    fn power_loss_at_every_operation_of_a_claim_never_locks_the_user_out() {
        let probe = SimStorage::new(Path::new(ROOT));
        let store = sim_store(&probe);
        let before = probe.ops_count();
        Owners::default()
            .claim(&store, "job", 1000)
            .expect("uncut claim");
        let ops = probe.ops_count() - before;
        assert!(
            ops >= 5,
            "a claim is at least five mutating operations ({ops})"
        );

        let mut outcomes = [0usize; 2];
        for cut in 0..=ops {
            let live = SimStorage::new(Path::new(ROOT));
            let store = sim_store(&live);
            live.cut_power_after(cut);
            let claimed = Owners::default().claim(&store, "job", 1000);
            assert_eq!(
                claimed.is_ok(),
                cut >= ops,
                "cut at {cut} of {ops}: {claimed:?}"
            );
            drop(store);

            let rebooted = live.durable_image();
            let store = sim_store(&rebooted);
            let names: Vec<String> = rebooted
                .read_dir(Path::new(ROOT))
                .expect("read_dir")
                .into_iter()
                .map(|e| e.name)
                .collect();
            assert!(
                names.iter().all(|n| n == "job"),
                "cut {cut}: after recovery only the job may be there: {names:?}"
            );
            let owners = Owners::default();
            match owners.owner(&store, "job") {
                Ok(None) => {
                    owners
                        .claim(&store, "job", 2000)
                        .expect("an unclaimed job is claimable by anyone");
                    outcomes[0] += 1;
                }
                Ok(Some(1000)) => outcomes[1] += 1,
                other => panic!("cut {cut}: locked out: {other:?}"),
            }
        }
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
    }

    #[test]
    fn a_failed_claim_leaves_nothing_and_the_next_one_succeeds() {
        use crate::storage::fault::{FaultPlan, FaultyStorage};
        let sim = SimStorage::new(Path::new(ROOT));
        let faulty = FaultyStorage::new(
            Arc::new(sim.clone()),
            FaultPlan {
                fail_write_file_synced: Some(libc::ENOSPC),
                ..FaultPlan::default()
            },
        );
        let config = StoreConfig {
            root: ROOT.into(),
            queue_depth: 2,
            io_buffer_bytes: 4096,
            io_pool_bytes: 4 * 4096,
            ..StoreConfig::default()
        };
        let pool = BufferPool::new(config.io_pool_bytes, config.io_buffer_bytes).expect("pool");
        let store = Store::with_storage(config, Arc::new(faulty.clone()), pool).expect("store");
        let owners = Owners::default();
        let err = owners.claim(&store, "job", 1000).expect_err("disk full");
        assert!(
            matches!(&err, OwnerError::Store(e) if e.raw_os_error() == Some(libc::ENOSPC)),
            "{err:?}"
        );
        assert!(sim.read_dir(Path::new(ROOT)).expect("read_dir").is_empty());
        assert_eq!(owners.owner(&store, "job").expect("ask"), None);
        faulty.set_plan(FaultPlan::default());
        owners
            .claim(&store, "job", 1001)
            .expect("claim once there is room");
        assert_eq!(
            Owners::default().owner(&store, "job").expect("ask"),
            Some(1001)
        );
    }

    #[test]
    fn a_job_directory_removed_under_the_cache_is_claimed_anew() {
        let sim = SimStorage::new(Path::new(ROOT));
        let store = sim_store(&sim);
        let owners = Owners::default();
        owners.claim(&store, "job", 1000).expect("claim");
        let job_dir = Path::new(ROOT).join("job");
        sim.remove_dir_all(&job_dir)
            .expect("operator removes the job");
        owners.claim(&store, "job", 1000).expect("claimed again");
        assert_eq!(
            sim.read_file_limited(&job_dir.join(OWNER_FILE), OWNER_LEN_MAX)
                .expect("OWNER made again"),
            b"1000\n"
        );
        // Gone again: another uid's registration now claims it, as after a
        // restart.
        sim.remove_dir_all(&job_dir).expect("remove");
        owners
            .claim(&store, "job", 2000)
            .expect("claimed by another uid");
        assert_eq!(owners.owner(&store, "job").expect("ask"), Some(2000));
        assert!(matches!(
            owners.claim(&store, "job", 1000),
            Err(OwnerError::NotOwner { owner: 2000, .. })
        ));
    }
}
