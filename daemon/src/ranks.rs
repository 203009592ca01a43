//! What the daemon knows of each (job, rank) across connections: which
//! connection holds it, which steps are captured and not yet committed, and
//! the newest committed step. A restore waits here for in-flight persists, so
//! a trainer that crashed after `Captured` and came back restores the step it
//! had captured.
//!
//! A connection holds its (job, rank) through a [`RankHold`], which gives it
//! back when dropped: however the connection ends (a clean close, an error,
//! a panic in its task), the next registration of that rank is not `Busy`.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// A (job, rank): what one registration captures and restores.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankKey {
    pub job: String,
    pub rank: u32,
}

impl RankKey {
    pub fn new(job: impl Into<String>, rank: u32) -> RankKey {
        RankKey {
            job: job.into(),
            rank,
        }
    }
}

impl fmt::Display for RankKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {:?} rank {}", self.job, self.rank)
    }
}

#[derive(Debug, Default, Clone)]
struct RankState {
    holder: Option<u64>,
    in_flight: BTreeSet<u64>,
    last_committed: Option<u64>,
}

/// One rank's state, as status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankView {
    pub key: RankKey,
    pub in_flight: u64,
    pub last_committed: Option<u64>,
}

/// Every (job, rank) this daemon has seen since it started.
#[derive(Debug, Default)]
pub struct Ranks {
    state: Mutex<HashMap<RankKey, RankState>>,
    changed: tokio::sync::Notify,
}

/// Connection `conn`'s hold on a (job, rank); released on drop.
#[derive(Debug)]
#[must_use = "the rank is released when the hold is dropped"]
pub struct RankHold {
    ranks: Arc<Ranks>,
    key: RankKey,
    conn: u64,
}

impl Drop for RankHold {
    fn drop(&mut self) {
        self.ranks.release(&self.key, self.conn);
    }
}

impl Ranks {
    /// Makes connection `conn` the holder of `key` for as long as the
    /// returned hold lives; the current holder's id if another connection
    /// has it.
    pub fn acquire(self: &Arc<Self>, key: &RankKey, conn: u64) -> Result<RankHold, u64> {
        let mut state = self.lock();
        let entry = state.entry(key.clone()).or_default();
        match entry.holder {
            Some(other) => Err(other),
            None => {
                entry.holder = Some(conn);
                Ok(RankHold {
                    ranks: Arc::clone(self),
                    key: key.clone(),
                    conn,
                })
            }
        }
    }

    /// Called by a hold's Drop: never panics (a second panic while
    /// unwinding aborts the daemon); a release by a connection that does not
    /// hold the rank is logged, changes nothing, and fails debug builds when
    /// not unwinding already.
    fn release(&self, key: &RankKey, conn: u64) {
        let mut state = self.lock();
        match state.get_mut(key) {
            Some(entry) if entry.holder == Some(conn) => entry.holder = None,
            other => {
                let holder = other.and_then(|e| e.holder);
                tracing::error!(%key, conn, ?holder, "a rank released by a connection that does not hold it; left as it is");
                debug_assert!(
                    std::thread::panicking(),
                    "{key} released by connection {conn}, which does not hold it (holder {holder:?})"
                );
            }
        }
    }

    /// Records `step` as captured and being persisted; false if it already is.
    pub fn start(&self, key: &RankKey, step: u64) -> bool {
        self.lock()
            .entry(key.clone())
            .or_default()
            .in_flight
            .insert(step)
    }

    /// Records the end of `step`'s persist (`committed` or not). Called from
    /// an in-flight guard's Drop, so it never panics (a second panic while
    /// unwinding aborts the daemon): a step that was not in flight is
    /// logged, and fails debug builds when not unwinding already.
    pub fn finish(&self, key: &RankKey, step: u64, committed: bool) {
        {
            let mut state = self.lock();
            let entry = state.entry(key.clone()).or_default();
            let was = entry.in_flight.remove(&step);
            if !was {
                tracing::error!(%key, step, "finishing a step that was not in flight");
            }
            debug_assert!(
                was || std::thread::panicking(),
                "finishing step {step} of {key}, which was not in flight"
            );
            if committed {
                entry.last_committed = entry.last_committed.max(Some(step));
            }
        }
        self.changed.notify_waiters();
    }

    /// Records a step found committed on disk at start-up.
    pub fn seed(&self, key: &RankKey, step: u64) {
        let mut state = self.lock();
        let entry = state.entry(key.clone()).or_default();
        entry.last_committed = entry.last_committed.max(Some(step));
    }

