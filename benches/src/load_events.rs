//! What a `load` trainer process tells the harness: one JSON object per
//! line on its stdout. A `request` line goes out before every call that
//! waits on the daemon, and the next line of any other kind answers it, so
//! the harness's watchdog knows, for every trainer, since when a request
//! has gone unanswered.

use std::io::Write as _;

use serde::{Deserialize, Serialize};

/// One line of a trainer's stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// About to call the daemon: `what` (`register`, `snapshot`, `commit`,
    /// `restore`) for `step` (0 where no step applies).
    Request { what: String, step: u64 },
    /// Registered: the staging slots the daemon gave, the policy it named,
    /// whether the CUDA device page-locked the mapping.
    Registered {
        slots: u32,
        policy: String,
        pinned: bool,
    },
    /// One snapshot call returned: captured (into a slot or streamed) or
    /// skipped, and the wall time it blocked.
    Snapshot {
        step: u64,
        captured: bool,
        stall_s: f64,
    },
    /// One `wait_committed` returned; `error` when the commit failed.
    Committed { step: u64, error: Option<String> },
    /// The trainer's end: its counts and the restore of its newest commit.
    Done(Box<TrainerSummary>),
    /// The trainer failed; it exits non-zero after this line.
    Failed { error: String },
}

/// What a trainer reports when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerSummary {
    /// Seconds from the start signal to the end of its snapshot loop.
    pub loop_s: f64,
    pub captured: u64,
    pub skipped: u64,
    /// Captured steps the daemon reported committed.
    pub committed: u64,
    /// Seconds spent waiting for commit outcomes (collected after each
    /// capture, for the steps before it).
    pub commit_wait_s: f64,
    /// The failed commits' errors (every one fails the run).
    pub commit_errors: Vec<String>,
    /// The highest committed step.
    pub newest_committed: Option<u64>,
    /// The step `restore(Latest)` gave back, and from where.
    pub restored_step: Option<u64>,
    pub restore_source: Option<String>,
    /// Every restored byte matched the state of `newest_committed`.
    pub restore_verified: bool,
}

impl Event {
    /// The event as one line of JSON on stdout, flushed (the harness reads
    /// it while the trainer waits on its next call).
    pub fn emit(&self) -> std::io::Result<()> {
        let line = serde_json::to_string(self).map_err(std::io::Error::other)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()
    }

    /// One line back into an event.
    pub fn parse(line: &str) -> Result<Event, String> {
        serde_json::from_str(line).map_err(|e| format!("{e} in {line:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_one_line_each() {
        let events = [
            Event::Request {
                what: "snapshot".into(),
                step: 4,
            },
            Event::Registered {
                slots: 1,
                policy: "stream".into(),
                pinned: true,
            },
            Event::Snapshot {
                step: 4,
                captured: false,
                stall_s: 0.25,
            },
            Event::Committed {
                step: 4,
                error: Some("ENOSPC".into()),
            },
            Event::Done(Box::new(TrainerSummary {
                loop_s: 3.0,
                captured: 2,
                skipped: 1,
                committed: 2,
                commit_wait_s: 0.5,
                commit_errors: Vec::new(),
                newest_committed: Some(3),
                restored_step: Some(3),
                restore_source: Some("memory".into()),
                restore_verified: true,
            })),
            Event::Failed {
                error: "boom".into(),
            },
        ];
        for e in events {
            let line = serde_json::to_string(&e).expect("serializes");
            assert!(!line.contains('\n'));
            assert_eq!(Event::parse(&line), Ok(e));
        }
        assert!(Event::parse("{\"event\":\"nope\"}").is_err());
        assert!(Event::parse("not json").is_err());
    }
}
