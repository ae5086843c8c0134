//! Helpers of the backend parity tests: the GPU variants under test (opened once per test
//! binary and shared, as an application shares its device), seeded inputs, weights in every
//! storage dtype, NaN-poisoned outputs, the normalised-MSE check, a paged-KV driver for
//! attention, and the analysis of sampling draws near float-rounding boundaries.
//!
//! Each test body is a function generic over `Backend`; `on_every_gpu!` runs it on every
//! variant: wgpu (default kernels, and the portable ones where they differ) and CUDA (exact
//! f32 prefill GEMMs, and the default half-precision ones; see with_cudas). Test files declare `mod common;`
//! next to `#[macro_use] mod parity;` (the CUDA skip rules live there).

#![allow(dead_code)]

use anyllama::backend::cpu::Cpu;
use anyllama::backend::params::KV_BLOCK;
use anyllama::backend::{Backend, Heads, KvView, RmsNormed, SampleOp, Weight};
use anyllama::dtype::DType;
use anyllama::pool::Buf;
use half::{bf16, f16};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::OnceLock;

pub mod fused;

#[cfg(feature = "cuda")]
use anyllama::backend::cuda::{Cuda, CudaOptions};
#[cfg(feature = "wgpu")]
use anyllama::backend::wgpu::{Wgpu, WgpuOptions};

/// Normalised MSE bounds: f32 paths differ only in summation order and transcendental ulps;
/// an f16 KV cache adds a rounding per stored value (the conversion may round differently).
pub const TOL_F32: f64 = 1e-10;
pub const TOL_F16_KV: f64 = 1e-5;

/// `$f(name, backend, $args...)` for every GPU variant of every backend built in.
macro_rules! on_every_gpu {
    ($f:ident $(, $arg:expr)* $(,)?) => {{
        #[cfg(feature = "wgpu")]
        for (name, gpu) in $crate::parity::gpus() {
            $f(name, gpu $(, $arg)*);
        }
        #[cfg(feature = "cuda")]
        $crate::parity::with_cudas(|cudas| {
            for (name, gpu) in cudas {
                $f(name, gpu $(, $arg)*);
            }
        });
    }};
}

/// Whether any GPU variant will run (so that a test can skip its CPU-side preparation).
pub fn any_gpu() -> bool {
    #[cfg(feature = "wgpu")]
    if !gpus().is_empty() {
        return true;
    }
    #[cfg(feature = "cuda")]
    if cuda_usable() {
        return true;
    }
    false
}

#[cfg(feature = "wgpu")]
pub fn open(options: WgpuOptions) -> Option<Wgpu> {
    match Wgpu::with_options(options) {
        Ok(w) => Some(w),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI is set but the wgpu backend could not open an adapter: {e}")
        }
        Err(e) => {
            eprintln!("skipping wgpu parity test: {e}");
            None
        }
    }
}

/// The wgpu variants to test, opened once per process and shared by the tests (as an
/// application shares its one device): default kernels, plus the portable ones where they differ.
#[cfg(feature = "wgpu")]
pub fn gpus() -> &'static [(&'static str, Wgpu)] {
    static GPUS: OnceLock<Vec<(&'static str, Wgpu)>> = OnceLock::new();
    GPUS.get_or_init(|| {
        let Some(default) = open(WgpuOptions::default()) else {
            return vec![];
        };
        let native = default.uses_native_f16() || default.adapter().subgroup;
        let mut v = vec![("default", default)];
        if native {
            let portable = open(WgpuOptions {
                portable: true,
                ..Default::default()
            })
            .expect("the portable variant opens where the default one does");
            v.push(("portable", portable));
        }
        v
    })
}

/// Bytes bound per storage binding in the `chunked` variant.
#[cfg(feature = "wgpu")]
pub const CHUNKED_BINDING: u64 = 16384;

/// A wgpu variant whose storage bindings are capped at CHUNKED_BINDING bytes, so that small
/// weights and embedding tables take the row-chunked path of tensors over the binding limit.
#[cfg(feature = "wgpu")]
pub fn chunked() -> Option<&'static Wgpu> {
    static CHUNKED: OnceLock<Option<Wgpu>> = OnceLock::new();
    CHUNKED
        .get_or_init(|| {
            open(WgpuOptions {
                max_storage_binding: Some(CHUNKED_BINDING),
                ..Default::default()
            })
        })
        .as_ref()
}

