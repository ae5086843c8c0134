//! Model weights: tensor sources (safetensors folders, GGUF files) and the one table that maps
//! their tensor names to the roles of the Llama forward pass.

use crate::dtype::DType;
use crate::error::Result;
use std::borrow::Cow;

pub mod gguf;
pub mod load;
pub mod safetensors;

pub use load::{load_weights, tensor_name, LayerWeights, Weights};

/// A tensor as stored on disk, before upload. `shape` is in HF order (`[rows, cols]` for a
/// matrix: `[out_features, in_features]`); `data` holds the stored bytes (little-endian floats or
/// GGUF blocks laid out row by row).
#[derive(Debug, Clone)]
pub struct HostTensor<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl HostTensor<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Anything that can hand out named tensors (memory-mapped, so `get` is cheap).
pub trait TensorSource {
    /// Every tensor name in the source.
    fn names(&self) -> Vec<String>;
    /// The tensor called `name`, or None if absent. Errors are for malformed entries.
    fn get(&self, name: &str) -> Result<Option<HostTensor<'_>>>;
    /// Total stored bytes of every tensor (progress bars). Sources whose `get` does work
    /// (GGUF un-permutes Q/K rows) override it with what their index already knows.
    fn total_bytes(&self) -> usize {
        let names = self.names();
        names
            .iter()
            .filter_map(|n| self.get(n).ok().flatten())
            .map(|t| t.data.len())
            .sum()
    }
}
