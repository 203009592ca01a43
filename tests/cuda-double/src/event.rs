//! Events: what a record captured, for queries, synchronization, waits and
//! timing.

use std::sync::Arc;

use crate::capture::{CaptureId, Clock};
use crate::completion::Completion;
use crate::context::CtxShared;

/// `CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING | CU_EVENT_INTERPROCESS`.
pub const FLAGS_KNOWN: u32 = 0x1 | 0x2 | 0x4;
pub const DISABLE_TIMING: u32 = 0x2;
pub const INTERPROCESS: u32 = 0x4;

/// What the last `cuEventRecord` captured.
#[derive(Debug, Clone)]
pub enum Recorded {
    /// Never recorded: queries succeed, waits are no-ops.
    Never,
    /// The stream's work so far, ending in this marker operation.
    Work(Arc<Completion>),
    /// Recorded in a capture sequence: a point in the graph, not in time.
    Captured { capture: CaptureId, clock: Clock },
}

#[derive(Debug)]
pub struct EventEntry {
    pub ctx: Arc<CtxShared>,
    pub flags: u32,
    pub recorded: Recorded,
}

impl EventEntry {
    pub fn timing(&self) -> bool {
        self.flags & DISABLE_TIMING == 0
    }
}
