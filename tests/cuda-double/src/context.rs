//! Contexts: one primary context per device, reference counted, and each
//! thread's stack of current contexts.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::ThreadId;

use cudarc::driver::sys::CUresult;

use crate::completion::Completion;
use crate::errors;
use crate::stream::StreamEntry;

/// What a context's operations and handles share: its identity and its
/// sticky error. A reset makes a new one; operations of the old one keep the
/// old one.
#[derive(Debug)]
pub struct CtxShared {
    /// The `CUcontext` value (stable for the device across resets).
    pub handle: usize,
    pub device: usize,
    /// 0: healthy; otherwise the `CUresult` number of the sticky error.
    sticky: AtomicU32,
}

impl CtxShared {
    pub fn new(handle: usize, device: usize) -> Self {
        Self {
            handle,
            device,
            sticky: AtomicU32::new(0),
        }
    }

    /// The error every call in this context returns, once it is broken.
    pub fn sticky(&self) -> Option<CUresult> {
        match self.sticky.load(Ordering::Acquire) {
            0 => None,
            raw => Some(errors::from_raw(raw).unwrap_or(CUresult::CUDA_ERROR_UNKNOWN)),
        }
    }

    /// `Err(sticky error)` once the context is broken.
    pub fn check(&self) -> Result<(), CUresult> {
        self.sticky().map_or(Ok(()), Err)
    }

    /// Breaks the context with `code`; the first error stays.
    pub fn break_with(&self, code: CUresult) {
        let _ = self
            .sticky
            .compare_exchange(0, code as u32, Ordering::AcqRel, Ordering::Acquire);
    }

    pub fn clear_sticky(&self) {
        self.sticky.store(0, Ordering::Release);
    }
}

/// A device's primary context.
#[derive(Debug)]
pub struct PrimaryContext {
    pub handle: usize,
    pub device: usize,
    pub refcount: u32,
    /// `Some` while retained (refcount > 0).
    pub active: Option<Arc<CtxShared>>,
    /// The legacy default stream (handles 0 and `CU_STREAM_LEGACY`), made on
    /// first use.
    pub legacy: Option<StreamEntry>,
    /// `CU_STREAM_PER_THREAD`: a blocking stream per calling thread.
    pub per_thread: HashMap<ThreadId, StreamEntry>,
    /// The last operations of destroyed blocking streams, still pending: the
    /// legacy stream and `cuCtxSynchronize` still wait for them.
    pub retired: Vec<Arc<Completion>>,
}

impl PrimaryContext {
    pub fn new(handle: usize, device: usize) -> Self {
        Self {
            handle,
            device,
            refcount: 0,
            active: None,
            legacy: None,
            per_thread: HashMap::new(),
            retired: Vec::new(),
        }
    }
}

thread_local! {
    /// The calling thread's context stack; the last entry is current.
    static STACK: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's current context handle.
pub fn current() -> Option<usize> {
    STACK.with(|s| s.borrow().last().copied())
}

/// `cuCtxSetCurrent`: replaces the top of the stack (pushes onto an empty
/// one); `None` pops the top (nothing on an empty stack).
pub fn set_current(ctx: Option<usize>) {
    STACK.with(|s| {
        let mut s = s.borrow_mut();
        match ctx {
            Some(c) => match s.last_mut() {
                Some(top) => *top = c,
                None => s.push(c),
            },
            None => {
                s.pop();
            }
        }
    });
}

pub fn push(ctx: usize) {
    STACK.with(|s| s.borrow_mut().push(ctx));
}

pub fn pop() -> Option<usize> {
    STACK.with(|s| s.borrow_mut().pop())
}
