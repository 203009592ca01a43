//! gpusnap client library.
//!
//! * [`proto`]: the wire protocol the client and `gpusnapd` speak.
//! * [`Dtype`], [`TensorSpec`]: the tensor vocabulary both sides share.

mod dtype;
pub mod proto;
mod tensor;

pub use dtype::{Dtype, UnknownDtype};
pub use tensor::{TensorSpec, TensorSpecError};