/// The CUDA variant whose prefill GEMMs round activations to the weight's half type.
pub const CUDA_HALF_GEMM: &str = "cuda";

/// Whether this machine can run CUDA, decided once per process: without a usable driver this
/// prints why (once) and says no; a failure instead when ANYLLAMA_REQUIRE_CUDA is set.
#[cfg(feature = "cuda")]
pub fn cuda_usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| match anyllama::backend::cuda::unavailable_reason() {
        None => true,
        Some(why) => {
            crate::common::skip_or_fail_cuda("cuda parity", &why);
            false
        }
    })
}

/// Runs `f` on the CUDA variants: `cuda-exact` (prefill GEMMs in f32, held to the same bounds
/// as every other backend) and `cuda` (the default: cuBLAS on f16/bf16, see matmul_tolerance
/// and attention_tolerance);
/// none where cuda_usable says no. A driver that sees a device but fails to open panics.
///
/// Unlike wgpu's, these are opened per test thread, not once per process: `Cuda` keeps CUDA
/// graph handles, which are neither Send nor Sync, so a process-wide instance cannot be shared
/// by the test threads. After the first open the kernels come from the disk cubin cache.
#[cfg(feature = "cuda")]
pub fn with_cudas(f: impl FnOnce(&[(&'static str, Cuda)])) {
    thread_local! {
        static CUDAS: Vec<(&'static str, Cuda)> = {
            let open = |exact| {
                let options = CudaOptions {
                    exact,
                    ..Default::default()
                };
                crate::common::cuda_backend_with("cuda parity", options)
                    .expect("cuda_usable said the driver is usable")
            };
            vec![("cuda-exact", open(true)), (CUDA_HALF_GEMM, open(false))]
        };
    }
    if cuda_usable() {
        CUDAS.with(|v| f(v));
    } else {
        f(&[]);
    }
}

/// Rows above which CUDA's matmul leaves its mat-vec kernel for cuBLAS (MATVEC_MAX_ROWS in
/// src/backend/cuda/ops.rs).
pub const CUDA_MATVEC_MAX_ROWS: usize = 8;

/// Normalised MSE bounds for the `cuda` variant's prefill GEMMs, which round each activation
/// (and each widened block-format weight) to the half type before an f32-accumulated product.
/// Round-to-nearest to p significant bits errs by a relative delta with |delta| <= 2^-p, about
/// uniform, so E[delta^2] ~ 2^-2p / 3; the error of a dot product over independent roundings has
/// a normalised MSE of about E[delta^2] (per rounded operand). bf16 (p = 8): ~5e-6; f16
/// (p = 11): ~8e-8, twice that with rounded weights. The bounds leave a margin of 20x and more
/// for the spread over few outputs, and stay far below what a wrong element or row gives (~1).
pub const TOL_BF16_GEMM: f64 = 1e-4;
pub const TOL_F16_GEMM: f64 = 1e-5;

/// The bound for the `cuda` variant's matmul backward where both GEMM operands are rounded to
/// bf16 (matmul_dx through f16 or block-format weights, dequantized to bf16, with dy rounded;
/// matmul_dw with dy and x rounded): twice the ~5e-6 per rounded operand, margin 20x.
/// matmul_dx through bf16 weights rounds dy alone and is held to TOL_BF16_GEMM.
pub const TOL_BF16_TRAIN_GEMM: f64 = 2e-4;

/// The `cuda` variant's size rule for matmul_dw on bf16 tensor cores (HALF_DW_MIN_ROWS and
/// HALF_DW_MIN_SIDE in src/backend/cuda/train.rs): at least this many rows, both sides at
/// least this wide, and both multiples of 8.
pub const CUDA_HALF_DW_MIN_ROWS: usize = 64;
pub const CUDA_HALF_DW_MIN_SIDE: usize = 65;

/// The bound for matmul on variant `name`: f32 rounding everywhere, except the `cuda` variant's
/// cuBLAS path (rows over CUDA_MATVEC_MAX_ROWS) on weights that are not f32.
pub fn matmul_tolerance(name: &str, dtype: DType, rows: usize, n: usize) -> f64 {
    if name == CUDA_HALF_GEMM && rows > CUDA_MATVEC_MAX_ROWS && dtype != DType::F32 {
        return if dtype == DType::BF16 {
            TOL_BF16_GEMM
        } else {
            TOL_F16_GEMM
        };
    }
    // A handful of outputs may all be small by cancellation, which makes the normalised
    // error of a different summation order large: bound those more loosely.
    if rows * n < 8 {
        1e-8
    } else {
        TOL_F32
    }
}

/// Query rows from which CUDA's attention runs as cuBLAS GEMMs (GEMM_ATTENTION_MIN_ROWS in
/// src/backend/cuda/ops.rs).
pub const CUDA_GEMM_ATTENTION_MIN_ROWS: usize = 32;

/// Normalised MSE bound for the `cuda` variant's long-prefill attention (the flash kernel for head
/// sizes 64 and 128, GEMMs otherwise), which rounds Q and the softmax weights P to f16 (and K and V too when the cache is f32; an f16 cache is used as stored)
/// before f32-accumulated products. With u = 2^-11 (f16 keeps 11 significant bits) each rounding
/// errs by a relative delta with E[delta^2] <= u^2 / 3 ~ 8e-8 (u^2 / 6 for evenly spread
/// mantissas). A rounded P (or V) carries its delta straight into the output: normalised MSE
/// ~E[delta^2]. A rounded Q (or K) moves each scaled score s by an error of variance
/// E[delta^2] E[s^2], and a softmax weight by the same relative amount; these inputs (q, k
/// uniform in [-1, 1], scale 1/sqrt(head_dim)) have E[s^2] = 1/9. So ~1.1 E[delta^2] <= 9e-8 with
/// an f16 cache, twice that with an f32 one. The bound leaves a margin of 20x over the estimate,
/// and a single wrong output value in the smallest case here (~19k values) already exceeds it.
pub const TOL_F16_ATTENTION: f64 = 4e-6;

/// The bound for attention of `rows` query rows on variant `name` with a `kv` cache.
pub fn attention_tolerance(name: &str, kv: DType, rows: usize) -> f64 {
    let base = if kv == DType::F16 {
        TOL_F16_KV
    } else {
        TOL_F32
    };
    if name == CUDA_HALF_GEMM && rows >= CUDA_GEMM_ATTENTION_MIN_ROWS {
        base.max(TOL_F16_ATTENTION)
    } else {
        base
    }
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn randn(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| r.random_range(-1.0f32..1.0) * scale)
        .collect()
}

pub fn upload<B: Backend>(b: &B, bytes: &[u8]) -> Buf<B> {
    let mut buf = b.alloc(bytes.len().max(4)).unwrap();
    b.upload(&mut buf, 0, bytes).unwrap();
    buf
}

pub fn f32_buf<B: Backend>(b: &B, v: &[f32]) -> Buf<B> {
    upload(b, bytemuck::cast_slice(v))
}

pub fn u32_buf<B: Backend>(b: &B, v: &[u32]) -> Buf<B> {
    upload(b, bytemuck::cast_slice(v))
}

/// An output buffer of n floats, all NaN.
pub fn poisoned<B: Backend>(b: &B, n: usize) -> Buf<B> {
    f32_buf(b, &vec![f32::NAN; n])
}

pub fn read_f32<B: Backend>(b: &B, buf: &Buf<B>, n: usize) -> Vec<f32> {
    let mut out = vec![0u8; n * 4];
    b.read(buf, 0, &mut out).unwrap();
    bytemuck::cast_slice(&out).to_vec()
}

pub fn encode(dtype: DType, v: &[f32]) -> Vec<u8> {
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
        _ => unreachable!(),
    }
}

pub fn weight<B: Backend>(b: &B, dtype: DType, rows: usize, cols: usize, v: &[f32]) -> Weight<B> {
    let bytes = encode(dtype, v);
    let mut buf = Buf::exact(b, bytes.len()).unwrap();
    b.upload(&mut buf, 0, &bytes).unwrap();
    Weight {
        buf,
        dtype,
        rows,
        cols,
    }
}

/// GGUF blocks of every kind: random bytes (every quant value and packed scale occurs) with
/// the f16 block scales / mins set to modest finite values.
pub fn quant_bytes(r: &mut ChaCha8Rng, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
    let n = dtype.bytes_for(rows * cols).unwrap();
    let mut bytes: Vec<u8> = (0..n).map(|_| r.random()).collect();
    // (offset, low, high) of each f16 field in a block.
    let fields: &[(usize, f32, f32)] = match dtype {
        DType::Q8_0 | DType::Q4_0 => &[(0, -0.05, 0.05)],
        DType::Q4_1 => &[(0, 0.001, 0.05), (2, -0.5, 0.5)],
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

pub const QUANTS: [DType; 5] = [
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q4K,
    DType::Q6K,
];

pub fn raw_weight<B: Backend>(
    b: &B,
    dtype: DType,
    rows: usize,
    cols: usize,
    bytes: &[u8],
) -> Weight<B> {
    let mut buf = Buf::exact(b, bytes.len()).unwrap();
    b.upload(&mut buf, 0, bytes).unwrap();
    Weight {
        buf,
        dtype,
        rows,
        cols,
    }
}

/// Row widths for a block format: odd block counts make rows start off 4-byte boundaries.
pub fn quant_widths(dtype: DType) -> &'static [usize] {
    if dtype.block_elems() == 256 {
        &[256, 768, 1536]
    } else {
        &[32, 96, 576]
    }
}

pub fn assert_close(what: &str, cpu: &[f32], gpu: &[f32], tol: f64) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: lengths");
    if let Some(i) = gpu.iter().position(|v| v.is_nan()) {
        panic!("{what}: NaN at {i} (cpu {})", cpu[i]);
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in cpu.iter().zip(gpu) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*a as f64).powi(2);
    }
    let nmse = num / den.max(1e-30);
    if nmse > tol {
        let worst = (0..cpu.len())
            .max_by(|&i, &j| (cpu[i] - gpu[i]).abs().total_cmp(&(cpu[j] - gpu[j]).abs()))
            .unwrap();
        panic!(
            "{what}: normalised MSE {nmse:.3e} > {tol:.0e}; worst at {worst}: cpu {} gpu {}",
            cpu[worst], gpu[worst]
        );
    }
}

pub fn heads(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Heads {
    Heads {
        n_heads,
        n_kv_heads,
        head_dim,
    }
}

/// One layer's attention inputs and the schedule of (kv_append, attention) steps.
pub struct AttnCase<'a> {
    pub h: Heads,
    pub kv: DType,
    pub table: &'a [u32],
    pub pool_blocks: usize,
    pub steps: &'a [usize],
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// Every step's attention output, and the final K and V cache bytes.
pub type AttnRun = (Vec<Vec<f32>>, Vec<u8>, Vec<u8>);

/// Drives one layer's paged cache through the case's steps, as prefill and decode do.
pub fn run_attention<B: Backend>(b: &B, c: &AttnCase) -> AttnRun {
    let AttnCase {
        h,
        kv,
        table,
        pool_blocks,
        steps,
        q,
        k,
        v,
    } = *c;
    let width = h.n_kv_heads * h.head_dim;
    let cache_bytes = pool_blocks * KV_BLOCK * width * if kv == DType::F16 { 2 } else { 4 };
    // NaN in every slot (f16 NaN pairs or f32 NaN): a kernel that reads past the sequence fails.
    let nan_word = if kv == DType::F16 {
        0x7e00_7e00u32
    } else {
        f32::NAN.to_bits()
    };
    let poison = vec![nan_word; cache_bytes / 4];
    let mut kc = Buf::exact(b, cache_bytes).unwrap();
    let mut vc = Buf::exact(b, cache_bytes).unwrap();
    b.upload(&mut kc, 0, bytemuck::cast_slice(&poison)).unwrap();
    b.upload(&mut vc, 0, bytemuck::cast_slice(&poison)).unwrap();
    let tb = u32_buf(b, table);
    let qw = h.n_heads * h.head_dim;
    let mut outs = vec![];
    let mut pos0 = 0;
    for &rows in steps {
        let kb = f32_buf(b, &k[pos0 * width..(pos0 + rows) * width]);
        let vb = f32_buf(b, &v[pos0 * width..(pos0 + rows) * width]);
        b.kv_append(&mut kc, &mut vc, kv, &tb, &kb, &vb, rows, pos0, h)
            .unwrap();
        let qb = f32_buf(b, &q[pos0 * qw..(pos0 + rows) * qw]);
        let mut out = poisoned(b, rows * qw);
        let view = KvView {
            k: &kc,
            v: &vc,
            table: &tb,
            dtype: kv,
        };
        b.attention(&mut out, &qb, view, rows, pos0, h).unwrap();
        outs.push(read_f32(b, &out, rows * qw));
        pos0 += rows;
    }
    let mut kbytes = vec![0u8; cache_bytes];
    let mut vbytes = vec![0u8; cache_bytes];
    b.read(&kc, 0, &mut kbytes).unwrap();
    b.read(&vc, 0, &mut vbytes).unwrap();
    (outs, kbytes, vbytes)
}

pub fn cache_values(kv: DType, bytes: &[u8]) -> Vec<f32> {
    match kv {
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytemuck::cast_slice(bytes).to_vec(),
    }
}

/// The kept set of sample.rs and each kept token's probability weight.
pub use anyllama::sample::kept_set;

/// Whether `token` is a correct draw for the id-order walk up to float rounding: the walk
/// target u * mass, in exact (f64) arithmetic, lies in the token's cumulative interval widened
/// by the rounding the f32 reference itself makes (measured: its running sum against f64) plus
/// a slack for a parallel sum. On a big flat distribution the f32 running sum drifts by more
/// than one token's width, so two correct implementations can differ there and only there.
pub fn walk_accepts(logits: &[f32], s: &SampleOp, token: u32) -> bool {
    let (keep, p) = kept_set(logits, s);
    let (mut acc32, mut acc64, mut drift) = (0f32, 0f64, 0f64);
    let mut bounds = vec![(0f64, 0f64); logits.len()];
    for i in 0..logits.len() {
        if keep[i] {
            bounds[i].0 = acc64;
            acc32 += p[i];
            acc64 += p[i] as f64;
            drift = drift.max((acc32 as f64 - acc64).abs());
            bounds[i].1 = acc64;
        }
    }
    let target = s.uniform as f64 * acc64;
    let margin = 2.0 * drift + 1e-6 * acc64;
    let t = token as usize;
    t < logits.len() && keep[t] && bounds[t].0 - margin <= target && target <= bounds[t].1 + margin
}

/// out = x . w^T on the CPU and on `gpu` for a random x and the weight `bytes` (stored as
/// `dtype`, n rows of k values), compared by normalised MSE.
pub fn check_matmul<B: Backend>(
    name: &str,
    gpu: &B,
    r: &mut ChaCha8Rng,
    dtype: DType,
    shape: [usize; 3],
    bytes: &[u8],
) {
    let [rows, n, k] = shape;
    let cpu = Cpu::new();
    let x = randn(r, rows * k, 1.0);
    let mut oc = poisoned(&cpu, rows * n);
    let wc = raw_weight(&cpu, dtype, n, k, bytes);
    cpu.matmul(&mut oc, &f32_buf(&cpu, &x), &wc, rows).unwrap();
    let what = format!("{name} matmul {dtype} rows {rows} n {n} k {k}");
    let mut og = poisoned(gpu, rows * n);
    let wg = raw_weight(gpu, dtype, n, k, bytes);
    gpu.matmul(&mut og, &f32_buf(gpu, &x), &wg, rows)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_close(
        &what,
        &read_f32(&cpu, &oc, rows * n),
        &read_f32(gpu, &og, rows * n),
        matmul_tolerance(name, dtype, rows, n),
    );
}

/// One layer's attention inputs for a schedule of steps, and the CPU's outputs and final
/// caches for each KV dtype, computed once and compared against every variant.
pub struct AttnReference {
    pub seed: u64,
    pub h: Heads,
    pub steps: Vec<usize>,
    pub table: Vec<u32>,
    pub pool_blocks: usize,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// For each KV dtype, the CPU's run.
    pub cpu: Vec<(DType, AttnRun)>,
}

impl AttnReference {
    pub fn new(seed: u64, h: Heads, steps: &[usize]) -> AttnReference {
        let mut r = rng(seed);
        let total: usize = steps.iter().sum();
        let blocks = total.div_ceil(KV_BLOCK);
        // A block table out of order, drawn from a pool with spare blocks (never written: NaN).
        let pool_blocks = blocks + 3;
        let mut ids: Vec<u32> = (0..pool_blocks as u32).collect();
        ids.shuffle(&mut r);
        ids.truncate(blocks);
        let q = randn(&mut r, total * h.n_heads * h.head_dim, 1.0);
        let k = randn(&mut r, total * h.n_kv_heads * h.head_dim, 1.0);
        let v = randn(&mut r, total * h.n_kv_heads * h.head_dim, 1.0);
        let mut reference = AttnReference {
            seed,
            h,
            steps: steps.to_vec(),
            table: ids,
            pool_blocks,
            q,
            k,
            v,
            cpu: vec![],
        };
        let cpu = Cpu::new();
        for kv in [DType::F32, DType::F16] {
            let run = run_attention(&cpu, &reference.case(kv));
            reference.cpu.push((kv, run));
        }
        reference
    }

    pub fn case(&self, kv: DType) -> AttnCase<'_> {
        AttnCase {
            h: self.h,
            kv,
            table: &self.table,
            pool_blocks: self.pool_blocks,
            steps: &self.steps,
            q: &self.q,
            k: &self.k,
            v: &self.v,
        }
    }
}

/// kv_append and attention of `gpu` against the reference, step by step, for both KV dtypes.
pub fn check_attention<B: Backend>(name: &str, gpu: &B, reference: &AttnReference) {
    let (h, steps) = (reference.h, &reference.steps);
    for (kv, (oc, kc, vc)) in &reference.cpu {
        let kv = *kv;
        let (og, kg, vg) = run_attention(gpu, &reference.case(kv));
        let tol = if kv == DType::F16 {
            TOL_F16_KV
        } else {
            TOL_F32
        };
        // Compare the written slots only; unwritten ones stay NaN on both sides.
        let written = |bytes: &[u8]| -> Vec<f32> {
            cache_values(kv, bytes)
                .into_iter()
                .filter(|x| !x.is_nan())
                .collect()
        };
        let what = format!("{name} kv_append {h:?} {kv} steps {steps:?}");
        assert_close(&format!("{what} K"), &written(kc), &written(&kg), tol);
        assert_close(&format!("{what} V"), &written(vc), &written(&vg), tol);
        let mut pos0 = 0;
        for (i, &rows) in steps.iter().enumerate() {
            let what = format!("{name} attention {h:?} {kv} rows {rows} pos0 {pos0}");
            assert_close(&what, &oc[i], &og[i], attention_tolerance(name, kv, rows));
            pos0 += rows;
        }
    }
}
