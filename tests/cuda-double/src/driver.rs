//! The driver's process-wide state after `cuInit`: the devices' address
//! spaces, and behind one lock every table (contexts, allocations, streams,
//! events, graphs, page-locked ranges, captures).
//!
//! The lock is held only to read and change these tables, never while
//! waiting for an operation or copying bytes: stream workers never take it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cudarc::driver::sys::CUresult;

use crate::capture::{Captures, GraphEntry};
use crate::completion::Completion;
use crate::config::{self, Config};
use crate::context::{self, CtxShared, PrimaryContext};
use crate::control::lock;
use crate::event::EventEntry;
use crate::host::HostRegistry;
use crate::memory::{AddressSpace, Allocation, Allocator};
use crate::stream::{StreamEntry, StreamKey};

/// Handles (contexts, streams, events, graphs) are drawn from one counter,
/// never reused, and stay clear of 0, `CU_STREAM_LEGACY` (1) and
/// `CU_STREAM_PER_THREAD` (2).
const FIRST_HANDLE: usize = 0x1000;
const HANDLE_STEP: usize = 0x10;

#[derive(Debug)]
pub struct Driver {
    pub config: &'static Config,
    pub spaces: Vec<AddressSpace>,
    state: Mutex<State>,
}

static DRIVER: OnceLock<Driver> = OnceLock::new();

/// The driver, once `cuInit` has succeeded.
pub fn driver() -> Result<&'static Driver, CUresult> {
    DRIVER.get().ok_or(CUresult::CUDA_ERROR_NOT_INITIALIZED)
}

/// `cuInit`'s work: reads the settings and reserves every device's address
/// space, once.
pub fn init() -> Result<&'static Driver, CUresult> {
    static INIT: Mutex<()> = Mutex::new(());
    let config = config::config()?;
    if config.devices == 0 {
        return Err(CUresult::CUDA_ERROR_NO_DEVICE);
    }
    if let Some(d) = DRIVER.get() {
        return Ok(d);
    }
    let _once = lock(&INIT);
    if let Some(d) = DRIVER.get() {
        return Ok(d);
    }
    let mut spaces = Vec::with_capacity(config.devices);
    for _ in 0..config.devices {
        spaces.push(AddressSpace::new(config.memory_bytes).map_err(|e| {
            eprintln!(
                "gpusnap-cuda-double: cannot reserve {} bytes of device memory: {e}",
                config.memory_bytes
            );
            CUresult::CUDA_ERROR_OUT_OF_MEMORY
        })?);
    }
    let mut state = State {
        contexts: Vec::new(),
        allocators: (0..config.devices)
            .map(|_| Allocator::new(config.memory_bytes))
            .collect(),
        streams: HashMap::new(),
        events: HashMap::new(),
        graphs: HashMap::new(),
        host: HostRegistry::default(),
        captures: Captures::default(),
        next_handle: FIRST_HANDLE,
        next_buffer_id: 1,
    };
    for device in 0..config.devices {
        let handle = state.new_handle();
        state.contexts.push(PrimaryContext::new(handle, device));
    }
    let _ = DRIVER.set(Driver {
        config,
        spaces,
        state: Mutex::new(state),
    });
    driver()
}

impl Driver {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The device whose address space holds `addr`, and its offset there.
    pub fn locate(&self, addr: usize) -> Option<(usize, usize)> {
        self.spaces
            .iter()
            .enumerate()
            .find_map(|(device, s)| s.offset_of(addr).map(|o| (device, o)))
    }

    /// Whether `[addr, addr + len)` touches any device's address space.
    pub fn overlaps_device_memory(&self, addr: usize, len: usize) -> bool {
        self.spaces.iter().any(|s| s.overlaps(addr, len))
    }
}

/// Every table, behind the driver's lock.
#[derive(Debug)]
pub struct State {
    pub contexts: Vec<PrimaryContext>,
    pub allocators: Vec<Allocator>,
    pub streams: HashMap<usize, StreamEntry>,
    pub events: HashMap<usize, EventEntry>,
    pub graphs: HashMap<usize, GraphEntry>,
    pub host: HostRegistry,
    pub captures: Captures,
    next_handle: usize,
    next_buffer_id: u64,
}

impl State {
    pub fn new_handle(&mut self) -> usize {
        let h = self.next_handle;
        self.next_handle += HANDLE_STEP;
        h
    }

    pub fn new_buffer_id(&mut self) -> u64 {
        let id = self.next_buffer_id;
        self.next_buffer_id += 1;
        id
    }

    /// The primary context whose handle is `handle`.
    pub fn context_by_handle(&self, handle: usize) -> Option<&PrimaryContext> {
        self.contexts.iter().find(|c| c.handle == handle)
    }

    /// The calling thread's current context, if it is active and healthy:
    /// `CUDA_ERROR_INVALID_CONTEXT` without one, the sticky error in a broken one.
    pub fn current_ctx(&self) -> Result<Arc<CtxShared>, CUresult> {
        let ctx = self.current_ctx_unchecked()?;
        ctx.check()?;
        Ok(ctx)
    }

    /// The current context even if it is broken.
    pub fn current_ctx_unchecked(&self) -> Result<Arc<CtxShared>, CUresult> {
        let handle = context::current().ok_or(CUresult::CUDA_ERROR_INVALID_CONTEXT)?;
        let ctx = self
            .context_by_handle(handle)
            .ok_or(CUresult::CUDA_ERROR_INVALID_CONTEXT)?;
        ctx.active
            .clone()
            .ok_or(CUresult::CUDA_ERROR_INVALID_CONTEXT)
    }

