//! Every training op of the cpu backend (src/backend/cpu_train.rs) against central finite
//! differences. The rule: this file has its own small, plain f64 implementation of each forward
//! op; first it checks that the f64 forward agrees with the cpu backend's f32 forward op (tight
//! normalised MSE), then it takes the gradient of a random scalar objective
//! L = sum(forward_output * R) (R random, fixed) by central differences in f64, for every input
//! element (a random sample of them for larger inputs), and compares what the cpu backward op
//! returns for dy = R. The fused cross entropy is its own scalar objective. AdamW is checked
//! against an f64 re-implementation of PyTorch's formula (src/backend/train.rs).
//!
//! Output buffers of activation gradients are poisoned with NaN first (they must overwrite);
//! parameter gradients start non-zero (they must accumulate). NaN anywhere in an output fails.
//! Shapes are tiny: the whole file runs in well under a second in release.

use anyllama::backend::cpu::Cpu;
use anyllama::backend::train::{AdamW, TrainBackend};
use anyllama::backend::{Backend, Heads, Weight};
use anyllama::batch::Batch;
use anyllama::config::ModelConfig;
use anyllama::dtype::DType;
use anyllama::pool::Buf;
use anyllama::quant::dequantize;
use anyllama::quant_blocks::quantize_blocks;
use anyllama::rope::rope_freqs;
use half::{bf16, f16};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---------------------------------------------------------------------------------------------
// Helpers: buffers, comparisons, finite differences.

/// Central-difference step (relative to max(1, |x|)).
const H: f64 = 1e-5;
/// Bounds of a gradient check: max|a - b| / (max|b| + tiny), and normalised MSE.
const GRAD_REL: f64 = 1e-3;
const GRAD_NMSE: f64 = 1e-6;
const TINY: f64 = 1e-12;
/// Normalised MSE of the cpu's f32 forward against the f64 one (summation order and ulps).
const FWD_NMSE: f64 = 1e-10;
/// Inputs of at most this many elements are differentiated element by element; larger ones
/// on a random sample of SAMPLE elements.
const ALL_UP_TO: usize = 640;
const SAMPLE: usize = 96;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn randv(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| r.random_range(-1.0f32..1.0) * scale)
        .collect()
}

fn upload(c: &Cpu, bytes: &[u8]) -> Buf<Cpu> {
    let mut b = c.alloc(bytes.len().max(4)).unwrap();
    c.upload(&mut b, 0, bytes).unwrap();
    b
}

fn buf(c: &Cpu, v: &[f32]) -> Buf<Cpu> {
    upload(c, bytemuck::cast_slice(v))
}

fn ubuf(c: &Cpu, v: &[u32]) -> Buf<Cpu> {
    upload(c, bytemuck::cast_slice(v))
}

fn ibuf(c: &Cpu, v: &[i32]) -> Buf<Cpu> {
    upload(c, bytemuck::cast_slice(v))
}

/// An output buffer of n floats, all NaN.
fn nan_buf(c: &Cpu, n: usize) -> Buf<Cpu> {
    buf(c, &vec![f32::NAN; n])
}

fn read(c: &Cpu, b: &Buf<Cpu>, n: usize) -> Vec<f32> {
    let mut out = vec![0u8; n * 4];
    c.read(b, 0, &mut out).unwrap();
    bytemuck::cast_slice(&out).to_vec()
}

fn read_bytes(c: &Cpu, b: &Buf<Cpu>, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    c.read(b, 0, &mut out).unwrap();
    out
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The scalar objective sum(y * r).
fn objective(y: &[f64], r: &[f32]) -> f64 {
    assert_eq!(y.len(), r.len());
    y.iter().zip(r).map(|(y, r)| y * *r as f64).sum()
}

fn assert_no_nan(what: &str, v: &[f32]) {
    if let Some(i) = v.iter().position(|x| x.is_nan()) {
        panic!("{what}: NaN at {i} (of {})", v.len());
    }
}

fn nmse(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    num / den.max(1e-300)
}

/// The cpu's f32 forward against the f64 one.
fn check_fwd(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert_no_nan(what, got);
    let e = nmse(&wide(got), want);
    assert!(
        e <= FWD_NMSE,
        "{what}: forward normalised MSE {e:.3e} > {FWD_NMSE:.0e} (cpu f32 vs f64 reference)"
    );
}

/// A gradient the cpu returned (`got`, the whole output; compared at `idx`) against the
/// finite-difference one (`want[i]` for `idx[i]`).
fn check_grad(what: &str, got: &[f32], idx: &[usize], want: &[f64]) {
    check_grad64(what, &wide(got), idx, want);
}

fn check_grad64(what: &str, got: &[f64], idx: &[usize], want: &[f64]) {
    assert_eq!(idx.len(), want.len());
    if let Some(i) = got.iter().position(|x| x.is_nan()) {
        panic!("{what}: NaN at {i} (of {})", got.len());
    }
    let a: Vec<f64> = idx.iter().map(|&i| got[i]).collect();
    let (mut worst, mut at) = (0.0f64, 0);
    for (j, (x, y)) in a.iter().zip(want).enumerate() {
        if (x - y).abs() > worst {
            (worst, at) = ((x - y).abs(), j);
        }
    }
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let rel = worst / (scale + TINY);
    let e = nmse(&a, want);
    assert!(
        rel < GRAD_REL && e < GRAD_NMSE,
        "{what}: max|got - fd| / max|fd| = {rel:.3e} (bound {GRAD_REL:.0e}), normalised MSE \
         {e:.3e} (bound {GRAD_NMSE:.0e}); worst at element {}: got {} want {} (max|fd| {scale:.3e})",
        idx[at],
        a[at],
        want[at]
    );
}

/// The elements of an input of n to differentiate: all of them, or a random sample.
fn pick(r: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if n > ALL_UP_TO {
        idx.shuffle(r);
        idx.truncate(SAMPLE);
        idx.sort_unstable();
    }
    idx
}

/// dL/dx[i] for i in idx by central differences of the f64 function f.
fn fd(x: &[f64], idx: &[usize], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    idx.iter()
        .map(|&i| {
            let x0 = xp[i];
            let h = H * x0.abs().max(1.0);
            let (a, b) = (x0 + h, x0 - h);
            xp[i] = a;
            let la = f(&xp);
            xp[i] = b;
            let lb = f(&xp);
            xp[i] = x0;
            (la - lb) / (a - b)
        })
        .collect()
}

/// `got - base` in f64: what an accumulating op added.
fn added(got: &[f32], base: &[f32]) -> Vec<f64> {
    got.iter()
        .zip(base)
        .map(|(g, b)| *g as f64 - *b as f64)
        .collect()
}

fn scaled(v: &[f64], s: f64) -> Vec<f64> {
    v.iter().map(|x| x * s).collect()
}

fn heads(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Heads {
    Heads {
        n_heads,
        n_kv_heads,
        head_dim,
    }
}

// ---------------------------------------------------------------------------------------------
// Weights of every stored dtype, and their values as the f64 forward sees them.

fn raw_weight(c: &Cpu, dtype: DType, rows: usize, cols: usize, bytes: &[u8]) -> Weight<Cpu> {
    let mut b = Buf::exact(c, bytes.len()).unwrap();
    c.upload(&mut b, 0, bytes).unwrap();
    Weight {
        buf: b,
        dtype,
        rows,
        cols,
    }
}

/// Stored bytes of `v` in a float dtype.
fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => v
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => unreachable!("{dtype} is not a float dtype"),
    }
}

