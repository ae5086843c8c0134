//! Every `TrainBackend` op and the two batched forward ops (rope_rows, attention_packed) of the
//! CUDA backend against the CPU reference (src/backend/cpu_train.rs, itself checked against
//! finite differences by tests/train_grad.rs), on the same inputs, over shapes that hit the
//! kernels' edges: one row, odd widths, GQA ratios 1/3/4, several packed sequences of unequal
//! length (longer than a tile, and of one row), pos0 > 0, every head-size variant, every weight
//! dtype of matmul_dx, a loss over more than one chunk of logits. Activation-gradient outputs
//! are poisoned with NaN first (they must overwrite); parameter gradients start non-zero (they
//! must accumulate). Any NaN fails; floats are compared by normalised MSE. CUDA's training
//! math is f32, so one bound, TOL_F32, serves every op on the exact variant and every op but the
//! products on the default one, whose GEMMs round their operands to bf16 (bounds from parity's
//! rounding estimate: matmul_dx_tolerance, matmul_dw_tolerance) or, for the f32 GEMMs of
//! LoRA-thin or unaligned shapes, to TF32 (TOL_TF32_GEMM).
//!
//! Each case is one generic function run on the CPU and on the GPU with the same inputs.
//! Without a CUDA driver the tests print SKIPPED and pass, except when ANYLLAMA_REQUIRE_CUDA is
//! set (the NVIDIA test machine sets it).

#![cfg(feature = "cuda")]

mod common;
#[allow(unused_macros)]
mod parity;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::cuda::Cuda;
use anyllama::backend::train::{AdamW, TrainBackend};
use anyllama::backend::Backend;
use anyllama::batch::Batch;
use anyllama::dtype::DType;
use parity::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Runs `f(name, gpu, rng)` on both CUDA variants (their prefill GEMMs and matmul backward
/// differ; training's other ops are f32 in both, and either is what some caller trains on).
fn on_cudas(seed: u64, mut f: impl FnMut(&str, &Cuda, &mut ChaCha8Rng)) {
    with_cudas(|cudas| {
        for (name, gpu) in cudas {
            f(name, gpu, &mut rng(seed));
        }
    });
}

/// Compares each output of a case, CPU against GPU.
fn compare(what: &str, parts: &[&str], cpu: &[Vec<f32>], gpu: &[Vec<f32>]) {
    for ((part, c), g) in parts.iter().zip(cpu).zip(gpu) {
        assert_close(&format!("{what} {part}"), c, g, TOL_F32);
    }
}

/// As assert_close at TOL_F32, with the error normalised by at least `floor` per element: for a
/// gradient that cancels to about zero (a one-row sequence's dq and dk are exactly 0; rms_norm's
/// dx over one column is eps-small) float rounding of its terms is all either side computes,
/// so it is measured against the size of those terms (`floor`, a mean square), not its own.
fn assert_close_floor(what: &str, cpu: &[f32], gpu: &[f32], floor: f64) {
    let den: f64 = cpu.iter().map(|v| (*v as f64).powi(2)).sum();
    let floor_total = floor * cpu.len() as f64;
    if den >= floor_total {
        return assert_close(what, cpu, gpu, TOL_F32);
    }
    // Scale both so that the reference's squares sum to the floor's: the same bound then holds.
    assert_close(what, cpu, gpu, TOL_F32 * floor_total / den.max(1e-30));
}

fn mean_square(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len().max(1) as f64
}

// ---- vector ops ----

fn run_vector_ops<B: TrainBackend>(b: &B, x: &[f32], y: &[f32]) -> Vec<Vec<f32>> {
    let n = x.len();
    let xb = f32_buf(b, x);
    // zero: NaN in, zeros out, and the value past n untouched.
    let mut z = poisoned(b, n + 1);
    b.zero(&mut z, n).unwrap();
    let mut z = read_f32(b, &z, n + 1);
    assert!(z[n].is_nan(), "{}: zero wrote past n", b.name());
    z.truncate(n);
    let mut yb = f32_buf(b, y);
    b.axpy(&mut yb, &xb, -0.75, n).unwrap();
    // sum_squares adds to what out[0] holds.
    let mut s = f32_buf(b, &[1.5]);
    b.sum_squares(&mut s, &xb, n).unwrap();
    vec![z, read_f32(b, &yb, n), read_f32(b, &s, 1)]
}

#[test]
fn zero_axpy_sum_squares() {
    on_cudas(1, |name, gpu, r| {
        for n in [1, 7, 1000, 100_003, 3_000_001] {
            let (x, y) = (randn(r, n, 2.0), randn(r, n, 1.0));
            let c = run_vector_ops(&Cpu::new(), &x, &y);
            let g = run_vector_ops(gpu, &x, &y);
            assert!(g[0].iter().all(|v| *v == 0.0), "{name} zero n {n}");
            compare(
                &format!("{name} n {n}"),
                &["axpy", "sum_squares"],
                &c[1..],
                &g[1..],
            );
        }
    });
}

// ---- matmul backward ----

/// The bytes of an n x k weight in `dtype`: random floats encoded, or random GGUF blocks.
fn weight_bytes(r: &mut ChaCha8Rng, dtype: DType, n: usize, k: usize) -> Vec<u8> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => encode(dtype, &randn(r, n * k, 1.0)),
        _ => quant_bytes(r, dtype, n, k),
    }
}

