//! A strict stand-in for a GPU device, so the device-generic paths of the
//! client are tested before CUDA exists.
//!
//! * Its buffers ([`DoubleBuffer`], registered as `Buffer::Device`) live in
//!   memfds this process never maps: like GPU memory, the client cannot
//!   reach their bytes except through the double's copies.
//! * Its copies run on its own thread, and only once they are released:
//!   when their ticket is waited for (or dropped), or when the test calls
//!   [`DoubleDevice::release`]. A ticket is therefore never done when
//!   `capture`/`restore` returns, and "not done yet" is certain, not a
//!   matter of timing: the client has to wait for it.
//! * It records every misuse as a violation, and [`DoubleDevice::check`]
//!   (called after every test body) fails the test on any: a copy into
//!   staging it was not attached to, a detach while its copies run, a copy
//!   of host memory or of another device's buffer, unequal lengths, a
//!   source or target range past the end of its buffer, two copies in
//!   flight over the same staging bytes (in one job or in two), a write to
//!   a buffer ([`DoubleBuffer::overwrite`]) while a capture still reads it,
//!   a ticket dropped before it was waited for, a job never released within
//!   [`WAIT_MAX`]. A misuse it can refuse (a range past a buffer, foreign
//!   memory) fails the call too; none panics its thread.
//! * As the [`Device`] contract asks, a job's copies (their spans and
//!   buffers) are dropped before its ticket reports done, a failed job's
//!   too.
//! * It can fail its next attach, or its next capture (from the ticket, as
//!   an asynchronous copy error arrives).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::device::{
    AttachedStaging, CaptureCopy, CopyTicket, Device, DeviceBuffer, RestoreCopy, Source,
    StagingRegion, StagingSpan, StreamOrder, Target,
};
use crate::{Error, Result};

/// A ticket wait, or a job left unreleased, longer than this is a hung
/// double or a test that forgot its job: the test fails.
const WAIT_MAX: Duration = Duration::from_secs(20);

/// What the double's thread runs.
enum DoubleCopy {
    /// Buffer bytes `offset..offset + dst.len()` into `dst`.
    Capture {
        buffer: Arc<dyn DeviceBuffer>,
        offset: usize,
        dst: StagingSpan,
    },
    /// `src` into buffer bytes `offset..offset + src.len()`.
    Restore {
        src: StagingSpan,
        buffer: Arc<dyn DeviceBuffer>,
        offset: usize,
    },
}

impl DoubleCopy {
    fn span(&self) -> &StagingSpan {
        match self {
            DoubleCopy::Capture { dst, .. } => dst,
            DoubleCopy::Restore { src, .. } => src,
        }
    }

    /// Staging addresses `start..end` of the copy.
    fn staging_range(&self) -> (usize, usize) {
        let span = self.span();
        let start = span.as_ptr() as usize;
        (start, start + span.len())
    }

    /// Copies; an error is a violation the caller records.
    fn copy(self) -> Result<(), String> {
        match self {
            DoubleCopy::Capture {
                buffer,
                offset,
                mut dst,
            } => {
                let mut bytes = vec![0u8; dst.len()];
                memory_of(&buffer)
                    .read_exact_at(&mut bytes, offset as u64)
                    .map_err(|e| format!("reading {buffer:?} at {offset}: {e}"))?;
                dst.copy_from(&bytes);
            }
            DoubleCopy::Restore {
                src,
                buffer,
                offset,
            } => {
                let mut bytes = vec![0u8; src.len()];
                src.copy_to(&mut bytes);
                memory_of(&buffer)
                    .write_all_at(&bytes, offset as u64)
                    .map_err(|e| format!("writing {buffer:?} at {offset}: {e}"))?;
            }
        }
        Ok(())
    }
}

struct Job {
    id: usize,
    copies: Vec<DoubleCopy>,
    /// Fail instead of copying (an injected copy error).
    fail: Option<String>,
    done: Arc<Done>,
    /// The double's thread may run it.
    released: bool,
}

