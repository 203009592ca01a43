//! Golden frames: every message of every protocol version a current
//! daemon serves, as committed files (`golden/v<N>.frames`). Requests
//! decode to the expected message and re-encode byte for byte; replies
//! encode for that version byte for byte, and decode and re-encode byte
//! for byte again: with this build's types for the current version, with
//! the frozen types of that version (`v1_types.rs`, `v2_types.rs`,
//! `v3_types.rs`) for an older one. A version's file never changes
//! once released: a diff in one is a break of the protocol.
//!
//! `GPUSNAP_BLESS_GOLDEN=1` writes the file of the current version when it
//! does not exist yet (a new version); it never rewrites one.

mod samples;
mod v1_types;
mod v2_types;
mod v3_types;

use std::collections::BTreeMap;
use std::path::PathBuf;

use gpusnap_proto::{
    FRAME_HEADER_BYTES, FrameError, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, Reply, ReplyBody,
    Request, RequestBody, decode, encode, encode_reply, frame_len,
};

fn golden_path(version: u32) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("v{version}.frames"))
}

/// The frames of `version`, by name, as this build encodes them.
fn expected(version: u32) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut id = 0;
    for (name, body) in samples::requests(version) {
        id += 1;
        let frame = encode(&Request { id, body }).expect("encode request");
        out.push((format!("request.{name}"), frame));
    }
    for (name, body) in samples::replies(version) {
        let event = matches!(body, ReplyBody::Committed { .. } | ReplyBody::Failed { .. });
        let id = if event {
            0
        } else {
            id += 1;
            id
        };
        let frame = encode_reply(&Reply { id, body }, version).expect("encode reply");
        out.push((format!("reply.{name}"), frame));
    }
    out
}

fn render(frames: &[(String, Vec<u8>)]) -> String {
    frames
        .iter()
        .map(|(name, frame)| {
            let (header, body) = frame.split_at(FRAME_HEADER_BYTES);
            let hex: String = header.iter().map(|b| format!("{b:02x}")).collect();
            format!(
                "{name} {hex} {}\n",
                std::str::from_utf8(body).expect("JSON")
            )
        })
        .collect()
}

fn frame_of(body: Vec<u8>) -> Vec<u8> {
    let mut frame = u32::try_from(body.len())
        .expect("small")
        .to_le_bytes()
        .to_vec();
    frame.extend_from_slice(&body);
    frame
}

/// Parses a golden file into (name, frame bytes).
fn parse(text: &str) -> BTreeMap<String, Vec<u8>> {
    let mut frames = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut parts = line.splitn(3, ' ');
        let (Some(name), Some(hex), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            panic!("malformed golden line: {line}");
        };
        assert_eq!(hex.len(), 2 * FRAME_HEADER_BYTES, "{name}: header");
        let mut frame: Vec<u8> = (0..FRAME_HEADER_BYTES)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        frame.extend_from_slice(body.as_bytes());
        let header: [u8; FRAME_HEADER_BYTES] = frame[..FRAME_HEADER_BYTES].try_into().expect("4");
        assert_eq!(
            frame_len(header).expect("length"),
            body.len(),
            "{name}: the length prefix is the body's length"
        );
        assert!(
            frames.insert(name.to_owned(), frame).is_none(),
            "{name} twice"
        );
    }
    frames
}

#[test]
fn every_served_version_decodes_and_reencodes_byte_for_byte() {
    for version in PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION {
        let path = golden_path(version);
        let expected = expected(version);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(_)
                if version == PROTOCOL_VERSION
                    && std::env::var_os("GPUSNAP_BLESS_GOLDEN").is_some() =>
            {
                let header = format!(
                    "# Protocol version {version}: one frame per line, \"<name> <4-byte length prefix, hex> <body>\".\n# Written by GPUSNAP_BLESS_GOLDEN=1 when the version was made; never edited.\n"
                );
                let text = header + &render(&expected);
                std::fs::write(&path, &text).expect("write golden file");
                text
            }
            Err(e) => panic!(
                "{}: {e} (a served version needs its golden file)",
                path.display()
            ),
        };
        let golden = parse(&text);
        let names: Vec<&String> = expected.iter().map(|(n, _)| n).collect();
        let golden_names: Vec<&String> = golden.keys().collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(
            sorted, golden_names,
            "v{version}: the messages the file holds"
        );
        for (name, frame) in &expected {
            let want = &golden[name];
            assert!(
                frame == want,
                "v{version} {name}: this build writes\n{}\nthe golden file says\n{}",
                String::from_utf8_lossy(frame),
                String::from_utf8_lossy(want)
            );
            let body = &want[FRAME_HEADER_BYTES..];
            if name.starts_with("request.") {
                let request: Request = decode(body).expect("a served version's request decodes");
                assert_eq!(
                    &encode(&request).expect("encode"),
                    want,
                    "v{version} {name}"
                );
            } else if version == PROTOCOL_VERSION {
                let reply: Reply = decode(body).expect("reply decodes");
                assert_eq!(&encode(&reply).expect("encode"), want, "v{version} {name}");
            } else {
                let reencoded = reencode_as(version, body).unwrap_or_else(|e| {
                    panic!("v{version} {name}: a version-{version} client refuses it: {e}")
                });
                assert_eq!(
                    &frame_of(reencoded),
                    want,
                    "v{version} {name}: re-encoded by the version-{version} types"
                );
            }
        }
    }
}

