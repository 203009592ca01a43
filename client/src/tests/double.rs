//! A strict stand-in for a GPU device, so the device-generic paths of the
//! client are tested before CUDA exists.
//!
//! * Its buffers ([`DoubleBuffer`], registered as `Buffer::Device`) live in
//!   memfds this process never maps: like GPU memory, the client cannot
//!   reach their bytes except through the double's copies.
//! * Its copies run on its own thread, after a delay: a ticket is not done
//!   when `capture`/`restore` returns, and the client has to wait for it.
//! * It records every misuse as a violation, and [`DoubleDevice::check`]
//!   (called after every test body) fails the test on any: a copy into
//!   staging it was not attached to, a detach while its copies run, a copy
//!   of host memory or of another device's buffer, unequal lengths, a
//!   ticket dropped before it was waited for.
//! * It can fail its next attach, or its next capture (from the ticket, as
//!   an asynchronous copy error arrives).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::device::{
    AttachedStaging, CaptureCopy, CopyTicket, Device, DeviceBuffer, RestoreCopy, Source,
    StagingRegion, StagingSpan, Target,
};
use crate::{Error, Result};

/// How long the double's thread lets a job sit before it copies.
const LATENCY: Duration = Duration::from_millis(3);
/// A ticket wait longer than this is a hung double: the test fails.
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

struct Job {
    copies: Vec<DoubleCopy>,
    /// Fail instead of copying (an injected copy error).
    fail: Option<String>,
    done: Arc<Done>,
}

/// A job's end, as its ticket sees it.
#[derive(Default)]
struct Done {
    result: Mutex<Option<Result<Duration, String>>>,
    changed: Condvar,
}

/// State the device, its thread, its tickets and its attachments share.
#[derive(Default)]
struct Shared {
    /// Regions attached now: (id, base, len).
    attached: Mutex<Vec<(usize, usize, usize)>>,
    /// Jobs started and not finished, per attached region id.
    in_flight: Mutex<Vec<usize>>,
    violations: Mutex<Vec<String>>,
    attaches: AtomicUsize,
    detaches: AtomicUsize,
    jobs: AtomicUsize,
    next_id: AtomicUsize,
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
}