/// Random bytes of a k-quant format with its f16 block scales set to modest finite values
/// (as tests/parity builds them: every quant value and packed scale occurs).
fn kquant_bytes(r: &mut ChaCha8Rng, dtype: DType, n: usize) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..dtype.bytes_for(n).unwrap())
        .map(|_| r.random())
        .collect();
    let fields: &[(usize, f32, f32)] = match dtype {
        DType::Q4K => &[(0, 0.001, 0.05), (2, 0.0, 0.02)],
        DType::Q6K => &[(208, -0.05, 0.05)],
        _ => unreachable!(),
    };
    for block in bytes.chunks_exact_mut(dtype.block_bytes()) {
        for &(at, lo, hi) in fields {
            let v = f16::from_f32(r.random_range(lo..hi));
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

/// A random [rows, cols] weight stored as `dtype`, and its dequantized values.
fn make_weight(
    r: &mut ChaCha8Rng,
    c: &Cpu,
    dtype: DType,
    rows: usize,
    cols: usize,
) -> (Weight<Cpu>, Vec<f64>) {
    let n = rows * cols;
    let bytes = match dtype {
        DType::F32 | DType::F16 | DType::BF16 => encode(dtype, &randv(r, n, 1.0)),
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
            quantize_blocks(dtype, &randv(r, n, 1.0)).expect("whole blocks")
        }
        DType::Q4K | DType::Q6K => kquant_bytes(r, dtype, n),
    };
    let mut values = vec![0.0f32; n];
    dequantize(dtype, &bytes, &mut values);
    assert!(
        values.iter().all(|v| v.is_finite()),
        "{dtype}: finite values"
    );
    (raw_weight(c, dtype, rows, cols, &bytes), wide(&values))
}

const ALL_DTYPES: [DType; 8] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q4K,
    DType::Q6K,
];

// ---------------------------------------------------------------------------------------------
// The f64 forward ops.

/// y[rows, n] = x[rows, k] . W[n, k]^T
fn matmul64(x: &[f64], w: &[f64], rows: usize, n: usize, k: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows * n];
    for r in 0..rows {
        for o in 0..n {
            y[r * n + o] = dot64(&x[r * k..(r + 1) * k], &w[o * k..(o + 1) * k]);
        }
    }
    y
}

/// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w
fn rms_norm64(x: &[f64], w: &[f64], rows: usize, dim: usize, eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; rows * dim];
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let rstd = 1.0 / (dot64(xr, xr) / dim as f64 + eps).sqrt();
        for i in 0..dim {
            y[r * dim + i] = xr[i] * rstd * w[i];
        }
    }
    y
}

/// HF half-split RoPE of x [rows, n_heads, head_dim], row r at position pos[r], cos and sin
/// scaled by attn_scale. The angle is pos * inv_freq rounded to f32, as HF (and the contract)
/// form it; everything after is f64.
fn rope64(
    x: &[f64],
    inv_freq: &[f32],
    pos: &[u32],
    n_heads: usize,
    hd: usize,
    attn_scale: f32,
) -> Vec<f64> {
    let half = hd / 2;
    let mut y = x.to_vec();
    for (r, &p) in pos.iter().enumerate() {
        for h in 0..n_heads {
            let base = (r * n_heads + h) * hd;
            for i in 0..half {
                let angle = (p as f32 * inv_freq[i]) as f64;
                let (s, c) = (
                    angle.sin() * attn_scale as f64,
                    angle.cos() * attn_scale as f64,
                );
                let (x1, x2) = (x[base + i], x[base + i + half]);
                y[base + i] = x1 * c - x2 * s;
                y[base + i + half] = x2 * c + x1 * s;
            }
        }
    }
    y
}

