//! The CUDA kernel sources: every file in `SOURCES` compiles with NVRTC to a cubin for the
//! architectures the backend targets (no GPU or driver needed, only libnvrtc), and the CUDA
//! kernel files cover every op that has a WGSL shader. Without libnvrtc the compile test prints
//! why and passes, except when ANYLLAMA_REQUIRE_CUDA is set.
//!
//! Then the paths only CUDA has, on the device (both CUDA variants of parity::with_cudas;
//! without a CUDA driver they print why and pass, except when ANYLLAMA_REQUIRE_CUDA is set):
//! the one-kernel rope_kv_append against rope then kv_append, decode attention (both kernels, with
//! one split and many, merged by the combine pass), plainly and inside recorded and replayed
//! decode-step graphs, and the prefill projections that share one rounded norm
//! output or add into the residual through the GEMM, against the CPU backend.

#![cfg(feature = "cuda")]

mod common;
#[allow(unused_macros)]
mod parity;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::cuda::{compile, nvrtc_available, Cuda, CudaOptions, SOURCES};
use anyllama::backend::params::KV_BLOCK;
use anyllama::backend::{
    rope_kv_append_unfused, Backend, Heads, KvSlot, KvView, RmsNormed, RopeArgs,
};
use anyllama::dtype::DType;
use anyllama::pool::Buf;
use parity::*;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::path::Path;

/// Ampere (A100) and Hopper (H100/H200).
const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