/// Jobs started and not yet run, and whether the device is gone.
#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    closed: bool,
}

/// A job's end, as its ticket sees it.
#[derive(Default)]
struct Done {
    result: Mutex<Option<Result<Duration, String>>>,
    changed: Condvar,
}

/// State the device, its thread, its tickets, buffers and attachments
/// share.
#[derive(Default)]
struct Shared {
    /// Regions attached now: (id, base, len).
    attached: Mutex<Vec<(usize, usize, usize)>>,
    /// Regions of jobs whose ticket has not finished, one entry per job.
    in_flight: Mutex<Vec<usize>>,
    /// Staging addresses of copies not yet dropped: (job, start, end).
    spans: Mutex<Vec<(usize, usize, usize)>>,
    /// Buffers a capture has still to read: (job, buffer address).
    reading: Mutex<Vec<(usize, usize)>>,
    queue: Mutex<Queue>,
    queue_changed: Condvar,
    violations: Mutex<Vec<String>>,
    attaches: AtomicUsize,
    detaches: AtomicUsize,
    jobs: AtomicUsize,
    next_region: AtomicUsize,
    next_job: AtomicUsize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

impl Shared {
    fn violation(&self, what: String) {
        eprintln!("device double: violation: {what}");
        self.violations.lock().expect("violations").push(what);
    }

    /// The attached region `span` lies in, or a violation.
    fn region_of(&self, span: &StagingSpan) -> Option<usize> {
        let (start, len) = (span.as_ptr() as usize, span.len());
        let attached = self.attached.lock().expect("attached");
        let found = attached
            .iter()
            .find(|&&(_, base, rlen)| start >= base && start + len <= base + rlen)
            .map(|&(id, _, _)| id);
        drop(attached);
        if found.is_none() {
            self.violation(format!(
                "a copy through {span:?}, which is in no staging this device is attached to"
            ));
        }
        found
    }

    /// Records the staging ranges of job `id`'s copies, flagging any that
    /// overlaps another copy in flight (of this job or of another).
    fn claim_spans(&self, id: usize, copies: &[DoubleCopy]) {
        let mut spans = self.spans.lock().expect("spans");
        for copy in copies.iter().filter(|c| !c.span().is_empty()) {
            let (start, end) = copy.staging_range();
            if let Some(&(other, s, e)) = spans.iter().find(|&&(_, s, e)| start < e && s < end) {
                let whose = if other == id {
                    "the same job".to_owned()
                } else {
                    format!("job {other}, still in flight")
                };
                self.violation(format!(
                    "job {id} copies through staging {start:#x}..{end:#x}, which overlaps {s:#x}..{e:#x} of {whose}"
                ));
            }
            spans.push((id, start, end));
        }
    }

    /// Lets the double's thread run job `id` (every job when `None`).
    fn release(&self, id: Option<usize>) {
        let mut queue = self.queue.lock().expect("queue");
        for job in queue
            .jobs
            .iter_mut()
            .filter(|j| id.is_none_or(|id| j.id == id))
        {
            job.released = true;
        }
        drop(queue);
        self.queue_changed.notify_all();
    }

    /// The next job to run; `None` once the device is gone and every job
    /// has run. Jobs no ticket releases within [`WAIT_MAX`] are a violation
    /// (and run then, so that nothing hangs).
    fn next_job(&self) -> Option<Job> {
        let mut queue = self.queue.lock().expect("queue");
        loop {
            let closed = queue.closed;
            if let Some(i) = queue.jobs.iter().position(|j| j.released || closed) {
                return Some(queue.jobs.remove(i));
            }
            if closed {
                return None;
            }
            let (guard, waited) = self
                .queue_changed
                .wait_timeout(queue, WAIT_MAX)
                .expect("queue");
            queue = guard;
            if waited.timed_out() && !queue.jobs.is_empty() {
                let held = queue.jobs.len();
                drop(queue);
                self.violation(format!(
                    "{held} jobs held for {WAIT_MAX:?}: their tickets were neither waited for nor dropped"
                ));
                self.release(None);
                queue = self.queue.lock().expect("queue");
            }
        }
    }

