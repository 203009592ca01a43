//! A client speaking the protocol as raw JSON frames, for tests that must
//! see each reply and event exactly as the daemon sends it: fields the Rust
//! client does not expose (`os_error`), or a `Busy` it would retry.
#![allow(dead_code, reason = "each test file uses a different part")]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use gpusnap::proto::{self, PROTOCOL_VERSION};
use serde_json::{Value, json};

/// One connection, after the handshake at the current version.
pub struct Raw {
    s: UnixStream,
    id: u64,
    /// Events (id 0) read while waiting for replies, oldest first.
    pub events: Vec<Value>,
}

impl Raw {
    pub fn connect(socket: &Path) -> Raw {
        let s = UnixStream::connect(socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut raw = Raw {
            s,
            id: 0,
            events: Vec::new(),
        };
        let welcome = raw.call(
            json!({ "type": "hello", "protocol_version": PROTOCOL_VERSION, "client": "e2e-raw" }),
        );
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        raw
    }

    pub fn send(&mut self, body: Value) {
        self.id += 1;
        let frame = proto::encode(&json!({ "id": self.id, "body": body })).expect("encode");
        self.s.write_all(&frame).expect("send");
    }

    /// The next frame (`None` once the daemon closed the connection). A
    /// frame carrying the staging memfd is read as bytes: the descriptor is
    /// dropped by the kernel.
    pub fn next(&mut self) -> Option<(u64, Value)> {
        let mut header = [0u8; 4];
        self.s.read_exact(&mut header).ok()?;
        let mut body = vec![0u8; proto::frame_len(header).expect("frame")];
        self.s.read_exact(&mut body).ok()?;
        let v: Value = serde_json::from_slice(&body).expect("JSON");
        Some((v["id"].as_u64().expect("id"), v["body"].clone()))
    }

    /// Sends `body` and returns its reply, keeping the events on the way.
    pub fn call(&mut self, body: Value) -> Value {
        self.send(body);
        loop {
            let (id, body) = self.next().expect("a reply");
            if id == self.id {
                return body;
            }
            assert_eq!(id, 0, "a reply to another request");
            self.events.push(body);
        }
    }

    /// The next event, from those kept or from the socket.
    pub fn event(&mut self) -> Value {
        if !self.events.is_empty() {
            return self.events.remove(0);
        }
        let (id, body) = self.next().expect("an event");
        assert_eq!(id, 0, "an event, not a reply");
        body
    }

    /// Registers `job` rank 0 of 1 with one F32 tensor `w` of `elements`.
    pub fn register(&mut self, job: &str, elements: u64) -> Value {
        self.call(
            json!({ "type": "register", "job": job, "rank": 0, "world_size": 1,
                          "tensors": [{ "name": "w", "dtype": "F32", "shape": [elements] }] }),
        )
    }

    /// `begin` and `captured` of `step` (the slot's bytes are whatever the
    /// staging holds): the reply to `captured`.
    pub fn capture(&mut self, step: u64) -> Value {
        let slot = self.call(json!({ "type": "begin", "step": step }));
        assert_eq!(slot["type"], "slot", "{slot}");
        self.call(json!({ "type": "captured", "step": step, "capture_ns": 1, "stall_ns": 1 }))
    }
}
