//! `MANIFEST.json`: what a committed snapshot is, and how to check it.
//!
//! # Format versions, and the rules for changing the format
//!
//! Every manifest carries `format_version`, and the safetensors header of
//! its data file carries the same number (`gpusnap.format_version` in
//! `__metadata__`). A build at version N writes version N and reads every
//! version 1..=N ([`FormatVersion`]); it refuses a newer one with
//! [`ManifestError::UnsupportedVersion`] (so the snapshot is reported, never
//! misread). A store holds its [`FormatVersion`], so a test can run a store
//! of a later build against the snapshots of this one.
//!
//! 1. Raise [`FORMAT_VERSION`] for any change an older reader would misread
//!    or refuse: a field's meaning or unit, the checksum or its chunking,
//!    the data file's layout or header, a new value of a closed field
//!    (`io_backend`, a tensor's `dtype`), a field that becomes required.
//! 2. Adding an optional field (`#[serde(default)]`) does not change the
//!    version: readers ignore fields they do not know.
//! 3. Never drop an old version: a reader keeps every rule of versions
//!    1..=N. Whatever depends on the version is a function of the
//!    manifest's own `format_version`, never of the build's: the header a
//!    reader rebuilds to compare byte for byte is built with the manifest's
//!    version ([`Manifest::header_metadata`]), so the first bump does not
//!    unlist every older snapshot.
//! 4. Each version has a real snapshot committed under
//!    `daemon/tests/fixtures/` (version 1: `fixtures/v1`, made by the
//!    version-1 writer), which every later build must list, verify and read
//!    byte for byte (`daemon/tests/format_versions.rs`). A bump adds the new
//!    version's fixture and never regenerates an old one.

use std::collections::BTreeMap;

use gpusnap_proto::convert::to_u64;
use serde::{Deserialize, Serialize};

use crate::buffer_pool::IO_ALIGN_BYTES;
use crate::storage::BackendKind;
use crate::store::layout::{HEADER_LEN_MAX, Layout, LayoutError, TensorEntry};
use crate::store::paths::{self, SnapshotId};

/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "gpusnap-manifest";
/// The manifest version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest manifest version; every build reads it.
pub const FORMAT_VERSION_MIN: u32 = 1;

/// The manifest versions a store reads and the one it writes: a build at
/// version N reads 1..=N and writes N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FormatVersion(u32);

impl FormatVersion {
    /// This build's rules.
    pub const CURRENT: FormatVersion = FormatVersion(FORMAT_VERSION);

    /// The rules of a build at `version` (1 or later). Only this build's
    /// own version is real; a later one is a simulated bump for tests,
    /// which writes that number and reads everything up to it.
    pub fn of_build(version: u32) -> FormatVersion {
        assert!(
            version >= FORMAT_VERSION_MIN,
            "format versions start at {FORMAT_VERSION_MIN}"
        );
        FormatVersion(version)
    }

    /// The version written.
    pub fn writes(self) -> u32 {
        self.0
    }

    /// Whether a manifest of `version` is read.
    pub fn reads(self, version: u32) -> bool {
        (FORMAT_VERSION_MIN..=self.0).contains(&version)
    }
}

impl Default for FormatVersion {
    fn default() -> Self {
        FormatVersion::CURRENT
    }
}
/// Largest manifest accepted, checked before reading it.
pub const MANIFEST_LEN_MAX: u64 = 256 << 20;
/// Largest CRC chunk.
pub const CHUNK_BYTES_MAX: u64 = 1 << 30;

/// Why a manifest is not a valid description of a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON of the expected shape: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("manifest format is {found:?}, not {FORMAT_NAME:?}")]
    WrongFormat { found: String },
    #[error(
        "manifest version {found} is not one this build reads ({FORMAT_VERSION_MIN}..={newest})"
    )]
    UnsupportedVersion { found: u32, newest: u32 },
    #[error("manifest does not serialize: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("manifest is inconsistent: {0}")]
    Inconsistent(String),
    #[error("manifest tensor table: {0}")]
    Layout(#[from] LayoutError),
    #[error("manifest names job {job:?}, rank {rank}, step {step}, but lies at {path_id}")]
    WrongPlace {
        job: String,
        rank: u32,
        step: u64,
        path_id: String,
    },
}