/// Causal GQA attention within each packed sequence of `lens` rows: (out [rows, H*hd],
/// lse [rows, H], the natural logsumexp of the scaled scores).
fn attention64(q: &[f64], k: &[f64], v: &[f64], lens: &[usize], h: Heads) -> (Vec<f64>, Vec<f64>) {
    let (nh, hd) = (h.n_heads, h.head_dim);
    let (qw, kvw, group) = (nh * hd, h.n_kv_heads * hd, nh / h.n_kv_heads);
    let scale = 1.0 / (hd as f64).sqrt();
    let rows: usize = lens.iter().sum();
    let (mut out, mut lse) = (vec![0.0; rows * qw], vec![0.0; rows * nh]);
    let mut start = 0;
    for &len in lens {
        for r in start..start + len {
            for head in 0..nh {
                let kvh = head / group;
                let qr = &q[r * qw + head * hd..][..hd];
                let s: Vec<f64> = (start..=r)
                    .map(|j| dot64(qr, &k[j * kvw + kvh * hd..][..hd]) * scale)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let l = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                for (j, sj) in (start..=r).zip(&s) {
                    let p = (sj - l).exp();
                    for d in 0..hd {
                        out[r * qw + head * hd + d] += p * v[j * kvw + kvh * hd + d];
                    }
                }
                lse[r * nh + head] = l;
            }
        }
        start += len;
    }
    (out, lse)
}