    pub fn is_in_flight(&self, key: &RankKey, step: u64) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|e| e.in_flight.contains(&step))
    }

    /// Waits until `key` has nothing in flight; false on timeout.
    pub async fn wait_idle(&self, key: &RankKey, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().get(key).is_none_or(|e| e.in_flight.is_empty()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    pub fn views(&self) -> Vec<RankView> {
        let mut views: Vec<RankView> = self
            .lock()
            .iter()
            .map(|(key, e)| RankView {
                key: key.clone(),
                in_flight: gpusnap_proto::convert::to_u64(e.in_flight.len()),
                last_committed: e.last_committed,
            })
            .collect();
        views.sort_by(|a, b| a.key.cmp(&b.key));
        views
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RankKey, RankState>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_has_one_holder_until_its_hold_is_dropped() {
        let ranks = Arc::new(Ranks::default());
        let key = RankKey::new("j", 0);
        let first = ranks.acquire(&key, 1).expect("first");
        assert_eq!(ranks.acquire(&key, 2).map(|_| ()), Err(1));
        assert_eq!(
            ranks.acquire(&key, 1).map(|_| ()),
            Err(1),
            "not even its holder takes it twice"
        );
        drop(first);
        let second = ranks.acquire(&key, 2).expect("free again");
        drop(second);
        let _third = ranks.acquire(&key, 3).expect("free again");
    }

    #[test]
    fn a_hold_dropped_by_a_panic_releases_the_rank() {
        let ranks = Arc::new(Ranks::default());
        let key = RankKey::new("j", 0);
        let held = Arc::clone(&ranks);
        let k = key.clone();
        let panicked = std::thread::spawn(move || {
            let _hold = held.acquire(&k, 1).expect("first");
            panic!("a connection task's bug");
        })
        .join();
        assert!(panicked.is_err());
        let _again = ranks.acquire(&key, 2).expect("released by the unwinding");
    }

    /// A hold that does not match the table (a bug) fails debug builds when
    /// dropped normally, and never panics while the thread already unwinds:
    /// a second panic would abort the daemon.
    #[test]
    fn a_broken_release_fails_debug_builds_but_never_panics_while_unwinding() {
        use std::panic::{AssertUnwindSafe, catch_unwind};
        let ranks = Arc::new(Ranks::default());
        let key = RankKey::new("j", 0);
        let real = ranks.acquire(&key, 1).expect("first");
        let forged = || RankHold {
            ranks: Arc::clone(&ranks),
            key: key.clone(),
            conn: 2,
        };
        let dropped = catch_unwind(AssertUnwindSafe(|| drop(forged())));
        assert_eq!(dropped.is_err(), cfg!(debug_assertions));
        let unwound = catch_unwind(AssertUnwindSafe(|| {
            let _forged = forged();
            panic!("the first panic");
        }));
        let payload = unwound.expect_err("the first panic propagates");
        assert_eq!(
            crate::server::errors::panic_message(&*payload),
            "the first panic",
            "the release did not panic again"
        );
        assert_eq!(
            ranks.acquire(&key, 3).map(|_| ()),
            Err(1),
            "a broken release changes nothing"
        );
        drop(real);

        let finished = catch_unwind(AssertUnwindSafe(|| ranks.finish(&key, 9, false)));
        assert_eq!(finished.is_err(), cfg!(debug_assertions));
        let unwound = catch_unwind(AssertUnwindSafe(|| {
            struct FinishOnDrop<'r>(&'r Ranks, &'r RankKey);
            impl Drop for FinishOnDrop<'_> {
                fn drop(&mut self) {
                    self.0.finish(self.1, 9, false);
                }
            }
            let _finish = FinishOnDrop(&ranks, &key);
            panic!("the first panic");
        }));
        assert!(unwound.is_err(), "one panic, no abort");
    }

    #[tokio::test]
    async fn restores_wait_for_in_flight_steps() {
        let ranks = Arc::new(Ranks::default());
        let key = RankKey::new("j", 0);
        assert!(ranks.start(&key, 10));
        assert!(!ranks.start(&key, 10));
        assert!(!ranks.wait_idle(&key, Duration::from_millis(20)).await);
        let r = Arc::clone(&ranks);
        let k = key.clone();
        let finisher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            r.finish(&k, 10, true);
        });
        assert!(ranks.wait_idle(&key, Duration::from_secs(10)).await);
        finisher.await.expect("join");
        assert_eq!(ranks.views()[0].last_committed, Some(10));
    }
}