fn run_matmul_dx<B: TrainBackend>(
    b: &B,
    dtype: DType,
    [rows, n, k]: [usize; 3],
    bytes: &[u8],
    dy: &[f32],
) -> Vec<f32> {
    let w = raw_weight(b, dtype, n, k, bytes);
    let mut dx = poisoned(b, rows * k);
    b.matmul_dx(&mut dx, &f32_buf(b, dy), &w, rows, 0.5)
        .unwrap_or_else(|e| panic!("{} matmul_dx {dtype}: {e}", b.name()));
    read_f32(b, &dx, rows * k)
}

/// The default variant's f32 GEMMs (cuBLAS with CUBLAS_COMPUTE_32F_FAST_TF32) round both
/// operands to TF32, 11 significant bits: a relative error of at most 2^-11 per operand, an
/// rms of about 2^-11 / sqrt(3) = 2.8e-4, so a product of two carries a normalised variance
/// of about 2 x 2.8e-4^2 = 1.6e-7 (measured on the H200: 6.6e-8 to 1.0e-7). Bound: 1e-6.
const TOL_TF32_GEMM: f64 = 1e-6;

/// The bound of an f32 GEMM on variant `name`: f32 on the exact variant, TF32 on the default.
fn f32_gemm_tolerance(name: &str) -> f64 {
    match name == CUDA_HALF_GEMM {
        true => TOL_TF32_GEMM,
        false => TOL_F32,
    }
}

/// The bound for matmul_dx on variant `name`: the default variant runs on bf16 tensor cores
/// for weights that are not f32 when both widths are whole octets, rounding dy (and the
/// weight, unless stored as bf16) to bf16, and on TF32 otherwise.
fn matmul_dx_tolerance(name: &str, dtype: DType, n: usize, k: usize) -> f64 {
    let half = name == CUDA_HALF_GEMM && dtype != DType::F32 && n % 8 == 0 && k % 8 == 0;
    match dtype {
        _ if !half => f32_gemm_tolerance(name),
        DType::BF16 => TOL_BF16_GEMM,
        _ => TOL_BF16_TRAIN_GEMM,
    }
}

/// The bound for matmul_dw on variant `name` (the default variant's size rule: parity's
/// CUDA_HALF_DW_MIN_ROWS and CUDA_HALF_DW_MIN_SIDE).
fn matmul_dw_tolerance(name: &str, [rows, n, k]: [usize; 3]) -> f64 {
    let half = name == CUDA_HALF_GEMM
        && rows >= CUDA_HALF_DW_MIN_ROWS
        && n.min(k) >= CUDA_HALF_DW_MIN_SIDE
        && n % 8 == 0
        && k % 8 == 0;
    if half {
        TOL_BF16_TRAIN_GEMM
    } else {
        f32_gemm_tolerance(name)
    }
}

/// Checks a matmul backward result, printing the normalised MSE of the bf16 cases.
fn check_matmul_backward(what: &str, cpu: &[f32], gpu: &[f32], tol: f64) {
    if tol > TOL_F32 {
        eprintln!(
            "{what}: normalised MSE {:.2e} (bound {tol:.0e})",
            common::nmse(gpu, cpu)
        );
    }
    assert_close(what, cpu, gpu, tol);
}

#[test]
fn matmul_dx_every_weight_dtype() {
    on_cudas(2, |name, gpu, r| {
        let mut cases = vec![];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // k = 7 and 49: rows that are not whole octets (the scalar widening); n = 5 and
            // 300 (and those) keep the default variant on f32; the rest take its bf16 GEMMs.
            for shape in [
                [1, 5, 7],
                [3, 64, 48],
                [33, 96, 49],
                [64, 300, 576],
                [1, 8, 8],
                [130, 256, 320],
                [9, 2048, 64],
            ] {
                cases.push((dtype, shape));
            }
        }
        for dtype in QUANTS {
            for &k in quant_widths(dtype) {
                for rows in [1, 17] {
                    cases.push((dtype, [rows, 40, k]));
                }
            }
        }
        for (dtype, shape) in cases {
            let [rows, n, k] = shape;
            let bytes = weight_bytes(r, dtype, n, k);
            let dy = randn(r, rows * n, 1.0);
            let c = run_matmul_dx(&Cpu::new(), dtype, shape, &bytes, &dy);
            let g = run_matmul_dx(gpu, dtype, shape, &bytes, &dy);
            let what = format!("{name} matmul_dx {dtype} rows {rows} n {n} k {k}");
            check_matmul_backward(&what, &c, &g, matmul_dx_tolerance(name, dtype, n, k));
        }
    });
}

