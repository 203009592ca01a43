//! What the daemon knows of each (job, rank) across connections: which
//! connection holds it, which steps are captured and not yet committed, and
//! the newest committed step. A restore waits here for in-flight persists, so
//! a trainer that crashed after `Captured` and came back restores the step it
//! had captured.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::hot_tier::RankKey;

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

impl Ranks {
    /// Makes connection `conn` the holder of `key`; the current holder's id
    /// if another connection has it.
    pub fn acquire(&self, key: &RankKey, conn: u64) -> Result<(), u64> {
        let mut state = self.lock();
        let entry = state.entry(key.clone()).or_default();
        match entry.holder {
            Some(other) if other != conn => Err(other),
            _ => {
                entry.holder = Some(conn);
                Ok(())
            }
        }
    }

    pub fn release(&self, key: &RankKey, conn: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.get_mut(key)
            && entry.holder == Some(conn)
        {
            entry.holder = None;
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

    /// Records the end of `step`'s persist (`committed` or not).
    pub fn finish(&self, key: &RankKey, step: u64, committed: bool) {
        {
            let mut state = self.lock();
            let entry = state.entry(key.clone()).or_default();
            let was = entry.in_flight.remove(&step);
            assert!(was, "finishing step {step} that was not in flight");
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
                in_flight: e.in_flight.len() as u64,
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

    #[tokio::test]
    async fn one_holder_per_rank_and_restores_wait_for_in_flight_steps() {
        let ranks = std::sync::Arc::new(Ranks::default());
        let key: RankKey = ("j".into(), 0);
        ranks.acquire(&key, 1).expect("first");
        assert_eq!(ranks.acquire(&key, 2), Err(1));
        ranks.release(&key, 2);
        assert_eq!(ranks.acquire(&key, 2), Err(1), "only the holder releases");
        ranks.release(&key, 1);
        ranks.acquire(&key, 2).expect("free again");
        assert!(ranks.start(&key, 10));
        assert!(!ranks.start(&key, 10));
        assert!(!ranks.wait_idle(&key, Duration::from_millis(20)).await);
        let r = std::sync::Arc::clone(&ranks);
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