/// silu(gate) * up
fn swiglu64(g: &[f64], u: &[f64]) -> Vec<f64> {
    g.iter()
        .zip(u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

/// out[t] = table[tokens[t]]
fn embedding64(table: &[f64], tokens: &[u32], dim: usize) -> Vec<f64> {
    tokens
        .iter()
        .flat_map(|&t| {
            table[t as usize * dim..(t as usize + 1) * dim]
                .iter()
                .cloned()
        })
        .collect()
}

/// Sum over labelled rows of logsumexp(x W^T) - logit[label] (unscaled).
fn cross_entropy64(x: &[f64], w: &[f64], labels: &[i32], vocab: usize, dim: usize) -> f64 {
    let rows = labels.len();
    let logits = matmul64(x, w, rows, vocab, dim);
    let mut total = 0.0;
    for (r, &label) in labels.iter().enumerate() {
        if label < 0 {
            continue;
        }
        let l = &logits[r * vocab..(r + 1) * vocab];
        let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + l.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        total += lse - l[label as usize];
    }
    total
}

// ---------------------------------------------------------------------------------------------
// matmul

#[test]
fn matmul_dx_every_weight_dtype() {
    let cpu = Cpu::new();
    let mut r = rng(1);
    let alpha = -1.5f32;
    for dtype in ALL_DTYPES {
        let k = match dtype.block_elems() {
            1 => 13,
            32 => 64,
            _ => 256,
        };
        for (rows, n) in [(1, 5), (3, 5)] {
            let what = format!("matmul_dx {dtype} rows {rows} n {n} k {k} alpha {alpha}");
            let (w, w64) = make_weight(&mut r, &cpu, dtype, n, k);
            let x = randv(&mut r, rows * k, 1.0);
            let x64 = wide(&x);
            // The f64 forward is the cpu's forward.
            let mut y = nan_buf(&cpu, rows * n);
            cpu.matmul(&mut y, &buf(&cpu, &x), &w, rows).unwrap();
            let want_y = matmul64(&x64, &w64, rows, n, k);
            check_fwd(&what, &read(&cpu, &y, rows * n), &want_y);

            let dy = randv(&mut r, rows * n, 1.0);
            let mut dx = nan_buf(&cpu, rows * k);
            cpu.matmul_dx(&mut dx, &buf(&cpu, &dy), &w, rows, alpha)
                .unwrap();
            let got = read(&cpu, &dx, rows * k);
            let idx = pick(&mut r, rows * k);
            let want = fd(&x64, &idx, |x| {
                objective(&matmul64(x, &w64, rows, n, k), &dy)
            });
            check_grad(&what, &got, &idx, &scaled(&want, alpha as f64));
        }
    }
}

#[test]
fn matmul_dw_accumulates() {
    let cpu = Cpu::new();
    let mut r = rng(2);
    for (rows, n, k, alpha) in [(5, 7, 9, 0.75f32), (1, 4, 3, -2.0), (6, 3, 32, 1.0)] {
        let what = format!("matmul_dw rows {rows} n {n} k {k} alpha {alpha}");
        let wv = randv(&mut r, n * k, 1.0);
        let w64 = wide(&wv);
        let w = raw_weight(&cpu, DType::F32, n, k, &encode(DType::F32, &wv));
        let x = randv(&mut r, rows * k, 1.0);
        let x64 = wide(&x);
        let xb = buf(&cpu, &x);
        let mut y = nan_buf(&cpu, rows * n);
        cpu.matmul(&mut y, &xb, &w, rows).unwrap();
        check_fwd(
            &what,
            &read(&cpu, &y, rows * n),
            &matmul64(&x64, &w64, rows, n, k),
        );

        let dy = randv(&mut r, rows * n, 1.0);
        let dyb = buf(&cpu, &dy);
        let idx = pick(&mut r, n * k);
        let want = scaled(
            &fd(&w64, &idx, |w| {
                objective(&matmul64(&x64, w, rows, n, k), &dy)
            }),
            alpha as f64,
        );
        let dw0 = randv(&mut r, n * k, 1.0);
        let mut dw = buf(&cpu, &dw0);
        cpu.matmul_dw(&mut dw, &dyb, &xb, rows, n, k, alpha)
            .unwrap();
        let once = read(&cpu, &dw, n * k);
        check_grad64(
            &format!("{what} (added once)"),
            &added(&once, &dw0),
            &idx,
            &want,
        );
        // A second micro-batch adds again.
        cpu.matmul_dw(&mut dw, &dyb, &xb, rows, n, k, alpha)
            .unwrap();
        let twice = read(&cpu, &dw, n * k);
        check_grad64(
            &format!("{what} (added twice)"),
            &added(&twice, &dw0),
            &idx,
            &scaled(&want, 2.0),
        );
        // Inputs are read, not written.
        assert_eq!(read(&cpu, &xb, rows * k), x, "{what}: x changed");
        assert_eq!(read(&cpu, &dyb, rows * n), dy, "{what}: dy changed");
    }
}

// ---------------------------------------------------------------------------------------------
// rms_norm

#[test]
fn rms_norm_backward_dx_and_dweight() {
    let cpu = Cpu::new();
    let mut r = rng(3);
    let eps = 1e-5f32;
    for (rows, dim) in [(1, 37), (4, 37), (3, 8), (2, 5)] {
        let what = format!("rms_norm_backward rows {rows} dim {dim}");
        let x = randv(&mut r, rows * dim, 2.0);
        let wv = randv(&mut r, dim, 1.5);
        let (x64, w64) = (wide(&x), wide(&wv));
        let (xb, wb) = (buf(&cpu, &x), buf(&cpu, &wv));
        let mut y = nan_buf(&cpu, rows * dim);
        cpu.rms_norm(&mut y, &xb, &wb, rows, dim, eps).unwrap();
        let f = |x: &[f64], w: &[f64]| rms_norm64(x, w, rows, dim, eps as f64);
        check_fwd(&what, &read(&cpu, &y, rows * dim), &f(&x64, &w64));

        let dy = randv(&mut r, rows * dim, 1.0);
        let dyb = buf(&cpu, &dy);
        let dw0 = randv(&mut r, dim, 1.0);
        let mut dx = nan_buf(&cpu, rows * dim);
        let mut dw = buf(&cpu, &dw0);
        cpu.rms_norm_backward(&mut dx, Some(&mut dw), &dyb, &xb, &wb, rows, dim, eps)
            .unwrap();
        let got_dx = read(&cpu, &dx, rows * dim);
        let idx = pick(&mut r, rows * dim);
        let want_dx = fd(&x64, &idx, |x| objective(&f(x, &w64), &dy));
        check_grad(&format!("{what} dx"), &got_dx, &idx, &want_dx);
        let widx: Vec<usize> = (0..dim).collect();
        let want_dw = fd(&w64, &widx, |w| objective(&f(&x64, w), &dy));
        check_grad64(
            &format!("{what} dweight (added)"),
            &added(&read(&cpu, &dw, dim), &dw0),
            &widx,
            &want_dw,
        );

        // Without dweight: the same dx.
        let mut dx2 = nan_buf(&cpu, rows * dim);
        cpu.rms_norm_backward(&mut dx2, None, &dyb, &xb, &wb, rows, dim, eps)
            .unwrap();
        assert_eq!(
            read(&cpu, &dx2, rows * dim),
            got_dx,
            "{what}: dx without dweight"
        );
        assert_eq!(read(&cpu, &xb, rows * dim), x, "{what}: x changed");
        assert_eq!(read(&cpu, &wb, dim), wv, "{what}: w changed");
    }
}

// ---------------------------------------------------------------------------------------------
// rope

/// (name, config.json) of every RoPE variant at head_dim 8 (hidden 32, 4 heads), and one at 12.
fn rope_configs() -> Vec<(&'static str, String)> {
    let base = |extra: &str, hidden: usize| {
        format!(
            r#"{{"model_type": "llama", "hidden_size": {hidden}, "num_attention_heads": 4{extra}}}"#
        )
    };
    vec![
        (
            "default",
            base(
                r#", "rope_theta": 10000.0, "max_position_embeddings": 2048"#,
                32,
            ),
        ),
        (
            "default-hd12",
            base(
                r#", "rope_theta": 500000.0, "max_position_embeddings": 2048"#,
                48,
            ),
        ),
        (
            "linear",
            base(
                r#", "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 4.0}"#,
                32,
            ),
        ),
        (
            "dynamic",
            base(
                r#", "max_position_embeddings": 16, "rope_parameters": {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0}"#,
                32,
            ),
        ),
        (
            "llama3",
            base(
                r#", "max_position_embeddings": 2048, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}"#,
                32,
            ),
        ),
        (
            "longrope",
            base(
                r#", "max_position_embeddings": 2048, "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 24, "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 2.0, 4.0, 8.0]}"#,
                32,
            ),
        ),
        (
            "yarn",
            base(
                r#", "max_position_embeddings": 2048, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 16}"#,
                32,
            ),
        ),
        (
            "yarn-attention-factor",
            base(
                r#", "max_position_embeddings": 2048, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 0.8, "original_max_position_embeddings": 16}"#,
                32,
            ),
        ),
    ]
}

#[test]
fn rope_backward_every_variant_and_packed_positions() {
    let cpu = Cpu::new();
    let mut r = rng(4);
    let mut scales = vec![];
    // (sequence lengths, first positions): one sequence at pos0 > 0, then several packed ones
    // (one of them far out, where the f32 angle is large).
    let batches: [(&[usize], &[usize]); 3] =
        [(&[4], &[7]), (&[3, 1, 4], &[5, 1000, 0]), (&[1], &[0])];
    for (name, json) in rope_configs() {
        let cfg = ModelConfig::from_hf_json(&json).unwrap_or_else(|e| panic!("{name}: {e}"));
        let hd = cfg.head_dim;
        for (lens, pos0) in batches {
            let batch = Batch::new(&cpu, lens, pos0).unwrap();
            let pos: Vec<u32> = lens
                .iter()
                .zip(pos0)
                .flat_map(|(&l, &p)| (p..p + l).map(|p| p as u32))
                .collect();
            assert_eq!(
                read_bytes(&cpu, &batch.pos, pos.len() * 4),
                bytemuck::cast_slice::<u32, u8>(&pos)
            );
            let seq_len = *pos.iter().max().unwrap() as usize + 1;
            let freqs = rope_freqs(&cfg, seq_len);
            let a = freqs.attention_scaling;
            scales.push(a);
            let invb = buf(&cpu, &freqs.inv_freq);
            for n_heads in [3, 1] {
                let rows = batch.rows;
                let n = rows * n_heads * hd;
                let what = format!(
                    "rope {name} head_dim {hd} heads {n_heads} lens {lens:?} pos0 {pos0:?} \
                     attn_scale {a}"
                );
                let x = randv(&mut r, n, 1.0);
                let x64 = wide(&x);
                let f = |x: &[f64]| rope64(x, &freqs.inv_freq, &pos, n_heads, hd, a);
                let mut y = buf(&cpu, &x);
                cpu.rope_rows(&mut y, &invb, &batch.pos, rows, n_heads, hd, a)
                    .unwrap();
                check_fwd(&what, &read(&cpu, &y, n), &f(&x64));

                // In place: dx holds dy on the way in.
                let dy = randv(&mut r, n, 1.0);
                let mut dx = buf(&cpu, &dy);
                cpu.rope_backward(&mut dx, &invb, &batch.pos, rows, n_heads, hd, a)
                    .unwrap();
                let idx = pick(&mut r, n);
                let want = fd(&x64, &idx, |x| objective(&f(x), &dy));
                check_grad(&format!("{what} dx"), &read(&cpu, &dx, n), &idx, &want);
            }
        }
    }
    // yarn and longrope scale cos and sin; the others do not.
    assert!(
        scales.iter().filter(|&&s| (s - 1.0).abs() > 0.05).count() >= 6,
        "attn_scale != 1 was covered: {scales:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// attention

#[test]
fn attention_packed_forward_and_backward() {
    let cpu = Cpu::new();
    let mut r = rng(5);
    // (n_heads, n_kv_heads, head_dim, sequence lengths): GQA ratios 1, 3 and 4, head_dim 8
    // and 6, several packed sequences of unequal lengths, and a single 1-row sequence.
    let cases: [(usize, usize, usize, &[usize]); 6] = [
        (2, 2, 8, &[1, 5, 3]),
        (3, 1, 6, &[1, 5, 3]),
        (4, 1, 8, &[2, 1, 4]),
        (8, 2, 6, &[5, 3]),
        (4, 1, 6, &[1]),
        (3, 3, 8, &[6]),
    ];
    for (nh, nkv, hd, lens) in cases {
        let h = heads(nh, nkv, hd);
        let batch = Batch::new(&cpu, lens, &vec![0; lens.len()]).unwrap();
        let rows = batch.rows;
        let (qn, kvn) = (rows * nh * hd, rows * nkv * hd);
        let what = format!("attention heads {nh}/{nkv} head_dim {hd} lens {lens:?}");
        let q = randv(&mut r, qn, 1.5);
        let k = randv(&mut r, kvn, 1.5);
        let v = randv(&mut r, kvn, 1.0);
        let (q64, k64, v64) = (wide(&q), wide(&k), wide(&v));
        let (qb, kb, vb) = (buf(&cpu, &q), buf(&cpu, &k), buf(&cpu, &v));

        let mut out = nan_buf(&cpu, qn);
        let mut lse = nan_buf(&cpu, rows * nh);
        cpu.attention_packed(&mut out, Some(&mut lse), &qb, &kb, &vb, batch.view(), h)
            .unwrap();
        let (want_out, want_lse) = attention64(&q64, &k64, &v64, lens, h);
        let got_out = read(&cpu, &out, qn);
        let got_lse = read(&cpu, &lse, rows * nh);
        check_fwd(&format!("{what} out"), &got_out, &want_out);
        check_fwd(&format!("{what} lse"), &got_lse, &want_lse);
        let mut out2 = nan_buf(&cpu, qn);
        cpu.attention_packed(&mut out2, None, &qb, &kb, &vb, batch.view(), h)
            .unwrap();
        assert_eq!(read(&cpu, &out2, qn), got_out, "{what}: out without lse");

        let dout = randv(&mut r, qn, 1.0);
        let doutb = buf(&cpu, &dout);
        let (mut dq, mut dk, mut dv) = (nan_buf(&cpu, qn), nan_buf(&cpu, kvn), nan_buf(&cpu, kvn));
        cpu.attention_backward(
            &mut dq,
            &mut dk,
            &mut dv,
            &doutb,
            &qb,
            &kb,
            &vb,
            &out,
            &lse,
            batch.view(),
            h,
        )
        .unwrap();
        let obj =
            |q: &[f64], k: &[f64], v: &[f64]| objective(&attention64(q, k, v, lens, h).0, &dout);
        let idx = pick(&mut r, qn);
        let want = fd(&q64, &idx, |q| obj(q, &k64, &v64));
        check_grad(&format!("{what} dq"), &read(&cpu, &dq, qn), &idx, &want);
        let idx = pick(&mut r, kvn);
        let want = fd(&k64, &idx, |k| obj(&q64, k, &v64));
        check_grad(&format!("{what} dk"), &read(&cpu, &dk, kvn), &idx, &want);
        let want = fd(&v64, &idx, |v| obj(&q64, &k64, v));
        check_grad(&format!("{what} dv"), &read(&cpu, &dv, kvn), &idx, &want);

        // The forward's tensors are read, not written.
        assert_eq!(read(&cpu, &qb, qn), q, "{what}: q changed");
        assert_eq!(read(&cpu, &kb, kvn), k, "{what}: k changed");
        assert_eq!(read(&cpu, &vb, kvn), v, "{what}: v changed");
        assert_eq!(read(&cpu, &out, qn), got_out, "{what}: out changed");
        assert_eq!(read(&cpu, &lse, rows * nh), got_lse, "{what}: lse changed");
    }
}

// ---------------------------------------------------------------------------------------------
// swiglu, embedding

#[test]
fn swiglu_backward_dgate_dup() {
    let cpu = Cpu::new();
    let mut r = rng(6);
    for (n, gate_scale) in [(37, 3.0f32), (5, 12.0), (1, 1.0)] {
        let what = format!("swiglu n {n} gate scale {gate_scale}");
        let g = randv(&mut r, n, gate_scale);
        let u = randv(&mut r, n, 2.0);
        let (g64, u64_) = (wide(&g), wide(&u));
        let (gb, ub) = (buf(&cpu, &g), buf(&cpu, &u));
        let mut y = nan_buf(&cpu, n);
        cpu.swiglu(&mut y, &gb, &ub, n).unwrap();
        check_fwd(&what, &read(&cpu, &y, n), &swiglu64(&g64, &u64_));

        let dy = randv(&mut r, n, 1.0);
        let (mut dg, mut du) = (nan_buf(&cpu, n), nan_buf(&cpu, n));
        cpu.swiglu_backward(&mut dg, &mut du, &buf(&cpu, &dy), &gb, &ub, n)
            .unwrap();
        let idx = pick(&mut r, n);
        let want = fd(&g64, &idx, |g| objective(&swiglu64(g, &u64_), &dy));
        check_grad(&format!("{what} dgate"), &read(&cpu, &dg, n), &idx, &want);
        let want = fd(&u64_, &idx, |u| objective(&swiglu64(&g64, u), &dy));
        check_grad(&format!("{what} dup"), &read(&cpu, &du, n), &idx, &want);
    }
}

#[test]
fn embedding_backward_accumulates_repeated_tokens() {
    let cpu = Cpu::new();
    let mut r = rng(7);
    let (vocab, dim) = (6, 5);
    // Token 2 three times, 0 twice; 1 and 4 never (their rows must stay as they were).
    let tokens = [2u32, 0, 2, 5, 2, 3, 0];
    let nt = tokens.len();
    let tv = randv(&mut r, vocab * dim, 1.0);
    let t64 = wide(&tv);
    let table = raw_weight(&cpu, DType::F32, vocab, dim, &encode(DType::F32, &tv));
    let tb = ubuf(&cpu, &tokens);
    let mut y = nan_buf(&cpu, nt * dim);
    cpu.embedding(&mut y, &tb, &table, nt).unwrap();
    check_fwd(
        "embedding",
        &read(&cpu, &y, nt * dim),
        &embedding64(&t64, &tokens, dim),
    );

    let dy = randv(&mut r, nt * dim, 1.0);
    let d0 = randv(&mut r, vocab * dim, 1.0);
    let mut dt = buf(&cpu, &d0);
    cpu.embedding_backward(&mut dt, &buf(&cpu, &dy), &tb, nt, dim)
        .unwrap();
    let got = added(&read(&cpu, &dt, vocab * dim), &d0);
    let idx: Vec<usize> = (0..vocab * dim).collect();
    let want = fd(&t64, &idx, |t| {
        objective(&embedding64(t, &tokens, dim), &dy)
    });
    check_grad64("embedding_backward dtable (added)", &got, &idx, &want);
    for unused in [1, 4] {
        assert!(
            got[unused * dim..(unused + 1) * dim]
                .iter()
                .all(|&v| v == 0.0),
            "embedding_backward: row {unused} of an unused token changed"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// cross entropy

#[test]
fn cross_entropy_loss_dx_dw_across_chunks() {
    let cpu = Cpu::new();
    let mut r = rng(8);
    // (classifier dtype, rows, dim, vocab, trained): 70 and 67 rows cross CE_CHUNK = 64.
    for (dtype, rows, dim, vocab, trained) in [
        (DType::F32, 70, 8, 11, true),
        (DType::BF16, 67, 5, 7, true),
        (DType::Q8_0, 4, 32, 5, false),
        (DType::F32, 1, 3, 4, true),
    ] {
        let what = format!("cross_entropy {dtype} rows {rows} dim {dim} vocab {vocab}");
        let (w, w64) = make_weight(&mut r, &cpu, dtype, vocab, dim);
        let x = randv(&mut r, rows * dim, 1.5);
        let x64 = wide(&x);
        // Every third row ignored (-100; the last chunk has ignored and labelled rows), except
        // in the 1-row case.
        let labels: Vec<i32> = (0..rows)
            .map(|i| {
                if rows > 1 && i % 3 == 1 {
                    -100
                } else {
                    r.random_range(0..vocab as i32)
                }
            })
            .collect();
        let labelled = labels.iter().filter(|&&l| l >= 0).count();
        let scale = 1.0 / labelled as f32;
        let (xb, lb) = (buf(&cpu, &x), ibuf(&cpu, &labels));
        let mut loss = nan_buf(&cpu, 1);
        let mut dx = nan_buf(&cpu, rows * dim);
        let dw0 = randv(&mut r, vocab * dim, 1.0);
        let mut dw = buf(&cpu, &dw0);
        cpu.cross_entropy(
            &mut loss,
            &mut dx,
            trained.then_some(&mut dw),
            &xb,
            &w,
            &lb,
            rows,
            scale,
        )
        .unwrap();
        // loss[0] is the unscaled sum over labelled rows.
        let got_loss = read(&cpu, &loss, 1)[0] as f64;
        let want_loss = cross_entropy64(&x64, &w64, &labels, vocab, dim);
        assert!(
            (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
            "{what}: loss {got_loss} want {want_loss}"
        );

        let obj = |x: &[f64], w: &[f64]| scale as f64 * cross_entropy64(x, w, &labels, vocab, dim);
        let got_dx = read(&cpu, &dx, rows * dim);
        let idx = pick(&mut r, rows * dim);
        let want = fd(&x64, &idx, |x| obj(x, &w64));
        check_grad(&format!("{what} dx"), &got_dx, &idx, &want);
        for (i, &l) in labels.iter().enumerate() {
            if l < 0 {
                assert!(
                    got_dx[i * dim..(i + 1) * dim].iter().all(|&v| v == 0.0),
                    "{what}: dx of ignored row {i} is not zero"
                );
            }
        }
        let got_dw = read(&cpu, &dw, vocab * dim);
        if trained {
            let idx = pick(&mut r, vocab * dim);
            let want = fd(&w64, &idx, |w| obj(&x64, w));
            check_grad64(
                &format!("{what} dw (added)"),
                &added(&got_dw, &dw0),
                &idx,
                &want,
            );
        } else {
            assert_eq!(got_dw, dw0, "{what}: dw touched without being given");
        }
        assert_eq!(read(&cpu, &xb, rows * dim), x, "{what}: x changed");
    }
}

#[test]
fn cross_entropy_rejects_a_label_past_the_vocab() {
    let cpu = Cpu::new();
    let mut r = rng(9);
    let (w, _) = make_weight(&mut r, &cpu, DType::F32, 4, 3);
    let x = buf(&cpu, &randv(&mut r, 6, 1.0));
    let (mut loss, mut dx) = (nan_buf(&cpu, 1), nan_buf(&cpu, 6));
    let labels = ibuf(&cpu, &[1, 4]);
    assert!(cpu
        .cross_entropy(&mut loss, &mut dx, None, &x, &w, &labels, 2, 0.5)
        .is_err());
}

// ---------------------------------------------------------------------------------------------
// optimizer and weights

#[test]
fn adamw_matches_pytorch_formula_over_three_steps() {
    let cpu = Cpu::new();
    let mut r = rng(10);
    let n = 23;
    let p0 = randv(&mut r, n, 1.0);
    let (mut p64, mut m64, mut v64) = (wide(&p0), vec![0.0f64; n], vec![0.0f64; n]);
    let mut pb = buf(&cpu, &p0);
    let mut mb = buf(&cpu, &vec![0.0; n]);
    let mut vb = buf(&cpu, &vec![0.0; n]);
    for step in 1..=3u32 {
        let mut g = randv(&mut r, n, 3.0);
        g[5] = 0.0; // a zero gradient still decays the weight
        g[7] = 1e-4 * step as f32;
        let h = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
            grad_scale: 0.5,
        };
        let before = read(&cpu, &pb, n);
        cpu.adamw(&mut pb, &buf(&cpu, &g), &mut mb, &mut vb, n, h)
            .unwrap();
        // torch.optim.AdamW (decoupled weight decay), in f64.
        let (lr, b1, b2, eps, wd) = (
            h.lr as f64,
            h.beta1 as f64,
            h.beta2 as f64,
            h.eps as f64,
            h.weight_decay as f64,
        );
        let t = step as i32;
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let before64 = p64.clone();
        for i in 0..n {
            let gi = g[i] as f64 * h.grad_scale as f64;
            p64[i] -= lr * wd * p64[i];
            m64[i] = b1 * m64[i] + (1.0 - b1) * gi;
            v64[i] = b2 * v64[i] + (1.0 - b2) * gi * gi;
            p64[i] -= (lr / bc1) * m64[i] / (v64[i].sqrt() / bc2.sqrt() + eps);
        }
        let what = format!("adamw step {step}");
        let (gp, gm, gv) = (read(&cpu, &pb, n), read(&cpu, &mb, n), read(&cpu, &vb, n));
        let all: Vec<usize> = (0..n).collect();
        for (name, got, want, tol) in [
            ("param", &gp, &p64, 1e-6),
            ("m", &gm, &m64, 1e-5),
            ("v", &gv, &v64, 1e-5),
        ] {
            assert_no_nan(&format!("{what} {name}"), got);
            let a = wide(got);
            let worst = a
                .iter()
                .zip(want)
                .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(
                worst <= tol * scale,
                "{what} {name}: max|got - want| {worst:e} > {tol:e} * {scale:e}"
            );
        }
        // The update itself (p_new - p_old), which the parameter's size would hide.
        let got_delta = added(&gp, &before);
        let want_delta: Vec<f64> = p64.iter().zip(&before64).map(|(a, b)| a - b).collect();
        check_grad64(&format!("{what} update"), &got_delta, &all, &want_delta);
    }
}

#[test]
fn write_weight_rounds_and_the_forward_sees_it() {
    let cpu = Cpu::new();
    let mut r = rng(11);
    let (rows, cols) = (3, 4);
    // Known roundings: ties to even, just above a tie, overflow to infinity, a subnormal.
    let specials_bf16: [(f32, u16); 7] = [
        (1.0, 0x3f80),
        (f32::from_bits(0x3f80_8000), 0x3f80), // 1 + 2^-8: tie, stays even
        (f32::from_bits(0x3f81_8000), 0x3f82), // 1 + 3 * 2^-8: tie, up to even
        (f32::from_bits(0x3f80_8001), 0x3f81), // just above a tie: up
        (-2.5, 0xc020),
        (f32::MAX, 0x7f80), // rounds up past the largest bf16: +inf
        (f32::from_bits(0x0001_16c2), 0x0001),
    ];
    let specials_f16: [(f32, u16); 5] = [
        (1.0, 0x3c00),
        (1.0 + 2f32.powi(-11), 0x3c00),       // tie, stays even
        (1.0 + 3.0 * 2f32.powi(-11), 0x3c02), // tie, up to even
        (-2.5, 0xc100),
        (65520.0, 0x7c00), // past the largest f16: +inf
    ];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let what = format!("write_weight {dtype}");
        let (mut w, _) = make_weight(&mut r, &cpu, dtype, rows, cols);
        let nbytes = dtype.bytes_for(rows * cols).unwrap();
        // Known values first.
        let specials: &[(f32, u16)] = match dtype {
            DType::BF16 => &specials_bf16,
            DType::F16 => &specials_f16,
            _ => &[],
        };
        if !specials.is_empty() {
            let mut src = vec![0.0f32; rows * cols];
            for (i, &(v, _)) in specials.iter().enumerate() {
                src[i] = v;
            }
            cpu.write_weight(&mut w, &buf(&cpu, &src)).unwrap();
            let stored = read_bytes(&cpu, &w.buf, nbytes);
            let halves: &[u16] = bytemuck::cast_slice(&stored);
            for (i, &(v, bits)) in specials.iter().enumerate() {
                assert_eq!(
                    halves[i],
                    bits,
                    "{what}: {v:e} (bits {:#010x}) stored as {:#06x}, want {bits:#06x}",
                    v.to_bits(),
                    halves[i]
                );
            }
        }
        // Then random values: stored as `encode` rounds them (exactly, for f32), and the next
        // forward sees the stored values.
        let src = randv(&mut r, rows * cols, 2.0);
        cpu.write_weight(&mut w, &buf(&cpu, &src)).unwrap();
        let stored = read_bytes(&cpu, &w.buf, nbytes);
        assert_eq!(stored, encode(dtype, &src), "{what}: stored bytes");
        let mut vals = vec![0.0f32; rows * cols];
        dequantize(dtype, &stored, &mut vals);
        if dtype == DType::F32 {
            assert_eq!(vals, src, "{what}: f32 round trip");
        } else {
            let e = nmse(&wide(&vals), &wide(&src));
            let bound = if dtype == DType::F16 { 1e-6 } else { 1e-4 };
            assert!(e < bound, "{what}: round trip normalised MSE {e:e}");
        }
        let x = randv(&mut r, 2 * cols, 1.0);
        let mut y = nan_buf(&cpu, 2 * rows);
        cpu.matmul(&mut y, &buf(&cpu, &x), &w, 2).unwrap();
        check_fwd(
            &format!("{what} forward"),
            &read(&cpu, &y, 2 * rows),
            &matmul64(&wide(&x), &wide(&vals), 2, rows, cols),
        );
    }
    // A quantized weight cannot be written; it stays as it was.
    for dtype in [DType::Q8_0, DType::Q4K] {
        let cols = dtype.block_elems();
        let (mut w, _) = make_weight(&mut r, &cpu, dtype, 2, cols);
        let nbytes = dtype.bytes_for(2 * cols).unwrap();
        let before = read_bytes(&cpu, &w.buf, nbytes);
        let src = buf(&cpu, &randv(&mut r, 2 * cols, 1.0));
        assert!(
            cpu.write_weight(&mut w, &src).is_err(),
            "write_weight into {dtype} must fail"
        );
        assert_eq!(
            read_bytes(&cpu, &w.buf, nbytes),
            before,
            "{dtype} weight changed"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// vector ops

#[test]
fn zero_axpy_sum_squares() {
    let cpu = Cpu::new();
    let mut r = rng(12);
    let (len, n) = (19, 13);
    // zero: the first n elements, no more.
    let x0 = randv(&mut r, len, 1.0);
    let mut x = buf(&cpu, &x0);
    cpu.zero(&mut x, n).unwrap();
    let got = read(&cpu, &x, len);
    assert!(got[..n].iter().all(|&v| v == 0.0), "zero: {got:?}");
    assert_eq!(got[n..], x0[n..], "zero wrote past n");

    // axpy: y += alpha x on the first n elements.
    let (y0, xs) = (randv(&mut r, len, 1.0), randv(&mut r, len, 1.0));
    let alpha = -0.375f32;
    let mut y = buf(&cpu, &y0);
    cpu.axpy(&mut y, &buf(&cpu, &xs), alpha, n).unwrap();
    let got = read(&cpu, &y, len);
    for i in 0..n {
        let want = y0[i] as f64 + alpha as f64 * xs[i] as f64;
        assert!(
            (got[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1.0),
            "axpy[{i}]: {} want {want}",
            got[i]
        );
    }
    assert_eq!(got[n..], y0[n..], "axpy wrote past n");

    // sum_squares adds into out[0], call after call.
    let xs = randv(&mut r, len, 3.0);
    let xb = buf(&cpu, &xs);
    let mut out = buf(&cpu, &[2.5, 7.0]);
    let ss: f64 = xs[..n].iter().map(|&v| v as f64 * v as f64).sum();
    cpu.sum_squares(&mut out, &xb, n).unwrap();
    cpu.sum_squares(&mut out, &xb, n).unwrap();
    let got = read(&cpu, &out, 2);
    let want = 2.5 + 2.0 * ss;
    assert!(
        (got[0] as f64 - want).abs() <= 1e-6 * want,
        "sum_squares: {} want {want}",
        got[0]
    );
    assert_eq!(got[1], 7.0, "sum_squares wrote past out[0]");
}