fn run_matmul_dw<B: TrainBackend>(
    b: &B,
    [rows, n, k]: [usize; 3],
    dy: &[f32],
    x: &[f32],
    dw0: &[f32],
) -> Vec<f32> {
    let mut dw = f32_buf(b, dw0);
    b.matmul_dw(&mut dw, &f32_buf(b, dy), &f32_buf(b, x), rows, n, k, 1.5)
        .unwrap();
    read_f32(b, &dw, n * k)
}

#[test]
fn matmul_dw_accumulates() {
    on_cudas(3, |name, gpu, r| {
        // The last three take the default variant's bf16 GEMM (its size rule), the first
        // four do not (one row; 17 rows; n = 7; a side of 64, a LoRA rank).
        for shape in [
            [1, 5, 3],
            [17, 96, 130],
            [64, 7, 576],
            [300, 64, 576],
            [64, 72, 576],
            [200, 96, 136],
            [257, 512, 80],
        ] {
            let [rows, n, k] = shape;
            let (dy, x) = (randn(r, rows * n, 1.0), randn(r, rows * k, 1.0));
            let dw0 = randn(r, n * k, 1.0);
            let c = run_matmul_dw(&Cpu::new(), shape, &dy, &x, &dw0);
            let g = run_matmul_dw(gpu, shape, &dy, &x, &dw0);
            let what = format!("{name} matmul_dw rows {rows} n {n} k {k}");
            check_matmul_backward(&what, &c, &g, matmul_dw_tolerance(name, shape));
        }
    });
}

/// Milliseconds per call of `f`: 3 calls to warm up, then the mean of 20, the device synchronised
/// before and after.
fn time_ms(gpu: &Cuda, mut f: impl FnMut()) -> f64 {
    const CALLS: usize = 20;
    for _ in 0..3 {
        f();
    }
    gpu.sync().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..CALLS {
        f();
    }
    gpu.sync().unwrap();
    t.elapsed().as_secs_f64() * 1e3 / CALLS as f64
}

/// Times matmul_dx and matmul_dw on both CUDA variants at model sizes (the exact variant runs
/// them in f32, the default one on bf16 tensor cores): run with `--ignored --nocapture`.
#[test]
#[ignore]
fn matmul_backward_timing() {
    on_cudas(12, |name, gpu, r| {
        let dx_cases = [
            (DType::BF16, [8192, 2048, 2048]),
            (DType::BF16, [8192, 8192, 2048]),
            (DType::BF16, [8192, 2048, 8192]),
            (DType::F16, [8192, 2048, 2048]),
            (DType::Q8_0, [8192, 8192, 2048]),
            (DType::Q4K, [8192, 8192, 2048]),
            (DType::BF16, [16, 2048, 2048]),
        ];
        for (dtype, [rows, n, k]) in dx_cases {
            let w = raw_weight(gpu, dtype, n, k, &weight_bytes(r, dtype, n, k));
            let dy = f32_buf(gpu, &randn(r, rows * n, 1.0));
            let mut dx = gpu.alloc(rows * k * 4).unwrap();
            let ms = time_ms(gpu, || {
                gpu.matmul_dx(&mut dx, &dy, &w, rows, 1.0).unwrap();
            });
            let tflops = 2.0 * (rows * n * k) as f64 / (ms * 1e-3) / 1e12;
            eprintln!(
                "timing {name} matmul_dx {dtype} rows {rows} n {n} k {k}: {ms:.3} ms \
                 ({tflops:.0} TFLOP/s)"
            );
        }
        let dw_cases = [
            [8192, 2048, 2048],
            [8192, 8192, 2048],
            [8192, 2048, 8192],
            [8192, 72, 2048],
            [8192, 2048, 72],
            [8192, 16, 2048],
            [64, 2048, 2048],
            [128, 2048, 2048],
        ];
        for [rows, n, k] in dw_cases {
            let dy = f32_buf(gpu, &randn(r, rows * n, 1.0));
            let x = f32_buf(gpu, &randn(r, rows * k, 1.0));
            let mut dw = f32_buf(gpu, &vec![0.0; n * k]);
            let ms = time_ms(gpu, || {
                gpu.matmul_dw(&mut dw, &dy, &x, rows, n, k, 1.0).unwrap();
            });
            let tflops = 2.0 * (rows * n * k) as f64 / (ms * 1e-3) / 1e12;
            eprintln!(
                "timing {name} matmul_dw rows {rows} n {n} k {k}: {ms:.3} ms ({tflops:.0} TFLOP/s)"
            );
        }
    });
}

// ---- rms_norm, swiglu, embedding ----

