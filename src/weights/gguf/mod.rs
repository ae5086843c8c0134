//! GGUF files (llama.cpp's single-file format), memory-mapped: typed metadata, tensor infos, and
//! tensors handed out in HF layout. Two things differ from a safetensors checkpoint:
//! - ggml lists dimensions fastest-first (`ne = [cols, rows]`); we report HF order `[rows, cols]`.
//! - llama.cpp's converter reorders the rows of every Llama `attn_q` / `attn_k` tensor so that
//!   RoPE can rotate adjacent pairs (x0,x1),(x2,x3)...; the model here, like transformers, rotates
//!   the two halves of each head instead. `get` undoes that reordering, whole rows at a time, so
//!   quantized blocks are moved, never re-encoded.

mod config;
mod ggml_type;
mod parse;
pub(crate) mod rope_freqs;
pub(crate) mod value;

pub use ggml_type::GgmlType;
pub use value::{Array, Value};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::weights::{HostTensor, TensorSource};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where one tensor lives in the file and how it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// Dimensions in ggml order: `dims[0]` is the row length (fastest-moving).
    pub dims: Vec<u64>,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    pub n_elements: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Shape in HF order (`[rows, cols]` for a matrix): the ggml dimensions reversed.
    pub fn shape(&self) -> Vec<usize> {
        // Every dimension fits in usize: their product was checked when the file was parsed.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An opened GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, Value)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps the file and parses and checks its header. Tensor data is not read until asked for.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::load(path, e.to_string()))?;
        let len = file
            .metadata()
            .map_err(|e| Error::load(path, e.to_string()))?
            .len();
        if len < 24 {
            return Err(Error::load(
                path,
                format!("file is {len} bytes, too short for a GGUF header (24 bytes)"),
            ));
        }
        // SAFETY: the map is read-only; like every mmap-based loader we rely on the file not
        // being truncated or rewritten while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::load(path, e.to_string()))?;
        let h = parse::parse_header(&mmap, path)?;
        let metadata_index = h
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = h
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: h.version,
            metadata: h.metadata,
            metadata_index,
            tensors: h.tensors,
            tensor_index,
            alignment: h.alignment,
            data_offset: h.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// An error about this file.
    pub(crate) fn error(&self, msg: impl Into<String>) -> Error {
        Error::load(&self.path, msg)
    }

    // ----- metadata -----

    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Every metadata entry, in file order.
    pub fn metadata_entries(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.metadata.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        conv: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => conv(v).map(Some).ok_or_else(|| {
                self.error(format!(
                    "metadata {key} is a {} ({v:?}), expected {want}",
                    v.type_name()
                ))
            }),
        }
    }

    /// A non-negative integer of any width; None if absent, an error if of another type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", Value::as_u64)
    }

    /// Like `get_u64`, converted to usize.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get_u64(key)? {
            None => Ok(None),
            Some(v) => usize::try_from(v)
                .map(Some)
                .map_err(|_| self.error(format!("metadata {key} = {v} does not fit in usize"))),
        }
    }

    pub fn get_i64(&self, key: &str) -> Result<Option<i64>> {
        self.typed(key, "an integer", Value::as_i64)
    }

    /// A float (f32 or f64; integers are accepted and converted).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", Value::as_bool)
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", Value::as_str)
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&Array>> {
        self.typed(key, "an array", Value::as_array)
    }

    /// An array of strings (a vocabulary, a merge list).
    pub fn get_string_array(&self, key: &str) -> Result<Option<&[String]>> {
        self.typed(key, "an array of strings", |v| match v {
            Value::Array(Array::String(s)) => Some(s.as_slice()),
            _ => None,
        })
    }

    /// `general.architecture`, which every GGUF file must have.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")?
            .ok_or_else(|| self.error("metadata has no general.architecture"))
    }

    // ----- tensors -----

    /// Every tensor info, in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor's bytes exactly as stored (no row reordering). Bounds were checked at open.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.mmap[start..start + info.n_bytes]
    }

    /// The decodable dtype of a tensor, or an error naming its ggml type.
    fn dtype_of(&self, info: &TensorInfo) -> Result<DType> {
        info.ggml_type.to_dtype().ok_or_else(|| {
            self.error(format!(
                "tensor {} is stored as {}, which cannot be decoded \
                 (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)",
                info.name, info.ggml_type
            ))
        })
    }

    /// The number of heads whose rows llama.cpp interleaved in this tensor, if it is one of the
    /// Llama query/key projections (weight or bias) that need their rows put back.
    fn permuted_heads(&self, name: &str) -> Result<Option<usize>> {
        if self.architecture()? != "llama" || !name.starts_with("blk.") {
            return Ok(None);
        }
        let is_q = name.contains(".attn_q.");
        if !is_q && !name.contains(".attn_k.") {
            return Ok(None);
        }
        let n_heads = self
            .get_usize("llama.attention.head_count")?
            .ok_or_else(|| self.error("metadata has no llama.attention.head_count"))?;
        // llama.cpp: without an explicit KV head count, every head has its own keys.
        let n_kv_heads = self
            .get_usize("llama.attention.head_count_kv")?
            .unwrap_or(n_heads);
        Ok(Some(if is_q { n_heads } else { n_kv_heads }))
    }
}

