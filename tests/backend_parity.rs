//! Every op of the wgpu backend against the CPU reference backend (src/backend/cpu.rs), on the
//! same inputs, over shapes that hit the kernels' edges: one row, odd row counts, widths that are
//! not powers of two (and odd where the op allows), pos0 > 0, GQA ratios 1/3/4/8, sequences that
//! cross paged-block boundaries with block tables out of order, both KV dtypes, the decode and
//! prefill paths of matmul and attention, and a ~1000-position context for split-KV decoding.
//! GPU outputs (and unwritten KV cache slots) are poisoned with NaN first; any NaN fails.
//! Float results are compared by normalised MSE (sum (a-b)^2 / sum a^2); token ids must match.
//!
//! The kernels run in every variant the adapter allows: the default one and, where it has
//! SHADER_F16 / SUBGROUP, the portable one too. With no adapter the tests print why and pass,
//! except when the CI variable is set: then they fail (CI must run them, on lavapipe).

#![cfg(feature = "wgpu")]

use anyllama::backend::cpu::Cpu;
use anyllama::backend::params::KV_BLOCK;
use anyllama::backend::wgpu::{Wgpu, WgpuOptions};
use anyllama::backend::{Backend, Heads, KvView, SampleOp, Weight};
use anyllama::dtype::DType;
use anyllama::pool::Buf;
use half::{bf16, f16};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::OnceLock;

/// Normalised MSE bounds: f32 paths differ only in summation order and transcendental ulps;
/// an f16 KV cache adds a rounding per stored value (the conversion may round differently).
const TOL_F32: f64 = 1e-10;
const TOL_F16_KV: f64 = 1e-5;

fn open(options: WgpuOptions) -> Option<Wgpu> {
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

/// The variants to test, opened once per process and shared by the tests (as an application
/// shares its one device): default kernels, plus the portable ones where they differ.
fn gpus() -> &'static [(&'static str, Wgpu)] {
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
const CHUNKED_BINDING: u64 = 16384;

/// A variant whose storage bindings are capped at CHUNKED_BINDING bytes, so that small weights
/// and embedding tables take the row-chunked path of tensors over the binding limit.
fn chunked() -> Option<&'static Wgpu> {
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

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn randn(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| r.random_range(-1.0f32..1.0) * scale)
        .collect()
}

fn upload<B: Backend>(b: &B, bytes: &[u8]) -> Buf<B> {
    let mut buf = b.alloc(bytes.len().max(4)).unwrap();
    b.upload(&mut buf, 0, bytes).unwrap();
    buf
}

fn f32_buf<B: Backend>(b: &B, v: &[f32]) -> Buf<B> {
    upload(b, bytemuck::cast_slice(v))
}

fn u32_buf<B: Backend>(b: &B, v: &[u32]) -> Buf<B> {
    upload(b, bytemuck::cast_slice(v))
}

/// An output buffer of n floats, all NaN.
fn poisoned<B: Backend>(b: &B, n: usize) -> Buf<B> {
    f32_buf(b, &vec![f32::NAN; n])
}

fn read_f32<B: Backend>(b: &B, buf: &Buf<B>, n: usize) -> Vec<f32> {
    let mut out = vec![0u8; n * 4];
    b.read(buf, 0, &mut out).unwrap();
    bytemuck::cast_slice(&out).to_vec()
}

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
        _ => unreachable!(),
    }
}