/// `body` decoded with the frozen reply types of the older `version` and
/// encoded again: what a client of that version reads.
fn reencode_as(version: u32, body: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    match version {
        1 => serde_json::from_slice::<v1_types::Reply>(body)
            .map(|r| serde_json::to_vec(&r).expect("encode")),
        2 => serde_json::from_slice::<v2_types::Reply>(body)
            .map(|r| serde_json::to_vec(&r).expect("encode")),
        3 => serde_json::from_slice::<v3_types::Reply>(body)
            .map(|r| serde_json::to_vec(&r).expect("encode")),
        other => panic!("v{other}: a frozen copy of each older version's types"),
    }
}

/// The current version's samples (every new field set), said for each
/// older version, are read by that version's frozen types: nothing new
/// leaks to an old client.
#[test]
fn current_replies_said_for_an_older_version_are_read_by_its_types() {
    for version in PROTOCOL_VERSION_MIN..PROTOCOL_VERSION {
        for (name, body) in samples::replies(PROTOCOL_VERSION) {
            let frame = match encode_reply(&Reply { id: 1, body }, version) {
                Ok(frame) => frame,
                // A reply the old version has no word for (`attach_noted`).
                Err(FrameError::NotInVersion { .. }) => continue,
                Err(e) => panic!("v{version} {name}: {e}"),
            };
            let body = &frame[FRAME_HEADER_BYTES..];
            let reencoded = reencode_as(version, body).unwrap_or_else(|e| {
                panic!(
                    "v{version} {name}: a version-{version} client refuses {}: {e}",
                    String::from_utf8_lossy(body)
                )
            });
            assert_eq!(reencoded, body, "v{version} {name}");
        }
    }
}

/// Fails to compile when a message is added, until a sample (and so a
/// golden frame) exists for it.
#[test]
fn the_samples_cover_every_message() {
    let all_requests = |b: &RequestBody| match b {
        RequestBody::Hello { .. }
        | RequestBody::Register { .. }
        | RequestBody::Begin { .. }
        | RequestBody::ChunkFilled { .. }
        | RequestBody::Captured { .. }
        | RequestBody::Abort { .. }
        | RequestBody::Restore { .. }
        | RequestBody::Release { .. }
        | RequestBody::List { .. }
        | RequestBody::Status
        | RequestBody::Describe { .. }
        | RequestBody::Attached { .. } => (),
    };
    let all_replies = |b: &ReplyBody| match b {
        ReplyBody::Welcome { .. }
        | ReplyBody::Registered(_)
        | ReplyBody::Slot { .. }
        | ReplyBody::Stream { .. }
        | ReplyBody::Skipped { .. }
        | ReplyBody::ChunkFree { .. }
        | ReplyBody::Accepted { .. }
        | ReplyBody::Aborted { .. }
        | ReplyBody::Restored { .. }
        | ReplyBody::NoSnapshot
        | ReplyBody::Released
        | ReplyBody::Listing { .. }
        | ReplyBody::Status(_)
        | ReplyBody::Described { .. }
        | ReplyBody::Error { .. }
        | ReplyBody::Committed { .. }
        | ReplyBody::Failed { .. }
        | ReplyBody::AttachNoted => (),
    };
    let _ = (all_requests, all_replies);
    let names = |bodies: Vec<&'static str>| {
        let mut names = bodies;
        names.sort_unstable();
        names.dedup();
        names
    };
    let sampled_requests = names(
        samples::requests(PROTOCOL_VERSION)
            .iter()
            .map(|(_, b)| b.name())
            .collect(),
    );
    let sampled_replies = names(
        samples::replies(PROTOCOL_VERSION)
            .iter()
            .map(|(_, b)| b.name())
            .collect(),
    );
    assert_eq!(
        sampled_requests,
        names(RequestBody::NAMES.to_vec()),
        "a sample of every request, and NAMES lists exactly their names"
    );
    assert_eq!(
        sampled_replies,
        names(ReplyBody::NAMES.to_vec()),
        "a sample of every reply, and NAMES lists exactly their names"
    );
}

#[test]
fn version_1_registered_says_no_memory_and_unserved_versions_are_refused() {
    // Only a host memfd exists today; a v1 frame of it has no `memory`.
    let reply = samples::replies(1)
        .into_iter()
        .find(|(n, _)| *n == "registered")
        .expect("sample")
        .1;
    let frame = encode_reply(&Reply { id: 1, body: reply }, 1).expect("encode");
    let text = std::str::from_utf8(&frame[FRAME_HEADER_BYTES..]).expect("JSON");
    assert!(!text.contains("memory"), "{text}");
    assert!(
        encode_reply(
            &Reply {
                id: 1,
                body: ReplyBody::Released
            },
            9
        )
        .is_err()
    );
}