/// Undoes llama.cpp's Q/K row permutation. Per head, llama.cpp stored HF row `t * half + d`
/// (t in 0..2, d in 0..half) at row `2 * d + t`, i.e. HF rows reshaped `(2, half)` and
/// transposed; transformers reverses it the same way when it loads a GGUF. `data` holds `rows`
/// rows of equal byte length.
pub fn unpermute_rows(data: &[u8], rows: usize, n_heads: usize) -> Option<Vec<u8>> {
    if rows == 0 {
        return data.is_empty().then(Vec::new);
    }
    if n_heads == 0 || rows % (2 * n_heads) != 0 || data.len() % rows != 0 {
        return None;
    }
    let row_bytes = data.len() / rows;
    let half = rows / n_heads / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_heads {
        for t in 0..2 {
            for d in 0..half {
                let dst = h * 2 * half + t * half + d;
                let src = h * 2 * half + 2 * d + t;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Some(out)
}

impl TensorSource for GgufFile {
    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }

    fn total_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }

    fn meta(&self, name: &str) -> Result<Option<crate::weights::TensorMeta>> {
        let Some(info) = self.tensor_info(name) else {
            return Ok(None);
        };
        Ok(Some(crate::weights::TensorMeta {
            dtype: self.dtype_of(info)?,
            shape: info.shape(),
            bytes: info.n_bytes,
        }))
    }

    fn get(&self, name: &str) -> Result<Option<HostTensor<'_>>> {
        let Some(info) = self.tensor_info(name) else {
            return Ok(None);
        };
        let dtype = self.dtype_of(info)?;
        let shape = info.shape();
        let bytes = self.tensor_bytes(info);
        let data = match self.permuted_heads(name)? {
            None => Cow::Borrowed(bytes),
            Some(n_heads) => {
                // A vector (bias) is reordered element by element, a matrix row by row; a vector
                // of blocks cannot be, since its elements are not separately addressable.
                let rows = shape[0];
                let whole_rows = shape.len() > 1 || !dtype.is_quantized();
                let out = whole_rows
                    .then(|| unpermute_rows(bytes, rows, n_heads))
                    .flatten();
                Cow::Owned(out.ok_or_else(|| {
                    self.error(format!(
                        "tensor {name} ({dtype}, shape {shape:?}) cannot be split into {n_heads} \
                         heads of two equal row halves"
                    ))
                })?)
            }
        };
        Ok(Some(HostTensor { dtype, shape, data }))
    }
}

#[cfg(test)]
mod tests {
    use super::unpermute_rows;

    #[test]
    fn unpermute_rows_handles_edges() {
        assert_eq!(unpermute_rows(&[], 0, 2), Some(vec![]));
        assert_eq!(unpermute_rows(&[0; 6], 6, 2), None); // 6 rows are not 2 heads of even halves
        assert_eq!(unpermute_rows(&[0; 4], 4, 0), None);
        // one head of width 4: stored rows (d, t) = 0:(0,0) 1:(0,1) 2:(1,0) 3:(1,1) -> HF t*2+d
        assert_eq!(
            unpermute_rows(&[10, 11, 12, 13], 4, 1),
            Some(vec![10, 12, 11, 13])
        );
    }
}