#[test]
fn every_kernel_file_compiles_with_nvrtc() {
    if !nvrtc_available() {
        common::skip_or_fail_cuda(
            "cuda kernel compile",
            "no NVRTC (libnvrtc) to compile the CUDA kernels",
        );
        return;
    }
    // Every file for every architecture, then one report of all that failed.
    let mut failures = vec![];
    for arch in ARCHS {
        for &(stem, src) in SOURCES {
            match compile(stem, src, arch) {
                // A cubin is an ELF image; anything else (PTX text, an empty buffer) would make
                // the driver JIT or fail at load time.
                Ok(cubin) if cubin.starts_with(b"\x7fELF") => {}
                Ok(cubin) => failures.push(format!(
                    "{stem}.cu for {arch}: NVRTC returned {} bytes that are not an ELF cubin",
                    cubin.len()
                )),
                Err(e) => failures.push(format!("{stem}.cu for {arch}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// WGSL shaders whose op lives in a CUDA file of another name: wgpu splits these kernels into
/// one file per pipeline (f16 and block-format weights, decode / prefill / split-KV combine),
/// while CUDA keeps all variants of an op in one translation unit.
const WGSL_ONLY: [(&str, &str); 9] = [
    ("matmul_f16", "matmul"),
    ("matmul_quant", "matmul"),
    ("matmul_plain", "matmul"),
    ("matmul_norm", "matmul"),
    ("embedding_quant", "embedding"),
    ("attention_decode", "attention"),
    ("attention_prefill", "attention"),
    ("attention_combine", "attention"),
    ("rope_rows", "rope"),
];

fn stems(dir: &Path, ext: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn cuda_kernels_cover_every_wgsl_shader() {
    let shaders = common::root().join("shaders");
    let wgsl = stems(&shaders.join("wgsl"), "wgsl");
    let cuda = stems(&shaders.join("cuda"), "cu");
    assert!(!wgsl.is_empty(), "no shaders under {}", shaders.display());
    for stem in &wgsl {
        let holder = WGSL_ONLY
            .iter()
            .find(|(w, _)| w == stem)
            .map_or(stem.as_str(), |(_, c)| *c);
        assert!(
            cuda.contains(holder),
            "shaders/wgsl/{stem}.wgsl has no CUDA counterpart shaders/cuda/{holder}.cu \
             (add one, or list it in WGSL_ONLY with the file that holds its kernels)"
        );
    }
    for (w, _) in WGSL_ONLY {
        assert!(
            wgsl.contains(w),
            "WGSL_ONLY lists {w}, which is not in shaders/wgsl: drop it from the list"
        );
    }
    // Every .cu file is compiled by the backend: one left out of SOURCES would never run.
    let compiled: BTreeSet<String> = SOURCES.iter().map(|(s, _)| s.to_string()).collect();
    assert_eq!(
        cuda, compiled,
        "shaders/cuda/*.cu and anyllama::backend::cuda::SOURCES differ"
    );
}

// ---- rope_kv_append ----

/// A paged cache of `blocks` blocks, every slot NaN (f16 NaN pairs or f32 NaN).
fn nan_cache<B: Backend>(b: &B, kv: DType, blocks: usize, width: usize) -> Buf<B> {
    let bytes = blocks * KV_BLOCK * width * if kv == DType::F16 { 2 } else { 4 };
    let word = if kv == DType::F16 {
        0x7e00_7e00u32
    } else {
        f32::NAN.to_bits()
    };
    upload(b, bytemuck::cast_slice(&vec![word; bytes / 4]))
}

fn read_bytes<B: Backend>(b: &B, buf: &Buf<B>, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    b.read(buf, 0, &mut out).unwrap();
    out
}

/// A block table of `len` entries into a pool of `pool` blocks (pool prime and > 5), out of
/// order: consecutive blocks land `5` apart, so up to `pool` consecutive blocks never share one.
fn scattered_table(len: usize, pool: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 5 + 3) % pool) as u32).collect()
}

struct RopeCase {
    h: Heads,
    kv: DType,
    rows: usize,
    pos0: usize,
    attn_scale: f32,
    pool: usize,
    table: Vec<u32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    inv_freq: Vec<f32>,
}

/// q and k after the op, and the K and V cache bytes: `fused` calls the backend's
/// rope_kv_append, else the trait's default (rope, then kv_append).
type RopeRun = (Vec<f32>, Vec<f32>, Vec<u8>, Vec<u8>);

fn run_rope_kv<B: Backend>(b: &B, c: &RopeCase, fused: bool) -> RopeRun {
    let h = c.h;
    let width = h.n_kv_heads * h.head_dim;
    let (mut q, mut k, v) = (f32_buf(b, &c.q), f32_buf(b, &c.k), f32_buf(b, &c.v));
    let mut kc = nan_cache(b, c.kv, c.pool, width);
    let mut vc = nan_cache(b, c.kv, c.pool, width);
    let (table, inv_freq) = (u32_buf(b, &c.table), f32_buf(b, &c.inv_freq));
    let cache = KvSlot {
        k: &mut kc,
        v: &mut vc,
        table: &table,
        dtype: c.kv,
    };
    let rope = RopeArgs {
        inv_freq: &inv_freq,
        attn_scale: c.attn_scale,
    };
    let (rows, pos0) = (c.rows, c.pos0);
    if fused {
        b.rope_kv_append(&mut q, &mut k, &v, cache, rope, rows, pos0, h)
    } else {
        rope_kv_append_unfused(b, &mut q, &mut k, &v, cache, rope, rows, pos0, h)
    }
    .unwrap();
    let cache_bytes = c.pool * KV_BLOCK * width * if c.kv == DType::F16 { 2 } else { 4 };
    (
        read_f32(b, &q, c.q.len()),
        read_f32(b, &k, c.k.len()),
        read_bytes(b, &kc, cache_bytes),
        read_bytes(b, &vc, cache_bytes),
    )
}

/// The same slots written (NaN elsewhere) and the written values within `tol`.
fn assert_same_cache(what: &str, kv: DType, want: &[u8], got: &[u8], tol: f64) {
    let (a, b) = (cache_values(kv, want), cache_values(kv, got));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            x.is_nan(),
            y.is_nan(),
            "{what}: slot value {i} written by one side only ({x} vs {y})"
        );
    }
    let written = |v: &[f32]| -> Vec<f32> { v.iter().copied().filter(|x| !x.is_nan()).collect() };
    assert_close(what, &written(&a), &written(&b), tol);
}

fn check_rope_kv_append<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    let cpu = Cpu::new();
    for h in [
        heads(32, 8, 64),
        heads(9, 3, 64),
        heads(4, 1, 128),
        heads(8, 8, 32),
        heads(6, 2, 96),
        heads(2, 1, 256),
    ] {
        // One row at a block's start and end, rows across block boundaries, a prefill, and
        // positions far out (the table is long; only the touched blocks hold data).
        for (rows, pos0, attn_scale) in [
            (1, 0, 1.0),
            (1, 15, 1.0),
            (3, 14, 1.3),
            (37, 5, 1.0),
            (40, 1000, 1.0),
            (2, 31_000, 0.9),
        ] {
            for kv in [DType::F32, DType::F16] {
                let end = pos0 + rows;
                let pool = 7;
                let c = RopeCase {
                    h,
                    kv,
                    rows,
                    pos0,
                    attn_scale,
                    pool,
                    table: scattered_table(end.div_ceil(KV_BLOCK), pool),
                    q: randn(r, rows * h.n_heads * h.head_dim, 1.0),
                    k: randn(r, rows * h.n_kv_heads * h.head_dim, 1.0),
                    v: randn(r, rows * h.n_kv_heads * h.head_dim, 1.0),
                    inv_freq: (0..h.head_dim / 2)
                        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / h.head_dim as f32))
                        .collect(),
                };
                let what = format!("{name} rope_kv_append {h:?} {kv} rows {rows} pos0 {pos0}");
                let fused = run_rope_kv(gpu, &c, true);
                let unfused = run_rope_kv(gpu, &c, false);
                let reference = run_rope_kv(&cpu, &c, false);
                let cache_tol = if kv == DType::F16 {
                    TOL_F16_KV
                } else {
                    TOL_F32
                };
                // The fused kernel does what rope then kv_append do on the device.
                assert_close(
                    &format!("{what} q vs unfused"),
                    &unfused.0,
                    &fused.0,
                    TOL_F32,
                );
                assert_close(
                    &format!("{what} k vs unfused"),
                    &unfused.1,
                    &fused.1,
                    TOL_F32,
                );
                assert_same_cache(
                    &format!("{what} K vs unfused"),
                    kv,
                    &unfused.2,
                    &fused.2,
                    cache_tol,
                );
                assert_same_cache(
                    &format!("{what} V vs unfused"),
                    kv,
                    &unfused.3,
                    &fused.3,
                    cache_tol,
                );
                // And what the CPU reference does (sin / cos of large angles: a few ulps).
                let rope_tol = if pos0 > 10_000 { 1e-8 } else { 1e-9 };
                assert_close(
                    &format!("{what} q vs cpu"),
                    &reference.0,
                    &fused.0,
                    rope_tol,
                );
                assert_close(
                    &format!("{what} k vs cpu"),
                    &reference.1,
                    &fused.1,
                    rope_tol,
                );
                let kv_tol = cache_tol.max(rope_tol);
                assert_same_cache(
                    &format!("{what} K vs cpu"),
                    kv,
                    &reference.2,
                    &fused.2,
                    kv_tol,
                );
                assert_same_cache(
                    &format!("{what} V vs cpu"),
                    kv,
                    &reference.3,
                    &fused.3,
                    cache_tol,
                );
            }
        }
    }
}

