//! GGUF block formats, decoded to f32 exactly as ggml defines them (ggml-common.h / ggml-quants.c),
//! plus ggml's reference quantizers for Q8_0, Q4_0 and Q4_1. A block packs a run of values along a
//! row with its own f16 scale; every row of a tensor is a whole number of blocks.
//!
//! Q8_0  (32 values, 34 bytes):  d:f16, q:i8[32]                     x = d * q
//! Q4_0  (32 values, 18 bytes):  d:f16, q:u8[16] (two 4-bit values)  x = d * (q - 8)
//! Q4_1  (32 values, 20 bytes):  d:f16, m:f16, q:u8[16]              x = d * q + m
//!   In both 4-bit formats byte j holds value j in its low nibble and value j+16 in its high one.
//! Q4_K  (256 values, 144 bytes): d:f16, dmin:f16, scales:u8[12], q:u8[128]
//!   Eight sub-blocks of 32 values, each with a 6-bit scale and a 6-bit min packed in `scales`:
//!   x = d * scale * q - dmin * min, q a 4-bit value.
//! Q6_K  (256 values, 210 bytes): ql:u8[128], qh:u8[64], scales:i8[16], d:f16
//!   Sixteen sub-blocks of 16 values with an 8-bit signed scale; each 6-bit value has its low four
//!   bits in `ql` and its high two in `qh`: x = d * scale * (q - 32).

use crate::dtype::DType;
use half::f16;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decode `out.len()` values stored as block format `dtype` in `bytes`
/// (exactly `dtype.bytes_for(out.len())` bytes).
pub fn dequantize_blocks(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    assert!(dtype.is_quantized(), "{dtype} is not a block format");
    assert_eq!(
        Some(bytes.len()),
        dtype.bytes_for(out.len()),
        "{dtype}: byte/value count mismatch"
    );
    let blocks = bytes.chunks_exact(dtype.block_bytes());
    let outs = out.chunks_exact_mut(dtype.block_elems());
    for (b, y) in blocks.zip(outs) {
        match dtype {
            DType::Q8_0 => q8_0_block(b, y),
            DType::Q4_0 => q4_0_block(b, y),
            DType::Q4_1 => q4_1_block(b, y),
            DType::Q4K => q4_k_block(b, y),
            DType::Q6K => q6_k_block(b, y),
            DType::F32 | DType::F16 | DType::BF16 => unreachable!("checked above"),
        }
    }
}

fn q8_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (o, &q) in y.iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

fn q4_0_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0f) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// Scale and min of sub-block `j` (0..8) from Q4_K's 12 packed bytes: sub-blocks 0-3 keep
/// theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 put their low
/// 4 bits in the nibbles of bytes 8-11 and their top 2 bits in the spare high bits of bytes 0-7.
pub fn q4_k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn q4_k_block(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    // Four groups of 64 values: 32 bytes each, low nibbles first, then high nibbles.
    for g in 0..4 {
        let (sc1, m1) = q4_k_scale_min(2 * g, scales);
        let (sc2, m2) = q4_k_scale_min(2 * g + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * g..32 * g + 32];
        let y = &mut y[64 * g..64 * g + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0f) as f32 - min1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

fn q6_k_block(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    // Two halves of 128 values: 64 bytes of ql, 32 of qh and 8 scales each.
    for n in 0..2 {
        let ql = &ql_all[64 * n..64 * n + 64];
        let qh = &qh_all[32 * n..32 * n + 32];
        let sc = &sc_all[8 * n..8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |i: usize| d * (sc[i] as i8) as f32;
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

/// Encode `x` (a whole number of 32-value blocks) as Q8_0, Q4_0 or Q4_1, with ggml's reference
/// rounding (`quantize_row_*_ref`). Returns None for another dtype or a partial block.
pub fn quantize_blocks(dtype: DType, x: &[f32]) -> Option<Vec<u8>> {
    let quantize_block: fn(&[f32], &mut [u8]) = match dtype {
        DType::Q8_0 => quantize_q8_0_block,
        DType::Q4_0 => quantize_q4_0_block,
        DType::Q4_1 => quantize_q4_1_block,
        _ => return None,
    };
    let mut out = vec![0u8; dtype.bytes_for(x.len())?];
    for (xb, b) in x
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(dtype.block_bytes()))
    {
        quantize_block(xb, b);
    }
    Some(out)
}

fn put_f16(b: &mut [u8], i: usize, v: f32) {
    b[i..i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// C's `roundf`: halves away from zero (Rust's `f32::round` does the same).
fn quantize_q8_0_block(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    for (q, &v) in b[2..34].iter_mut().zip(x) {
        *q = ((v * id).round() as i8) as u8;
    }
}

fn quantize_q4_0_block(x: &[f32], b: &mut [u8]) {
    // The value of largest magnitude (the first one on ties) keeps its sign, so that it maps
    // exactly to -8 and the 16 levels cover [-8d, 7d] with the extreme at the wide end.
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    for j in 0..16 {
        // `as i8` truncates like C's (int8_t) cast, and saturates instead of wrapping.
        let lo = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let hi = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        b[2 + j] = lo | (hi << 4);
    }
}

fn quantize_q4_1_block(x: &[f32], b: &mut [u8]) {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    for j in 0..16 {
        let lo = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let hi = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        b[4 + j] = lo | (hi << 4);
    }
}
