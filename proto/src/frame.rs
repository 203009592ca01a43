//! Framing: a 4-byte little-endian body length, then that many bytes of
//! JSON. Both sides frame through these functions and nothing else.

use serde::{Deserialize, Serialize};

/// Longest frame body, in bytes (a registration of many tensors is the
/// largest message). A daemon may set a lower limit of its own.
pub const FRAME_BYTES_MAX: u32 = 64 << 20;
/// Bytes of the length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Why a frame cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the {limit}-byte limit")]
    TooLarge { len: u64, limit: u32 },
    #[error("empty frame")]
    Empty,
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("{what} cannot be said in protocol version {version}")]
    NotInVersion { what: String, version: u32 },
}

/// The body length a frame header announces, checked against `limit`
/// (at most [`FRAME_BYTES_MAX`]) before anything is allocated for it.
pub fn body_len(header: [u8; FRAME_HEADER_BYTES], limit: u32) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header);
    let limit = limit.min(FRAME_BYTES_MAX);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > limit {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            limit,
        });
    }
    Ok(crate::convert::to_usize(u64::from(len)))
}

/// The body length of a frame header, checked against [`FRAME_BYTES_MAX`].
pub fn frame_len(header: [u8; FRAME_HEADER_BYTES]) -> Result<usize, FrameError> {
    body_len(header, FRAME_BYTES_MAX)
}

/// Header and body of one message; a message over the frame limit is an
/// error, never a frame the other side must refuse.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    frame(serde_json::to_vec(message)?)
}

/// The frame of an encoded body.
pub(crate) fn frame(body: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    let too_large = || FrameError::TooLarge {
        len: crate::convert::to_u64(body.len()),
        limit: FRAME_BYTES_MAX,
    };
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= FRAME_BYTES_MAX)
        .ok_or_else(too_large)?;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Parses one frame body.
pub fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_len_holds_a_frame_to_the_lower_of_the_callers_limit_and_the_protocols() {
        let header = |len: u32| len.to_le_bytes();
        assert_eq!(body_len(header(4096), 4096).expect("at the limit"), 4096);
        assert!(matches!(
            body_len(header(4097), 4096),
            Err(FrameError::TooLarge {
                len: 4097,
                limit: 4096
            })
        ));
        // A limit above the protocol's is the protocol's.
        assert!(matches!(
            body_len(header(FRAME_BYTES_MAX + 1), u32::MAX),
            Err(FrameError::TooLarge {
                limit: FRAME_BYTES_MAX,
                ..
            })
        ));
        assert!(matches!(body_len(header(0), 4096), Err(FrameError::Empty)));
    }
}
