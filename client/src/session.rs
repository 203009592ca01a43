//! One live conversation with `gpusnapd`: request ids, replies matched to
//! them in order, events recorded whenever they arrive, the handshake and
//! the registration's staging.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::conn::{Conn, Deadline};
use crate::error::{Error, Result};
use crate::proto::{
    AttachReport, ErrorKind, OsError, PROTOCOL_VERSION, Reply, ReplyBody, Request, RequestBody,
};
use crate::staging::Staging;
use crate::window::Window;

/// Commit and failure outcomes kept for steps nobody collected yet; past
/// this, the lowest step's goes.
pub(crate) const SETTLED_MAX: usize = 1024;
/// Skips kept for steps nobody collected yet, in a window of their own (a
/// trainer under policy `skip` may be refused every step and seldom ask).
pub(crate) const SKIPPED_MAX: usize = 1024;
/// Pauses between handshakes that the daemon reset.
const HELLO_PAUSE_FIRST: Duration = Duration::from_millis(50);
const HELLO_PAUSE_MAX: Duration = Duration::from_secs(1);
/// The first protocol version with `Attached`.
const ATTACHED_SINCE: u32 = 3;

/// What became of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Committed {
        bytes: u64,
        persist: Duration,
    },
    Failed {
        kind: ErrorKind,
        message: String,
        os_error: Option<OsError>,
    },
    Skipped {
        reason: String,
    },
}

/// Outcomes recorded per step, across connections, until collected
/// ([`Events::take`]). Commits and failures are kept in one bounded window
/// ([`SETTLED_MAX`]), skips in another ([`SKIPPED_MAX`]), so no number of
/// skips pushes out a commit or failure nobody has collected yet; each
/// window drops its lowest step when full, and remembers the highest it
/// dropped ([`Events::dropped_through`]).
#[derive(Debug)]
pub(crate) struct Events {
    /// `Committed` and `Failed` outcomes.
    settled: Window<Outcome>,
    /// The reasons of skipped steps.
    skipped: Window<String>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            settled: Window::new(SETTLED_MAX),
            skipped: Window::new(SKIPPED_MAX),
        }
    }
}

impl Events {
    /// Records what became of `step`, replacing what was kept for it.
    pub(crate) fn record(&mut self, step: u64, outcome: Outcome) {
        match outcome {
            Outcome::Skipped { reason } => {
                self.settled.remove(step);
                self.skipped.insert(step, reason);
            }
            settled => {
                self.skipped.remove(step);
                self.settled.insert(step, settled);
            }
        }
    }

    /// Records every outcome of `other` (events read by another thread on
    /// this client's connection), and what it dropped.
    pub(crate) fn absorb(&mut self, mut other: Events) {
        self.settled.note_dropped(other.settled.dropped_through());
        self.skipped.note_dropped(other.skipped.dropped_through());
        for (step, outcome) in other.settled.drain() {
            self.record(step, outcome);
        }
        for (step, reason) in other.skipped.drain() {
            self.record(step, Outcome::Skipped { reason });
        }
    }

    /// Takes what became of `step`.
    pub(crate) fn take(&mut self, step: u64) -> Option<Outcome> {
        self.settled.remove(step).or_else(|| {
            self.skipped
                .remove(step)
                .map(|reason| Outcome::Skipped { reason })
        })
    }

    /// Whether an outcome is kept for `step`.
    pub(crate) fn contains(&self, step: u64) -> bool {
        self.settled.contains(step) || self.skipped.contains(step)
    }

    /// The highest step whose commit or failure was dropped to keep the
    /// bound, when `step` is at or below it (its outcome may be one of
    /// those dropped); `None` otherwise.
    pub(crate) fn dropped_through(&self, step: u64) -> Option<u64> {
        self.settled
            .dropped_through()
            .filter(|&through| step <= through)
    }
}

/// A connection after a successful handshake.
#[derive(Debug)]
pub(crate) struct Session {
    conn: Conn,
    next_id: u64,
    pub uid: u32,
    /// The protocol version the daemon speaks on this connection.
    pub version: u32,
    /// The registration made on this connection.
    pub staging: Option<Arc<Staging>>,
    /// Tensors in that registration.
    pub registered: usize,
    /// Steps accepted on this connection whose event has not come yet.
    pub in_flight: BTreeSet<u64>,
    broken: bool,
}

impl Session {
    /// Connects and says Hello, retrying until `deadline`: a missing or
    /// refusing socket, and a connection reset before the Welcome (a daemon
    /// that is stopping or restarting still had it in its backlog). The
    /// connect retries inside share the same deadline.
    pub(crate) fn open(
        socket: &Path,
        deadline: Instant,
        call_timeout: Duration,
    ) -> Result<Session> {
        let mut backoff = Backoff::new(HELLO_PAUSE_FIRST, HELLO_PAUSE_MAX, deadline);
        loop {
            match Session::open_once(socket, deadline, call_timeout) {
                Err(Error::Disconnected(why)) => {
                    tracing::debug!(%why, "gpusnapd closed the connection before its welcome");
                    if !backoff.pause() {
                        return Err(Error::Disconnected(why));
                    }
                }
                r => return r,
            }
        }
    }