fn weight<B: Backend>(b: &B, dtype: DType, rows: usize, cols: usize, v: &[f32]) -> Weight<B> {
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
fn quant_bytes(r: &mut ChaCha8Rng, dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
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

const QUANTS: [DType; 5] = [
    DType::Q8_0,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q4K,
    DType::Q6K,
];

fn raw_weight<B: Backend>(
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
fn quant_widths(dtype: DType) -> &'static [usize] {
    if dtype.block_elems() == 256 {
        &[256, 768, 1536]
    } else {
        &[32, 96, 576]
    }
}

fn assert_close(what: &str, cpu: &[f32], gpu: &[f32], tol: f64) {
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

#[test]
fn embedding_widens_every_float_dtype_exactly() {
    let cpu = Cpu::new();
    // Tables over the storage binding limit are looked up in row chunks: `chunked` forces it.
    let mut variants: Vec<(&str, &Wgpu)> = gpus().iter().map(|(n, g)| (*n, g)).collect();
    variants.extend(chunked().map(|g| ("chunked", g)));
    let mut r = rng(1);
    for (name, gpu) in variants {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (vocab, dim) in [(50, 576), (700, 12), (33, 7), (5, 1)] {
                if name == "chunked" && dim > 12 {
                    continue;
                }
                let table = randn(&mut r, vocab * dim, 2.0);
                let ids: Vec<u32> = (0..5).map(|_| r.random_range(0..vocab as u32)).collect();
                for n in [1, ids.len()] {
                    let what =
                        format!("{name} embedding {dtype} vocab {vocab} dim {dim} tokens {n}");
                    let mut outs = vec![];
                    let tc = weight(&cpu, dtype, vocab, dim, &table);
                    let mut oc = poisoned(&cpu, n * dim);
                    cpu.embedding(&mut oc, &u32_buf(&cpu, &ids), &tc, n)
                        .unwrap();
                    outs.push(read_f32(&cpu, &oc, n * dim));
                    let tg = weight(gpu, dtype, vocab, dim, &table);
                    let mut og = poisoned(gpu, n * dim);
                    gpu.embedding(&mut og, &u32_buf(gpu, &ids), &tg, n).unwrap();
                    outs.push(read_f32(gpu, &og, n * dim));
                    assert_close(&what, &outs[0], &outs[1], 0.0);
                }
            }
        }
    }
}

fn check_quant_embedding(
    name: &str,
    gpu: &Wgpu,
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

#[test]
fn embedding_decodes_every_block_format() {
    let mut r = rng(11);
    for (name, gpu) in gpus() {
        for dtype in QUANTS {
            for &dim in quant_widths(dtype) {
                check_quant_embedding(name, gpu, &mut r, dtype, 50, dim);
            }
        }
    }
    if let Some(gpu) = chunked() {
        for dtype in QUANTS {
            let dim = if dtype.block_elems() == 256 { 256 } else { 96 };
            check_quant_embedding("chunked", gpu, &mut r, dtype, 600, dim);
        }
    }
}

#[test]
fn rms_norm_matches() {
    let cpu = Cpu::new();
    let mut r = rng(2);
    for (name, gpu) in gpus() {
        for (rows, dim) in [(1, 576), (3, 1536), (7, 49), (2, 5000), (5, 1)] {
            let x = randn(&mut r, rows * dim, 3.0);
            let w = randn(&mut r, dim, 1.0);
            let mut oc = poisoned(&cpu, rows * dim);
            cpu.rms_norm(
                &mut oc,
                &f32_buf(&cpu, &x),
                &f32_buf(&cpu, &w),
                rows,
                dim,
                1e-5,
            )
            .unwrap();
            let mut og = poisoned(gpu, rows * dim);
            gpu.rms_norm(
                &mut og,
                &f32_buf(gpu, &x),
                &f32_buf(gpu, &w),
                rows,
                dim,
                1e-5,
            )
            .unwrap();
            assert_close(
                &format!("{name} rms_norm rows {rows} dim {dim}"),
                &read_f32(&cpu, &oc, rows * dim),
                &read_f32(gpu, &og, rows * dim),
                TOL_F32,
            );
        }
    }
}

fn check_matmul(
    name: &str,
    gpu: &Wgpu,
    r: &mut ChaCha8Rng,
    dtype: DType,
    rows: usize,
    n: usize,
    k: usize,
) {
    let cpu = Cpu::new();
    let x = randn(r, rows * k, 1.0);
    let w = randn(r, n * k, 1.0);
    let mut oc = poisoned(&cpu, rows * n);
    cpu.matmul(
        &mut oc,
        &f32_buf(&cpu, &x),
        &weight(&cpu, dtype, n, k, &w),
        rows,
    )
    .unwrap();
    let mut og = poisoned(gpu, rows * n);
    gpu.matmul(
        &mut og,
        &f32_buf(gpu, &x),
        &weight(gpu, dtype, n, k, &w),
        rows,
    )
    .unwrap();
    assert_close(
        &format!("{name} matmul {dtype} rows {rows} n {n} k {k}"),
        &read_f32(&cpu, &oc, rows * n),
        &read_f32(gpu, &og, rows * n),
        TOL_F32,
    );
}

#[test]
fn matmul_matches_for_every_dtype_and_path() {
    let mut r = rng(3);
    for (name, gpu) in gpus() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            // Rows up to 8 take the mat-vec kernel, more the tiled one.
            for rows in [1, 3, 5, 8, 9, 17, 70] {
                for (n, k) in [(576, 576), (192, 1536), (49, 50), (33, 7), (130, 68)] {
                    check_matmul(name, gpu, &mut r, dtype, rows, n, k);
                }
            }
        }
    }
    // Weights over the storage binding limit are bound in row chunks.
    if let Some(gpu) = chunked() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (rows, n, k) in [(1, 1000, 12), (3, 1200, 8), (12, 300, 64), (9, 440, 25)] {
                check_matmul("chunked", gpu, &mut r, dtype, rows, n, k);
            }
        }
    }
}