/// [dx, dweight] of rms_norm_backward (dweight starts at dw0; with `with_dw` false it must stay).
fn run_rms_norm_backward<B: TrainBackend>(
    b: &B,
    (rows, dim, with_dw): (usize, usize, bool),
    [x, dy, w, dw0]: [&[f32]; 4],
) -> Vec<Vec<f32>> {
    let mut dx = poisoned(b, rows * dim);
    let mut dw = f32_buf(b, dw0);
    let (dyb, xb, wb) = (f32_buf(b, dy), f32_buf(b, x), f32_buf(b, w));
    let dweight = with_dw.then_some(&mut dw);
    b.rms_norm_backward(&mut dx, dweight, &dyb, &xb, &wb, rows, dim, 1e-5)
        .unwrap();
    vec![read_f32(b, &dx, rows * dim), read_f32(b, &dw, dim)]
}

#[test]
fn rms_norm_backward_dx_and_dweight() {
    on_cudas(4, |name, gpu, r| {
        for (rows, dim) in [(1, 576), (7, 49), (3, 1536), (5, 1), (300, 64), (70, 5000)] {
            let (x, dy) = (randn(r, rows * dim, 3.0), randn(r, rows * dim, 1.0));
            let (w, dw0) = (randn(r, dim, 1.0), randn(r, dim, 1.0));
            for with_dw in [false, true] {
                let case = (rows, dim, with_dw);
                let inputs = [&x[..], &dy, &w, &dw0];
                let c = run_rms_norm_backward(&Cpu::new(), case, inputs);
                let g = run_rms_norm_backward(gpu, case, inputs);
                let what = format!("{name} rms_norm_backward rows {rows} dim {dim} dw {with_dw}");
                // dx's terms are of the size of dy * w * rstd.
                let rstd: Vec<f32> = x
                    .chunks_exact(dim)
                    .map(|xr| (mean_square(xr) as f32 + 1e-5).sqrt().recip())
                    .collect();
                let terms: Vec<f32> = (0..rows * dim)
                    .map(|i| dy[i] * w[i % dim] * rstd[i / dim])
                    .collect();
                assert_close_floor(&format!("{what} dx"), &c[0], &g[0], mean_square(&terms));
                assert_close(&format!("{what} dweight"), &c[1], &g[1], TOL_F32);
            }
        }
    });
}

fn run_swiglu_backward<B: TrainBackend>(b: &B, [dout, gate, up]: [&[f32]; 3]) -> Vec<Vec<f32>> {
    let n = dout.len();
    let (mut dg, mut du) = (poisoned(b, n), poisoned(b, n));
    let (d, g, u) = (f32_buf(b, dout), f32_buf(b, gate), f32_buf(b, up));
    b.swiglu_backward(&mut dg, &mut du, &d, &g, &u, n).unwrap();
    vec![read_f32(b, &dg, n), read_f32(b, &du, n)]
}

#[test]
fn swiglu_backward_both_inputs() {
    on_cudas(5, |name, gpu, r| {
        for n in [1, 7, 1000, 65_537] {
            let (d, g, u) = (randn(r, n, 1.0), randn(r, n, 6.0), randn(r, n, 2.0));
            let c = run_swiglu_backward(&Cpu::new(), [&d, &g, &u]);
            let gg = run_swiglu_backward(gpu, [&d, &g, &u]);
            compare(
                &format!("{name} swiglu_backward n {n}"),
                &["dgate", "dup"],
                &c,
                &gg,
            );
        }
    });
}

fn run_embedding_backward<B: TrainBackend>(
    b: &B,
    dim: usize,
    table0: &[f32],
    dout: &[f32],
    ids: &[u32],
) -> Vec<f32> {
    let mut dt = f32_buf(b, table0);
    b.embedding_backward(&mut dt, &f32_buf(b, dout), &u32_buf(b, ids), ids.len(), dim)
        .unwrap();
    read_f32(b, &dt, table0.len())
}

#[test]
fn embedding_backward_scatters_repeated_tokens() {
    on_cudas(6, |name, gpu, r| {
        for (vocab, dim, n) in [(50, 576, 9), (700, 7, 300), (5, 1, 1), (3, 64, 200)] {
            // Few distinct ids among many tokens: rows receive many adds.
            let ids: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
            let (table0, dout) = (randn(r, vocab * dim, 1.0), randn(r, n * dim, 1.0));
            let c = run_embedding_backward(&Cpu::new(), dim, &table0, &dout, &ids);
            let g = run_embedding_backward(gpu, dim, &table0, &dout, &ids);
            let what = format!("{name} embedding_backward vocab {vocab} dim {dim} tokens {n}");
            assert_close(&what, &c, &g, TOL_F32);
        }
    });
}

// ---- rope and attention over packed batches ----

