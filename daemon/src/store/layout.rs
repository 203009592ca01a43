//! Where each tensor goes in a snapshot's data file, and the safetensors
//! header that describes it.
//!
//! File = 8-byte little-endian header length `n`, `n` bytes of JSON padded
//! with spaces so that the data section starts on a 4096-byte boundary, then
//! the tensors packed with no holes. Tensors are ordered by element size,
//! largest first (registration order within a size), so every tensor's offset
//! is a multiple of its element size. The header is a pure function of the
//! tensor table and the metadata, so a reader can rebuild it from the
//! manifest and compare it byte for byte.

use std::collections::{BTreeMap, HashSet};

use gpusnap_proto::{Dtype, TensorSpec, TensorSpecError};
use serde::{Deserialize, Serialize};

use crate::buffer_pool::IO_ALIGN_BYTES;

/// Largest safetensors header accepted (the safetensors crate's own limit).
pub const HEADER_LEN_MAX: u64 = 100_000_000;
/// Most tensors in one snapshot.
pub const TENSOR_COUNT_MAX: usize = 1_000_000;

/// A tensor's place in the data section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub len: u64,
}

impl TensorEntry {
    pub fn spec(&self) -> TensorSpec {
        TensorSpec::new(self.name.clone(), self.dtype, self.shape.clone())
    }

    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Why a tensor set cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Spec(#[from] TensorSpecError),
    #[error("tensor name {0:?} is registered twice")]
    DuplicateName(String),
    #[error("{count} tensors is more than the {TENSOR_COUNT_MAX} a snapshot may hold")]
    TooManyTensors { count: usize },
    #[error("the data section would overflow 64-bit sizes")]
    Overflow,
    #[error("the safetensors header would be {len} bytes, over the {HEADER_LEN_MAX}-byte limit")]
    HeaderTooLarge { len: u64 },
    #[error("tensor table is not packed: {0}")]
    NotPacked(String),
}

/// The tensors of one snapshot, placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// In data-section order (ascending offsets, no holes).
    pub tensors: Vec<TensorEntry>,
    pub data_len: u64,
}

impl Layout {
    /// Places `specs`: validated, unique names, packed by element size.
    pub fn plan(specs: &[TensorSpec]) -> Result<Layout, LayoutError> {
        if specs.len() > TENSOR_COUNT_MAX {
            return Err(LayoutError::TooManyTensors { count: specs.len() });
        }
        let mut seen = HashSet::with_capacity(specs.len());
        let mut order: Vec<(&TensorSpec, u64)> = Vec::with_capacity(specs.len());
        for spec in specs {
            let len = spec.validate()?;
            if !seen.insert(spec.name.as_str()) {
                return Err(LayoutError::DuplicateName(spec.name.clone()));
            }
            order.push((spec, len));
        }
        // Stable: registration order within one element size.
        order.sort_by_key(|&(spec, _)| std::cmp::Reverse(spec.dtype.size_bytes()));
        let mut offset = 0u64;
        let mut tensors = Vec::with_capacity(specs.len());
        for (spec, len) in order {
            tensors.push(TensorEntry {
                name: spec.name.clone(),
                dtype: spec.dtype,
                shape: spec.shape.clone(),
                offset,
                len,
            });
            offset = offset.checked_add(len).ok_or(LayoutError::Overflow)?;
        }
        Ok(Layout {
            tensors,
            data_len: offset,
        })
    }

    /// Checks a table read back from disk: valid specs, unique names,
    /// ascending offsets with no holes summing to `data_len`.
    pub fn from_table(tensors: Vec<TensorEntry>, data_len: u64) -> Result<Layout, LayoutError> {
        if tensors.len() > TENSOR_COUNT_MAX {
            return Err(LayoutError::TooManyTensors {
                count: tensors.len(),
            });
        }
        let mut seen = HashSet::with_capacity(tensors.len());
        let mut expected_offset = 0u64;
        for t in &tensors {
            let len = t.spec().validate()?;
            if !seen.insert(t.name.as_str()) {
                return Err(LayoutError::DuplicateName(t.name.clone()));
            }
            if t.len != len || t.offset != expected_offset {
                return Err(LayoutError::NotPacked(format!(
                    "tensor {:?} at offset {} length {} (expected offset {expected_offset} length {len})",
                    t.name, t.offset, t.len
                )));
            }
            expected_offset = expected_offset
                .checked_add(len)
                .ok_or(LayoutError::Overflow)?;
        }
        if expected_offset != data_len {
            return Err(LayoutError::NotPacked(format!(
                "tensors end at {expected_offset}, data section is {data_len} bytes"
            )));
        }
        Ok(Layout { tensors, data_len })
    }

