//! Test-only fault injection: the `[testing]` table of the configuration
//! turned into hooks that the connections and the persist engine call at
//! fixed points, and into the latency backend the store opens on
//! ([`open_store`]: `testing.delays`). A production config has no such
//! table (the config refuses one unless `GPUSNAP_TESTING=1` is set), and
//! then every hook is the check of an unset option and the store's storage
//! is not wrapped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{TESTING_ENV, TestingConfig};
use crate::storage::delay::DelayedStorage;
use crate::store::{Store, StoreConfig, StoreError};

/// Opens the daemon's store: on the real storage, or, when `testing` has
/// `delays`, on the real storage wrapped in a [`DelayedStorage`] with those
/// specs (the latency backend), through [`Store::open_wrapped`]. Everything
/// else about the store (the backend probe, recovery) is the same.
pub fn open_store(
    store: StoreConfig,
    testing: Option<&TestingConfig>,
) -> Result<Store, StoreError> {
    let delays = testing.map_or(&[][..], |t| t.delays.as_slice());
    if delays.is_empty() {
        return Store::open(store);
    }
    tracing::warn!(
        ?delays,
        "[testing] delays: the store's storage is the latency backend ({TESTING_ENV}=1); this daemon is for tests only"
    );
    let specs = delays.to_vec();
    Store::open_wrapped(store, move |real| {
        Arc::new(DelayedStorage::new(real, specs))
    })
}

/// The armed hooks of one daemon.
#[derive(Debug, Default)]
pub struct Hooks {
    panic_once_on_request: Option<String>,
    request_panic_fired: AtomicBool,
    panic_persisting_step: Option<u64>,
}

impl Hooks {
    /// The hooks `testing` arms (none without a `[testing]` table).
    pub fn new(testing: Option<&TestingConfig>) -> Hooks {
        let Some(TestingConfig {
            panic_once_on_request,
            panic_persisting_step,
            // The store's, not a hook: see `open_store`.
            delays: _,
        }) = testing
        else {
            return Hooks::default();
        };
        tracing::warn!(
            ?panic_once_on_request,
            ?panic_persisting_step,
            "[testing] fault injection is on ({TESTING_ENV}=1); this daemon is for tests only"
        );
        Hooks {
            panic_once_on_request: panic_once_on_request.clone(),
            request_panic_fired: AtomicBool::new(false),
            panic_persisting_step: *panic_persisting_step,
        }
    }

    /// Called by a connection before it handles a request named `name`.
    pub fn on_request(&self, name: &str) {
        if self.panic_once_on_request.as_deref() == Some(name)
            && !self.request_panic_fired.swap(true, Ordering::SeqCst)
        {
            panic!("injected panic handling a {name} request ([testing] panic_once_on_request)");
        }
    }

    /// Called by a lane or a stream thread before it writes `step`.
    pub fn on_persist(&self, step: u64) {
        if self.panic_persisting_step == Some(step) {
            panic!("injected panic persisting step {step} ([testing] panic_persisting_step)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unarmed_hooks_do_nothing_and_armed_ones_panic_where_named() {
        let off = Hooks::new(None);
        off.on_request("captured");
        off.on_persist(2);
        let on = Hooks::new(Some(&TestingConfig {
            panic_once_on_request: Some("captured".into()),
            panic_persisting_step: Some(2),
            delays: Vec::new(),
        }));
        on.on_request("begin");
        on.on_persist(1);
        let first = std::panic::catch_unwind(|| on.on_request("captured"));
        assert!(first.is_err(), "the first captured panics");
        on.on_request("captured");
        for _ in 0..2 {
            assert!(
                std::panic::catch_unwind(|| on.on_persist(2)).is_err(),
                "every persist of step 2 panics"
            );
        }
    }

    #[test]
    fn testing_delays_open_the_store_on_the_latency_backend() {
        use crate::storage::delay::{DelaySpec, DelayedOp};
        use crate::store::{Layout, SnapshotId, Source};
        use gpusnap_proto::{Dtype, TensorSpec};
        use std::time::{Duration, Instant};

        const DELAY: Duration = Duration::from_millis(300);
        let dir = tempfile::tempdir().expect("tempdir");
        let config = |name: &str| StoreConfig {
            root: dir.path().join(name),
            io_backend: crate::storage::probe::BackendChoice::Buffered,
            io_buffer_bytes: 4096,
            io_pool_bytes: 16 * 4096,
            ..StoreConfig::default()
        };
        let testing = TestingConfig {
            delays: vec![DelaySpec {
                op: DelayedOp::SyncData,
                delay_ms: u64::try_from(DELAY.as_millis()).expect("ms"),
                first_n: Some(1),
            }],
            ..TestingConfig::default()
        };
        let layout = Layout::plan(&[TensorSpec::new("t", Dtype::U8, [4096])]).expect("plan");
        let data = crate::hot_tier::HotBuffer::from_slice(&[7; 4096]).expect("aligned");
        let commit = |store: &Store, step: u64| {
            let id = SnapshotId::new("j".to_owned(), 0, step).expect("id");
            let started = Instant::now();
            store
                .write_laid_out(&id, &layout, 1, Source::Memory(&data))
                .expect("commit");
            started.elapsed()
        };
        let delayed = open_store(config("delayed"), Some(&testing)).expect("store");
        let took = commit(&delayed, 1);
        assert!(
            took >= DELAY,
            "the first snapshot's fdatasync is delayed: {took:?}"
        );
        let plain = open_store(config("plain"), Some(&TestingConfig::default())).expect("store");
        let unwrapped = open_store(config("none"), None).expect("store");
        for store in [&plain, &unwrapped] {
            // Nothing to assert on a fast disk's speed: the data is intact.
            commit(store, 1);
            let snapshot = store.find("j", 0, Some(1)).expect("committed");
            let report = store.verify(&snapshot.dir);
            assert!(report.is_ok(), "{:?}", report.problems);
        }
    }
}