/// Bad arguments are errors naming the op, as they are for rope and kv_append.
fn check_rope_kv_append_rejects(name: &str, gpu: &Cuda) {
    let h = heads(4, 2, 16);
    let (rows, pos0) = (2, 30);
    let width = h.n_kv_heads * h.head_dim;
    let mut q = poisoned(gpu, rows * h.n_heads * h.head_dim);
    let mut k = poisoned(gpu, rows * width);
    let v = poisoned(gpu, rows * width);
    let mut kc = nan_cache(gpu, DType::F32, 4, width);
    let mut vc = nan_cache(gpu, DType::F32, 4, width);
    let table = u32_buf(gpu, &[0, 1, 2]);
    let short_table = u32_buf(gpu, &[0]);
    let inv_freq = f32_buf(gpu, &[1.0; 8]);
    // Buffers are rounded up to the pool's size classes (at least 64 u32 entries), so the
    // short table is short only for a position past 64 blocks.
    let far = 100 * 16;
    let mut go = |table: &Buf<Cuda>, dtype: DType, rows: usize, pos0: usize, h: Heads| {
        let cache = KvSlot {
            k: &mut kc,
            v: &mut vc,
            table,
            dtype,
        };
        let rope = RopeArgs {
            inv_freq: &inv_freq,
            attn_scale: 1.0,
        };
        gpu.rope_kv_append(&mut q, &mut k, &v, cache, rope, rows, pos0, h)
    };
    go(&table, DType::F32, rows, pos0, h).unwrap_or_else(|e| panic!("{name}: valid call: {e}"));
    for (what, result) in [
        (
            "a table too short",
            go(&short_table, DType::F32, rows, far, h),
        ),
        ("a bf16 cache", go(&table, DType::BF16, rows, pos0, h)),
        ("q too short", go(&table, DType::F32, rows + 1, pos0, h)),
        (
            "an odd head_dim",
            go(&table, DType::F32, 1, pos0, heads(4, 2, 15)),
        ),
        (
            "heads that do not group",
            go(&table, DType::F32, 1, pos0, heads(3, 2, 16)),
        ),
    ] {
        let e = result.expect_err(&format!("{name}: rope_kv_append with {what}"));
        assert!(
            e.to_string().contains("rope_kv_append"),
            "{name}: the error for {what} names the op: {e}"
        );
    }
    gpu.sync().unwrap();
}

