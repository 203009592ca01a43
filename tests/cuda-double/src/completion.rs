//! The completion of one stream operation: what later operations, events and
//! synchronizing calls wait for. Waits are plain condvar waits, unbounded like
//! the driver's own (`cuStreamSynchronize` has no timeout either); nothing
//! spins.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use cudarc::driver::sys::CUresult;

use crate::control::lock;

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// `Err` when the operation failed (an injected fault, or a context that
    /// was already broken).
    pub result: Result<(), CUresult>,
    /// When it ended, for `cuEventElapsedTime_v2`.
    pub at: Instant,
}

/// A one-shot completion flag.
#[derive(Debug, Default)]
pub struct Completion {
    outcome: Mutex<Option<Outcome>>,
    done: Condvar,
}

impl Completion {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A completion that is already done, successfully.
    pub fn finished() -> Arc<Self> {
        let c = Self::new();
        c.complete(Ok(()));
        c
    }

    pub fn complete(&self, result: Result<(), CUresult>) {
        let mut outcome = lock(&self.outcome);
        debug_assert!(outcome.is_none(), "an operation completed twice");
        *outcome = Some(Outcome {
            result,
            at: Instant::now(),
        });
        self.done.notify_all();
    }

    /// The outcome, if the operation has ended.
    pub fn peek(&self) -> Option<Outcome> {
        *lock(&self.outcome)
    }

    pub fn is_done(&self) -> bool {
        self.peek().is_some()
    }

    /// Blocks until the operation has ended.
    pub fn wait(&self) -> Outcome {
        let mut outcome = lock(&self.outcome);
        loop {
            if let Some(o) = *outcome {
                return o;
            }
            outcome = self
                .done
                .wait(outcome)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// Waits for every completion in `all`.
pub fn wait_all(all: &[Arc<Completion>]) {
    for c in all {
        c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_returns_once_completed_from_another_thread() {
        let c = Completion::new();
        assert!(!c.is_done());
        let other = Arc::clone(&c);
        let t = std::thread::spawn(move || other.complete(Err(CUresult::CUDA_ERROR_LAUNCH_FAILED)));
        assert_eq!(c.wait().result, Err(CUresult::CUDA_ERROR_LAUNCH_FAILED));
        t.join().unwrap();
        assert!(Completion::finished().is_done());
    }
}