    /// Job `id`'s copies are gone: its spans and buffers are free.
    fn job_dropped(&self, id: usize) {
        self.spans
            .lock()
            .expect("spans")
            .retain(|&(job, _, _)| job != id);
        self.reading
            .lock()
            .expect("reading")
            .retain(|&(job, _)| job != id);
    }
}

/// The double. Make it with [`DoubleDevice::new`] (it is always in an
/// `Arc`: its buffers name it).
pub struct DoubleDevice {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    fail_attach: Mutex<Option<String>>,
    fail_capture: Mutex<Option<String>>,
    this: Weak<DoubleDevice>,
}

impl std::fmt::Debug for DoubleDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoubleDevice")
            .field("attaches", &self.attaches())
            .field("detaches", &self.detaches())
            .finish()
    }
}

impl DoubleDevice {
    pub fn new() -> Arc<DoubleDevice> {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("device-double".into())
                .spawn(move || run(&shared))
                .expect("spawn the double's thread")
        };
        Arc::new_cyclic(|this| DoubleDevice {
            shared,
            thread: Mutex::new(Some(thread)),
            fail_attach: Mutex::new(None),
            fail_capture: Mutex::new(None),
            this: this.clone(),
        })
    }

    /// A buffer of this device holding `bytes`.
    pub fn buffer(&self, bytes: &[u8]) -> Arc<DoubleBuffer> {
        let fd = memfd_create("device-double", MFdFlags::MFD_CLOEXEC).expect("memfd");
        let memory = File::from(fd);
        memory.set_len(bytes.len() as u64).expect("size");
        memory.write_all_at(bytes, 0).expect("fill");
        Arc::new(DoubleBuffer {
            device: self.this.upgrade().expect("the double is alive"),
            memory,
            len: bytes.len(),
        })
    }

    /// Lets every job started so far run, without waiting for any: what a
    /// device does on its own, after a while.
    pub fn release(&self) {
        self.shared.release(None);
    }

    /// The next attach fails with `reason`.
    pub fn fail_next_attach(&self, reason: &str) {
        *self.fail_attach.lock().expect("fail") = Some(reason.to_owned());
    }

    /// The next capture's ticket fails with `reason` (nothing is copied).
    pub fn fail_next_capture(&self, reason: &str) {
        *self.fail_capture.lock().expect("fail") = Some(reason.to_owned());
    }

    pub fn attaches(&self) -> usize {
        self.shared.attaches.load(Ordering::SeqCst)
    }

    pub fn detaches(&self) -> usize {
        self.shared.detaches.load(Ordering::SeqCst)
    }

    /// `capture`/`restore` calls that started copies.
    pub fn jobs(&self) -> usize {
        self.shared.jobs.load(Ordering::SeqCst)
    }

    /// The violations so far.
    pub fn violations(&self) -> Vec<String> {
        self.shared.violations.lock().expect("violations").clone()
    }

    /// Fails the test on any violation so far.
    pub fn check(&self) {
        let violations = self.shared.violations.lock().expect("violations").clone();
        assert!(
            violations.is_empty(),
            "the device double saw violations: {violations:#?}"
        );
    }

    /// `buffer`, when it is one of this device's and `offset..offset + len`
    /// lies inside it (else a violation).
    fn own(
        &self,
        buffer: &Arc<dyn DeviceBuffer>,
        offset: usize,
        len: usize,
        what: &str,
    ) -> Result<Arc<dyn DeviceBuffer>> {
        let Some(mine) = buffer
            .as_any()
            .downcast_ref::<DoubleBuffer>()
            .filter(|b| std::ptr::eq(Arc::as_ptr(&b.device), self))
        else {
            self.shared
                .violation(format!("{what} of {buffer:?}, not a buffer of this device"));
            return Err(Error::internal("device double: a foreign buffer"));
        };
        if offset.checked_add(len).is_none_or(|end| end > mine.len) {
            self.shared.violation(format!(
                "{what} of bytes {offset}..{} of {mine:?}, past its end",
                offset.saturating_add(len)
            ));
            return Err(Error::internal("device double: a range past a buffer"));
        }
        Ok(Arc::clone(buffer))
    }

    fn submit(&self, copies: Vec<DoubleCopy>, fail: Option<String>) -> Result<Box<dyn CopyTicket>> {
        let region = copies.first().and_then(|c| self.shared.region_of(c.span()));
        for c in copies.iter().skip(1) {
            if self.shared.region_of(c.span()) != region {
                self.shared
                    .violation("one job's copies span two stagings".into());
            }
        }
        let Some(region) = region else {
            return Err(Error::internal("device double: staging not attached"));
        };
        let id = self.shared.next_job.fetch_add(1, Ordering::SeqCst);
        self.shared.claim_spans(id, &copies);
        self.shared
            .reading
            .lock()
            .expect("reading")
            .extend(copies.iter().filter_map(|c| match c {
                DoubleCopy::Capture { buffer, .. } => Some((id, buffer_address(buffer))),
                DoubleCopy::Restore { .. } => None,
            }));
        self.shared.jobs.fetch_add(1, Ordering::SeqCst);
        self.shared
            .in_flight
            .lock()
            .expect("in flight")
            .push(region);
        let done = Arc::new(Done::default());
        self.shared.queue.lock().expect("queue").jobs.push(Job {
            id,
            copies,
            fail,
            done: Arc::clone(&done),
            released: false,
        });
        self.shared.queue_changed.notify_all();
        let ticket = DoubleTicket {
            job: id,
            done,
            region,
            shared: Arc::clone(&self.shared),
            waited: false,
        };
        if ticket.is_done() {
            self.shared
                .violation("a ticket done before capture/restore returned".into());
        }
        Ok(Box::new(ticket))
    }
}

