//! Model weights: tensor sources (safetensors folders, GGUF files) and the one table that maps
//! their tensor names to the roles of the Llama forward pass.

use crate::dtype::DType;
use crate::error::Result;
use std::borrow::Cow;

pub mod fused;
pub mod gguf;
pub mod load;
pub mod safetensors;

pub use load::{load_weights, plan_weights, tensor_name, LayerWeights, Weights, WeightsPlan};

/// The largest JSON / text side file we read whole (config.json, an index, tokenizer.json, a
/// chat template): real ones are at most tens of MB; a file claiming more is not read at all.
pub const MAX_TEXT_FILE: u64 = 256 << 20;

/// Reads a side file as UTF-8 text, refusing files over `MAX_TEXT_FILE` before reading them.
/// Errors keep the io::Error kind readable by callers that treat "not found" specially.
pub fn read_text_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_TEXT_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("file is {len} bytes, over the limit of {MAX_TEXT_FILE} for a text file"),
        ));
    }
    // `take` also bounds a file that grows (or a device that never ends) after the size check.
    let mut text = String::new();
    file.take(MAX_TEXT_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_TEXT_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("file is over the limit of {MAX_TEXT_FILE} bytes for a text file"),
        ));
    }
    Ok(text)
}

/// `source` as the loader reads it: Phi-3's fused projections shown split under Llama's names.
pub fn model_source<S: TensorSource + 'static>(
    source: S,
    cfg: &crate::config::ModelConfig,
) -> Box<dyn TensorSource> {
    match cfg.arch {
        crate::arch::Arch::Phi3 => Box::new(fused::SplitFused::new(source, cfg)),
        _ => Box::new(source),
    }
}

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

/// What a source knows about a tensor without reading it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMeta {
    pub dtype: DType,
    /// HF order, as `HostTensor::shape`.
    pub shape: Vec<usize>,
    /// Stored bytes.
    pub bytes: usize,
}

/// Anything that can hand out named tensors (memory-mapped, so `get` is cheap).
pub trait TensorSource {
    /// Every tensor name in the source.
    fn names(&self) -> Vec<String>;
    /// The tensor called `name`, or None if absent. Errors are for malformed entries.
    fn get(&self, name: &str) -> Result<Option<HostTensor<'_>>>;
    /// Dtype, shape and size of `name` (None if absent). Sources whose `get` does work override it.
    fn meta(&self, name: &str) -> Result<Option<TensorMeta>> {
        Ok(self.get(name)?.map(|t| TensorMeta {
            dtype: t.dtype,
            shape: t.shape,
            bytes: t.data.len(),
        }))
    }
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
