//! Test-only fault injection: the `[testing]` table of the configuration
//! turned into hooks that the connections and the persist engine call at
//! fixed points. A production config has no such table (the config refuses
//! one unless `GPUSNAP_TESTING=1` is set), and then every hook is the check
//! of an unset option.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{TESTING_ENV, TestingConfig};

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
}