/// Sequence layouts: lengths and first positions.
const PACKINGS: [(&[usize], &[usize]); 4] = [
    (&[1], &[0]),
    (&[37], &[5]),
    (&[5, 17, 1, 40], &[0, 3, 100, 0]),
    (&[100, 33], &[0, 7]),
];

/// HF's default inverse frequencies for head_dim (theta 10000).
fn inv_freq(head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32))
        .collect()
}

/// [rope_rows(x), rope_backward(x)] over a packed batch.
fn run_rope<B: TrainBackend>(
    b: &B,
    (lens, pos0): (&[usize], &[usize]),
    (n_heads, head_dim, attn_scale): (usize, usize, f32),
    x: &[f32],
) -> Vec<Vec<f32>> {
    let batch = Batch::new(b, lens, pos0).unwrap();
    let f = f32_buf(b, &inv_freq(head_dim));
    let rows = batch.rows;
    let (mut fwd, mut bwd) = (f32_buf(b, x), f32_buf(b, x));
    b.rope_rows(
        &mut fwd, &f, &batch.pos, rows, n_heads, head_dim, attn_scale,
    )
    .unwrap();
    b.rope_backward(
        &mut bwd, &f, &batch.pos, rows, n_heads, head_dim, attn_scale,
    )
    .unwrap();
    vec![read_f32(b, &fwd, x.len()), read_f32(b, &bwd, x.len())]
}

#[test]
fn rope_rows_and_backward() {
    on_cudas(7, |name, gpu, r| {
        for packing in PACKINGS {
            for (n_heads, head_dim, scale) in
                [(1, 2, 1.0), (3, 64, 1.0), (2, 10, 1.2), (8, 128, 0.9)]
            {
                let rows: usize = packing.0.iter().sum();
                let x = randn(r, rows * n_heads * head_dim, 1.0);
                let shape = (n_heads, head_dim, scale);
                let c = run_rope(&Cpu::new(), packing, shape, &x);
                let g = run_rope(gpu, packing, shape, &x);
                let what = format!("{name} rope {packing:?} heads {n_heads} hd {head_dim}");
                compare(&what, &["rope_rows", "rope_backward"], &c, &g);
            }
        }
    });
}

/// Sequence layouts of the attention case: PACKINGS, and one that takes the tensor-core kernels
/// past two tiles of 64 rows, with sequences of unequal length (one of a single row, one of
/// exactly a tile).
const ATTN_PACKINGS: [(&[usize], &[usize]); 5] = [
    PACKINGS[0],
    PACKINGS[1],
    PACKINGS[2],
    PACKINGS[3],
    (&[150, 1, 64, 23], &[0, 0, 0, 0]),
];

/// Normalised MSE bound for the default variant's tensor-core attention (head sizes 64 and 128,
/// shaders/cuda/attention_train_mma.cu), which rounds Q, K, V, dout and the weights P and dS to
/// bf16 before f32-accumulated products. bf16 keeps 8 significant bits, so each rounding errs by
/// a relative delta with E[delta^2] <= u^2 / 3 ~ 5.1e-6 (u = 2^-8; about half that for evenly
/// spread mantissas). These inputs (uniform in [-1, 1], scale 1/sqrt(head_dim)) give scaled
/// scores with E[s^2] = 1/9, and the roundings reach the outputs as follows:
/// - out and dv: a rounded V (or dout) and P carry their delta straight through; rounded Q and
///   K move each score by a variance 2 E[s^2] E[delta^2] and each weight by that relatively:
///   ~2.2 E[delta^2] in all.
/// - lse: the scores' error only, at most ~2 E[delta^2] (a one-row sequence, where lse = s).
/// - dq and dk: dS = P (dP - D) takes the errors of P and of dP (dout and V rounded), then its
///   own rounding and that of K (or Q) in the last product: ~5 E[delta^2].
///
/// So ~2.6e-5 at most; the bound leaves a margin of ~20x for the spread over small cases, and a
/// single wrong value in the smallest case here (128 values) already exceeds it.
const TOL_BF16_ATTENTION: f64 = 5e-4;

/// The bound for attention_packed and attention_backward on variant `name`: the default
/// variant's tensor-core kernels at head sizes 64 and 128, f32 everywhere else.
fn packed_attention_tolerance(name: &str, head_dim: usize) -> f64 {
    if name == CUDA_HALF_GEMM && (head_dim == 64 || head_dim == 128) {
        TOL_BF16_ATTENTION
    } else {
        TOL_F32
    }
}