#[test]
fn rope_kv_append_is_rope_then_kv_append() {
    let mut r = rng(21);
    with_cudas(|cudas| {
        for (name, gpu) in cudas {
            check_rope_kv_append(name, gpu, &mut r);
            check_rope_kv_append_rejects(name, gpu);
        }
    });
}

// ---- decode attention: one split, many splits, graphs ----

/// One layer's decode: a prefix of `prefix` positions stored at once, then `steps` steps of
/// `rows` rows, each storing its k, v and attending; `graph` runs each step through
/// decode_step (CUDA: traced, captured as a graph on a new trace, replayed on a known one).
struct DecodeCase {
    h: Heads,
    kv: DType,
    prefix: usize,
    rows: usize,
    steps: usize,
    table: Vec<u32>,
    pool: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Every step's attention output (poisoned with NaN before each step).
fn run_decode<B: Backend>(b: &B, c: &DecodeCase, graph: bool) -> Vec<Vec<f32>> {
    let (h, kv, rows) = (c.h, c.kv, c.rows);
    let (width, qw) = (h.n_kv_heads * h.head_dim, h.n_heads * h.head_dim);
    let mut kc = nan_cache(b, kv, c.pool, width);
    let mut vc = nan_cache(b, kv, c.pool, width);
    let tb = u32_buf(b, &c.table);
    if c.prefix > 0 {
        let (kp, vp) = (&c.k[..c.prefix * width], &c.v[..c.prefix * width]);
        let (kb, vb) = (f32_buf(b, kp), f32_buf(b, vp));
        b.kv_append(&mut kc, &mut vc, kv, &tb, &kb, &vb, c.prefix, 0, h)
            .unwrap();
    }
    // The same buffers every step, as the generator's scratch: a replayed graph reads them.
    let (mut kb, mut vb, mut qb) = (
        poisoned(b, rows * width),
        poisoned(b, rows * width),
        poisoned(b, rows * qw),
    );
    let mut out = poisoned(b, rows * qw);
    let mut outs = vec![];
    for s in 0..c.steps {
        let pos0 = c.prefix + s * rows;
        let bytes = |v: &[f32], w: usize| -> Vec<u8> {
            bytemuck::cast_slice::<f32, u8>(&v[pos0 * w..(pos0 + rows) * w]).to_vec()
        };
        b.upload(&mut kb, 0, &bytes(&c.k, width)).unwrap();
        b.upload(&mut vb, 0, &bytes(&c.v, width)).unwrap();
        b.upload(&mut qb, 0, &bytes(&c.q, qw)).unwrap();
        let nan = vec![f32::NAN; rows * qw];
        b.upload(&mut out, 0, bytemuck::cast_slice(&nan)).unwrap();
        let mut step = || {
            b.kv_append(&mut kc, &mut vc, kv, &tb, &kb, &vb, rows, pos0, h)?;
            let view = KvView {
                k: &kc,
                v: &vc,
                table: &tb,
                dtype: kv,
            };
            b.attention(&mut out, &qb, view, rows, pos0, h)
        };
        if graph {
            b.decode_step(&mut step).unwrap();
        } else {
            step().unwrap();
        }
        outs.push(read_f32(b, &out, rows * qw));
    }
    outs
}

fn check_decode_attention<B: Backend>(name: &str, gpu: &B, seed: u64, h: Heads, shape: [usize; 3]) {
    let [prefix, rows, steps] = shape;
    let cpu = Cpu::new();
    let mut r = rng(seed);
    let total = prefix + rows * steps;
    let blocks = total.div_ceil(KV_BLOCK);
    let pool = blocks + 3;
    let mut table: Vec<u32> = (0..pool as u32).collect();
    table.shuffle(&mut r);
    table.truncate(blocks);
    for kv in [DType::F32, DType::F16] {
        let c = DecodeCase {
            h,
            kv,
            prefix,
            rows,
            steps,
            table: table.clone(),
            pool,
            q: randn(&mut r, total * h.n_heads * h.head_dim, 1.0),
            k: randn(&mut r, total * h.n_kv_heads * h.head_dim, 1.0),
            v: randn(&mut r, total * h.n_kv_heads * h.head_dim, 1.0),
        };
        let want = run_decode(&cpu, &c, false);
        for graph in [false, true] {
            let got = run_decode(gpu, &c, graph);
            for (s, (w, g)) in want.iter().zip(&got).enumerate() {
                let pos0 = prefix + s * rows;
                let what = format!(
                    "{name} decode attention {h:?} {kv} rows {rows} pos0 {pos0} graph {graph}"
                );
                assert_close(&what, w, g, attention_tolerance(name, kv, rows));
            }
        }
    }
}

#[test]
fn decode_attention_with_one_split_and_many() {
    // [prefix, rows per step, steps]. With an f16 cache, decode runs attention_decode_f16: one
    // block per query head up to 2048 positions of context (the end of a recorded step's
    // 256-position bucket), split past that (merged by attention_combine). An f32 cache runs
    // attention_decode, split-KV: ~264 blocks wanted over (kv heads x rows) blocks per split,
    // splits of >= 32 positions. Every case also runs on a backend whose f16 kernel always
    // splits, so both kernels' splits are covered at every length.
    let cases = [
        // Up to 32 positions: one split run directly, 8 (mostly empty) in a graph.
        (heads(32, 8, 64), [0, 1, 20]),
        (heads(8, 2, 64), [3, 4, 7]),
        // Two splits, then several; steps that cross the 256-position bucket (a new graph).
        (heads(32, 8, 64), [40, 1, 3]),
        (heads(9, 3, 64), [253, 1, 6]),
        // Long context, GQA 3, three-row steps: ~30 splits.
        (heads(9, 3, 64), [997, 3, 2]),
        // The largest group and head_dim the decode kernel takes.
        (heads(16, 1, 128), [100, 1, 3]),
        // 66 kv heads x 4 rows = 264 blocks: one split at any length, several chunks of 128
        // positions in that one block, in a graph too.
        (heads(66, 66, 32), [300, 4, 2]),
        // f16 kernel: head_dim 256 (one warp per position); steps whose context passes 2048,
        // from one split to several (two rows per step; one row per step in graphs whose
        // bucket ends at 2048, then 2304); several passes of the kernel's loop per block.
        (heads(4, 2, 256), [30, 1, 3]),
        (heads(32, 8, 128), [2034, 2, 10]),
        (heads(9, 3, 64), [1900, 1, 200]),
    ];
    let split_only = common::cuda_backend_with(
        "cuda decode attention, always split",
        CudaOptions {
            short_decode_positions: Some(0),
            ..Default::default()
        },
    );
    with_cudas(|cudas| {
        let mut kernels = BTreeSet::new();
        let split = split_only.iter().map(|b| ("cuda-always-split", b));
        for (name, gpu) in cudas.iter().map(|(n, b)| (*n, b)).chain(split) {
            for (i, &(h, [prefix, rows, steps])) in cases.iter().enumerate() {
                check_decode_attention(name, gpu, 40 + i as u64, h, [prefix, rows, steps]);
                for s in 0..steps {
                    for kv in [DType::F32, DType::F16] {
                        let pos0 = prefix + s * rows;
                        kernels.extend(gpu.decode_attention_kernel(rows, pos0, h, kv));
                    }
                }
            }
        }
        if !cudas.is_empty() {
            let want = BTreeSet::from([
                "attention_decode",
                "attention_decode_f16",
                "attention_decode_f16 + combine",
            ]);
            assert_eq!(kernels, want, "decode attention kernels the cases ran");
        }
    });
}

// ---- prefill projections on cuBLAS ----

/// Random weights of `n` rows of `k` in `dtype` (float or block format), as stored.
fn weight_bytes(r: &mut ChaCha8Rng, dtype: DType, n: usize, k: usize) -> Vec<u8> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => encode(dtype, &randn(r, n * k, 0.5)),
        _ => quant_bytes(r, dtype, n, k),
    }
}

