//! Stream capture, minimal but honest: operations on a capturing stream are
//! recorded into the capture sequence, never run; the rules of the driver's
//! documentation about which calls a capture forbids and when it is
//! invalidated are kept; `cuStreamEndCapture` hands out an opaque graph.
//!
//! Cross-stream capture (fork and join through events) is tracked with
//! vector clocks: each member stream counts its captured operations, an event
//! recorded in the capture carries its stream's clock, a wait merges it. At
//! the end every member's work must be joined into the origin stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::ThreadId;

use cudarc::driver::sys::CUresult;

use crate::context::CtxShared;
use crate::stream::StreamKey;

pub type CaptureId = u64;
/// Captured operations seen, per member stream.
pub type Clock = HashMap<StreamKey, u64>;

/// `CUstreamCaptureMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Global,
    ThreadLocal,
    Relaxed,
}

impl Mode {
    pub fn from_raw(raw: u32) -> Option<Self> {
        use cudarc::driver::sys::CUstreamCaptureMode as M;
        match raw {
            r if r == M::CU_STREAM_CAPTURE_MODE_GLOBAL as u32 => Some(Self::Global),
            r if r == M::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL as u32 => Some(Self::ThreadLocal),
            r if r == M::CU_STREAM_CAPTURE_MODE_RELAXED as u32 => Some(Self::Relaxed),
            _ => None,
        }
    }
}

/// One capture sequence.
#[derive(Debug)]
pub struct Capture {
    pub origin: StreamKey,
    pub mode: Mode,
    /// The thread that began it.
    pub thread: ThreadId,
    pub ctx: Arc<CtxShared>,
    /// A forbidden call or dependency invalidated it: operations on its
    /// streams fail and `cuStreamEndCapture` returns no graph.
    pub invalidated: bool,
    pub nodes: u64,
    pub members: HashMap<StreamKey, Clock>,
}

/// A graph `cuStreamEndCapture` made.
#[derive(Debug)]
pub struct GraphEntry {
    pub ctx_handle: usize,
    pub nodes: u64,
}

/// Every active capture sequence.
#[derive(Debug, Default)]
pub struct Captures {
    pub active: HashMap<CaptureId, Capture>,
    next_id: CaptureId,
}

impl Captures {
    pub fn begin(
        &mut self,
        origin: StreamKey,
        mode: Mode,
        thread: ThreadId,
        ctx: Arc<CtxShared>,
    ) -> CaptureId {
        self.next_id += 1;
        let id = self.next_id;
        let mut members = HashMap::new();
        members.insert(origin, Clock::new());
        self.active.insert(
            id,
            Capture {
                origin,
                mode,
                thread,
                ctx,
                invalidated: false,
                nodes: 0,
                members,
            },
        );
        id
    }

    /// Records one operation of `stream` in capture `id`.
    pub fn record_op(&mut self, id: CaptureId, stream: StreamKey) -> Result<(), CUresult> {
        let c = self
            .active
            .get_mut(&id)
            .ok_or(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)?;
        if c.invalidated {
            return Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED);
        }
        c.nodes += 1;
        *c.members
            .entry(stream)
            .or_default()
            .entry(stream)
            .or_insert(0) += 1;
        Ok(())
    }

    /// The clock of `stream` in capture `id` (what an event recorded there
    /// carries).
    pub fn clock(&self, id: CaptureId, stream: StreamKey) -> Clock {
        self.active
            .get(&id)
            .and_then(|c| c.members.get(&stream))
            .cloned()
            .unwrap_or_default()
    }

    /// `stream` waits for `clock`: merges it (and joins the capture if the
    /// stream was not a member yet).
    pub fn merge(&mut self, id: CaptureId, stream: StreamKey, clock: &Clock) {
        if let Some(c) = self.active.get_mut(&id) {
            let mine = c.members.entry(stream).or_default();
            for (k, v) in clock {
                let e = mine.entry(*k).or_insert(0);
                *e = (*e).max(*v);
            }
        }
    }

    /// The captures that forbid `thread` potentially unsafe calls: its own
    /// that are not relaxed, and other threads' global ones (the documented
    /// rule of `cuStreamBeginCapture`'s mode). An invalidated capture still
    /// forbids them until it is ended.
    pub fn prohibiting(&self, thread: ThreadId) -> Vec<CaptureId> {
        self.active
            .iter()
            .filter(|(_, c)| {
                (c.thread == thread && c.mode != Mode::Relaxed)
                    || (c.thread != thread && c.mode == Mode::Global)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn invalidate(&mut self, ids: &[CaptureId]) {
        for id in ids {
            if let Some(c) = self.active.get_mut(id) {
                c.invalidated = true;
            }
        }
    }

    /// Refuses a potentially unsafe call (a synchronization, an allocation)
    /// while a capture forbids it to this thread, invalidating that capture.
    pub fn check_unsafe_call(&mut self) -> Result<(), CUresult> {
        let ids = self.prohibiting(std::thread::current().id());
        if ids.is_empty() {
            return Ok(());
        }
        self.invalidate(&ids);
        Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED)
    }

    /// Ends capture `id`; `Ok(nodes)` when it may become a graph, or the
    /// error `cuStreamEndCapture` returns.
    pub fn end(&mut self, id: CaptureId) -> (Vec<StreamKey>, Result<u64, CUresult>) {
        let Some(c) = self.active.remove(&id) else {
            return (
                Vec::new(),
                Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED),
            );
        };
        let members: Vec<StreamKey> = c.members.keys().copied().collect();
        if c.invalidated {
            return (
                members,
                Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED),
            );
        }
        let origin = c.members.get(&c.origin).cloned().unwrap_or_default();
        let unjoined = c.members.iter().any(|(k, clock)| {
            *k != c.origin
                && clock.get(k).copied().unwrap_or(0) > origin.get(k).copied().unwrap_or(0)
        });
        if unjoined {
            return (members, Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNJOINED));
        }
        (members, Ok(c.nodes))
    }
}