    /// Resolves a caller's stream handle: 0 and `CU_STREAM_LEGACY` name the
    /// current context's legacy stream, `CU_STREAM_PER_THREAD` the calling
    /// thread's stream (both made on first use); anything else must be a
    /// live created stream. The context must not be broken.
    pub fn resolve_stream(&mut self, raw: usize) -> Result<(StreamKey, Arc<CtxShared>), CUresult> {
        let (key, ctx) = self.resolve_stream_unchecked(raw)?;
        ctx.check()?;
        Ok((key, ctx))
    }

    pub fn resolve_stream_unchecked(
        &mut self,
        raw: usize,
    ) -> Result<(StreamKey, Arc<CtxShared>), CUresult> {
        match raw {
            0 | 1 => {
                let ctx = self.current_ctx_unchecked()?;
                let device = ctx.device;
                let pc = &mut self.contexts[device];
                if pc.legacy.is_none() {
                    pc.legacy = Some(StreamEntry::new(0, Arc::clone(&ctx), 0, 0, true)?);
                }
                Ok((StreamKey::Legacy { device }, ctx))
            }
            2 => {
                let ctx = self.current_ctx_unchecked()?;
                let device = ctx.device;
                let thread = std::thread::current().id();
                let pc = &mut self.contexts[device];
                if let std::collections::hash_map::Entry::Vacant(slot) = pc.per_thread.entry(thread)
                {
                    slot.insert(StreamEntry::new(2, Arc::clone(&ctx), 0, 0, true)?);
                }
                Ok((StreamKey::PerThread { device, thread }, ctx))
            }
            handle => {
                let s = self
                    .streams
                    .get(&handle)
                    .ok_or(CUresult::CUDA_ERROR_INVALID_HANDLE)?;
                Ok((StreamKey::Created { handle }, Arc::clone(&s.ctx)))
            }
        }
    }

    pub fn stream(&self, key: &StreamKey) -> Option<&StreamEntry> {
        match key {
            StreamKey::Legacy { device } => self.contexts.get(*device)?.legacy.as_ref(),
            StreamKey::PerThread { device, thread } => {
                self.contexts.get(*device)?.per_thread.get(thread)
            }
            StreamKey::Created { handle } => self.streams.get(handle),
        }
    }

    pub fn stream_mut(&mut self, key: &StreamKey) -> Option<&mut StreamEntry> {
        match key {
            StreamKey::Legacy { device } => self.contexts.get_mut(*device)?.legacy.as_mut(),
            StreamKey::PerThread { device, thread } => {
                self.contexts.get_mut(*device)?.per_thread.get_mut(thread)
            }
            StreamKey::Created { handle } => self.streams.get_mut(handle),
        }
    }

    /// The blocking streams of `device`'s context (the per-thread streams
    /// and created streams without `CU_STREAM_NON_BLOCKING`).
    pub fn blocking_streams(&self, device: usize) -> impl Iterator<Item = &StreamEntry> {
        let created = self
            .streams
            .values()
            .filter(move |s| s.ctx.device == device);
        self.contexts[device]
            .per_thread
            .values()
            .chain(created)
            .filter(|s| s.blocking)
    }

    /// Every stream of `device`'s context, with its key.
    pub fn context_streams(&self, device: usize) -> Vec<(StreamKey, &StreamEntry)> {
        let pc = &self.contexts[device];
        let mut all: Vec<(StreamKey, &StreamEntry)> = Vec::new();
        if let Some(s) = &pc.legacy {
            all.push((StreamKey::Legacy { device }, s));
        }
        for (thread, s) in &pc.per_thread {
            all.push((
                StreamKey::PerThread {
                    device,
                    thread: *thread,
                },
                s,
            ));
        }
        for (handle, s) in &self.streams {
            if s.ctx.device == device {
                all.push((StreamKey::Created { handle: *handle }, s));
            }
        }
        all
    }

    /// Everything pending in `device`'s context: what `cuCtxSynchronize`
    /// waits for.
    pub fn pending_work(&self, device: usize) -> Vec<Arc<Completion>> {
        let mut all: Vec<Arc<Completion>> = self
            .context_streams(device)
            .into_iter()
            .filter_map(|(_, s)| s.last.clone())
            .collect();
        all.extend(self.contexts[device].retired.iter().cloned());
        all.retain(|c| !c.is_done());
        all
    }

    /// Refuses legacy-stream work that would depend on a capture: while a
    /// blocking stream of the context is capturing, or while a capture
    /// forbids this thread unsafe calls. The captures concerned are
    /// invalidated, as on the driver.
    pub fn check_legacy_use(&mut self, device: usize) -> Result<(), CUresult> {
        let mut ids = self.captures.prohibiting(std::thread::current().id());
        ids.extend(self.blocking_streams(device).filter_map(|s| s.capture));
        if ids.is_empty() {
            return Ok(());
        }
        self.captures.invalidate(&ids);
        Err(CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT)
    }

    /// The live allocation of `device` wholly containing `[addr, addr + len)`
    /// and the alias address of `addr`. Memory of another device, outside any
    /// allocation, or past an allocation's end is `CUDA_ERROR_INVALID_VALUE`.
    pub fn device_range(
        &self,
        driver: &Driver,
        device: usize,
        addr: usize,
        len: usize,
    ) -> Result<(Allocation, usize), CUresult> {
        let (on, offset) = driver
            .locate(addr)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        if on != device {
            return Err(CUresult::CUDA_ERROR_INVALID_VALUE);
        }
        let a = self.allocators[device]
            .containing_range(offset, len)
            .ok_or(CUresult::CUDA_ERROR_INVALID_VALUE)?;
        Ok((*a, driver.spaces[device].alias_at(offset)))
    }
}