/// The double. Make it with [`DoubleDevice::new`] (it is always in an
/// `Arc`: its buffers name it).
pub struct DoubleDevice {
    shared: Arc<Shared>,
    jobs: Mutex<Option<Sender<Job>>>,
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
        let (tx, rx) = channel();
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new()
            .name("device-double".into())
            .spawn(move || run(&rx))
            .expect("spawn the double's thread");
        Arc::new_cyclic(|this| DoubleDevice {
            shared,
            jobs: Mutex::new(Some(tx)),
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

    /// `buffer`, when it is one of this device's (else a violation).
    fn own(&self, buffer: &Arc<dyn DeviceBuffer>, what: &str) -> Result<Arc<dyn DeviceBuffer>> {
        let mine = buffer
            .as_any()
            .downcast_ref::<DoubleBuffer>()
            .is_some_and(|b| std::ptr::eq(Arc::as_ptr(&b.device), self));
        if !mine {
            self.shared
                .violation(format!("{what} of {buffer:?}, not a buffer of this device"));
            return Err(Error::internal("device double: a foreign buffer"));
        }
        Ok(Arc::clone(buffer))
    }

    fn submit(&self, copies: Vec<DoubleCopy>, fail: Option<String>) -> Result<Box<dyn CopyTicket>> {
        let region = copies.first().and_then(|c| match c {
            DoubleCopy::Capture { dst, .. } => self.shared.region_of(dst),
            DoubleCopy::Restore { src, .. } => self.shared.region_of(src),
        });
        for c in copies.iter().skip(1) {
            let span = match c {
                DoubleCopy::Capture { dst, .. } => dst,
                DoubleCopy::Restore { src, .. } => src,
            };
            if self.shared.region_of(span) != region {
                self.shared
                    .violation("one job's copies span two stagings".into());
            }
        }
        let Some(region) = region else {
            return Err(Error::internal("device double: staging not attached"));
        };
        self.shared.jobs.fetch_add(1, Ordering::SeqCst);
        self.shared
            .in_flight
            .lock()
            .expect("in flight")
            .push(region);
        let done = Arc::new(Done::default());
        let job = Job {
            copies,
            fail,
            done: Arc::clone(&done),
        };
        self.jobs
            .lock()
            .expect("jobs")
            .as_ref()
            .expect("the double is running")
            .send(job)
            .map_err(|_| Error::internal("device double: its thread is gone"))?;
        let ticket = DoubleTicket {
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
        drop(self.jobs.lock().expect("jobs").take());
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

/// The double's thread: each job after [`LATENCY`], in order.
fn run(jobs: &Receiver<Job>) {
    for job in jobs {
        std::thread::sleep(LATENCY);
        let started = Instant::now();
        let result = match job.fail {
            Some(reason) => Err(reason),
            None => {
                for copy in job.copies {
                    match copy {
                        DoubleCopy::Capture {
                            buffer,
                            offset,
                            mut dst,
                        } => {
                            let mut bytes = vec![0u8; dst.len()];
                            memory_of(&buffer)
                                .read_exact_at(&mut bytes, offset as u64)
                                .expect("read device memory");
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
                                .expect("write device memory");
                        }
                    }
                }
                Ok(started.elapsed().max(Duration::from_nanos(1)))
            }
        };
        // The copies (their spans and buffers) are dropped: now the job
        // may end.
        *job.done.result.lock().expect("done") = Some(result);
        job.done.changed.notify_all();
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
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
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

    fn capture(&self, copies: Vec<CaptureCopy>) -> Result<Box<dyn CopyTicket>> {
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
            let buffer = self.own(src.buffer(), "a capture")?;
            jobs.push(DoubleCopy::Capture {
                buffer,
                offset: src.offset(),
                dst,
            });
        }
        let fail = self.fail_capture.lock().expect("fail").take();
        self.submit(jobs, fail)
    }

    fn restore(&self, copies: Vec<RestoreCopy>) -> Result<Box<dyn CopyTicket>> {
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
            let buffer = self.own(dst.buffer(), "a restore")?;
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

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
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
    done: Arc<Done>,
    region: usize,
    shared: Arc<Shared>,
    waited: bool,
}

impl DoubleTicket {
    /// Waits for the job's end (a hung double fails the test).
    fn finish(&self) -> Result<Duration, String> {
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

    /// Overwrites the bytes, as a kernel of the trainer would.
    pub fn overwrite(&self, bytes: &[u8]) {
        assert_eq!(bytes.len(), self.len);
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
    use crate::staging::{Staging, testing};

    fn staging(devices: &[Arc<dyn Device>]) -> Staging {
        let info = testing::one_slot(&[64]);
        let (fd, _) = testing::memfd(info.memfd_bytes);
        Staging::map(fd, info, vec![64], devices).expect("map")
    }

    fn capture_of(buffer: &Arc<DoubleBuffer>, staging: &Staging) -> Vec<CaptureCopy> {
        // SAFETY: one set of spans at a time in this test.
        let dst = unsafe { staging.slot_spans(0) }
            .expect("spans")
            .pop()
            .expect("one");
        let src = Buffer::Device(Arc::clone(buffer) as Arc<dyn DeviceBuffer>).source();
        vec![CaptureCopy { src, dst }]
    }

    #[test]
    fn the_double_flags_copies_outside_its_attachments_and_tickets_dropped_unwaited() {
        let double = DoubleDevice::new();
        let buffer = double.buffer(&[7; 64]);
        // Staging the double was never attached to.
        let unattached = staging(&[]);
        assert!(double.capture(capture_of(&buffer, &unattached)).is_err());
        // Attached: the copy runs later than the call returns.
        let attached = staging(&[Arc::clone(&double) as Arc<dyn Device>]);
        let ticket = double
            .capture(capture_of(&buffer, &attached))
            .expect("capture");
        assert!(!ticket.is_done());
        drop(ticket);
        // Host memory is not the double's to copy.
        let host = crate::HostTensor::zeros(crate::Dtype::U8, [64]).expect("zeros");
        // SAFETY: the ticket above is gone (its drop waited for its copy).
        let dst = unsafe { attached.slot_spans(0) }
            .expect("spans")
            .pop()
            .expect("one");
        let copies = vec![CaptureCopy {
            src: Buffer::Host(host).source(),
            dst,
        }];
        assert!(double.capture(copies).is_err());
        let violations = double.violations();
        assert_eq!(violations.len(), 3, "{violations:#?}");
        assert!(violations[0].contains("in no staging this device is attached to"));
        assert!(violations[1].contains("dropped before it was waited for"));
        assert!(violations[2].contains("a capture of host memory"));
        let checked = std::panic::catch_unwind(|| double.check());
        assert!(checked.is_err(), "check fails the test on violations");
    }
}
