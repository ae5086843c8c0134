//! Reference decoding of every weight storage type to f32, one row (or any run of whole blocks) at
//! a time. The CPU backend's matmul and embedding use this; GPU kernels are tested against it.

use crate::dtype::DType;
use half::{bf16, f16};

/// Decode `out.len()` values stored as `dtype` in `bytes` (exactly `dtype.bytes_for(out.len())`).
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(Some(bytes.len()), dtype.bytes_for(out.len()));
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q4K | DType::Q6K => {
            crate::quant_blocks::dequantize_blocks(dtype, bytes, out)
        }
    }
}