/// The manifest of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub job: String,
    pub rank: u32,
    pub world_size: u32,
    pub step: u64,
    pub created_unix_ms: u64,
    pub io_backend: BackendKind,
    pub data_file: String,
    /// Exact length of the data file.
    pub file_len: u64,
    /// Length of the safetensors prefix (8 + header), a multiple of 4096.
    pub header_len: u64,
    pub header_crc32: u32,
    pub data_len: u64,
    pub chunk_bytes: u64,
    /// CRC32 of each `chunk_bytes` chunk of the data section, in order.
    pub chunk_crc32: Vec<u32>,
    /// In data-section order.
    pub tensors: Vec<TensorEntry>,
}

impl Manifest {
    pub fn id(&self) -> SnapshotId {
        SnapshotId {
            job: self.job.clone(),
            rank: self.rank,
            step: self.step,
        }
    }

    /// The metadata written into the safetensors header (`__metadata__`),
    /// of this manifest's own format version (rule 3 of the module doc).
    pub fn header_metadata(&self) -> BTreeMap<String, String> {
        header_metadata(&self.id(), self.world_size, self.format_version)
    }

    /// The manifest as written to disk: pretty JSON and a newline.
    pub fn to_json(&self) -> Result<Vec<u8>, ManifestError> {
        let mut out = serde_json::to_vec_pretty(self).map_err(ManifestError::Serialize)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Parses and checks internal consistency (not yet against the file),
    /// reading the versions `format` reads.
    pub fn parse(bytes: &[u8], format: FormatVersion) -> Result<(Manifest, Layout), ManifestError> {
        let manifest: Manifest = serde_json::from_slice(bytes)?;
        let layout = manifest.check(format)?;
        Ok((manifest, layout))
    }

    /// Every rule a manifest obeys, whoever wrote it, for a reader of
    /// `format`.
    pub fn check(&self, format: FormatVersion) -> Result<Layout, ManifestError> {
        let bad = |why: String| Err(ManifestError::Inconsistent(why));
        if self.format != FORMAT_NAME {
            return Err(ManifestError::WrongFormat {
                found: self.format.clone(),
            });
        }
        if !format.reads(self.format_version) {
            return Err(ManifestError::UnsupportedVersion {
                found: self.format_version,
                newest: format.writes(),
            });
        }
        if paths::validate_job(&self.job).is_err() {
            return bad(format!("job name {:?} is not valid", self.job));
        }
        if self.world_size == 0 || self.rank >= self.world_size {
            return bad(format!(
                "rank {} is not below world size {}",
                self.rank, self.world_size
            ));
        }
        if self.data_file != paths::DATA_FILE {
            return bad(format!("data file is {:?}", self.data_file));
        }
        let align = IO_ALIGN_BYTES as u64;
        if self.header_len < align
            || !self.header_len.is_multiple_of(align)
            || self.header_len - 8 > HEADER_LEN_MAX
        {
            return bad(format!("header length {} is not valid", self.header_len));
        }
        if self.header_len.checked_add(self.data_len) != Some(self.file_len) {
            return bad(format!(
                "file length {} != header {} + data {}",
                self.file_len, self.header_len, self.data_len
            ));
        }
        if self.chunk_bytes == 0
            || !self.chunk_bytes.is_multiple_of(align)
            || self.chunk_bytes > CHUNK_BYTES_MAX
        {
            return bad(format!("chunk size {} is not valid", self.chunk_bytes));
        }
        let chunks = gpusnap_kernels::reference::chunk_count(self.data_len, self.chunk_bytes);
        if to_u64(self.chunk_crc32.len()) != chunks {
            return bad(format!(
                "{} chunk CRCs for {chunks} chunks",
                self.chunk_crc32.len()
            ));
        }
        Ok(Layout::from_table(self.tensors.clone(), self.data_len)?)
    }

    /// Checks that this manifest belongs at `id`'s directory.
    pub fn check_place(&self, id: &SnapshotId) -> Result<(), ManifestError> {
        if self.job != id.job || self.rank != id.rank || self.step != id.step {
            return Err(ManifestError::WrongPlace {
                job: self.job.clone(),
                rank: self.rank,
                step: self.step,
                path_id: id.to_string(),
            });
        }
        Ok(())
    }

    /// Byte range `[start, end)` of chunk `index` within the data section.
    pub fn chunk_range(&self, index: u64) -> (u64, u64) {
        let start = index.saturating_mul(self.chunk_bytes).min(self.data_len);
        let end = start.saturating_add(self.chunk_bytes).min(self.data_len);
        (start, end)
    }
}

/// The safetensors `__metadata__` of a snapshot of `format_version`.
pub fn header_metadata(
    id: &SnapshotId,
    world_size: u32,
    format_version: u32,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_owned(), "pt".to_owned()),
        ("gpusnap.job".to_owned(), id.job.clone()),
        ("gpusnap.rank".to_owned(), id.rank.to_string()),
        ("gpusnap.step".to_owned(), id.step.to_string()),
        ("gpusnap.world_size".to_owned(), world_size.to_string()),
        (
            "gpusnap.format_version".to_owned(),
            format_version.to_string(),
        ),
    ])
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use super::*;
    use gpusnap_proto::{Dtype, TensorSpec};

    fn sample() -> Manifest {
        let layout = Layout::plan(&[
            TensorSpec::new("a", Dtype::F32, [1000]),
            TensorSpec::new("b", Dtype::U8, [5000]),
        ])
        .expect("plan");
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            job: "j".into(),
            rank: 0,
            world_size: 2,
            step: 7,
            created_unix_ms: 1,
            io_backend: BackendKind::IoUring,
            data_file: paths::DATA_FILE.into(),
            file_len: 4096 + layout.data_len,
            header_len: 4096,
            header_crc32: 0,
            data_len: layout.data_len,
            chunk_bytes: 4096,
            chunk_crc32: vec![0; 3],
            tensors: layout.tensors,
        }
    }

    #[test]
    fn round_trips_through_json() {
        let m = sample();
        let (parsed, layout) =
            Manifest::parse(&m.to_json().expect("json"), FormatVersion::CURRENT).expect("parse");
        assert_eq!(parsed, m);
        assert_eq!(layout.data_len, 9000);
        assert_eq!(m.chunk_range(2), (8192, 9000));
    }

    #[test]
    fn a_build_reads_every_version_up_to_its_own_and_refuses_newer() {
        let v1 = FormatVersion::CURRENT;
        let v2 = FormatVersion::of_build(2);
        assert_eq!((v1.writes(), v2.writes()), (1, 2));
        let mut m = sample();
        let json = m.to_json().expect("json");
        assert!(Manifest::parse(&json, v1).is_ok());
        assert!(Manifest::parse(&json, v2).is_ok(), "v2 reads v1");
        m.format_version = 2;
        let json = m.to_json().expect("json");
        assert!(Manifest::parse(&json, v2).is_ok());
        assert!(matches!(
            Manifest::parse(&json, v1),
            Err(ManifestError::UnsupportedVersion {
                found: 2,
                newest: 1
            })
        ));
        m.format_version = 0;
        assert!(Manifest::parse(&m.to_json().expect("json"), v2).is_err());
    }

    #[test]
    fn the_header_metadata_carries_the_manifests_own_version() {
        let mut m = sample();
        assert_eq!(m.header_metadata()["gpusnap.format_version"], "1");
        m.format_version = 2;
        assert_eq!(m.header_metadata()["gpusnap.format_version"], "2");
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        type Mutation = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("crc count", Box::new(|m| m.chunk_crc32.push(1))),
            ("file len", Box::new(|m| m.file_len += 1)),
            ("header align", Box::new(|m| m.header_len = 4000)),
            ("chunk size", Box::new(|m| m.chunk_bytes = 100)),
            ("version", Box::new(|m| m.format_version = 99)),
            ("format", Box::new(|m| m.format = "x".into())),
            ("rank", Box::new(|m| m.rank = 2)),
            ("job", Box::new(|m| m.job = "../x".into())),
            ("table", Box::new(|m| m.tensors.reverse())),
        ];
        for (what, mutate) in cases {
            let mut m = sample();
            mutate(&mut m);
            assert!(
                Manifest::parse(&m.to_json().expect("json"), FormatVersion::CURRENT).is_err(),
                "{what}"
            );
        }
        assert!(Manifest::parse(b"{\"format\": 1", FormatVersion::CURRENT).is_err());
    }
}
