//! `MANIFEST.json`: what a committed snapshot is, and how to check it.
//!
//! Format rules: `format_version` goes up for any change an older reader
//! would misread (a field's meaning, the checksum, the data layout). Adding an
//! optional field does not change it; readers ignore fields they do not know
//! and refuse versions newer than theirs. Version 1 is the first.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::buffer_pool::IO_ALIGN_BYTES;
use crate::storage::BackendKind;
use crate::store::layout::{HEADER_LEN_MAX, Layout, LayoutError, TensorEntry};
use crate::store::paths::{self, SnapshotId};

/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "gpusnap-manifest";
/// The manifest version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
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
    #[error("manifest version {found} is newer than this build reads ({FORMAT_VERSION})")]
    UnsupportedVersion { found: u32 },
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

    /// The metadata written into the safetensors header (`__metadata__`).
    pub fn header_metadata(&self) -> BTreeMap<String, String> {
        header_metadata(&self.id(), self.world_size)
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings, integers and enums always serializes.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Parses and checks internal consistency (not yet against the file).
    pub fn parse(bytes: &[u8]) -> Result<(Manifest, Layout), ManifestError> {
        let manifest: Manifest = serde_json::from_slice(bytes)?;
        let layout = manifest.check()?;
        Ok((manifest, layout))
    }

    /// Every rule a manifest obeys, whoever wrote it.
    pub fn check(&self) -> Result<Layout, ManifestError> {
        let bad = |why: String| Err(ManifestError::Inconsistent(why));
        if self.format != FORMAT_NAME {
            return Err(ManifestError::WrongFormat {
                found: self.format.clone(),
            });
        }
        if self.format_version == 0 || self.format_version > FORMAT_VERSION {
            return Err(ManifestError::UnsupportedVersion {
                found: self.format_version,
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
        if u64::try_from(self.chunk_crc32.len()).ok() != Some(chunks) {
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

/// The safetensors `__metadata__` of a snapshot.
pub fn header_metadata(id: &SnapshotId, world_size: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("format".to_owned(), "pt".to_owned()),
        ("gpusnap.job".to_owned(), id.job.clone()),
        ("gpusnap.rank".to_owned(), id.rank.to_string()),
        ("gpusnap.step".to_owned(), id.step.to_string()),
        ("gpusnap.world_size".to_owned(), world_size.to_string()),
        (
            "gpusnap.format_version".to_owned(),
            FORMAT_VERSION.to_string(),
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
        let (parsed, layout) = Manifest::parse(&m.to_json()).expect("parse");
        assert_eq!(parsed, m);
        assert_eq!(layout.data_len, 9000);
        assert_eq!(m.chunk_range(2), (8192, 9000));
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
            assert!(Manifest::parse(&m.to_json()).is_err(), "{what}");
        }
        assert!(Manifest::parse(b"{\"format\": 1").is_err());
    }
}
