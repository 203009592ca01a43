//! One connection to `gpusnapd`: frames out, frames (and passed file
//! descriptors) in, every read bounded by a deadline.
//!
//! Reads go through `recvmsg` so `SCM_RIGHTS` descriptors are never lost;
//! each descriptor is remembered with the stream position of the byte it
//! arrived on and handed out with the frame that contains that byte. Sends
//! use `MSG_NOSIGNAL`, so a closed peer is an error, never a `SIGPIPE`.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, send};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::proto::convert::to_u64;
use crate::proto::{self, FRAME_HEADER_BYTES, FrameError, Reply, Request};

/// Bytes asked of the kernel per read when no bigger frame is pending.
const READ_BYTES: usize = 64 << 10;
/// Descriptors one read can carry before the control data is truncated.
const FDS_PER_READ_MAX: usize = 8;
/// Pauses between connection attempts.
const CONNECT_PAUSE_FIRST: Duration = Duration::from_millis(50);
const CONNECT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// One frame from the daemon with the descriptors that rode on it.
#[derive(Debug)]
pub(crate) struct Frame {
    pub reply: Reply,
    pub fds: Vec<OwnedFd>,
}

/// A connected socket and what has been read from it but not yet parsed.
#[derive(Debug)]
pub(crate) struct Conn {
    stream: UnixStream,
    /// Received bytes; `buf[..consumed]` are already parsed.
    buf: Vec<u8>,
    consumed: usize,
    /// Stream position of `buf[0]`.
    buf_pos: u64,
    /// Descriptors not yet handed out, with the stream position they came at.
    fds: Vec<(u64, OwnedFd)>,
}

fn disconnected(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Disconnected(format!("{what}: {e}"))
}

/// Whether an errno means the peer is gone.
fn is_peer_gone(e: Errno) -> bool {
    matches!(
        e,
        Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN | Errno::ECONNABORTED
    )
}