impl Drop for DoubleDevice {
    fn drop(&mut self) {
        self.shared.queue.lock().expect("queue").closed = true;
        self.shared.queue_changed.notify_all();
        if let Some(thread) = self.thread.lock().expect("thread").take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

fn memory_of(buffer: &Arc<dyn DeviceBuffer>) -> &File {
    &buffer
        .as_any()
        .downcast_ref::<DoubleBuffer>()
        .expect("checked when the copy was started")
        .memory
}

/// Where a buffer lives, to name it in the double's records.
fn buffer_address(buffer: &Arc<dyn DeviceBuffer>) -> usize {
    Arc::as_ptr(buffer).cast::<()>() as usize
}

/// The double's thread: each job once it is released, until the device is
/// gone.
fn run(shared: &Shared) {
    while let Some(job) = shared.next_job() {
        let Job {
            id,
            copies,
            fail,
            done,
            ..
        } = job;
        let started = Instant::now();
        let result = match fail {
            Some(reason) => {
                drop(copies);
                Err(reason)
            }
            None => {
                // Each copy is dropped after it ran; after an error, the
                // rest are dropped uncopied.
                let copied = copies.into_iter().try_for_each(DoubleCopy::copy);
                if let Err(e) = &copied {
                    shared.violation(format!("job {id}: {e}"));
                }
                copied.map(|()| started.elapsed().max(Duration::from_nanos(1)))
            }
        };
        // Every copy (its span and buffer) is gone: now the job may end.
        shared.job_dropped(id);
        *done.result.lock().expect("done") = Some(result);
        done.changed.notify_all();
    }
}

impl Device for DoubleDevice {
    fn name(&self) -> &'static str {
        "double"
    }

    fn attach(&self, staging: &StagingRegion) -> Result<Box<dyn AttachedStaging>> {
        if let Some(reason) = self.fail_attach.lock().expect("fail").take() {
            return Err(Error::BackendUnavailable {
                backend: "double",
                reason,
            });
        }
        let id = self.shared.next_region.fetch_add(1, Ordering::SeqCst);
        self.shared.attached.lock().expect("attached").push((
            id,
            staging.as_ptr() as usize,
            staging.len(),
        ));
        self.shared.attaches.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(DoubleAttached {
            shared: Arc::clone(&self.shared),
            id,
        }))
    }

