//! Matmul and embedding on GGUF block formats (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), every GPU variant
//! against the CPU backend's reference decoding (src/quant_blocks.rs): every format, rows whose
//! byte length is not a multiple of 4, the mat-vec and tiled (cuBLAS) paths, weights bound in
//! row chunks (wgpu), and the fused projections (residual, norm + q/k/v, norm + gate/up). Conventions as in backend_parity.rs (poisoned outputs, normalised MSE, when
//! a missing device is a failure rather than a skip).

#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;
#[macro_use]
mod parity;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::Backend;
use anyllama::dtype::DType;
use parity::fused::FusedCase;
use parity::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

fn check_quant_embedding<B: Backend>(
    name: &str,
    gpu: &B,
    r: &mut ChaCha8Rng,
    dtype: DType,
    vocab: usize,
    dim: usize,
) {
    let cpu = Cpu::new();
    let bytes = quant_bytes(r, dtype, vocab, dim);
    let ids: Vec<u32> = (0..6).map(|_| r.random_range(0..vocab as u32)).collect();
    let n = ids.len();
    let mut oc = poisoned(&cpu, n * dim);
    let tc = raw_weight(&cpu, dtype, vocab, dim, &bytes);
    cpu.embedding(&mut oc, &u32_buf(&cpu, &ids), &tc, n)
        .unwrap();
    let mut og = poisoned(gpu, n * dim);
    let tg = raw_weight(gpu, dtype, vocab, dim, &bytes);
    gpu.embedding(&mut og, &u32_buf(gpu, &ids), &tg, n).unwrap();
    let what = format!("{name} embedding {dtype} vocab {vocab} dim {dim}");
    assert_close(
        &what,
        &read_f32(&cpu, &oc, n * dim),
        &read_f32(gpu, &og, n * dim),
        1e-12,
    );
}

fn check_quant_embeddings<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    for dtype in QUANTS {
        for &dim in quant_widths(dtype) {
            check_quant_embedding(name, gpu, r, dtype, 50, dim);
        }
    }
}

#[test]
fn embedding_decodes_every_block_format() {
    let mut r = rng(11);
    on_every_gpu!(check_quant_embeddings, &mut r);
    #[cfg(feature = "wgpu")]
    if let Some(gpu) = chunked() {
        for dtype in QUANTS {
            let dim = if dtype.block_elems() == 256 { 256 } else { 96 };
            check_quant_embedding("chunked", gpu, &mut r, dtype, 600, dim);
        }
    }
}

/// Matmul of a random weight in block format `dtype`.
fn check_quant_matmul<B: Backend>(
    name: &str,
    gpu: &B,
    r: &mut ChaCha8Rng,
    dtype: DType,
    shape: [usize; 3],
) {
    let bytes = quant_bytes(r, dtype, shape[1], shape[2]);
    check_matmul(name, gpu, r, dtype, shape, &bytes);
}

fn check_quant_matmuls<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    for dtype in QUANTS {
        for rows in [1, 4, 5, 9, 33] {
            for &k in quant_widths(dtype) {
                for n in [1, 49, 130] {
                    check_quant_matmul(name, gpu, r, dtype, [rows, n, k]);
                }
            }
        }
    }
}

#[test]
fn matmul_decodes_every_block_format() {
    let mut r = rng(12);
    on_every_gpu!(check_quant_matmuls, &mut r);
    #[cfg(feature = "wgpu")]
    if let Some(gpu) = chunked() {
        for dtype in QUANTS {
            for rows in [1, 9] {
                let k = if dtype.block_elems() == 256 { 256 } else { 96 };
                check_quant_matmul("chunked", gpu, &mut r, dtype, [rows, 400, k]);
            }
        }
    }
}

/// The fused projections (parity/fused.rs) on block-format weights: decode row counts (fused)
/// and a prefill one, every format and row width, with and without biases.
fn check_quant_fused<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    for dtype in QUANTS {
        for rows in [1, 3, 5, 9] {
            for &k in quant_widths(dtype) {
                for with_bias in [false, true] {
                    let weights = |r: &mut ChaCha8Rng, n| quant_bytes(r, dtype, n, k);
                    let case = FusedCase::new(r, dtype, [rows, 49, k], with_bias, weights);
                    case.check(name, gpu);
                }
            }
        }
    }
}

#[test]
fn fused_projections_decode_every_block_format() {
    let mut r = rng(13);
    on_every_gpu!(check_quant_fused, &mut r);
}
