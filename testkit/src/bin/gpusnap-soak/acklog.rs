//! A trainer's log: one line per event, appended with one `write` and made
//! durable with `fdatasync` before the trainer counts it, so what the
//! checker reads survives the trainer's SIGKILL.
//!
//! ```text
//! ack 17          step 17's commit was acknowledged to the client
//! restore 12      a restore of Latest returned step 12 with exactly its bytes
//! restore none    a restore of Latest found no snapshot
//! error Lost: ... a client call failed in a way a kill explains
//! unexpected ...  a client call failed in a way no kill explains
//! violation ...   what the trainer saw broke a rule (the checker fails)
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Why the log cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AckLogError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One line of the log, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Ack(u64),
    Restore(Option<u64>),
    Error(String),
    Unexpected(String),
    Violation(String),
}

/// The log open for appending.
#[derive(Debug)]
pub struct AckLog {
    file: File,
    path: PathBuf,
}

impl AckLog {
    /// Opens (creating) the log at `path` for appending.
    pub fn open(path: &Path) -> Result<AckLog, AckLogError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| AckLogError::Io {
                what: "opening",
                path: path.to_path_buf(),
                source,
            })?;
        Ok(AckLog {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends `entry` as one line and syncs it.
    pub fn append(&mut self, entry: &Entry) -> Result<(), AckLogError> {
        let one_line = |s: &str| s.replace('\n', " ");
        let line = match entry {
            Entry::Ack(step) => format!("ack {step}\n"),
            Entry::Restore(Some(step)) => format!("restore {step}\n"),
            Entry::Restore(None) => "restore none\n".to_owned(),
            Entry::Error(what) => format!("error {}\n", one_line(what)),
            Entry::Unexpected(what) => format!("unexpected {}\n", one_line(what)),
            Entry::Violation(what) => format!("violation {}\n", one_line(what)),
        };
        let io = |what| {
            let path = self.path.clone();
            move |source| AckLogError::Io { what, path, source }
        };
        self.file
            .write_all(line.as_bytes())
            .map_err(io("writing"))?;
        self.file.sync_data().map_err(io("fdatasync of"))
    }
}

/// Every whole line of the log at `path` (none when it does not exist yet);
/// a torn last line (a trainer killed inside its `write`) is left out, and
/// so is a line this build does not know.
pub fn read(path: &Path) -> Result<Vec<Entry>, AckLogError> {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AckLogError::Io {
                what: "reading",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let whole = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    Ok(whole.lines().filter_map(parse_line).collect())
}

fn parse_line(line: &str) -> Option<Entry> {
    let (word, rest) = line.split_once(' ')?;
    match word {
        "ack" => rest.parse().ok().map(Entry::Ack),
        "restore" if rest == "none" => Some(Entry::Restore(None)),
        "restore" => rest.parse().ok().map(|s| Entry::Restore(Some(s))),
        "error" => Some(Entry::Error(rest.to_owned())),
        "unexpected" => Some(Entry::Unexpected(rest.to_owned())),
        "violation" => Some(Entry::Violation(rest.to_owned())),
        _ => None,
    }
}

/// The highest acknowledged step among `entries`.
pub fn last_ack(entries: &[Entry]) -> Option<u64> {
    entries
        .iter()
        .filter_map(|e| match e {
            Entry::Ack(s) => Some(*s),
            _ => None,
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_a_torn_line_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        assert!(read(&path).expect("missing is empty").is_empty());
        let mut log = AckLog::open(&path).expect("open");
        let entries = [
            Entry::Ack(3),
            Entry::Restore(Some(2)),
            Entry::Restore(None),
            Entry::Error("Lost: step 4\nagain".to_owned()),
            Entry::Unexpected("Internal: x".to_owned()),
            Entry::Violation("restore of 2 differs".to_owned()),
            Entry::Ack(9),
        ];
        for e in &entries {
            log.append(e).expect("append");
        }
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"ack 12"))
            .expect("torn");
        let back = read(&path).expect("read");
        assert_eq!(back.len(), entries.len());
        assert_eq!(back[3], Entry::Error("Lost: step 4 again".to_owned()));
        assert_eq!(last_ack(&back), Some(9), "the torn ack 12 does not count");
    }
}
