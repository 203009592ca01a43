//! What tests steer and observe: fault rules, call counts, violations and the
//! per-operation delay. Process-wide, independent of `cuInit`: a test may
//! install a fault before the first driver call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};

use cudarc::driver::sys::CUresult;

use crate::config::{self, FaultRule};

/// A fault that fired on this call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injected {
    pub code: CUresult,
    pub asynchronous: bool,
}

#[derive(Debug)]
struct Installed {
    rule: FaultRule,
    /// The function's call count when the rule was installed.
    base: u64,
}

/// The process-wide control state.
#[derive(Debug)]
pub struct Control {
    faults: Mutex<Vec<Installed>>,
    calls: Mutex<HashMap<&'static str, u64>>,
    violations: Mutex<Vec<String>>,
    op_delay_us: AtomicU64,
}

/// The control state; the first use installs the environment's fault rules
/// and delay (none, and the default delay, if the environment is malformed:
/// `cuInit` reports that).
pub fn control() -> &'static Control {
    static CONTROL: LazyLock<Control> = LazyLock::new(|| {
        let (faults, delay) = match config::config() {
            Ok(c) => (
                c.faults
                    .iter()
                    .map(|rule| Installed {
                        rule: rule.clone(),
                        base: 0,
                    })
                    .collect(),
                c.op_delay_us,
            ),
            Err(_) => (Vec::new(), 200),
        };
        Control {
            faults: Mutex::new(faults),
            calls: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            op_delay_us: AtomicU64::new(delay),
        }
    });
    &CONTROL
}

/// A lock that survives a panic of an earlier holder: the double's state
/// stays usable for the rest of a test run.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Control {
    /// Counts a call of `function`; returns its number (from 1).
    pub fn count(&self, function: &'static str) -> u64 {
        let mut calls = lock(&self.calls);
        let c = calls.entry(function).or_insert(0);
        *c += 1;
        *c
    }

    /// The fault that fires on call number `count` of `function`, removed
    /// from the rules.
    pub fn fire(&self, function: &'static str, count: u64) -> Option<Injected> {
        let mut faults = lock(&self.faults);
        let at = faults.iter().position(|f| {
            f.rule.function == function && f.base.checked_add(f.rule.nth) == Some(count)
        })?;
        let fired = faults.remove(at);
        Some(Injected {
            code: fired.rule.code,
            asynchronous: fired.rule.asynchronous,
        })
    }

    /// Installs a rule, counting from now.
    pub fn install(&self, rule: FaultRule) {
        let base = self.call_count(rule.function);
        lock(&self.faults).push(Installed { rule, base });
    }

    pub fn clear_faults(&self) {
        lock(&self.faults).clear();
    }

    pub fn call_count(&self, function: &str) -> u64 {
        lock(&self.calls).get(function).copied().unwrap_or(0)
    }

    /// Records a use the real driver would punish (a crash, corrupted data,
    /// a leak). Reported on stderr too, so a test log shows it.
    pub fn violation(&self, message: String) {
        eprintln!("gpusnap-cuda-double: violation: {message}");
        lock(&self.violations).push(message);
    }

    pub fn violation_count(&self) -> u64 {
        u64::try_from(lock(&self.violations).len()).unwrap_or(u64::MAX)
    }

    pub fn violation_message(&self, index: u64) -> Option<String> {
        let index = usize::try_from(index).ok()?;
        lock(&self.violations).get(index).cloned()
    }

    pub fn op_delay_us(&self) -> u64 {
        self.op_delay_us.load(Ordering::Relaxed)
    }

    pub fn set_op_delay_us(&self, us: u64) {
        self.op_delay_us.store(us, Ordering::Relaxed);
    }
}
