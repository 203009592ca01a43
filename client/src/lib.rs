//! gpusnap client library.
//!
//! Today this crate holds the tensor vocabulary that the trainer and the
//! daemon share: [`Dtype`] and [`TensorSpec`]. The connection, registration,
//! capture and restore API arrives with the daemon's control plane.

mod dtype;
mod tensor;

pub use dtype::{Dtype, UnknownDtype};
pub use tensor::{TensorSpec, TensorSpecError};