/// As assert_close_floor at bound `tol` (floor 0: none), printing the normalised MSE (over the
/// floor, where it applies) of the cases held to a half-precision bound.
fn check_attention(what: &str, cpu: &[f32], gpu: &[f32], floor: f64, tol: f64) {
    let den: f64 = cpu.iter().map(|v| (*v as f64).powi(2)).sum();
    let floor_total = floor * cpu.len() as f64;
    let widen = if den >= floor_total {
        1.0
    } else {
        floor_total / den.max(1e-30)
    };
    if tol > TOL_F32 {
        let floored = if widen > 1.0 { " over the floor" } else { "" };
        eprintln!(
            "{what}: normalised MSE {:.2e}{floored} (bound {tol:.0e})",
            common::nmse(gpu, cpu) / widen
        );
    }
    assert_close(what, cpu, gpu, tol * widen);
}

/// One attention case's inputs: q, k, v, dout.
struct AttnInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

/// [out, lse] of attention_packed, and (out also without lse).
fn run_attention_packed<B: TrainBackend>(
    b: &B,
    packing: (&[usize], &[usize]),
    h: anyllama::backend::Heads,
    a: &AttnInputs,
) -> Vec<Vec<f32>> {
    let batch = Batch::new(b, packing.0, packing.1).unwrap();
    let rows = batch.rows;
    let (q, k, v) = (f32_buf(b, &a.q), f32_buf(b, &a.k), f32_buf(b, &a.v));
    let qw = h.n_heads * h.head_dim;
    let (mut o, mut lse) = (poisoned(b, rows * qw), poisoned(b, rows * h.n_heads));
    b.attention_packed(&mut o, Some(&mut lse), &q, &k, &v, batch.view(), h)
        .unwrap();
    let mut o2 = poisoned(b, rows * qw);
    b.attention_packed(&mut o2, None, &q, &k, &v, batch.view(), h)
        .unwrap();
    vec![
        read_f32(b, &o, rows * qw),
        read_f32(b, &lse, rows * h.n_heads),
        read_f32(b, &o2, rows * qw),
    ]
}

/// [dq, dk, dv] of attention_backward from the given forward out and lse.
fn run_attention_backward<B: TrainBackend>(
    b: &B,
    packing: (&[usize], &[usize]),
    h: anyllama::backend::Heads,
    a: &AttnInputs,
    (out, lse): (&[f32], &[f32]),
) -> Vec<Vec<f32>> {
    let batch = Batch::new(b, packing.0, packing.1).unwrap();
    let rows = batch.rows;
    let (qw, kw) = (h.n_heads * h.head_dim, h.n_kv_heads * h.head_dim);
    let (q, k, v) = (f32_buf(b, &a.q), f32_buf(b, &a.k), f32_buf(b, &a.v));
    let (dout, ob, lb) = (f32_buf(b, &a.dout), f32_buf(b, out), f32_buf(b, lse));
    let mut dq = poisoned(b, rows * qw);
    let (mut dk, mut dv) = (poisoned(b, rows * kw), poisoned(b, rows * kw));
    b.attention_backward(
        &mut dq,
        &mut dk,
        &mut dv,
        &dout,
        &q,
        &k,
        &v,
        &ob,
        &lb,
        batch.view(),
        h,
    )
    .unwrap();
    vec![
        read_f32(b, &dq, rows * qw),
        read_f32(b, &dk, rows * kw),
        read_f32(b, &dv, rows * kw),
    ]
}

#[test]
fn attention_packed_and_backward() {
    // GQA ratios 1, 3, 4 (and 2 at the largest head size); head sizes of every kernel variant
    // (64 and 128 on both the tensor-core and the f32 kernels, GQA 1 and 4 at 64), and ones
    // that are not multiples of 32 (or of 4).
    let shapes = [
        heads(2, 2, 64),
        heads(8, 2, 64),
        heads(6, 2, 32),
        heads(8, 2, 128),
        heads(3, 1, 10),
        heads(4, 1, 96),
        heads(2, 1, 256),
    ];
    on_cudas(8, |name, gpu, r| {
        let cpu = Cpu::new();
        for packing in ATTN_PACKINGS {
            for h in shapes {
                let rows: usize = packing.0.iter().sum();
                let (qw, kw) = (h.n_heads * h.head_dim, h.n_kv_heads * h.head_dim);
                let tol = packed_attention_tolerance(name, h.head_dim);
                let a = AttnInputs {
                    q: randn(r, rows * qw, 1.0),
                    k: randn(r, rows * kw, 1.0),
                    v: randn(r, rows * kw, 1.0),
                    dout: randn(r, rows * qw, 1.0),
                };
                let what = format!("{name} attention {h:?} {packing:?}");
                let c = run_attention_packed(&cpu, packing, h, &a);
                let g = run_attention_packed(gpu, packing, h, &a);
                for (i, part) in ["out", "lse", "out (no lse)"].iter().enumerate() {
                    check_attention(&format!("{what} {part}"), &c[i], &g[i], 0.0, tol);
                }
                // The backward of both from the CPU's forward: each is checked on its own.
                let fwd = (&c[0][..], &c[1][..]);
                let c = run_attention_backward(&cpu, packing, h, &a, fwd);
                let g = run_attention_backward(gpu, packing, h, &a, fwd);
                // dq and dk are sums of P (dout . v - D) terms, of about dv's size.
                let floor = mean_square(&c[2]);
                for (i, part) in ["dq", "dk", "dv"].iter().enumerate() {
                    let what = format!("{what} backward {part}");
                    check_attention(&what, &c[i], &g[i], floor, tol);
                }
            }
        }
    });
}