    fn open_once(socket: &Path, deadline: Instant, call_timeout: Duration) -> Result<Session> {
        let conn = Conn::connect(socket, deadline)?;
        let mut session = Session {
            conn,
            next_id: 1,
            uid: 0,
            version: 0,
            staging: None,
            registered: 0,
            in_flight: BTreeSet::new(),
            broken: false,
        };
        let hello = RequestBody::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: format!("gpusnap-rs {}", env!("CARGO_PKG_VERSION")),
        };
        let mut events = Events::default();
        match session.call(hello, Deadline::after(call_timeout), &mut events)? {
            ReplyBody::Welcome {
                protocol_version,
                daemon_version,
                uid,
            } => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(Error::VersionMismatch {
                        client: PROTOCOL_VERSION,
                        message: format!("gpusnapd {daemon_version} speaks {protocol_version}"),
                    });
                }
                tracing::debug!(%daemon_version, uid, "connected to gpusnapd");
                session.uid = uid;
                session.version = protocol_version;
                Ok(session)
            }
            other => Err(session.unexpected("hello", &other)),
        }
    }

    /// Whether the connection is unusable (a local error, a timeout, a
    /// closing daemon error).
    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Marks the connection unusable.
    pub(crate) fn unexpected_broken(&mut self) {
        self.broken = true;
    }

    fn mark<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Sends a request; returns its id.
    pub(crate) fn send(&mut self, body: RequestBody, deadline: Deadline) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let r = self.conn.send(&Request { id, body }, deadline);
        self.mark(r).map(|()| id)
    }

    /// The reply to request `id` (the next reply that is not an event);
    /// daemon errors come back as `Err`. Descriptors are refused unless
    /// `fds_allowed`.
    pub(crate) fn recv(
        &mut self,
        id: u64,
        what: &str,
        deadline: Deadline,
        events: &mut Events,
        fds_allowed: bool,
    ) -> Result<(ReplyBody, Vec<OwnedFd>)> {
        loop {
            let frame = self.conn.recv(deadline, what);
            let frame = self.mark(frame)?;
            let Reply { id: got, body } = frame.reply;
            if got == 0 {
                if !frame.fds.is_empty() {
                    return self.mark(Err(Error::Protocol(
                        "an event carried file descriptors".into(),
                    )));
                }
                self.record_event(body, events)?;
                continue;
            }
            if got != id {
                return self.mark(Err(Error::Protocol(format!(
                    "reply id {got} while awaiting {what} (id {id})"
                ))));
            }
            if !fds_allowed && !frame.fds.is_empty() {
                return self.mark(Err(Error::Protocol(format!(
                    "{} file descriptors on a reply to {what}",
                    frame.fds.len()
                ))));
            }
            if let ReplyBody::Error {
                kind,
                message,
                os_error,
            } = body
            {
                if kind.closes_connection() {
                    self.broken = true;
                }
                return Err(Error::from_daemon(kind, message, os_error));
            }
            return Ok((body, frame.fds));
        }
    }

    /// Sends `body` and returns its reply (no descriptors allowed).
    pub(crate) fn call(
        &mut self,
        body: RequestBody,
        deadline: Deadline,
        events: &mut Events,
    ) -> Result<ReplyBody> {
        let what = body.name();
        let id = self.send(body, deadline)?;
        self.recv(id, what, deadline, events, false).map(|(b, _)| b)
    }

    /// Tells the daemon what attaching the devices did to this
    /// connection's staging (`Attached`, answered `AttachNoted`), where it
    /// speaks a version that has the request; a daemon of an older version
    /// is told nothing. A failure is that of any request: a broken
    /// connection, or a refusal (a protocol error closes it).
    pub(crate) fn report_attached(
        &mut self,
        devices: Vec<AttachReport>,
        deadline: Deadline,
        events: &mut Events,
    ) -> Result<()> {
        if self.version < ATTACHED_SINCE {
            return Ok(());
        }
        match self.call(RequestBody::Attached { devices }, deadline, events)? {
            ReplyBody::AttachNoted => Ok(()),
            other => Err(self.unexpected("attached", &other)),
        }
    }

    /// Reads events until one for `step` is recorded.
    pub(crate) fn await_event(
        &mut self,
        step: u64,
        deadline: Deadline,
        events: &mut Events,
    ) -> Result<()> {
        let what = format!("the commit of step {step}");
        while !events.contains(step) {
            let frame = self.conn.recv(deadline, &what);
            let frame = self.mark(frame)?;
            if frame.reply.id != 0 || !frame.fds.is_empty() {
                return self.mark(Err(Error::Protocol(format!(
                    "unsolicited reply id {} while awaiting {what}",
                    frame.reply.id
                ))));
            }
            self.record_event(frame.reply.body, events)?;
        }
        Ok(())
    }

    fn record_event(&mut self, body: ReplyBody, events: &mut Events) -> Result<()> {
        let (step, outcome) = match body {
            ReplyBody::Committed {
                step,
                bytes,
                persist_ns,
            } => (
                step,
                Outcome::Committed {
                    bytes,
                    persist: Duration::from_nanos(persist_ns),
                },
            ),
            ReplyBody::Failed {
                step,
                kind,
                message,
                os_error,
            } => (
                step,
                Outcome::Failed {
                    kind,
                    message,
                    os_error,
                },
            ),
            // The daemon closes with an id-0 error (it is stopping, has too
            // many connections, or could not read a request's id).
            ReplyBody::Error {
                kind,
                message,
                os_error,
            } => {
                self.broken = true;
                return Err(Error::from_daemon(kind, message, os_error));
            }
            other => return Err(self.unexpected("an event", &other)),
        };
        tracing::debug!(step, ?outcome, "snapshot event");
        self.in_flight.remove(&step);
        events.record(step, outcome);
        Ok(())
    }

    /// A reply of the wrong type: a protocol error; the connection is done.
    pub(crate) fn unexpected(&mut self, what: &str, body: &ReplyBody) -> Error {
        self.broken = true;
        Error::Protocol(format!("unexpected reply {:?} to {what}", body.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip() -> Outcome {
        Outcome::Skipped {
            reason: "busy".into(),
        }
    }

    fn committed(bytes: u64) -> Outcome {
        Outcome::Committed {
            bytes,
            persist: Duration::from_millis(3),
        }
    }

    #[test]
    fn skips_are_bounded_and_taken_once() {
        let mut events = Events::default();
        for step in 0..(SKIPPED_MAX as u64 + 10) {
            events.record(step, skip());
        }
        assert!(!events.contains(9), "oldest dropped");
        assert!(events.contains(10));
        assert_eq!(events.take(10), Some(skip()));
        assert_eq!(events.take(10), None);
        assert_eq!(
            events.dropped_through(9),
            None,
            "dropped skips are not dropped commits"
        );
    }

    /// The regression: skips shared the commits' window, so a trainer
    /// under policy `skip` that was refused 1,024 times lost the commit
    /// (or failure) of an earlier step it had not collected yet.
    #[test]
    fn no_number_of_skips_pushes_out_an_uncollected_commit_or_failure() {
        let mut events = Events::default();
        events.record(1, committed(10));
        let failed = Outcome::Failed {
            kind: ErrorKind::Storage,
            message: "disk full".into(),
            os_error: Some(OsError::ENOSPC),
        };
        events.record(2, failed.clone());
        for step in 3..(3 + 4 * SKIPPED_MAX as u64) {
            events.record(step, skip());
        }
        assert_eq!(events.take(1), Some(committed(10)));
        assert_eq!(events.take(2), Some(failed));
        assert_eq!(events.dropped_through(1), None, "no commit was dropped");
    }

    #[test]
    fn commits_are_bounded_and_say_which_were_dropped() {
        let mut events = Events::default();
        for step in 1..=(SETTLED_MAX as u64 + 5) {
            events.record(step, committed(step));
        }
        assert!(!events.contains(5) && events.contains(6));
        assert_eq!(events.dropped_through(5), Some(5));
        assert_eq!(events.dropped_through(1), Some(5));
        assert_eq!(events.dropped_through(6), None);
        assert_eq!(events.take(6), Some(committed(6)));
    }

    #[test]
    fn a_step_keeps_only_its_latest_outcome_across_windows() {
        let mut events = Events::default();
        events.record(7, skip());
        events.record(7, committed(1));
        assert_eq!(events.take(7), Some(committed(1)));
        assert!(!events.contains(7), "the skip went with the commit");
        events.record(8, committed(2));
        events.record(8, skip());
        assert_eq!(events.take(8), Some(skip()));
        assert!(!events.contains(8));
    }

    #[test]
    fn absorbing_keeps_each_kind_in_its_window_and_what_was_dropped() {
        let mut other = Events::default();
        for step in 1..=(SETTLED_MAX as u64 + 1) {
            other.record(step, committed(step));
        }
        other.record(5000, skip());
        let mut events = Events::default();
        events.record(6000, skip());
        events.absorb(other);
        assert_eq!(events.dropped_through(1), Some(1));
        assert!(events.contains(2) && events.contains(5000) && events.contains(6000));
        assert_eq!(events.take(5000), Some(skip()));
    }
}
