//! Block formats: hand-built blocks checked against the format definitions, random blocks against
//! gguf-py's dequantization, and the Q8_0 / Q4_0 / Q4_1 quantizers against gguf-py's (which is
//! bit-exact with ggml's reference).

use crate::common::*;
use anyllama::dtype::DType;
use anyllama::quant::dequantize;
use anyllama::quant_blocks::quantize_blocks;
use half::f16;

fn dtype(name: &str) -> DType {
    match name {
        "Q8_0" => DType::Q8_0,
        "Q4_0" => DType::Q4_0,
        "Q4_1" => DType::Q4_1,
        "Q4_K" => DType::Q4K,
        "Q6_K" => DType::Q6K,
        other => panic!("unexpected type {other}"),
    }
}

fn decode(dt: DType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / dt.block_bytes() * dt.block_elems();
    let mut out = vec![f32::NAN; n];
    dequantize(dt, bytes, &mut out);
    out
}

fn h(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

#[test]
fn q4_0_block_by_hand() {
    // d = 0.5; byte j holds value j (low nibble) and value j+16 (high nibble).
    let mut b = h(0.5).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = decode(DType::Q4_0, &b);
    for j in 0..16 {
        assert_eq!(got[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(got[j + 16], ((15 - j) as f32 - 8.0) * 0.5);
    }
}

#[test]
fn q4_1_and_q8_0_blocks_by_hand() {
    let mut b = h(0.25).to_vec();
    b.extend(h(-1.0));
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let got = decode(DType::Q4_1, &b);
    for j in 0..16 {
        assert_eq!(got[j], j as f32 * 0.25 - 1.0);
        assert_eq!(got[j + 16], j as f32 * 0.25 - 1.0);
    }
    let mut b = h(-0.125).to_vec();
    b.extend((0..32).map(|j| (j * 8 - 128) as i8 as u8));
    let got = decode(DType::Q8_0, &b);
    for (j, &g) in got.iter().enumerate() {
        assert_eq!(g, (j as f32 * 8.0 - 128.0) * -0.125);
    }
}

#[test]
fn q4_k_block_by_hand() {
    // Eight sub-blocks of 32 with 6-bit scales and mins, packed into 12 bytes as ggml's
    // quantize_row_q4_K_ref packs them: bytes 0-3 / 4-7 hold sub-blocks 0-3's scale / min in
    // their low 6 bits and the top 2 bits of sub-blocks 4-7's; bytes 8-11 hold sub-blocks 4-7's
    // low 4 bits of scale (low nibble) and min (high nibble).
    let sc: Vec<u8> = (0..8)
        .map(|j| j as u8 + 1 + if j >= 4 { 40 } else { 0 })
        .collect();
    let mn: Vec<u8> = (0..8)
        .map(|j| 2 * j as u8 + if j >= 4 { 33 } else { 0 })
        .collect();
    let mut scales = [0u8; 12];
    for j in 0..4 {
        scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        scales[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        scales[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
    }
    let q = |i: usize| ((i * 7) % 16) as u8;
    // Value i sits in group g = i / 64: byte 32g + (i % 32), low nibble for the first 32 values
    // of the group, high nibble for the next 32.
    let mut qs = [0u8; 128];
    for i in 0..256 {
        let (g, within) = (i / 64, i % 64);
        let byte = &mut qs[32 * g + within % 32];
        *byte |= if within < 32 { q(i) } else { q(i) << 4 };
    }
    let (d, dmin) = (2.0f32, 0.5f32);
    let mut b = h(d).to_vec();
    b.extend(h(dmin));
    b.extend(scales);
    b.extend(qs);
    let got = decode(DType::Q4K, &b);
    for (i, &g) in got.iter().enumerate() {
        let j = i / 32;
        let want = d * sc[j] as f32 * q(i) as f32 - dmin * mn[j] as f32;
        assert_eq!(g, want, "value {i}");
    }
}

#[test]
fn q6_k_block_by_hand() {
    // 6-bit values L (stored as q + 32) with the low 4 bits in ql and the high 2 in qh, packed as
    // ggml's quantize_row_q6_K_ref does; sixteen signed 8-bit scales, one per 16 values.
    let level = |i: usize| ((i * 5) % 64) as u8;
    let sc: Vec<i8> = (0..16).map(|k| (k * 9 - 70) as i8).collect();
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for half in 0..2 {
        let j = 128 * half;
        for l in 0..32 {
            let lv = |k: usize| level(j + l + 32 * k);
            ql[64 * half + l] = (lv(0) & 0xf) | ((lv(2) & 0xf) << 4);
            ql[64 * half + l + 32] = (lv(1) & 0xf) | ((lv(3) & 0xf) << 4);
            qh[32 * half + l] =
                (lv(0) >> 4) | ((lv(1) >> 4) << 2) | ((lv(2) >> 4) << 4) | ((lv(3) >> 4) << 6);
        }
    }
    let d = 0.03125f32;
    let mut b = ql.to_vec();
    b.extend(qh);
    b.extend(sc.iter().map(|&s| s as u8));
    b.extend(h(d));
    let got = decode(DType::Q6K, &b);
    for (i, &g) in got.iter().enumerate() {
        let want = d * sc[i / 16] as f32 * (level(i) as i32 - 32) as f32;
        assert_eq!(g, want, "value {i}");
    }
}

#[test]
fn random_blocks_decode_like_gguf_py() {
    let fixture = load_json("quant_blocks.json");
    let cases = fixture["dequantize"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        let dt = dtype(case["type"].as_str().unwrap());
        let got = decode(dt, &hex(case["bytes"].as_str().unwrap()));
        let want = f32_list(&case["values"]);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{dt} value {i}: {g} vs {w}");
        }
    }
}

#[test]
fn quantizers_match_gguf_py_bit_for_bit() {
    let fixture = load_json("quant_blocks.json");
    for case in fixture["quantize"].as_array().unwrap() {
        let dt = dtype(case["type"].as_str().unwrap());
        let x = f32_list(&case["values"]);
        let got = quantize_blocks(dt, &x).unwrap();
        assert_eq!(got, hex(case["bytes"].as_str().unwrap()), "{dt}");
        // and the round trip stays within one quantization step (Q4_0 clips the far end)
        let back = decode(dt, &got);
        for (xb, yb) in x.chunks(32).zip(back.chunks(32)) {
            let range = xb.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
            let step = range / if dt == DType::Q8_0 { 254.0 } else { 15.0 };
            for (a, b) in xb.iter().zip(yb) {
                assert!((a - b).abs() <= step + range * 1e-3, "{dt}: {a} -> {b}");
            }
        }
    }
    assert!(quantize_blocks(DType::Q4K, &[0.0; 256]).is_none());
    assert!(quantize_blocks(DType::Q8_0, &[0.0; 31]).is_none());
}