    fn capture(
        &self,
        copies: Vec<CaptureCopy>,
        _order: &StreamOrder,
    ) -> Result<Box<dyn CopyTicket>> {
        let mut jobs = Vec::with_capacity(copies.len());
        for CaptureCopy { src, dst } in copies {
            if src.len() != dst.len() {
                self.shared.violation(format!(
                    "a capture of {} bytes into {} bytes",
                    src.len(),
                    dst.len()
                ));
            }
            let Source::Device(src) = src else {
                self.shared
                    .violation(format!("a capture of host memory ({src:?})"));
                return Err(Error::internal("device double: host memory"));
            };
            let buffer = self.own(src.buffer(), src.offset(), dst.len(), "a capture")?;
            jobs.push(DoubleCopy::Capture {
                buffer,
                offset: src.offset(),
                dst,
            });
        }
        let fail = self.fail_capture.lock().expect("fail").take();
        self.submit(jobs, fail)
    }

    fn restore(
        &self,
        copies: Vec<RestoreCopy>,
        _order: &StreamOrder,
    ) -> Result<Box<dyn CopyTicket>> {
        let mut jobs = Vec::with_capacity(copies.len());
        for RestoreCopy { src, dst } in copies {
            if src.len() != dst.len() {
                self.shared.violation(format!(
                    "a restore of {} bytes into {} bytes",
                    src.len(),
                    dst.len()
                ));
            }
            let Target::Device(dst) = dst else {
                self.shared
                    .violation(format!("a restore into host memory ({dst:?})"));
                return Err(Error::internal("device double: host memory"));
            };
            let buffer = self.own(dst.buffer(), dst.offset(), src.len(), "a restore")?;
            jobs.push(DoubleCopy::Restore {
                src,
                buffer,
                offset: dst.offset(),
            });
        }
        self.submit(jobs, None)
    }
}

/// A region the double is attached to.
#[derive(Debug)]
struct DoubleAttached {
    shared: Arc<Shared>,
    id: usize,
}

impl AttachedStaging for DoubleAttached {}

impl Drop for DoubleAttached {
    fn drop(&mut self) {
        if self
            .shared
            .in_flight
            .lock()
            .expect("in flight")
            .contains(&self.id)
        {
            self.shared
                .violation("detached while copies of that staging were in flight".into());
        }
        self.shared
            .attached
            .lock()
            .expect("attached")
            .retain(|&(id, _, _)| id != self.id);
        self.shared.detaches.fetch_add(1, Ordering::SeqCst);
    }
}

/// One job's ticket.
struct DoubleTicket {
    job: usize,
    done: Arc<Done>,
    region: usize,
    shared: Arc<Shared>,
    waited: bool,
}

impl DoubleTicket {
    /// Releases the job and waits for its end (a hung double fails the
    /// test).
    fn finish(&self) -> Result<Duration, String> {
        self.shared.release(Some(self.job));
        let deadline = Instant::now() + WAIT_MAX;
        let mut result = self.done.result.lock().expect("done");
        loop {
            if let Some(r) = result.take() {
                let mut in_flight = self.shared.in_flight.lock().expect("in flight");
                if let Some(i) = in_flight.iter().position(|&id| id == self.region) {
                    in_flight.swap_remove(i);
                }
                return r;
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .expect("the device double's copies never finished");
            result = self
                .done
                .changed
                .wait_timeout(result, left)
                .expect("done")
                .0;
        }
    }
}

impl CopyTicket for DoubleTicket {
    fn is_done(&self) -> bool {
        self.done.result.lock().expect("done").is_some()
    }

