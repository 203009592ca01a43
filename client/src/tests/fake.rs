//! A scriptable fake `gpusnapd`: a thread on a Unix listener that runs one
//! closure per accepted connection, speaking the real framing and passing a
//! real memfd with `SCM_RIGHTS`.

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use crate::proto::{
    self, AttachReport, BusyPolicy, PROTOCOL_VERSION, Reply, ReplyBody, Request, RequestBody,
    StagingInfo,
};
use crate::{ClientConfig, TensorSpec};

/// The uid the fake reports.
pub const UID: u32 = 4242;

pub type Handler = Box<dyn FnOnce(&mut FakeConn) + Send>;

/// What the fake does next.
pub enum Script {
    /// Accept one connection and run this on it.
    Conn(Handler),
    /// Close the listener, remove the socket, and listen again on it.
    Restart,
}

/// Shorthand for a connection script.
pub fn conn(f: impl FnOnce(&mut FakeConn) + Send + 'static) -> Script {
    Script::Conn(Box::new(f))
}

/// A running fake daemon.
pub struct Fake {
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    /// Listens on `path` and runs `scripts` in order.
    pub fn start(path: &Path, scripts: Vec<Script>) -> Fake {
        let path = path.to_path_buf();
        let mut listener = UnixListener::bind(&path).expect("bind fake socket");
        let thread = std::thread::spawn(move || {
            for script in scripts {
                match script {
                    Script::Restart => {
                        drop(listener);
                        std::fs::remove_file(&path).expect("remove socket");
                        std::thread::sleep(Duration::from_millis(100));
                        listener = UnixListener::bind(&path).expect("rebind fake socket");
                    }
                    Script::Conn(handler) => {
                        let stream = accept(&listener);
                        let mut conn = FakeConn::new(stream);
                        handler(&mut conn);
                    }
                }
            }
            drop(listener);
            let _ = std::fs::remove_file(&path);
        });
        Fake {
            thread: Some(thread),
        }
    }

    /// Waits for the script to end; fails the test if the fake panicked.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take()
            && let Err(panic) = t.join()
        {
            std::panic::resume_unwind(panic);
        }
    }
}

fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the client never connected");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A temporary directory with a socket path in it.
pub fn socket_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gpusnapd.sock");
    (dir, path)
}

/// A client configuration with short timeouts for tests.
pub fn config(path: &Path) -> ClientConfig {
    let mut c = ClientConfig::new("job-a");
    c.socket = path.to_path_buf();
    c.connect_timeout = Duration::from_secs(5);
    c.call_timeout = Duration::from_secs(5);
    c.commit_timeout = Duration::from_secs(5);
    c.copy_threads = 2;
    c
}

/// How the fake lays out staging for a registration.
#[derive(Debug, Clone)]
pub struct Layout {
    pub slots: u32,
    pub ring_chunks: u32,
    pub chunk_bytes: u64,
    pub policy: BusyPolicy,
    /// Bytes left empty after each tensor (holes in the data section).
    pub gap: u64,
}

impl Default for Layout {
    fn default() -> Layout {
        Layout {
            slots: 2,
            ring_chunks: 2,
            chunk_bytes: 4096,
            policy: BusyPolicy::Block,
            gap: 8,
        }
    }
}

impl Layout {
    /// The staging description for `tensors`.
    pub fn info(&self, tensors: &[TensorSpec]) -> StagingInfo {
        let mut offsets = Vec::new();
        let mut end = 0;
        for t in tensors {
            offsets.push(end);
            end += t.byte_len().expect("len") + self.gap;
        }
        let slot_bytes = end.div_ceil(4096).max(1) * 4096;
        let ring_offset = u64::from(self.slots) * slot_bytes;
        StagingInfo {
            memory: crate::proto::StagingMemory::HostMemfd,
            memfd_bytes: ring_offset + u64::from(self.ring_chunks) * self.chunk_bytes,
            slots: self.slots,
            slot_bytes,
            data_bytes: end,
            offsets,
            ring_offset,
            ring_chunks: self.ring_chunks,
            chunk_bytes: self.chunk_bytes,
            policy: self.policy,
        }
    }
}