fn check_quant_matmul(
    name: &str,
    gpu: &Wgpu,
    r: &mut ChaCha8Rng,
    dtype: DType,
    rows: usize,
    n: usize,
    k: usize,
) {
    let cpu = Cpu::new();
    let x = randn(r, rows * k, 1.0);
    let bytes = quant_bytes(r, dtype, n, k);
    let mut oc = poisoned(&cpu, rows * n);
    cpu.matmul(
        &mut oc,
        &f32_buf(&cpu, &x),
        &raw_weight(&cpu, dtype, n, k, &bytes),
        rows,
    )
    .unwrap();
    let mut og = poisoned(gpu, rows * n);
    gpu.matmul(
        &mut og,
        &f32_buf(gpu, &x),
        &raw_weight(gpu, dtype, n, k, &bytes),
        rows,
    )
    .unwrap();
    // A handful of outputs may all be small by cancellation, which makes the normalised
    // error of a different summation order large: bound those more loosely.
    let tol = if rows * n < 8 { 1e-8 } else { TOL_F32 };
    assert_close(
        &format!("{name} matmul {dtype} rows {rows} n {n} k {k}"),
        &read_f32(&cpu, &oc, rows * n),
        &read_f32(gpu, &og, rows * n),
        tol,
    );
}

#[test]
fn matmul_decodes_every_block_format() {
    let mut r = rng(12);
    for (name, gpu) in gpus() {
        for dtype in QUANTS {
            for rows in [1, 4, 5, 9, 33] {
                for &k in quant_widths(dtype) {
                    for n in [1, 49, 130] {
                        check_quant_matmul(name, gpu, &mut r, dtype, rows, n, k);
                    }
                }
            }
        }
    }
    if let Some(gpu) = chunked() {
        for dtype in QUANTS {
            for rows in [1, 9] {
                let k = if dtype.block_elems() == 256 { 256 } else { 96 };
                check_quant_matmul("chunked", gpu, &mut r, dtype, rows, 400, k);
            }
        }
    }
}

#[test]
fn elementwise_ops_match() {
    let cpu = Cpu::new();
    let mut r = rng(4);
    for (name, gpu) in gpus() {
        for n in [1, 257, 3 * 1536, 70_001] {
            let (a, b) = (randn(&mut r, n, 6.0), randn(&mut r, n, 2.0));
            let mut oc = poisoned(&cpu, n);
            cpu.swiglu(&mut oc, &f32_buf(&cpu, &a), &f32_buf(&cpu, &b), n)
                .unwrap();
            let mut og = poisoned(gpu, n);
            gpu.swiglu(&mut og, &f32_buf(gpu, &a), &f32_buf(gpu, &b), n)
                .unwrap();
            let what = format!("{name} swiglu n {n}");
            assert_close(
                &what,
                &read_f32(&cpu, &oc, n),
                &read_f32(gpu, &og, n),
                TOL_F32,
            );

            let mut xc = f32_buf(&cpu, &a);
            cpu.add(&mut xc, &f32_buf(&cpu, &b), n).unwrap();
            let mut xg = f32_buf(gpu, &a);
            gpu.add(&mut xg, &f32_buf(gpu, &b), n).unwrap();
            let what = format!("{name} add n {n}");
            assert_close(&what, &read_f32(&cpu, &xc, n), &read_f32(gpu, &xg, n), 0.0);
        }
        for (rows, n) in [(1, 576), (3, 49), (9, 1536)] {
            let (x, bias) = (randn(&mut r, rows * n, 2.0), randn(&mut r, n, 1.0));
            let mut xc = f32_buf(&cpu, &x);
            cpu.add_bias(&mut xc, &f32_buf(&cpu, &bias), rows, n)
                .unwrap();
            let mut xg = f32_buf(gpu, &x);
            gpu.add_bias(&mut xg, &f32_buf(gpu, &bias), rows, n)
                .unwrap();
            let what = format!("{name} add_bias rows {rows} n {n}");
            let len = rows * n;
            assert_close(
                &what,
                &read_f32(&cpu, &xc, len),
                &read_f32(gpu, &xg, len),
                0.0,
            );
        }
    }
}

fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
        .collect()
}

#[test]
fn rope_matches_at_any_position() {
    let cpu = Cpu::new();
    let mut r = rng(5);
    for (name, gpu) in gpus() {
        for h in [
            heads(9, 3, 64),
            heads(4, 1, 128),
            heads(8, 8, 32),
            heads(6, 2, 96),
        ] {
            for (rows, pos0, scale) in [(1, 0, 1.0), (5, 7, 1.0), (3, 1000, 1.3), (2, 31_000, 1.0)]
            {
                let nq = rows * h.n_heads * h.head_dim;
                let nk = rows * h.n_kv_heads * h.head_dim;
                let (q, k) = (randn(&mut r, nq, 1.0), randn(&mut r, nk, 1.0));
                let f = inv_freq(h.head_dim, 10000.0);
                let (mut qc, mut kc) = (f32_buf(&cpu, &q), f32_buf(&cpu, &k));
                cpu.rope(&mut qc, &mut kc, &f32_buf(&cpu, &f), rows, pos0, h, scale)
                    .unwrap();
                let (mut qg, mut kg) = (f32_buf(gpu, &q), f32_buf(gpu, &k));
                gpu.rope(&mut qg, &mut kg, &f32_buf(gpu, &f), rows, pos0, h, scale)
                    .unwrap();
                let what = format!("{name} rope {h:?} rows {rows} pos0 {pos0}");
                // sin / cos of angles of thousands of radians: a few ulps of the angle.
                let tol = if pos0 > 10_000 { 1e-8 } else { 1e-9 };
                assert_close(
                    &what,
                    &read_f32(&cpu, &qc, nq),
                    &read_f32(gpu, &qg, nq),
                    tol,
                );
                assert_close(
                    &what,
                    &read_f32(&cpu, &kc, nk),
                    &read_f32(gpu, &kg, nk),
                    tol,
                );
            }
        }
    }
}