    fn wait(mut self: Box<Self>) -> Result<Duration> {
        self.waited = true;
        self.finish().map_err(|reason| Error::BackendUnavailable {
            backend: "double",
            reason,
        })
    }

    /// An asynchronous device's copies: the trainer's later work is
    /// ordered after them on the device (this model has no trainer
    /// streams; the bodies touch its buffers only after a wait), so a
    /// hand-off does not wait for them on the host.
    fn order_streams_after(&self) -> Result<bool> {
        Ok(true)
    }
}

impl Drop for DoubleTicket {
    fn drop(&mut self) {
        if !self.waited {
            self.shared
                .violation("a ticket dropped before it was waited for".into());
            let _ = self.finish();
        }
    }
}

/// Memory of the double: a memfd this process never maps.
pub struct DoubleBuffer {
    device: Arc<DoubleDevice>,
    memory: File,
    len: usize,
}

impl std::fmt::Debug for DoubleBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DoubleBuffer({} bytes)", self.len)
    }
}

impl DoubleBuffer {
    /// The bytes, as the test (not the client) reads them back.
    pub fn contents(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.len];
        self.memory.read_exact_at(&mut bytes, 0).expect("read");
        bytes
    }

    /// Overwrites the bytes, as a kernel of the trainer would: a violation
    /// while a capture of this buffer has still to read it.
    pub fn overwrite(&self, bytes: &[u8]) {
        assert_eq!(bytes.len(), self.len);
        let me = std::ptr::from_ref(self).cast::<()>() as usize;
        let shared = &self.device.shared;
        let read_by = shared
            .reading
            .lock()
            .expect("reading")
            .iter()
            .find(|&&(_, buffer)| buffer == me)
            .map(|&(job, _)| job);
        if let Some(job) = read_by {
            shared.violation(format!(
                "a write to {self:?} while job {job}, a capture of it, is in flight"
            ));
        }
        self.memory.write_all_at(bytes, 0).expect("write");
    }
}

impl DeviceBuffer for DoubleBuffer {
    fn device(&self) -> Arc<dyn Device> {
        Arc::clone(&self.device) as Arc<dyn Device>
    }

