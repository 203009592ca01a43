//! The job-level marker `<prefix>/<job>/step-<N>/COMPLETE`: step N of a job
//! is complete in the object store when this object exists, parses, obeys
//! every rule, and names every rank's manifest by its SHA-256.
//!
//! The rule: a daemon that has uploaded a rank's manifest for step N
//! checks whether every rank of the world has one (and its data object, of
//! the manifest's length); if so it builds the marker and writes it with a
//! conditional put (create only if absent). Of daemons racing, the object
//! store lets exactly one create succeed; every other one reads the marker
//! and checks it equals the one it built. The marker is deterministic (no
//! time, no writer's name), so agreeing daemons build identical bytes.
//!
//! A marker is not proof by itself: a restore also downloads the manifest,
//! checks its digest against the marker, and every chunk's CRC against the
//! manifest before any byte is used.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::paths;

/// The `format` field of every marker.
pub const MARKER_FORMAT: &str = "gpusnap-complete";
/// The marker version this build writes and the newest it reads.
pub const MARKER_VERSION: u32 = 1;
/// Largest marker read (a world of tens of thousands of ranks fits).
pub const MARKER_LEN_MAX: u64 = 16 << 20;
/// Largest manifest object read (as the local store's limit).
pub const MANIFEST_LEN_MAX: u64 = crate::store::manifest::MANIFEST_LEN_MAX;

/// One rank's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankEntry {
    pub rank: u32,
    /// SHA-256 of the rank's `MANIFEST.json` object, lowercase hex.
    pub manifest_sha256: String,
    /// Length of the rank's data object.
    pub file_len: u64,
}

/// The marker of one complete step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marker {
    pub format: String,
    pub format_version: u32,
    pub job: String,
    pub step: u64,
    pub world_size: u32,
    /// Every rank, in rank order.
    pub ranks: Vec<RankEntry>,
}

/// Why a marker object is not a valid marker of the step it lies at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkerError {
    #[error("the marker is not JSON of the marker's shape: {0}")]
    Parse(String),
    #[error("the marker is inconsistent: {0}")]
    Inconsistent(String),
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    out
}

impl Marker {
    /// The marker of `job`'s `step` whose world's ranks are `ranks` (in rank
    /// order, one per rank).
    pub fn new(job: &str, step: u64, ranks: Vec<RankEntry>) -> Result<Marker, MarkerError> {
        let world_size = u32::try_from(ranks.len())
            .map_err(|_| MarkerError::Inconsistent(format!("{} ranks", ranks.len())))?;
        let marker = Marker {
            format: MARKER_FORMAT.into(),
            format_version: MARKER_VERSION,
            job: job.into(),
            step,
            world_size,
            ranks,
        };
        marker.check(job, step)?;
        Ok(marker)
    }

    /// The object's bytes: compact JSON and a newline (deterministic).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("a marker always serializes");
        out.push(b'\n');
        out
    }

    /// Parses and checks a marker read from `job`'s `step`.
    pub fn parse(bytes: &[u8], job: &str, step: u64) -> Result<Marker, MarkerError> {
        let marker: Marker =
            serde_json::from_slice(bytes).map_err(|e| MarkerError::Parse(e.to_string()))?;
        marker.check(job, step)?;
        Ok(marker)
    }

    /// Every rule, for a marker that lies at `job`'s `step`.
    pub fn check(&self, job: &str, step: u64) -> Result<(), MarkerError> {
        let bad = |why: String| Err(MarkerError::Inconsistent(why));
        if self.format != MARKER_FORMAT {
            return bad(format!(
                "format is {:?}, not {MARKER_FORMAT:?}",
                self.format
            ));
        }
        if self.format_version != MARKER_VERSION {
            return bad(format!(
                "version {} is not one this build reads ({MARKER_VERSION})",
                self.format_version
            ));
        }
        if self.job != job || self.step != step || paths::validate_job(job).is_err() {
            return bad(format!(
                "names job {:?} step {}, but lies at job {job:?} step {step}",
                self.job, self.step
            ));
        }
        if self.world_size == 0 || usize::try_from(self.world_size).ok() != Some(self.ranks.len()) {
            return bad(format!(
                "world size {} with {} ranks listed",
                self.world_size,
                self.ranks.len()
            ));
        }
        for (index, entry) in self.ranks.iter().enumerate() {
            if usize::try_from(entry.rank).ok() != Some(index) {
                return bad(format!("entry {index} names rank {}", entry.rank));
            }
            let hex = entry.manifest_sha256.as_bytes();
            if hex.len() != 64
                || !hex
                    .iter()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
            {
                return bad(format!("rank {}'s digest is not SHA-256 hex", entry.rank));
            }
        }
        Ok(())
    }

    /// The entry of `rank`, if the world has it.
    pub fn rank(&self, rank: u32) -> Option<&RankEntry> {
        self.ranks.get(usize::try_from(rank).ok()?)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;

    fn entry(rank: u32, text: &str) -> RankEntry {
        RankEntry {
            rank,
            manifest_sha256: sha256_hex(text.as_bytes()),
            file_len: 4096,
        }
    }

    #[test]
    fn a_marker_round_trips_byte_for_byte_and_builds_the_same_bytes_twice() {
        let m = Marker::new("job", 7, vec![entry(0, "a"), entry(1, "b")]).unwrap();
        let bytes = m.to_json();
        assert_eq!(Marker::parse(&bytes, "job", 7).unwrap(), m);
        let again = Marker::new("job", 7, vec![entry(0, "a"), entry(1, "b")]).unwrap();
        assert_eq!(again.to_json(), bytes);
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(m.rank(1).unwrap().rank, 1);
        assert!(m.rank(2).is_none());
    }

    #[test]
    fn a_marker_of_another_place_or_with_a_rank_missing_is_refused() {
        let m = Marker::new("job", 7, vec![entry(0, "a"), entry(1, "b")]).unwrap();
        let bytes = m.to_json();
        assert!(Marker::parse(&bytes, "job", 8).is_err());
        assert!(Marker::parse(&bytes, "other", 7).is_err());
        assert!(matches!(
            Marker::parse(b"{\"format\":", "job", 7),
            Err(MarkerError::Parse(_))
        ));
        let mut missing = m.clone();
        missing.ranks.pop();
        assert!(missing.check("job", 7).is_err(), "world 2, one rank listed");
        let mut swapped = m.clone();
        swapped.ranks.swap(0, 1);
        assert!(swapped.check("job", 7).is_err());
        let mut short = m.clone();
        short.ranks[0].manifest_sha256 = "abc".into();
        assert!(short.check("job", 7).is_err());
        let mut newer = m;
        newer.format_version = 2;
        assert!(newer.check("job", 7).is_err());
        assert!(Marker::new("job", 1, Vec::new()).is_err(), "an empty world");
    }
}