fn heads(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Heads {
    Heads {
        n_heads,
        n_kv_heads,
        head_dim,
    }
}

/// One layer's attention inputs and the schedule of (kv_append, attention) steps.
struct AttnCase<'a> {
    h: Heads,
    kv: DType,
    table: &'a [u32],
    pool_blocks: usize,
    steps: &'a [usize],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

/// Drives one layer's paged cache through the case's steps, as prefill and decode do; returns
/// every step's attention output and the final caches.
fn run_attention<B: Backend>(b: &B, c: &AttnCase) -> (Vec<Vec<f32>>, Vec<u8>, Vec<u8>) {
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

fn cache_values(kv: DType, bytes: &[u8]) -> Vec<f32> {
    match kv {
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytemuck::cast_slice(bytes).to_vec(),
    }
}

fn check_attention(gpus: &[(&'static str, Wgpu)], seed: u64, h: Heads, steps: &[usize]) {
    let cpu = Cpu::new();
    let mut r = rng(seed);
    let total: usize = steps.iter().sum();
    let blocks = total.div_ceil(KV_BLOCK);
    // A block table out of order, drawn from a pool with spare blocks (never written: NaN).
    let pool_blocks = blocks + 3;
    let mut ids: Vec<u32> = (0..pool_blocks as u32).collect();
    ids.shuffle(&mut r);
    let table = &ids[..blocks];
    let q = randn(&mut r, total * h.n_heads * h.head_dim, 1.0);
    let k = randn(&mut r, total * h.n_kv_heads * h.head_dim, 1.0);
    let v = randn(&mut r, total * h.n_kv_heads * h.head_dim, 1.0);
    for kv in [DType::F32, DType::F16] {
        let case = AttnCase {
            h,
            kv,
            table,
            pool_blocks,
            steps,
            q: &q,
            k: &k,
            v: &v,
        };
        let (oc, kc, vc) = run_attention(&cpu, &case);
        for (name, gpu) in gpus {
            let (og, kg, vg) = run_attention(gpu, &case);
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
            assert_close(&format!("{what} K"), &written(&kc), &written(&kg), tol);
            assert_close(&format!("{what} V"), &written(&vc), &written(&vg), tol);
            let mut pos0 = 0;
            for (i, &rows) in steps.iter().enumerate() {
                let what = format!("{name} attention {h:?} {kv} rows {rows} pos0 {pos0}");
                assert_close(&what, &oc[i], &og[i], tol);
                pos0 += rows;
            }
        }
    }
}

#[test]
fn attention_matches_for_gqa_ratios_and_schedules() {
    let gpus = gpus();
    if gpus.is_empty() {
        return;
    }
    // Ratios 1, 3, 4, 8; head dims 64, 128, 32, 96.
    let shapes = [
        heads(4, 4, 64),
        heads(9, 3, 64),
        heads(8, 2, 128),
        heads(16, 2, 32),
        heads(8, 1, 96),
    ];
    // Prefill crossing a block then decode; prefill at pos0 > 0 and multi-row decode steps;
    // one-token decode from the start across a block boundary.
    let schedules: [&[usize]; 3] = [&[20, 1, 1, 1], &[5, 37, 2, 4, 3], &[1; 18]];
    for (i, h) in shapes.into_iter().enumerate() {
        for (j, steps) in schedules.iter().enumerate() {
            check_attention(gpus, 100 + (i * 10 + j) as u64, h, steps);
        }
    }
}

#[test]
fn attention_long_context_split_kv() {
    let gpus = gpus();
    if gpus.is_empty() {
        return;
    }
    // ~1000 positions: a long prefill, then decode steps of one and three rows over it.
    check_attention(gpus, 7, heads(9, 3, 64), &[997, 1, 3]);
    check_attention(gpus, 8, heads(8, 2, 128), &[1000, 1]);
}

/// The kept set of sample.rs (same f32 arithmetic, so the same set) and each kept token's
/// probability weight.
fn kept_set(logits: &[f32], s: &SampleOp) -> (Vec<bool>, Vec<f32>) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let p: Vec<f32> = logits
        .iter()
        .map(|l| ((l - max) / s.temperature).exp())
        .collect();
    let mut keep = vec![true; logits.len()];
    if s.top_k > 0 && s.top_k < logits.len() {
        let mut sorted = logits.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[s.top_k - 1];
        keep.iter_mut()
            .zip(logits)
            .for_each(|(k, l)| *k &= *l >= kth);
    }
    if s.top_p < 1.0 {
        let mass: f32 = p
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(p, _)| p)
            .sum();
        let mut kept: Vec<f32> = p
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(p, _)| p / mass)
            .collect();
        kept.sort_by(|a, b| b.total_cmp(a));
        let (mut acc, mut t) = (0.0, kept[kept.len() - 1]);
        for q in kept {
            acc += q;
            if acc >= s.top_p {
                t = q;
                break;
            }
        }
        keep.iter_mut()
            .zip(&p)
            .for_each(|(k, p)| *k &= p / mass >= t);
    }
    if s.min_p > 0.0 {
        keep.iter_mut()
            .zip(&p)
            .for_each(|(k, p)| *k &= *p >= s.min_p);
    }
    (keep, p)
}

/// Whether `token` is a correct draw for the id-order walk up to float rounding: the walk
/// target u * mass, in exact (f64) arithmetic, lies in the token's cumulative interval widened
/// by the rounding the f32 reference itself makes (measured: its running sum against f64) plus
/// a slack for a parallel sum. On a big flat distribution the f32 running sum drifts by more
/// than one token's width, so two correct implementations can differ there and only there.
fn walk_accepts(logits: &[f32], s: &SampleOp, token: u32) -> bool {
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

#[test]
fn sample_picks_the_same_token() {
    let cpu = Cpu::new();
    let mut r = rng(9);
    let settings = [
        (0.0, 0, 1.0, 0.0),
        (0.8, 40, 0.95, 0.05),
        (1.0, 0, 1.0, 0.0),
        (0.7, 1, 1.0, 0.0),
        (1.3, 5, 1.0, 0.0),
        (0.9, 0, 0.5, 0.0),
        (1.0, 0, 0.9, 0.0),
        (1.0, 0, 1.0, 0.2),
        (0.6, 100, 0.8, 0.1),
        (1.0, 1_000_000, 0.99, 0.0),
    ];
    for (name, gpu) in gpus() {
        let mut outs_c = u32_buf(&cpu, &[u32::MAX; 4]);
        let mut outs_g = u32_buf(gpu, &[u32::MAX; 4]);
        let (mut same, mut rounding) = (0, 0);
        for case in 0..400 {
            let vocab = [7, 1000, 49152, 32001][case % 4];
            let (temperature, top_k, top_p, min_p) = settings[(case / 4) % settings.len()];
            // Like a language model's: a low flat floor and a few tens of likely tokens. Flat
            // logits only for small vocabularies: over a big flat one the reference's own f32
            // sums (top-p mass, walk) drift by more than a token's probability.
            let flat = vocab <= 1000 && case % 8 >= 4;
            let mut logits = randn(&mut r, vocab, if flat { 8.0 } else { 2.0 });
            if !flat {
                for _ in 0..vocab.min(30) {
                    let i = r.random_range(0..vocab);
                    logits[i] += r.random_range(2.0f32..12.0);
                }
            }
            if case % 3 == 0 {
                // Coarse values: many ties (the top-k threshold keeps them all).
                logits
                    .iter_mut()
                    .for_each(|l| *l = (*l * 2.0).round() / 2.0);
            }
            let s = SampleOp {
                temperature,
                top_k,
                top_p,
                min_p,
                uniform: r.random::<f32>(),
            };
            let index = case % 4;
            cpu.sample(&mut outs_c, index, &f32_buf(&cpu, &logits), vocab, s)
                .unwrap();
            gpu.sample(&mut outs_g, index, &f32_buf(gpu, &logits), vocab, s)
                .unwrap();
            let mut c = [0u8; 4];
            let mut g = [0u8; 4];
            cpu.read(&outs_c, index * 4, &mut c).unwrap();
            gpu.read(&outs_g, index * 4, &mut g).unwrap();
            let (c, g) = (u32::from_le_bytes(c), u32::from_le_bytes(g));
            if c == g {
                same += 1;
                continue;
            }
            let what = format!("{name} sample case {case}: vocab {vocab} {s:?}: cpu {c}, gpu {g}");
            let greedy = temperature <= 0.0 || top_k == 1;
            assert!(!greedy, "{what}");
            // Differ only where the reference's own rounding decides the walk.
            assert!(
                walk_accepts(&logits, &s, c),
                "{what}: the reference itself is off"
            );
            assert!(walk_accepts(&logits, &s, g), "{what}");
            rounding += 1;
        }
        eprintln!("{name} sample: {same} identical, {rounding} within the reference's rounding");
        assert!(
            rounding * 10 <= same,
            "{name}: too many rounding-level differences"
        );
    }
}

#[test]
fn upload_copy_and_read_keep_queue_order() {
    for (name, gpu) in gpus() {
        let x0: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let y0 = vec![1.0f32; 64];
        let y1 = vec![100.0f32; 64];
        let mut x = f32_buf(gpu, &x0);
        let mut y = f32_buf(gpu, &y0);
        gpu.add(&mut x, &y, 64).unwrap();
        // Enqueued after the first add: the first add must still see y0.
        gpu.upload(&mut y, 0, bytemuck::cast_slice(&y1)).unwrap();
        gpu.add(&mut x, &y, 64).unwrap();
        let mut z = poisoned(gpu, 64);
        gpu.copy(&mut z, 16, &x, 0, 128).unwrap();
        gpu.add(&mut z, &y, 64).unwrap();
        let z = read_f32(gpu, &z, 64);
        for (i, &got) in z.iter().enumerate() {
            let want = if (4..36).contains(&i) {
                (i - 4) as f32 + 101.0 + 100.0
            } else {
                f32::NAN
            };
            assert!(
                got == want || (want.is_nan() && got.is_nan()),
                "{name}: z[{i}] = {got}, want {want}"
            );
        }
        // Reads at offsets and lengths that are not whole words.
        let mut part = [0u8; 7];
        gpu.read(&x, 6, &mut part).unwrap();
        let all: Vec<u8> = read_f32(gpu, &x, 64)
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        assert_eq!(&part[..], &all[6..13], "{name}: unaligned read");
        // Bad requests are errors, not panics; the backend stays usable.
        assert!(gpu.alloc(1 << 50).is_err(), "{name}: absurd allocation");
        let mut small = gpu.alloc(16).unwrap();
        assert!(
            gpu.add(&mut small, &y, 1000).is_err(),
            "{name}: short buffer"
        );
        gpu.sync().unwrap();
    }
}

#[test]
fn ops_with_scratch_stay_whole_under_threads() {
    // Threads sharing one device: an op that runs several dispatches through an internal
    // scratch buffer (split-KV attention, sampling) must not let another thread's op in between.
    // Each thread enqueues many such ops back to back before reading any result; whether the
    // threads interleave at the wrong moment depends on scheduling, so this is a stress test.
    let Some((_, gpu)) = gpus().first() else {
        return;
    };
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            scope.spawn(move || {
                let cpu = Cpu::new();
                let mut r = rng(500 + t);
                let h = heads(8, 2, 64);
                let total = 40 + 7 * t as usize;
                let blocks = total.div_ceil(KV_BLOCK);
                let table: Vec<u32> = (0..blocks as u32).rev().collect();
                let q = randn(&mut r, total * 8 * 64, 1.0);
                let k = randn(&mut r, total * 2 * 64, 1.0);
                let v = randn(&mut r, total * 2 * 64, 1.0);
                let case = AttnCase {
                    h,
                    kv: DType::F32,
                    table: &table,
                    pool_blocks: blocks,
                    steps: &[total],
                    q: &q,
                    k: &k,
                    v: &v,
                };
                // Fill the caches, then decode the last row many times over.
                run_attention(&cpu, &case);
                let cache = blocks * KV_BLOCK * 2 * 64 * 4;
                let (mut kc, mut vc) = (
                    Buf::exact(gpu, cache).unwrap(),
                    Buf::exact(gpu, cache).unwrap(),
                );
                let tb = u32_buf(gpu, &table);
                let (kb, vb) = (f32_buf(gpu, &k), f32_buf(gpu, &v));
                gpu.kv_append(&mut kc, &mut vc, DType::F32, &tb, &kb, &vb, total, 0, h)
                    .unwrap();
                let (mut kcc, mut vcc) = (
                    Buf::exact(&cpu, cache).unwrap(),
                    Buf::exact(&cpu, cache).unwrap(),
                );
                let tbc = u32_buf(&cpu, &table);
                cpu.kv_append(
                    &mut kcc,
                    &mut vcc,
                    DType::F32,
                    &tbc,
                    &f32_buf(&cpu, &k),
                    &f32_buf(&cpu, &v),
                    total,
                    0,
                    h,
                )
                .unwrap();
                let last = &q[(total - 1) * 512..];
                let mut oc = poisoned(&cpu, 512);
                let view = KvView {
                    k: &kcc,
                    v: &vcc,
                    table: &tbc,
                    dtype: DType::F32,
                };
                cpu.attention(&mut oc, &f32_buf(&cpu, last), view, 1, total - 1, h)
                    .unwrap();
                let want = read_f32(&cpu, &oc, 512);
                let qg = f32_buf(gpu, last);
                let mut outs: Vec<_> = (0..30).map(|_| poisoned(gpu, 512)).collect();
                for o in outs.iter_mut() {
                    let view = KvView {
                        k: &kc,
                        v: &vc,
                        table: &tb,
                        dtype: DType::F32,
                    };
                    gpu.attention(o, &qg, view, 1, total - 1, h).unwrap();
                }
                for o in &outs {
                    assert_close(
                        &format!("thread {t} attention"),
                        &want,
                        &read_f32(gpu, o, 512),
                        TOL_F32,
                    );
                }
                // Sampling through the whole-vocabulary path, 30 tokens before one read.
                let logits = randn(&mut r, 1000, 8.0);
                let s = SampleOp {
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 0.9,
                    min_p: 0.0,
                    uniform: 0.5,
                };
                let mut tc = u32_buf(&cpu, &[0]);
                cpu.sample(&mut tc, 0, &f32_buf(&cpu, &logits), 1000, s)
                    .unwrap();
                let mut c = [0u8; 4];
                cpu.read(&tc, 0, &mut c).unwrap();
                let lg = f32_buf(gpu, &logits);
                let mut tg = u32_buf(gpu, &[u32::MAX; 30]);
                for i in 0..30 {
                    gpu.sample(&mut tg, i, &lg, 1000, s).unwrap();
                }
                let mut g = vec![0u8; 120];
                gpu.read(&tg, 0, &mut g).unwrap();
                let c = u32::from_le_bytes(c);
                for (i, g) in g.chunks_exact(4).enumerate() {
                    let g = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
                    assert!(
                        c == g || walk_accepts(&logits, &s, g),
                        "thread {t} sample {i}: cpu {c} gpu {g}"
                    );
                }
            });
        }
    });
}