impl Conn {
    /// Connects, retrying a missing or refusing socket (pauses of 50 ms
    /// doubling to 1 s) until `deadline`, the bound of the caller's whole
    /// wait.
    pub(crate) fn connect(socket: &Path, deadline: Instant) -> Result<Conn> {
        let mut backoff = Backoff::new(CONNECT_PAUSE_FIRST, CONNECT_PAUSE_MAX, deadline);
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => return Ok(Conn::from_stream(stream)),
                Err(e) => {
                    let retryable = matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound
                            | std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::Interrupted
                    );
                    if !retryable || !backoff.pause() {
                        return Err(Error::DaemonUnavailable {
                            socket: PathBuf::from(socket),
                            source: e,
                        });
                    }
                }
            }
        }
    }

    pub(crate) fn from_stream(stream: UnixStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
            consumed: 0,
            buf_pos: 0,
            fds: Vec::new(),
        }
    }

    /// Sends one request, giving up at `deadline`.
    pub(crate) fn send(&mut self, request: &Request, deadline: Deadline) -> Result<()> {
        let what = request.body.name();
        let frame = proto::encode(request).map_err(|e| match e {
            FrameError::TooLarge { .. } => Error::TooLarge(format!("{what} request: {e}")),
            other => Error::Protocol(format!("cannot encode {what}: {other}")),
        })?;
        let mut sent = 0;
        while let Some(rest) = frame.get(sent..).filter(|r| !r.is_empty()) {
            let remaining = remaining(deadline, what, "send")?;
            self.stream.set_write_timeout(Some(remaining))?;
            match send(self.stream.as_raw_fd(), rest, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => sent += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {}
                Err(e) if is_peer_gone(e) => {
                    return Err(disconnected(&format!("sending {what}"), e));
                }
                Err(e) => return Err(Error::Io(e.into())),
            }
        }
        Ok(())
    }

    /// Reads the next frame, waiting until `deadline` (`what` names the
    /// wait in a timeout).
    pub(crate) fn recv(&mut self, deadline: Deadline, what: &str) -> Result<Frame> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(frame);
            }
            self.fill(deadline, what)?;
        }
    }

    /// Bytes received and not yet parsed.
    fn pending(&self) -> &[u8] {
        self.buf.get(self.consumed..).unwrap_or(&[])
    }

    /// The frame length announced by a complete pending header.
    fn pending_frame_len(&self) -> Result<Option<usize>> {
        let Some(header) = self.pending().get(..FRAME_HEADER_BYTES) else {
            return Ok(None);
        };
        let header: [u8; FRAME_HEADER_BYTES] = header
            .try_into()
            .map_err(|_| Error::Protocol("short frame header".into()))?;
        match proto::frame_len(header) {
            Ok(len) => Ok(Some(len)),
            Err(e @ FrameError::TooLarge { .. }) => Err(Error::Protocol(format!(
                "gpusnapd sent an oversized frame: {e}"
            ))),
            Err(e) => Err(Error::Protocol(format!("gpusnapd sent a bad frame: {e}"))),
        }
    }

    fn parse(&mut self) -> Result<Option<Frame>> {
        let Some(len) = self.pending_frame_len()? else {
            return Ok(None);
        };
        let Some(body) = self
            .pending()
            .get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len)
        else {
            return Ok(None);
        };
        let reply: Result<Reply> = proto::decode(body)
            .map_err(|e| Error::Protocol(format!("gpusnapd sent a malformed message: {e}")));
        let start = self.buf_pos + to_u64(self.consumed);
        let end = start + to_u64(FRAME_HEADER_BYTES + len);
        self.consumed += FRAME_HEADER_BYTES + len;
        let (mine, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fds)
            .into_iter()
            .partition(|(pos, _)| *pos < end);
        self.fds = later;
        if self.consumed == self.buf.len() {
            self.buf_pos += to_u64(self.buf.len());
            self.buf.clear();
            self.consumed = 0;
        }
        if let Some((pos, _)) = mine.iter().find(|(pos, _)| *pos != start) {
            return Err(Error::Protocol(format!(
                "a file descriptor arrived inside a frame (byte {} of it), not on its first byte",
                pos - start
            )));
        }
        Ok(Some(Frame {
            reply: reply?,
            fds: mine.into_iter().map(|(_, fd)| fd).collect(),
        }))
    }

    /// Reads more bytes (and descriptors) from the socket.
    fn fill(&mut self, deadline: Deadline, what: &str) -> Result<()> {
        if self.consumed > 0 {
            self.buf.drain(..self.consumed);
            self.buf_pos += to_u64(self.consumed);
            self.consumed = 0;
        }
        let need = match self.pending_frame_len()? {
            Some(len) => FRAME_HEADER_BYTES + len - self.buf.len(),
            None => FRAME_HEADER_BYTES - self.buf.len(),
        };
        let want = need.max(READ_BYTES);
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        let result = self.read_some(old, deadline, what);
        let got = *result.as_ref().unwrap_or(&0);
        self.buf.truncate(old + got);
        match result {
            Ok(0) if old == 0 => Err(Error::Disconnected(format!(
                "gpusnapd closed the connection while {what} was awaited"
            ))),
            Ok(0) => Err(Error::Disconnected(format!(
                "gpusnapd closed the connection in the middle of a frame ({old} bytes of it read) while {what} was awaited"
            ))),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One `recvmsg` into `buf[at..]`; returns the bytes read.
    fn read_some(&mut self, at: usize, deadline: Deadline, what: &str) -> Result<usize> {
        let fd = self.stream.as_raw_fd();
        let pos = self.buf_pos + to_u64(at);
        loop {
            let remaining = remaining(deadline, what, "reply")?;
            self.stream.set_read_timeout(Some(remaining))?;
            let mut cmsg = nix::cmsg_space!([RawFd; FDS_PER_READ_MAX]);
            let Some(space) = self.buf.get_mut(at..) else {
                return Err(Error::Protocol("read buffer out of range".into()));
            };
            let mut iov = [IoSliceMut::new(space)];
            let msg = match recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            {
                Ok(msg) => msg,
                Err(Errno::EINTR | Errno::EAGAIN) => continue,
                Err(e) if is_peer_gone(e) => {
                    return Err(disconnected(&format!("awaiting {what}"), e));
                }
                Err(e) => return Err(Error::Io(e.into())),
            };
            let bytes = msg.bytes;
            let cmsgs = msg.cmsgs().map_err(|e| {
                Error::Protocol(format!(
                    "control data truncated ({e}): more descriptors than expected"
                ))
            })?;
            for c in cmsgs {
                match c {
                    ControlMessageOwned::ScmRights(fds) => {
                        for raw in fds {
                            // SAFETY: the kernel just installed `raw` in this
                            // process's table for this message; nothing else
                            // owns it.
                            self.fds.push((pos, unsafe { OwnedFd::from_raw_fd(raw) }));
                        }
                    }
                    other => {
                        return Err(Error::Protocol(format!(
                            "unexpected control message {other:?}"
                        )));
                    }
                }
            }
            return Ok(bytes);
        }
    }
}

/// When a wait ends, and the bound it was given (for the error).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub at: Instant,
    pub after: Duration,
}

impl Deadline {
    /// `after` from now.
    pub(crate) fn after(after: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + after,
            after,
        }
    }
}

/// Time left before `deadline`, or the timeout error.
fn remaining(deadline: Deadline, what: &str, phase: &str) -> Result<Duration> {
    let now = Instant::now();
    if now >= deadline.at {
        return Err(Error::Timeout {
            what: format!("{what} ({phase})"),
            after: deadline.after,
        });
    }
    Ok((deadline.at - now).max(Duration::from_millis(1)))
}