/// The loosest bound of the matmuls that make up an output.
fn tolerance(name: &str, dtypes: &[DType], rows: usize, n: usize) -> f64 {
    dtypes
        .iter()
        .map(|&d| matmul_tolerance(name, d, rows, n))
        .fold(0.0, f64::max)
}

/// resid += x . w^T (+ bias) for prefill row counts (cuBLAS with beta = 1, or the mat-vec's
/// epilogue where k is not whole octets) against the CPU's matmul + add.
fn check_matmul_residual<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    let cpu = Cpu::new();
    let shapes = [(576, 1536), (130, 64), (300, 40), (50, 36), (96, 256)];
    for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4K] {
        for rows in [3, 9, 64, 200] {
            for (n, k) in shapes {
                if k % dtype.block_elems() != 0 {
                    continue;
                }
                for with_bias in [false, true] {
                    let what = format!(
                        "{name} matmul_residual {dtype} rows {rows} n {n} k {k} bias {with_bias}"
                    );
                    let w = weight_bytes(r, dtype, n, k);
                    let (x, resid, bias) = (
                        randn(r, rows * k, 1.0),
                        randn(r, rows * n, 2.0),
                        randn(r, n, 1.0),
                    );
                    let mut outs = vec![];
                    macro_rules! go {
                        ($b:expr) => {{
                            let b = $b;
                            let wb = raw_weight(b, dtype, n, k, &w);
                            let mut res = f32_buf(b, &resid);
                            let mut tmp = poisoned(b, rows * n);
                            let bb = f32_buf(b, &bias);
                            b.matmul_residual(
                                &mut res,
                                &mut tmp,
                                &f32_buf(b, &x),
                                &wb,
                                with_bias.then_some(&bb),
                                rows,
                            )
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                            outs.push(read_f32(b, &res, rows * n));
                        }};
                    }
                    go!(&cpu);
                    go!(gpu);
                    let tol = tolerance(name, &[dtype], rows, n);
                    assert_close(&what, &outs[0], &outs[1], tol);
                }
            }
        }
    }
}

