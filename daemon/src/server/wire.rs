//! Frames on the daemon's side of a connection: reading requests with a size
//! limit, writing replies, and passing a memfd with `SCM_RIGHTS`.

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use gpusnap_proto::{
    self as proto, ErrorKind, FRAME_HEADER_BYTES, FrameError, Reply, ReplyBody, Request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Once a frame's header has arrived, its body must follow within this.
pub const BODY_WAIT: Duration = Duration::from_secs(30);

/// Why a request could not be read; each ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes is over the {limit}-byte limit")]
    TooLarge { len: u64, limit: u32 },
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("the frame body did not arrive within {} s", BODY_WAIT.as_secs())]
    SlowBody,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// The reply kind, when the client should be told.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            WireError::TooLarge { .. } => Some(ErrorKind::TooLarge),
            WireError::Malformed(_) | WireError::SlowBody => Some(ErrorKind::Protocol),
            WireError::Io(_) => None,
        }
    }
}

/// Reads one request; `Ok(None)` on a clean end of stream between frames.
pub async fn read_request(
    rd: &mut OwnedReadHalf,
    limit: u32,
) -> Result<Option<Request>, WireError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    let mut got = 0;
    while got < header.len() {
        let Some(rest) = header.get_mut(got..) else {
            break;
        };
        let n = rd.read(rest).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(WireError::Malformed(
                    "connection closed inside a frame header".into(),
                ))
            };
        }
        got += n;
    }
    // The configured limit (`daemon.frame_bytes_max`, at most the
    // protocol's), checked before the body is allocated.
    let len = proto::body_len(header, limit).map_err(|e| match e {
        FrameError::TooLarge { len, limit } => WireError::TooLarge { len, limit },
        e @ (FrameError::Empty | FrameError::Malformed(_) | FrameError::NotInVersion { .. }) => {
            WireError::Malformed(e.to_string())
        }
    })?;
    let mut body = vec![0u8; len];
    match tokio::time::timeout(BODY_WAIT, rd.read_exact(&mut body)).await {
        Err(_) => return Err(WireError::SlowBody),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(WireError::Malformed(
                "connection closed inside a frame".into(),
            ));
        }
        Ok(r) => r?,
    };
    let request: Request = proto::decode(&body).map_err(|e| WireError::Malformed(e.to_string()))?;
    Ok(Some(request))
}

/// Writes one reply as protocol `version` says it (the connection's,
/// from its handshake). A reply over the frame limit, or one the version
/// cannot say, goes out as an error saying so, for the same request.
pub async fn write_reply(
    wr: &mut OwnedWriteHalf,
    reply: &Reply,
    version: u32,
) -> std::io::Result<()> {
    wr.write_all(&encode_reply(reply, version)).await
}

fn encode_reply(reply: &Reply, version: u32) -> Vec<u8> {
    match proto::encode_reply(reply, version) {
        Ok(frame) => frame,
        Err(e) => {
            let (kind, message) = match &e {
                proto::FrameError::NotInVersion { .. } => (
                    ErrorKind::VersionMismatch,
                    format!("the reply cannot be sent: {e}; upgrade the client"),
                ),
                _ => (
                    ErrorKind::TooLarge,
                    format!("the reply cannot be sent: {e}; ask for less (a job filter)"),
                ),
            };
            let refusal = Reply {
                id: reply.id,
                body: ReplyBody::error(kind, message),
            };
            proto::encode_reply(&refusal, version)
                .expect("a short error reply encodes in every version")
        }
    }
}

/// Writes one reply with `fd` attached to its first byte.
pub async fn write_reply_with_fd(
    wr: &mut OwnedWriteHalf,
    reply: &Reply,
    version: u32,
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let frame = encode_reply(reply, version);
    let raw = [fd.as_raw_fd()];
    let stream = wr.as_ref();
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(&frame)];
            let cmsg = [ControlMessage::ScmRights(&raw)];
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        })
        .await?;
    assert!(sent > 0, "sendmsg of a non-empty frame sent nothing");
    if let Some(rest) = frame.get(sent..) {
        wr.write_all(rest).await?;
    }
    Ok(())
}
