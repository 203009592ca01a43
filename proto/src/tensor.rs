//! What a trainer registers: a named tensor of a dtype and a shape.

use serde::{Deserialize, Serialize};

use crate::Dtype;

/// Longest tensor name accepted, in bytes.
pub const NAME_LEN_MAX: usize = 1024;
/// Most dimensions a shape may have.
pub const RANK_MAX: usize = 16;

/// A named tensor: what a trainer registers and what a snapshot stores.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
}

/// Why a [`TensorSpec`] cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorSpecError {
    #[error("tensor name is empty")]
    EmptyName,
    #[error("tensor name {name:?} is longer than {NAME_LEN_MAX} bytes")]
    NameTooLong { name: String },
    #[error("tensor name {name:?} starts with \"__\", which safetensors reserves")]
    ReservedName { name: String },
    #[error("tensor {name:?} has {rank} dimensions; at most {RANK_MAX} are supported")]
    TooManyDimensions { name: String, rank: usize },
    #[error("tensor {name:?}: shape {shape:?} overflows 64-bit byte sizes")]
    SizeOverflow { name: String, shape: Vec<u64> },
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: impl Into<Vec<u64>>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.into(),
        }
    }

    /// Number of elements (1 for a scalar of shape `[]`).
    pub fn element_count(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Size of the tensor's data in bytes, or `None` if it overflows.
    pub fn byte_len(&self) -> Option<u64> {
        self.element_count()?.checked_mul(self.dtype.size_bytes())
    }

    /// Checks the name and shape; returns the byte length.
    pub fn validate(&self) -> Result<u64, TensorSpecError> {
        if self.name.is_empty() {
            return Err(TensorSpecError::EmptyName);
        }
        if self.name.len() > NAME_LEN_MAX {
            return Err(TensorSpecError::NameTooLong {
                name: self.name.chars().take(64).collect(),
            });
        }
        if self.name.starts_with("__") {
            return Err(TensorSpecError::ReservedName {
                name: self.name.clone(),
            });
        }
        if self.shape.len() > RANK_MAX {
            return Err(TensorSpecError::TooManyDimensions {
                name: self.name.clone(),
                rank: self.shape.len(),
            });
        }
        self.byte_len()
            .ok_or_else(|| TensorSpecError::SizeOverflow {
                name: self.name.clone(),
                shape: self.shape.clone(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_len_multiplies_shape_and_element_size() {
        assert_eq!(TensorSpec::new("a", Dtype::F32, [2, 3]).validate(), Ok(24));
        assert_eq!(TensorSpec::new("s", Dtype::F64, []).validate(), Ok(8));
        assert_eq!(TensorSpec::new("z", Dtype::BF16, [0, 7]).validate(), Ok(0));
    }

    #[test]
    fn bad_specs_are_refused_with_their_reason() {
        assert_eq!(
            TensorSpec::new("", Dtype::U8, [1]).validate(),
            Err(TensorSpecError::EmptyName)
        );
        assert!(matches!(
            TensorSpec::new("__metadata__", Dtype::U8, [1]).validate(),
            Err(TensorSpecError::ReservedName { .. })
        ));
        assert!(matches!(
            TensorSpec::new("big", Dtype::F64, [u64::MAX, 2]).validate(),
            Err(TensorSpecError::SizeOverflow { .. })
        ));
        assert!(matches!(
            TensorSpec::new("deep", Dtype::U8, vec![1; 17]).validate(),
            Err(TensorSpecError::TooManyDimensions { rank: 17, .. })
        ));
    }
}
