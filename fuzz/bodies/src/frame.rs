//! Target `frame`: the frame decoder of `gpusnap-proto`.
//!
//! The input is a byte stream cut into frames the way both sides cut
//! theirs ([`body_len`] on a 4-byte header, then the body), under a limit
//! the first byte picks. Invariants: a header is refused (never a panic)
//! when its length is 0 or over the lower of the caller's limit and
//! [`FRAME_BYTES_MAX`]; a body that decodes as a `Request` or a `Reply`
//! re-encodes to a frame that decodes to the same message, and encoding is
//! a fixed point (the second encoding has the first one's bytes); a
//! `Reply` encodes for every served protocol version, or is refused as
//! not sayable in it.

use gpusnap_proto::{
    FRAME_BYTES_MAX, FRAME_HEADER_BYTES, FrameError, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, Reply,
    Request, body_len, decode, encode, encode_reply, frame_len,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cursor::Cursor;

/// Most frames read from one input.
const FRAMES_MAX: usize = 64;

/// Decodes the frames of `data` and checks each (see the module doc).
pub fn frame(data: &[u8]) {
    let mut input = Cursor::new(data);
    // Limits below, at and above a typical body, and the protocol's.
    let limit = match input.u8() % 4 {
        0 => 64,
        1 => 4096,
        2 => FRAME_BYTES_MAX,
        _ => u32::MAX,
    };
    for _ in 0..FRAMES_MAX {
        if input.is_empty() {
            return;
        }
        let header = input.u32().to_le_bytes();
        let announced = u32::from_le_bytes(header);
        let len = match body_len(header, limit) {
            Ok(len) => len,
            Err(FrameError::Empty) => {
                assert_eq!(announced, 0, "only a zero length is an empty frame");
                continue;
            }
            Err(FrameError::TooLarge { len, limit: told }) => {
                assert_eq!(len, u64::from(announced));
                assert_eq!(told, limit.min(FRAME_BYTES_MAX));
                assert!(len > u64::from(told), "{len} refused under {told}");
                continue;
            }
            Err(e) => panic!("a header is refused only as empty or too large: {e}"),
        };
        let effective = limit.min(FRAME_BYTES_MAX);
        assert!(len > 0 && u64::try_from(len).is_ok_and(|l| l <= u64::from(effective)));
        assert_eq!(
            frame_len(header).ok(),
            Some(len),
            "a length under a lower limit is under the protocol's"
        );
        let body = input.bytes(len);
        round_trip::<Request>(body);
        if let Some(reply) = round_trip::<Reply>(body) {
            for version in PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION {
                match encode_reply(&reply, version) {
                    Ok(framed) => check_framed(&framed),
                    Err(FrameError::NotInVersion { .. } | FrameError::TooLarge { .. }) => {}
                    Err(e) => panic!("reply in version {version}: {e}"),
                }
            }
        }
    }
}

/// A body that decodes as `T` re-encodes, decodes to the same `T`, and
/// encodes to the same bytes again.
fn round_trip<T>(body: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let message: T = decode(body).ok()?;
    let framed = encode(&message).expect("a decoded message encodes");
    check_framed(&framed);
    let body_again = framed.get(FRAME_HEADER_BYTES..).expect("framed");
    let again: T = decode(body_again).expect("an encoded message decodes");
    assert_eq!(again, message, "decode(encode(m)) == m");
    let reframed = encode(&again).expect("encodes again");
    assert_eq!(reframed, framed, "encoding is a fixed point");
    Some(message)
}

/// A frame's header announces exactly its body's length, within the limit.
fn check_framed(framed: &[u8]) {
    let (header, body) = framed.split_at(FRAME_HEADER_BYTES);
    let header: [u8; FRAME_HEADER_BYTES] = header.try_into().expect("4 bytes");
    assert_eq!(
        frame_len(header).expect("a frame we made is valid"),
        body.len()
    );
}