/// One accepted connection.
pub struct FakeConn {
    pub stream: UnixStream,
    pub info: Option<StagingInfo>,
    pub tensors: Vec<TensorSpec>,
    /// The client's `Attached` reports, in order: each is answered
    /// `AttachNoted` as it arrives, never returned by `recv`.
    pub attached: Vec<Vec<AttachReport>>,
    memfd: Option<File>,
}

impl FakeConn {
    fn new(stream: UnixStream) -> FakeConn {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        FakeConn {
            stream,
            info: None,
            tensors: Vec::new(),
            attached: Vec::new(),
            memfd: None,
        }
    }

    /// The next request, or `None` when the client closed; an `Attached`
    /// report is recorded and answered on the way, as the daemon does.
    pub fn try_recv(&mut self) -> Option<Request> {
        loop {
            let request = self.try_recv_any()?;
            match request.body {
                RequestBody::Attached { devices } => {
                    assert!(self.info.is_some(), "attached before registered");
                    self.attached.push(devices);
                    self.reply(request.id, ReplyBody::AttachNoted);
                }
                _ => return Some(request),
            }
        }
    }

    /// The next request as it came, `Attached` too.
    pub fn try_recv_any(&mut self) -> Option<Request> {
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => panic!("fake read: {e}"),
        }
        let len = proto::frame_len(header).expect("client frame length");
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .expect("client frame body");
        Some(proto::decode(&body).expect("client frame decodes"))
    }

    /// The next request.
    pub fn recv(&mut self) -> Request {
        self.try_recv().expect("the client closed the connection")
    }

    /// The next request, which must be `name`.
    pub fn expect(&mut self, name: &str) -> Request {
        let r = self.recv();
        assert_eq!(r.body.name(), name, "fake got {r:?}");
        r
    }

    /// Whether no request arrives within `wait`.
    pub fn quiet_for(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut b = [0u8; 1];
        while Instant::now() < deadline {
            let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
            match nix::sys::socket::recv(self.stream.as_raw_fd(), &mut b, flags) {
                Ok(_) => return false,
                Err(nix::errno::Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("peek: {e}"),
            }
        }
        true
    }

    pub fn reply(&mut self, id: u64, body: ReplyBody) {
        self.raw(&proto::encode(&Reply { id, body }).expect("encode"));
    }

    pub fn event(&mut self, body: ReplyBody) {
        self.reply(0, body);
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        // The client may already have given up; that is what some tests check.
        let _ = self.stream.write_all(bytes);
    }

    /// Hello → Welcome.
    pub fn hello(&mut self) {
        let r = self.expect("hello");
        match r.body {
            RequestBody::Hello {
                protocol_version, ..
            } => assert_eq!(protocol_version, PROTOCOL_VERSION),
            other => panic!("{other:?}"),
        }
        self.reply(
            r.id,
            ReplyBody::Welcome {
                protocol_version: PROTOCOL_VERSION,
                daemon_version: "fake".into(),
                uid: UID,
            },
        );
    }

    /// The next `Register`; returns its id after storing the tensors.
    pub fn expect_register(&mut self) -> u64 {
        let r = self.expect("register");
        match r.body {
            RequestBody::Register { tensors, job, .. } => {
                assert_eq!(job, "job-a");
                self.tensors = tensors;
            }
            other => panic!("{other:?}"),
        }
        r.id
    }

    /// Answers a `Register` with `info` and a memfd of `memfd_len` bytes,
    /// sealed as the daemon seals it, passing `fds` descriptors (normally 1).
    pub fn registered_with(&mut self, id: u64, info: StagingInfo, memfd_len: u64, fds: usize) {
        self.send_registered(id, info, memfd_len, fds, true);
    }

    /// Answers a `Register` with a memfd that is not sealed.
    pub fn registered_unsealed(&mut self, id: u64, info: StagingInfo) {
        let len = info.memfd_bytes;
        self.send_registered(id, info, len, 1, false);
    }

    fn send_registered(
        &mut self,
        id: u64,
        info: StagingInfo,
        memfd_len: u64,
        fds: usize,
        sealed: bool,
    ) {
        let fd: OwnedFd = memfd_create(
            "fake-staging",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .expect("memfd");
        nix::unistd::ftruncate(&fd, i64::try_from(memfd_len).expect("len")).expect("ftruncate");
        if sealed {
            // As the daemon does (daemon/src/staging.rs): the size is final.
            let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
            fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).expect("seal");
        }
        let frame = proto::encode(&Reply {
            id,
            body: ReplyBody::Registered(info.clone()),
        })
        .expect("encode");
        let raw = vec![fd.as_raw_fd(); fds];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if fds == 0 { &[] } else { &cmsg };
        sendmsg::<()>(
            self.stream.as_raw_fd(),
            &[IoSlice::new(&frame)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        self.info = Some(info);
        self.memfd = Some(File::from(fd));
    }

    /// Register → Registered with `layout`.
    pub fn register(&mut self, layout: &Layout) -> StagingInfo {
        let id = self.expect_register();
        let info = layout.info(&self.tensors);
        self.registered_with(id, info.clone(), info.memfd_bytes, 1);
        info
    }

    /// Hello, then Register with `layout`.
    pub fn open(&mut self, layout: &Layout) -> StagingInfo {
        self.hello();
        self.register(layout)
    }

    fn memfd(&self) -> &File {
        self.memfd.as_ref().expect("registered")
    }

    pub fn info(&self) -> &StagingInfo {
        self.info.as_ref().expect("registered")
    }

    /// The data section of `slot`.
    pub fn slot_data(&self, slot: u32) -> Vec<u8> {
        let info = self.info();
        let mut buf = vec![0u8; usize::try_from(info.data_bytes).expect("len")];
        self.memfd()
            .read_exact_at(&mut buf, u64::from(slot) * info.slot_bytes)
            .expect("read slot");
        buf
    }

    /// Writes `data` as the data section of `slot`.
    pub fn write_slot(&self, slot: u32, data: &[u8]) {
        let at = u64::from(slot) * self.info().slot_bytes;
        self.memfd().write_all_at(data, at).expect("write slot");
    }

    /// The bytes of stream chunk `seq` at its ring position.
    pub fn ring_chunk(&self, seq: u64) -> Vec<u8> {
        let info = self.info();
        let (start, end) = info.chunk_range(seq);
        let mut buf = vec![0u8; usize::try_from(end - start).expect("len")];
        self.memfd()
            .read_exact_at(&mut buf, info.ring_position(seq))
            .expect("read ring");
        buf
    }

    /// Fills the ring with `byte` (stale data a client must overwrite).
    pub fn dirty_ring(&self, byte: u8) {
        let info = self.info();
        let len = usize::try_from(u64::from(info.ring_chunks) * info.chunk_bytes).expect("len");
        self.memfd()
            .write_all_at(&vec![byte; len], info.ring_offset)
            .expect("dirty ring");
    }

    /// Begin → Slot `slot`; returns the step.
    pub fn begin_slot(&mut self, slot: u32) -> u64 {
        let r = self.expect("begin");
        let RequestBody::Begin { step } = r.body else {
            unreachable!()
        };
        self.reply(r.id, ReplyBody::Slot { step, slot });
        step
    }

    /// Captured → Accepted; returns (step, capture_ns, stall_ns).
    pub fn accept_captured(&mut self) -> (u64, u64, u64) {
        let r = self.expect("captured");
        let RequestBody::Captured {
            step,
            capture_ns,
            stall_ns,
        } = r.body
        else {
            unreachable!()
        };
        self.reply(r.id, ReplyBody::Accepted { step });
        (step, capture_ns, stall_ns)
    }

    /// Reads until the client closes (so the client never sees EOF early).
    pub fn until_closed(&mut self) {
        if let Some(r) = self.try_recv() {
            panic!("unexpected request {r:?}");
        }
    }
}

/// The data section the client should have written: each tensor's bytes
/// at its offset, holes zero.
pub fn expected_data(info: &StagingInfo, tensors: &[Vec<u8>]) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(info.data_bytes).expect("len")];
    for (bytes, &off) in tensors.iter().zip(&info.offsets) {
        let off = usize::try_from(off).expect("off");
        data[off..off + bytes.len()].copy_from_slice(bytes);
    }
    data
}

/// `len` bytes of a pattern seeded by `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 31 + usize::from(seed) * 7) % 251).expect("byte"))
        .collect()
}