// ---- loss, optimizer, weight stores ----

/// The inputs of a cross_entropy case: the classifier's bytes, x, labels, and dw's start.
type CeInputs<'a> = (&'a [u8], &'a [f32], &'a [i32], Option<&'a [f32]>);

/// [loss, dx, dw] of cross_entropy (dw accumulates from dw0 when given).
fn run_cross_entropy<B: TrainBackend>(
    b: &B,
    dtype: DType,
    (rows, vocab, dim): (usize, usize, usize),
    (w_bytes, x, labels, dw0): CeInputs,
    scale: f32,
) -> Vec<Vec<f32>> {
    let w = raw_weight(b, dtype, vocab, dim, w_bytes);
    let (mut loss, mut dx) = (poisoned(b, 1), poisoned(b, rows * dim));
    let mut dw = dw0.map(|d| f32_buf(b, d));
    let lb = upload(b, bytemuck::cast_slice(labels));
    b.cross_entropy(
        &mut loss,
        &mut dx,
        dw.as_mut(),
        &f32_buf(b, x),
        &w,
        &lb,
        rows,
        scale,
    )
    .unwrap_or_else(|e| panic!("{} cross_entropy: {e}", b.name()));
    let dw = dw.map_or(vec![], |d| read_f32(b, &d, vocab * dim));
    vec![read_f32(b, &loss, 1), read_f32(b, &dx, rows * dim), dw]
}

/// The bound for cross_entropy on variant `name`: where the default variant takes the bf16
/// products (matmul_dx's rule over the classifier), the logits carry x's rounding (and the
/// weight's, unless stored as bf16) into the softmax, and dx and dw round dlogits too: two
/// rounded operands per product, as TOL_BF16_TRAIN_GEMM assumes.
///
/// On f32, dx sums `vocab` terms dlogit * W per element, and dlogits sum to zero over a row: the
/// result is a cancellation whose rounding variance grows with the number of terms, so the
/// bound (TOL_F32, set for reductions of about a thousand) grows with the vocabulary too. At
/// 300k the H200's SGEMM and the cpu's loop differ by 9.4e-9. The default variant's f32
/// products are TF32 (TOL_TF32_GEMM), growing with the vocabulary the same way.
fn cross_entropy_tolerance(name: &str, dtype: DType, vocab: usize, dim: usize) -> f64 {
    let half = dtype != DType::F32 && vocab % 8 == 0 && dim % 8 == 0;
    if name == CUDA_HALF_GEMM && half {
        TOL_BF16_TRAIN_GEMM
    } else {
        f32_gemm_tolerance(name) * (vocab as f64 / 1000.0).max(1.0)
    }
}

/// x scaled so that x . W^T (on the cpu) has an rms of 2.
fn logits_of_a_few_units(
    dtype: DType,
    (rows, vocab, dim): (usize, usize, usize),
    w_bytes: &[u8],
    x: Vec<f32>,
) -> Vec<f32> {
    let cpu = Cpu::new();
    let w = raw_weight(&cpu, dtype, vocab, dim, w_bytes);
    let mut logits = poisoned(&cpu, rows * vocab);
    cpu.matmul(&mut logits, &f32_buf(&cpu, &x), &w, rows)
        .unwrap();
    let l = read_f32(&cpu, &logits, rows * vocab);
    let rms = (l.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / l.len() as f64).sqrt();
    let s = (2.0 / rms.max(1e-12)) as f32;
    x.into_iter().map(|v| v * s).collect()
}

