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

/// The registration of one small tensor for `job` on `raw`.
fn register(raw: &mut RawJson, job: &str, events: &mut Vec<Value>) -> Value {
    let registered = raw.call(
        json!({ "type": "register", "job": job, "rank": 0, "world_size": 1,
                "tensors": [{ "name": "w", "dtype": "F32", "shape": [1024] }] }),
        events,
    );
    assert_eq!(registered["type"], "registered", "{registered}");
    registered
}

fn staging_clients(daemon: &Daemon, pinning: &str) -> f64 {
    daemon.metric(&format!("gpusnap_staging_clients{{pinning=\"{pinning}\"}}"))
}

#[test]
fn a_version_2_client_that_never_reports_pinning_is_served_as_before() {
    let daemon = Daemon::start(&[]);
    let mut raw = RawJson::connect(&daemon);
    let mut events = Vec::new();
    let welcome = raw.call(hello(2), &mut events);
    assert_eq!(welcome["protocol_version"], 2, "{welcome}");
    register(&mut raw, "v2", &mut events);
    assert_eq!(staging_clients(&daemon, "unreported"), 1.0);
    // Its status says sessions as version 2 did: no staging_pinning.
    let status = raw.call(json!({ "type": "status" }), &mut events);
    assert_eq!(status["type"], "status", "{status}");
    let session = &status["sessions"][0];
    assert_eq!(session["job"], "v2", "{status}");
    assert!(session.get("staging_pinning").is_none(), "{status}");
    assert_eq!(session.as_object().expect("object").len(), 8, "{session}");
    // Snapshots work without the report.
    let slot = raw.call(json!({ "type": "begin", "step": 1 }), &mut events);
    assert_eq!(slot["type"], "slot", "{slot}");
    let accepted = raw.call(
        json!({ "type": "captured", "step": 1, "capture_ns": 1, "stall_ns": 1 }),
        &mut events,
    );
    assert_eq!(accepted["type"], "accepted", "{accepted}");
    while events.is_empty() {
        let (id, body) = raw.next().expect("the commit event");
        assert_eq!(id, 0);
        events.push(body);
    }
    assert_eq!(events[0]["type"], "committed", "{}", events[0]);
    // A report is a version-3 request: refused, and the connection closed.
    let refused = raw.call(
        json!({ "type": "attached", "devices": [{ "device": "host", "pin": { "state": "not_needed" } }] }),
        &mut events,
    );
    assert_eq!(refused["kind"], "protocol", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .expect("message")
            .contains("version 3"),
        "{refused}"
    );
    assert!(raw.next().is_none(), "the connection is closed");
    wait_for("the session gone", Duration::from_secs(30), || {
        staging_clients(&daemon, "unreported") == 0.0
    });
}