    /// Names of the tensors overlapping `[start, end)` of the data section.
    pub fn tensors_in(&self, start: u64, end: u64) -> Vec<String> {
        let first = self.tensors.partition_point(|t| t.end() <= start);
        self.tensors
            .iter()
            .skip(first)
            .take_while(|t| t.offset < end)
            .filter(|t| t.len > 0)
            .map(|t| t.name.clone())
            .collect()
    }

    /// The safetensors prefix of the file: length, JSON header, space padding.
    /// Its length is a multiple of 4096.
    ///
    /// The header's bytes are part of the on-disk format (a reader rebuilds
    /// it and compares byte for byte), so their order is fixed here, not by
    /// `serde_json`'s map type (which a cargo feature anywhere in the build,
    /// `preserve_order`, would change): entries sorted by name, each
    /// tensor's fields as `data_offsets`, `dtype`, `shape`, exactly what the
    /// version-1 writer wrote.
    pub fn encode_header(
        &self,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Vec<u8>, LayoutError> {
        #[derive(Serialize)]
        struct Entry<'a> {
            data_offsets: [u64; 2],
            dtype: &'static str,
            shape: &'a [u64],
        }
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Value<'a> {
            Metadata(&'a BTreeMap<String, String>),
            Tensor(Entry<'a>),
        }
        let mut map: BTreeMap<&str, Value<'_>> = BTreeMap::new();
        if !metadata.is_empty() {
            map.insert("__metadata__", Value::Metadata(metadata));
        }
        for t in &self.tensors {
            map.insert(
                &t.name,
                Value::Tensor(Entry {
                    data_offsets: [t.offset, t.end()],
                    dtype: t.dtype.name(),
                    shape: &t.shape,
                }),
            );
        }
        let json = serde_json::to_vec(&map).map_err(|_| LayoutError::Overflow)?;
        let unpadded = 8 + json.len();
        let total = unpadded.next_multiple_of(IO_ALIGN_BYTES);
        let header_json_len = u64::try_from(total - 8).map_err(|_| LayoutError::Overflow)?;
        if header_json_len > HEADER_LEN_MAX {
            return Err(LayoutError::HeaderTooLarge {
                len: header_json_len,
            });
        }
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&header_json_len.to_le_bytes());
        out.extend_from_slice(&json);
        out.resize(total, b' ');
        debug_assert_eq!(out.len() % IO_ALIGN_BYTES, 0);
        Ok(out)
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests index and unwrap known data"
)]
mod tests {
    use super::*;

    fn specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("mask", Dtype::Bool, [3]),
            TensorSpec::new("w", Dtype::F32, [2, 3]),
            TensorSpec::new("step", Dtype::I64, []),
            TensorSpec::new("empty", Dtype::F16, [0]),
            TensorSpec::new("h", Dtype::BF16, [5]),
        ]
    }

    #[test]
    fn plan_packs_by_element_size_and_keeps_alignment() {
        let layout = Layout::plan(&specs()).expect("plan");
        let names: Vec<_> = layout.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["step", "w", "empty", "h", "mask"]);
        assert_eq!(layout.data_len, 8 + 24 + 10 + 3);
        for t in &layout.tensors {
            assert_eq!(t.offset % t.dtype.size_bytes(), 0, "{}", t.name);
        }
        let again = Layout::from_table(layout.tensors.clone(), layout.data_len).expect("valid");
        assert_eq!(again, layout);
    }

    #[test]
    fn duplicate_names_and_holes_are_refused() {
        let mut dup = specs();
        dup.push(TensorSpec::new("w", Dtype::U8, [1]));
        assert_eq!(
            Layout::plan(&dup),
            Err(LayoutError::DuplicateName("w".into()))
        );
        let layout = Layout::plan(&specs()).expect("plan");
        let mut holed = layout.tensors.clone();
        if let Some(t) = holed.get_mut(1) {
            t.offset += 1;
        }
        assert!(matches!(
            Layout::from_table(holed, layout.data_len),
            Err(LayoutError::NotPacked(_))
        ));
        assert!(matches!(
            Layout::from_table(layout.tensors.clone(), layout.data_len + 1),
            Err(LayoutError::NotPacked(_))
        ));
    }

    #[test]
    fn header_is_aligned_space_padded_and_names_tensors_in_range() {
        let layout = Layout::plan(&specs()).expect("plan");
        let meta = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let header = layout.encode_header(&meta).expect("header");
        assert_eq!(header.len() % 4096, 0);
        let n = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        assert_eq!(n + 8, header.len() as u64);
        assert_eq!(header.last(), Some(&b' '));
        let parsed: serde_json::Value =
            serde_json::from_slice(&header[8..]).expect("padded JSON parses");
        assert_eq!(parsed["w"]["data_offsets"], serde_json::json!([8, 32]));
        assert_eq!(layout.tensors_in(0, 9), ["step", "w"]);
        assert_eq!(layout.tensors_in(32, 33), ["h"]);
    }
}