#[test]
fn cross_entropy_loss_dx_dw() {
    // (rows, vocab, dim, dtype, dw): the f32 case of 300k x 230 logits takes two chunks of the
    // GPU's scratch, the bf16 one of 120k x 600 three; a row of -100 and a row of -1 are
    // ignored. On the default variant, vocab and dim whole octets and a classifier that is not
    // f32 take the bf16 tensor-core products (1000 x 64 bf16 and the last three cases).
    let cases = [
        (1, 5, 8, DType::F32, false),
        (3, 1000, 64, DType::BF16, true),
        (70, 777, 96, DType::Q8_0, false),
        (70, 777, 256, DType::Q4K, false),
        (9, 51, 7, DType::F16, true),
        (230, 300_000, 32, DType::F32, true),
        (600, 120_000, 64, DType::BF16, true),
        (70, 4096, 256, DType::Q4K, true),
        (33, 2048, 96, DType::F16, false),
    ];
    on_cudas(9, |name, gpu, r| {
        for (rows, vocab, dim, dtype, with_dw) in cases {
            let bytes = weight_bytes(r, dtype, vocab, dim);
            // Logits of a few units (x scaled to an rms logit of 2 over the dequantized weight):
            // a peaked softmax would turn the rounding of its logits (relative to their size)
            // into large relative errors of dx.
            let x =
                logits_of_a_few_units(dtype, (rows, vocab, dim), &bytes, randn(r, rows * dim, 1.0));
            let mut labels: Vec<i32> = (0..rows).map(|_| r.random_range(0..vocab as i32)).collect();
            if rows > 2 {
                labels[1] = -100;
                labels[rows - 1] = -1;
            }
            let dw0 = with_dw.then(|| randn(r, vocab * dim, 0.1));
            let scale = 1.0 / rows as f32;
            let shape = (rows, vocab, dim);
            let inputs = (&bytes[..], &x[..], &labels[..], dw0.as_deref());
            let c = run_cross_entropy(&Cpu::new(), dtype, shape, inputs, scale);
            let g = run_cross_entropy(gpu, dtype, shape, inputs, scale);
            let what = format!("{name} cross_entropy {dtype} rows {rows} vocab {vocab} dim {dim}");
            let tol = cross_entropy_tolerance(name, dtype, vocab, dim);
            for ((part, c), g) in ["loss", "dx", "dw"].iter().zip(&c).zip(&g) {
                check_matmul_backward(&format!("{what} {part}"), c, g, tol);
            }
        }
    });
}

fn run_adamw<B: TrainBackend>(b: &B, [p0, g, m0, v0]: [&[f32]; 4], h: AdamW) -> Vec<Vec<f32>> {
    let n = p0.len();
    let (mut p, mut m, mut v) = (f32_buf(b, p0), f32_buf(b, m0), f32_buf(b, v0));
    b.adamw(&mut p, &f32_buf(b, g), &mut m, &mut v, n, h)
        .unwrap();
    vec![read_f32(b, &p, n), read_f32(b, &m, n), read_f32(b, &v, n)]
}

#[test]
fn adamw_step() {
    on_cudas(10, |name, gpu, r| {
        for (n, step, wd, grad_scale) in
            [(1, 1, 0.0, 1.0), (1000, 1, 0.1, 1.0), (4097, 7, 0.01, 0.3)]
        {
            let h = AdamW {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: wd,
                step,
                grad_scale,
            };
            let (p, g, m) = (randn(r, n, 1.0), randn(r, n, 0.1), randn(r, n, 0.01));
            // Second moments are non-negative.
            let v: Vec<f32> = if step == 1 {
                vec![0.0; n]
            } else {
                randn(r, n, 1e-3).iter().map(|x| x.abs()).collect()
            };
            let c = run_adamw(&Cpu::new(), [&p, &g, &m, &v], h);
            let gg = run_adamw(gpu, [&p, &g, &m, &v], h);
            compare(
                &format!("{name} adamw n {n} step {step}"),
                &["param", "m", "v"],
                &c,
                &gg,
            );
        }
    });
}

/// The bytes of a weight of `dtype` after write_weight of `src`.
fn run_write_weight<B: TrainBackend>(
    b: &B,
    dtype: DType,
    rows: usize,
    cols: usize,
    src: &[f32],
) -> Vec<u8> {
    let mut w = weight(b, dtype, rows, cols, &vec![0.0; rows * cols]);
    b.write_weight(&mut w, &f32_buf(b, src)).unwrap();
    let mut bytes = vec![0u8; w.buf.len()];
    b.read(&w.buf, 0, &mut bytes).unwrap();
    bytes
}

#[test]
fn write_weight_rounds_like_the_cpu() {
    on_cudas(11, |name, gpu, r| {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (rows, cols) in [(1, 1), (7, 9), (64, 576)] {
                let mut src = randn(r, rows * cols, 3.0);
                // Ties and specials: the rounding must be exactly round-to-nearest-even.
                let specials = [
                    0.0,
                    -0.0,
                    1.0 + 1.0 / 256.0,
                    1.0 + 3.0 / 256.0,
                    65520.0,
                    1e-8,
                ];
                for (s, v) in src.iter_mut().zip(specials) {
                    *s = v;
                }
                let c = run_write_weight(&Cpu::new(), dtype, rows, cols, &src);
                let g = run_write_weight(gpu, dtype, rows, cols, &src);
                assert_eq!(
                    c, g,
                    "{name} write_weight {dtype} {rows} x {cols}: bytes differ"
                );
            }
        }
        // Block formats cannot be trained in place.
        let mut q = raw_weight(gpu, DType::Q8_0, 1, 32, &quant_bytes(r, DType::Q8_0, 1, 32));
        assert!(gpu.write_weight(&mut q, &f32_buf(gpu, &[0.0; 32])).is_err());
    });
}