#[test]
fn matmul_residual_on_every_path_matches_cpu() {
    let mut r = rng(22);
    with_cudas(|cudas| {
        for (name, gpu) in cudas {
            check_matmul_residual(name, gpu, &mut r);
        }
    });
}

/// norm_qkv and ffn_gate_up for prefill row counts with weights whose GEMMs share the rounded
/// norm output (one half type, k whole octets) and ones that do not (mixed half types, f32,
/// k not whole octets), against the CPU's rms_norm + matmuls (+ biases + swiglu).
fn check_prefill_projections<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    let cpu = Cpu::new();
    let sets: [(usize, [DType; 3]); 7] = [
        (512, [DType::BF16; 3]),
        (512, [DType::F16, DType::Q8_0, DType::Q6K]),
        (512, [DType::Q4K, DType::Q4K, DType::Q6K]),
        (512, [DType::BF16, DType::F16, DType::F16]),
        (256, [DType::F32, DType::F32, DType::F32]),
        (40, [DType::F16; 3]),
        (36, [DType::BF16; 3]),
    ];
    // Output widths of q, k, v (k and v narrower, as with GQA); gate and up use the first.
    let ns = [192, 64, 64];
    for (k, dtypes) in sets {
        for rows in [9, 64, 200] {
            for with_bias in [false, true] {
                let what = format!("{name} prefill {dtypes:?} rows {rows} k {k} bias {with_bias}");
                let ws: Vec<Vec<u8>> = (0..3)
                    .map(|i| weight_bytes(r, dtypes[i], ns[i], k))
                    .collect();
                // Gate and up: the first matrix's shape, the first two dtypes.
                let w3_bytes = weight_bytes(r, dtypes[1], ns[0], k);
                let x = randn(r, rows * k, 1.0);
                let norm: Vec<f32> = randn(r, k, 0.2).iter().map(|v| 1.0 + v).collect();
                let bias = randn(r, ns[0], 1.0);
                let mut outs = vec![];
                macro_rules! go {
                    ($b:expr) => {{
                        let b = $b;
                        let w: Vec<_> = (0..3)
                            .map(|i| raw_weight(b, dtypes[i], ns[i], k, &ws[i]))
                            .collect();
                        let (xb, gb, bb) = (f32_buf(b, &x), f32_buf(b, &norm), f32_buf(b, &bias));
                        let normed = RmsNormed {
                            x: &xb,
                            weight: &gb,
                            eps: 1e-5,
                        };
                        let mut h = poisoned(b, rows * k);
                        let mut qkv: Vec<_> = ns.iter().map(|&n| poisoned(b, rows * n)).collect();
                        let [q, kk, v] = &mut qkv[..] else {
                            unreachable!()
                        };
                        b.norm_qkv([q, kk, v], &mut h, normed, [&w[0], &w[1], &w[2]], rows)
                            .unwrap_or_else(|e| panic!("{what} norm_qkv: {e}"));
                        let n = ns[0];
                        let w3 = raw_weight(b, dtypes[1], n, k, &w3_bytes);
                        let mut out = poisoned(b, rows * n);
                        let (mut g, mut u) = (poisoned(b, rows * n), poisoned(b, rows * n));
                        let bias_ref = with_bias.then_some(&bb);
                        b.ffn_gate_up(
                            &mut out,
                            [&mut g, &mut u, &mut h],
                            normed,
                            (&w[0], &w3),
                            (bias_ref, bias_ref),
                            rows,
                        )
                        .unwrap_or_else(|e| panic!("{what} ffn_gate_up: {e}"));
                        let mut read: Vec<Vec<f32>> = qkv
                            .iter()
                            .zip(ns)
                            .map(|(o, n)| read_f32(b, o, rows * n))
                            .collect();
                        read.push(read_f32(b, &out, rows * n));
                        outs.push(read);
                    }};
                }
                go!(&cpu);
                go!(gpu);
                for (i, part) in ["q", "k", "v"].iter().enumerate() {
                    let tol = tolerance(name, &[dtypes[i]], rows, ns[i]);
                    assert_close(&format!("{what} {part}"), &outs[0][i], &outs[1][i], tol);
                }
                let tol = tolerance(name, &dtypes[..2], rows, ns[0]);
                assert_close(&format!("{what} gate/up"), &outs[0][3], &outs[1][3], tol);
            }
        }
    }
}

#[test]
fn prefill_projections_share_the_rounded_norm() {
    let mut r = rng(23);
    with_cudas(|cudas| {
        for (name, gpu) in cudas {
            check_prefill_projections(name, gpu, &mut r);
        }
    });
}