    fn byte_len(&self) -> usize {
        self.len
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Buffer;
    use crate::device::PinPolicy;
    use crate::device::{DeviceSource, DeviceTarget};
    use crate::staging::{Staging, testing};

    fn staging(devices: &[Arc<dyn Device>]) -> Staging {
        let info = testing::one_slot(&[64]);
        let (fd, _) = testing::memfd(info.memfd_bytes);
        Staging::map(fd, info, vec![64], devices, PinPolicy::Prefer).expect("map")
    }

    fn span(staging: &Staging) -> StagingSpan {
        // SAFETY: each test makes one set of spans at a time, except where
        // it says otherwise.
        unsafe { staging.slot_spans(0) }
            .expect("spans")
            .pop()
            .expect("one")
    }

    fn capture_of(buffer: &Arc<DoubleBuffer>, staging: &Staging) -> Vec<CaptureCopy> {
        let src = Buffer::Device(Arc::clone(buffer) as Arc<dyn DeviceBuffer>).source();
        vec![CaptureCopy {
            src,
            dst: span(staging),
        }]
    }

    fn dyn_buffer(buffer: &Arc<DoubleBuffer>) -> Arc<dyn DeviceBuffer> {
        Arc::clone(buffer) as Arc<dyn DeviceBuffer>
    }

    #[test]
    fn the_double_flags_copies_outside_its_attachments_and_tickets_dropped_unwaited() {
        let double = DoubleDevice::new();
        let buffer = double.buffer(&[7; 64]);
        // Staging the double was never attached to.
        let unattached = staging(&[]);
        assert!(
            double
                .capture(capture_of(&buffer, &unattached), &StreamOrder::legacy())
                .is_err()
        );
        // Attached: the copy waits for its ticket.
        let attached = staging(&[Arc::clone(&double) as Arc<dyn Device>]);
        let ticket = double
            .capture(capture_of(&buffer, &attached), &StreamOrder::legacy())
            .expect("capture");
        assert!(!ticket.is_done(), "a job runs only once released");
        drop(ticket);
        // Host memory is not the double's to copy (the ticket above is
        // gone: its drop waited for its copy).
        let host = crate::HostTensor::zeros(crate::Dtype::U8, [64]).expect("zeros");
        let copies = vec![CaptureCopy {
            src: Buffer::Host(host).source(),
            dst: span(&attached),
        }];
        assert!(double.capture(copies, &StreamOrder::legacy()).is_err());
        let violations = double.violations();
        assert_eq!(violations.len(), 3, "{violations:#?}");
        assert!(violations[0].contains("in no staging this device is attached to"));
        assert!(violations[1].contains("dropped before it was waited for"));
        assert!(violations[2].contains("a capture of host memory"));
        let checked = std::panic::catch_unwind(|| double.check());
        assert!(checked.is_err(), "check fails the test on violations");
    }

    #[test]
    fn a_job_runs_only_once_its_ticket_is_waited_for_or_the_test_releases_it() {
        let double = DoubleDevice::new();
        let buffer = double.buffer(&[7; 64]);
        let attached = staging(&[Arc::clone(&double) as Arc<dyn Device>]);
        let ticket = double
            .capture(capture_of(&buffer, &attached), &StreamOrder::legacy())
            .expect("capture");
        std::thread::sleep(Duration::from_millis(20));
        assert!(!ticket.is_done(), "not released: not run, however long");
        double.release();
        let deadline = Instant::now() + WAIT_MAX;
        while !ticket.is_done() {
            assert!(Instant::now() < deadline, "a released job never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
        ticket.wait().expect("copied");
        double.check();
    }

    #[test]
    fn a_range_past_the_end_of_a_buffer_is_a_violation_and_an_error_not_a_panic() {
        let double = DoubleDevice::new();
        let buffer = double.buffer(&[7; 64]);
        let attached = staging(&[Arc::clone(&double) as Arc<dyn Device>]);
        let past = DeviceSource::unchecked(dyn_buffer(&buffer), 32, 64);
        let refused = double.capture(
            vec![CaptureCopy {
                src: Source::Device(past),
                dst: span(&attached),
            }],
            &StreamOrder::legacy(),
        );
        assert!(refused.is_err());
        let past = DeviceTarget::unchecked(dyn_buffer(&buffer), usize::MAX, 64);
        let refused = double.restore(
            vec![RestoreCopy {
                src: span(&attached),
                dst: Target::Device(past),
            }],
            &StreamOrder::legacy(),
        );
        assert!(refused.is_err());
        let violations = double.violations();
        assert_eq!(violations.len(), 2, "{violations:#?}");
        assert!(
            violations[0].contains("a capture of bytes 32..96"),
            "{violations:#?}"
        );
        assert!(
            violations[1].contains("a restore of bytes"),
            "{violations:#?}"
        );
        assert!(violations.iter().all(|v| v.contains("past its end")));
        // The double still works.
        double
            .capture(capture_of(&buffer, &attached), &StreamOrder::legacy())
            .expect("capture")
            .wait()
            .expect("copied");
        assert_eq!(double.violations().len(), 2);
    }

    #[test]
    fn copies_over_the_same_staging_bytes_in_flight_at_once_are_a_violation() {
        let double = DoubleDevice::new();
        let (a, b) = (double.buffer(&[1; 64]), double.buffer(&[2; 64]));
        let attached = staging(&[Arc::clone(&double) as Arc<dyn Device>]);
        let first = double
            .capture(capture_of(&a, &attached), &StreamOrder::legacy())
            .expect("capture");
        // SAFETY: this breaks `slot_spans`'s contract on purpose (a second
        // span over the slot of a job in flight); the double copies both
        // jobs one after the other on its one thread, so no two accesses
        // race.
        let second_span = unsafe { attached.slot_spans(0) }
            .expect("spans")
            .pop()
            .expect("one");
        let second = double
            .capture(
                vec![CaptureCopy {
                    src: Buffer::Device(dyn_buffer(&b)).source(),
                    dst: second_span,
                }],
                &StreamOrder::legacy(),
            )
            .expect("capture");
        let violations = double.violations();
        assert_eq!(violations.len(), 1, "{violations:#?}");
        assert!(
            violations[0].contains("overlaps") && violations[0].contains("still in flight"),
            "{violations:#?}"
        );
        first.wait().expect("copied");
        second.wait().expect("copied");
        // Within one job too.
        let (head, tail) = span(&attached).split_at(32);
        // SAFETY: as above: `head` and this span overlap on purpose, and
        // the double's one thread copies them one after the other.
        let again = unsafe { attached.slot_spans(0) }
            .expect("spans")
            .pop()
            .expect("one")
            .split_at(16)
            .1;
        let src = |from: usize, len: usize| {
            Buffer::Device(dyn_buffer(&a))
                .source()
                .subrange(from..from + len)
                .expect("inside")
        };
        let both = double
            .capture(
                vec![
                    CaptureCopy {
                        src: src(0, 32),
                        dst: head,
                    },
                    CaptureCopy {
                        src: src(16, 48),
                        dst: again,
                    },
                ],
                &StreamOrder::legacy(),
            )
            .expect("capture");
        drop(tail);
        both.wait().expect("copied");
        let violations = double.violations();
        assert_eq!(violations.len(), 2, "{violations:#?}");
        assert!(violations[1].contains("of the same job"), "{violations:#?}");
        // Spans of finished jobs are free again: no violation.
        double
            .capture(capture_of(&a, &attached), &StreamOrder::legacy())
            .expect("capture")
            .wait()
            .expect("copied");
        assert_eq!(double.violations().len(), 2);
    }

    #[test]
    fn a_write_to_a_buffer_a_capture_still_reads_is_a_violation() {
        let double = DoubleDevice::new();
        let buffer = double.buffer(&[7; 64]);
        let attached = staging(&[Arc::clone(&double) as Arc<dyn Device>]);
        let ticket = double
            .capture(capture_of(&buffer, &attached), &StreamOrder::legacy())
            .expect("capture");
        buffer.overwrite(&[8; 64]);
        let violations = double.violations();
        assert_eq!(violations.len(), 1, "{violations:#?}");
        assert!(
            violations[0].contains("a write to DoubleBuffer(64 bytes) while job"),
            "{violations:#?}"
        );
        ticket.wait().expect("copied");
        // Once the capture has read it, the trainer may write.
        buffer.overwrite(&[9; 64]);
        assert_eq!(double.violations().len(), 1);
    }

    #[test]
    fn a_failed_job_drops_its_copies_before_its_ticket_reports_done() {
        let double = DoubleDevice::new();
        let buffer = double.buffer(&[7; 64]);
        let attached = staging(&[Arc::clone(&double) as Arc<dyn Device>]);
        let alone = Arc::strong_count(&buffer);
        double.fail_next_capture("copy engine fault");
        let ticket = double
            .capture(capture_of(&buffer, &attached), &StreamOrder::legacy())
            .expect("capture");
        assert_eq!(Arc::strong_count(&buffer), alone + 1, "the job holds it");
        let err = ticket.wait().unwrap_err();
        assert!(
            matches!(&err, Error::BackendUnavailable { reason, .. } if reason == "copy engine fault"),
            "{err}"
        );
        // Done was reported: the copy's buffer and span are gone already.
        assert_eq!(Arc::strong_count(&buffer), alone);
        assert!(double.shared.spans.lock().expect("spans").is_empty());
        assert!(double.shared.reading.lock().expect("reading").is_empty());
        double.check();
    }
}
