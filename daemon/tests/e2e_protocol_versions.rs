//! The handshake rule against the real daemon: a client of an older
//! version it still serves is answered in that version's words for the
//! whole connection; a client newer than the daemon, or older than its
//! minimum, is refused with `VersionMismatch` naming both, and closed.

mod daemon;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use daemon::*;
use gpusnap::proto::{self, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};
use serde_json::{Value, json};

/// A client speaking raw JSON, so it can speak any version.
struct RawJson {
    s: UnixStream,
    id: u64,
    /// The text of the last frame read, as the daemon wrote it.
    last_text: String,
}

impl RawJson {
    fn connect(daemon: &Daemon) -> RawJson {
        let s = UnixStream::connect(&daemon.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        RawJson {
            s,
            id: 0,
            last_text: String::new(),
        }
    }

    fn send(&mut self, body: Value) {
        self.id += 1;
        let frame = proto::encode(&json!({ "id": self.id, "body": body })).expect("encode");
        self.s.write_all(&frame).expect("send");
    }

    /// The next frame's body (`None` once the daemon closed).
    fn next(&mut self) -> Option<(u64, Value)> {
        let mut header = [0u8; 4];
        self.s.read_exact(&mut header).ok()?;
        let mut body = vec![0u8; proto::frame_len(header).expect("frame")];
        self.s.read_exact(&mut body).expect("body");
        let v: Value = serde_json::from_slice(&body).expect("JSON");
        self.last_text = String::from_utf8(body).expect("UTF-8");
        Some((v["id"].as_u64().expect("id"), v["body"].clone()))
    }

    /// Sends `body` and returns its reply, collecting events on the way.
    fn call(&mut self, body: Value, events: &mut Vec<Value>) -> Value {
        self.send(body);
        loop {
            let (id, body) = self.next().expect("a reply");
            if id == 0 {
                events.push(body);
                continue;
            }
            assert_eq!(id, self.id);
            return body;
        }
    }
}

fn hello(version: u32) -> Value {
    json!({ "type": "hello", "protocol_version": version, "client": "e2e-versions" })
}

#[test]
fn a_version_1_client_is_served_in_version_1_words_end_to_end() {
    assert_eq!(PROTOCOL_VERSION_MIN, 1, "this test speaks version 1");
    let daemon = Daemon::start(&[]);
    let mut raw = RawJson::connect(&daemon);
    let mut events = Vec::new();
    let welcome = raw.call(hello(1), &mut events);
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["protocol_version"], 1);
    let registered = raw.call(
        json!({ "type": "register", "job": "v1", "rank": 0, "world_size": 1,
                "tensors": [{ "name": "w", "dtype": "F32", "shape": [1024] }] }),
        &mut events,
    );
    assert_eq!(registered["type"], "registered", "{registered}");
    assert!(
        registered.get("memory").is_none(),
        "version 1 knows no staging kinds: {registered}"
    );
    // The fields in the order the daemon wrote them: version 1's order.
    let text = raw.last_text.clone();
    let keys = [
        "type",
        "memfd_bytes",
        "slots",
        "slot_bytes",
        "data_bytes",
        "offsets",
        "ring_offset",
        "ring_chunks",
        "chunk_bytes",
        "policy",
    ];
    let positions: Vec<usize> = keys
        .iter()
        .map(|k| {
            text.find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("no {k} in {text}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "version-1 fields in version-1 order: {text}"
    );
    assert_eq!(
        registered.as_object().expect("object").len(),
        keys.len(),
        "exactly the version-1 fields: {registered}"
    );
    let slot = raw.call(json!({ "type": "begin", "step": 1 }), &mut events);
    assert_eq!(slot["type"], "slot", "{slot}");
    let accepted = raw.call(
        json!({ "type": "captured", "step": 1, "capture_ns": 1, "stall_ns": 1 }),
        &mut events,
    );
    assert_eq!(accepted["type"], "accepted", "{accepted}");
    // The commit event comes on the same connection, in version-1 words.
    while events.is_empty() {
        let (id, body) = raw.next().expect("the commit event");
        assert_eq!(id, 0);
        events.push(body);
    }
    assert_eq!(events[0]["type"], "committed", "{}", events[0]);
    // An error reply has no `os_error` in version 1.
    let refused = raw.call(json!({ "type": "release", "slot": 0 }), &mut events);
    assert_eq!(refused["type"], "error");
    assert!(refused.get("os_error").is_none(), "{refused}");
}

#[test]
fn the_current_version_says_what_staging_is() {
    let daemon = Daemon::start(&[]);
    let mut raw = RawJson::connect(&daemon);
    let mut events = Vec::new();
    let welcome = raw.call(hello(PROTOCOL_VERSION), &mut events);
    assert_eq!(welcome["protocol_version"], PROTOCOL_VERSION);
    let registered = raw.call(
        json!({ "type": "register", "job": "v2", "rank": 0, "world_size": 1,
                "tensors": [{ "name": "w", "dtype": "F32", "shape": [16] }] }),
        &mut events,
    );
    assert_eq!(registered["memory"], json!({ "kind": "host_memfd" }));
}

#[test]
fn newer_and_too_old_clients_are_refused_naming_both_versions_and_closed() {
    let daemon = Daemon::start(&[]);
    for (version, advice) in [
        (PROTOCOL_VERSION + 1, "upgrade the daemon"),
        (PROTOCOL_VERSION_MIN - 1, "upgrade the client"),
    ] {
        let mut raw = RawJson::connect(&daemon);
        let mut events = Vec::new();
        let refused = raw.call(hello(version), &mut events);
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["kind"], "version_mismatch", "{refused}");
        let message = refused["message"].as_str().expect("message");
        assert!(
            message.contains(&format!("version {version}"))
                && message.contains(&format!("{PROTOCOL_VERSION_MIN} to {PROTOCOL_VERSION}"))
                && message.contains(advice),
            "{message}"
        );
        assert!(raw.next().is_none(), "the connection is closed");
    }
}
