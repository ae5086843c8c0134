//! Argument checks that every GPU backend makes before enqueuing an op, so that a bad size is an
//! error naming the op instead of an out-of-bounds access on the device.

use super::Heads;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Bytes of one weight row of `cols` values, which must be whole blocks.
pub fn row_bytes(dtype: DType, cols: usize, op: &str) -> Result<usize> {
    dtype.bytes_for(cols).ok_or_else(|| {
        Error::Device(format!(
            "{op}: rows of {cols} values are not a whole number of {dtype} blocks ({} values)",
            dtype.block_elems()
        ))
    })
}

/// Whether the KV cache holds f16 (else f32; nothing else is a cache dtype).
pub fn kv_is_f16(dtype: DType, op: &str) -> Result<bool> {
    match dtype {
        DType::F16 => Ok(true),
        DType::F32 => Ok(false),
        other => Err(Error::Device(format!(
            "{op}: KV cache dtype {other} (f16 or f32 only)"
        ))),
    }
}

/// Query heads split evenly over kv heads; head_dim even and at most `head_dim_max`.
pub fn heads(h: Heads, op: &str, head_dim_max: usize) -> Result<()> {
    if h.n_heads == 0 || h.n_kv_heads == 0 || h.n_heads % h.n_kv_heads != 0 {
        return Err(Error::Device(format!(
            "{op}: {} query heads do not split into groups over {} kv heads",
            h.n_heads, h.n_kv_heads
        )));
    }
    if h.head_dim == 0 || h.head_dim % 2 != 0 || h.head_dim > head_dim_max {
        return Err(Error::Device(format!(
            "{op}: head_dim {} (must be even and at most {head_dim_max} on this device)",
            h.head_dim
        )));
    }
    Ok(())
}