#[test]
fn attach_reports_are_checked_and_taken_once_per_registration() {
    let daemon = Daemon::start(&[]);
    let mut events = Vec::new();
    let pinned = |bytes: u64| {
        json!({ "type": "attached", "devices": [
            { "device": "cuda:0", "pin": { "state": "pinned", "bytes": bytes, "pin_ns": 2_000_000 } }
        ] })
    };

    // Before a registration: NotRegistered, and the connection stays.
    let mut raw = RawJson::connect(&daemon);
    raw.call(hello(PROTOCOL_VERSION), &mut events);
    let early = raw.call(pinned(4096), &mut events);
    assert_eq!(early["kind"], "not_registered", "{early}");
    let registered = register(&mut raw, "att", &mut events);
    let memfd = registered["memfd_bytes"].as_u64().expect("memfd_bytes");
    assert_eq!(staging_clients(&daemon, "unreported"), 1.0);

    // Accepted once: the gauges move, status shows it.
    let noted = raw.call(pinned(memfd), &mut events);
    assert_eq!(noted["type"], "attach_noted", "{noted}");
    assert_eq!(staging_clients(&daemon, "unreported"), 0.0);
    assert_eq!(staging_clients(&daemon, "pinned"), 1.0);
    assert_eq!(daemon.metric("gpusnap_staging_pinned_bytes"), memfd as f64);
    assert_eq!(
        daemon.metric("gpusnap_staging_pin_seconds_count{job=\"att\"}"),
        1.0
    );
    let status = raw.call(json!({ "type": "status" }), &mut events);
    assert_eq!(
        status["sessions"][0]["staging_pinning"],
        json!([{ "device": "cuda:0", "pin": { "state": "pinned", "bytes": memfd, "pin_ns": 2_000_000 } }]),
        "{status}"
    );
    assert!(daemon.log().contains("staging page-locked by the client"));
    // A second report: a protocol error, closed; the share goes with it.
    let twice = raw.call(pinned(memfd), &mut events);
    assert_eq!(twice["kind"], "protocol", "{twice}");
    assert!(raw.next().is_none(), "closed");
    wait_for(
        "the pinned share given back",
        Duration::from_secs(30),
        || {
            staging_clients(&daemon, "pinned") == 0.0
                && daemon.metric("gpusnap_staging_pinned_bytes") == 0.0
        },
    );

    // Reports that break a bound: each a protocol error naming it, closed,
    // and the gauges untouched.
    let long_reason = "x".repeat(gpusnap::proto::PIN_REASON_BYTES_MAX + 1);
    let many: Vec<Value> = (0..=gpusnap::proto::ATTACH_DEVICES_MAX)
        .map(|i| json!({ "device": format!("cuda:{i}"), "pin": { "state": "not_needed" } }))
        .collect();
    for (bad, says) in [
        (pinned(u64::MAX), "more than the"),
        (
            json!({ "type": "attached", "devices": [{ "device": "cuda:0", "pin": { "state": "unpinned", "reason": long_reason } }] }),
            "unpinned reason of",
        ),
        (
            json!({ "type": "attached", "devices": [{ "device": "cuda 0", "pin": { "state": "not_needed" } }] }),
            "printable ASCII",
        ),
        (json!({ "type": "attached", "devices": many }), "at most"),
        (
            json!({ "type": "attached", "devices": [] }),
            "names no device",
        ),
        (
            json!({ "type": "attached", "devices": [{ "device": "cuda:0", "pin": { "state": "melted" } }] }),
            "",
        ),
    ] {
        let mut raw = RawJson::connect(&daemon);
        raw.call(hello(PROTOCOL_VERSION), &mut events);
        register(&mut raw, "att", &mut events);
        // A report that does not decode is refused as a bad frame (id 0).
        raw.send(bad);
        let (id, refused) = raw.next().expect("the refusal");
        assert!(id == raw.id || id == 0, "{id}: {refused}");
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["kind"], "protocol", "{refused}");
        let message = refused["message"].as_str().expect("message");
        assert!(message.contains(says), "{says:?} in {message}");
        assert!(raw.next().is_none(), "closed");
        wait_rank_free(&daemon, "att", 0);
    }
    assert_eq!(staging_clients(&daemon, "pinned"), 0.0);
    assert_eq!(staging_clients(&daemon, "unreported"), 0.0);

    // An unpinned staging is counted and warned about with its reason.
    let mut raw = RawJson::connect(&daemon);
    raw.call(hello(PROTOCOL_VERSION), &mut events);
    register(&mut raw, "att", &mut events);
    let noted = raw.call(
        json!({ "type": "attached", "devices": [
            { "device": "host", "pin": { "state": "not_needed" } },
            { "device": "cuda:1", "pin": { "state": "unpinned", "reason": "CUDA_ERROR_OUT_OF_MEMORY at offset 0" } }
        ] }),
        &mut events,
    );
    assert_eq!(noted["type"], "attach_noted", "{noted}");
    assert_eq!(staging_clients(&daemon, "unpinned"), 1.0);
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("staging is not page-locked by the client")
            && l.contains("CUDA_ERROR_OUT_OF_MEMORY at offset 0")),
        "{log}"
    );
    drop(raw);
    wait_for(
        "the unpinned share given back",
        Duration::from_secs(30),
        || staging_clients(&daemon, "unpinned") == 0.0,
    );
}
