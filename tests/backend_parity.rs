//! Every op of the GPU backends (wgpu, CUDA) against the CPU reference backend
//! (src/backend/cpu.rs), on the same inputs, over shapes that hit the kernels' edges: one row,
//! odd row counts, widths that are not powers of two (and odd where the op allows), pos0 > 0, GQA
//! ratios 1/3/4/8, sequences that cross paged-block boundaries with block tables out of order,
//! both KV dtypes, the decode and prefill paths of matmul and attention, and a ~1000-position
//! context for split-KV decoding. GPU outputs (and unwritten KV cache slots) are poisoned with
//! NaN first; any NaN fails. Float results are compared by normalised MSE (sum (a-b)^2 / sum a^2).
//! Block-format weights: backend_parity_quant.rs; sampling and threads: backend_parity_sample.rs;
//! helpers and the variants under test: parity/.
//!
//! Each test runs on every variant (parity::on_every_gpu): wgpu's default kernels and, where the
//! adapter has SHADER_F16 / SUBGROUP, its portable ones; CUDA's exact-f32 and default GEMMs.
//! With no wgpu adapter the wgpu variants print why and pass, except when the CI variable is set
//! (CI must run them, on lavapipe). With no CUDA driver the CUDA variants print why and pass,
//! except when ANYLLAMA_REQUIRE_CUDA is set.

#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;
#[macro_use]
mod parity;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::params::KV_BLOCK;
use anyllama::backend::{Backend, Heads, KvSlot, RopeArgs};
use anyllama::dtype::DType;
use anyllama::pool::Buf;
use parity::fused::FusedCase;
use parity::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Float embedding tables looked up on `gpu`; `small` keeps to tables narrow enough for the
/// chunked variant's binding cap to split them into row chunks.
fn check_float_embedding<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng, small: bool) {
    let cpu = Cpu::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (vocab, dim) in [(50, 576), (700, 12), (33, 7), (5, 1)] {
            if small && dim > 12 {
                continue;
            }
            let table = randn(r, vocab * dim, 2.0);
            let ids: Vec<u32> = (0..5).map(|_| r.random_range(0..vocab as u32)).collect();
            for n in [1, ids.len()] {
                let what = format!("{name} embedding {dtype} vocab {vocab} dim {dim} tokens {n}");
                let tc = weight(&cpu, dtype, vocab, dim, &table);
                let mut oc = poisoned(&cpu, n * dim);
                cpu.embedding(&mut oc, &u32_buf(&cpu, &ids), &tc, n)
                    .unwrap();
                let tg = weight(gpu, dtype, vocab, dim, &table);
                let mut og = poisoned(gpu, n * dim);
                gpu.embedding(&mut og, &u32_buf(gpu, &ids), &tg, n).unwrap();
                let (want, got) = (read_f32(&cpu, &oc, n * dim), read_f32(gpu, &og, n * dim));
                assert_close(&what, &want, &got, 0.0);
            }
        }
    }
}

#[test]
fn embedding_widens_every_float_dtype_exactly() {
    let mut r = rng(1);
    on_every_gpu!(check_float_embedding, &mut r, false);
    // Tables over the storage binding limit are looked up in row chunks: `chunked` forces it.
    #[cfg(feature = "wgpu")]
    if let Some(gpu) = chunked() {
        check_float_embedding("chunked", gpu, &mut r, true);
    }
}

fn check_rms_norm<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    let cpu = Cpu::new();
    for (rows, dim) in [(1, 576), (3, 1536), (7, 49), (2, 5000), (5, 1)] {
        let x = randn(r, rows * dim, 3.0);
        let w = randn(r, dim, 1.0);
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

#[test]
fn rms_norm_matches() {
    let mut r = rng(2);
    on_every_gpu!(check_rms_norm, &mut r);
}

/// Matmul of a random weight stored as float `dtype`.
fn check_float_matmul<B: Backend>(
    name: &str,
    gpu: &B,
    r: &mut ChaCha8Rng,
    dtype: DType,
    shape: [usize; 3],
) {
    let w = randn(r, shape[1] * shape[2], 1.0);
    check_matmul(name, gpu, r, dtype, shape, &encode(dtype, &w));
}

fn check_float_matmuls<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        // Rows up to 8 take the mat-vec kernel, more the tiled one (cuBLAS on CUDA).
        for rows in [1, 3, 5, 8, 9, 17, 70] {
            for (n, k) in [(576, 576), (192, 1536), (49, 50), (33, 7), (130, 68)] {
                check_float_matmul(name, gpu, r, dtype, [rows, n, k]);
            }
        }
    }
}

#[test]
fn matmul_matches_for_every_dtype_and_path() {
    let mut r = rng(3);
    on_every_gpu!(check_float_matmuls, &mut r);
    // Weights over the storage binding limit are bound in row chunks.
    #[cfg(feature = "wgpu")]
    if let Some(gpu) = chunked() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for (rows, n, k) in [(1, 1000, 12), (3, 1200, 8), (12, 300, 64), (9, 440, 25)] {
                check_float_matmul("chunked", gpu, &mut r, dtype, [rows, n, k]);
            }
        }
    }
}

fn check_elementwise<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    let cpu = Cpu::new();
    for n in [1, 257, 3 * 1536, 70_001] {
        let (a, b) = (randn(r, n, 6.0), randn(r, n, 2.0));
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

        // LoRA's scaled update: one rounding of alpha * y, then the add (a GPU may fuse them).
        let mut xc = f32_buf(&cpu, &a);
        cpu.add_scaled(&mut xc, &f32_buf(&cpu, &b), 0.37, n)
            .unwrap();
        let mut xg = f32_buf(gpu, &a);
        gpu.add_scaled(&mut xg, &f32_buf(gpu, &b), 0.37, n).unwrap();
        let what = format!("{name} add_scaled n {n}");
        assert_close(
            &what,
            &read_f32(&cpu, &xc, n),
            &read_f32(gpu, &xg, n),
            TOL_F32,
        );
    }
    for (rows, n) in [(1, 576), (3, 49), (9, 1536)] {
        let (x, bias) = (randn(r, rows * n, 2.0), randn(r, n, 1.0));
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

#[test]
fn elementwise_ops_match() {
    let mut r = rng(4);
    on_every_gpu!(check_elementwise, &mut r);
}

fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32))
        .collect()
}

fn check_rope<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    let cpu = Cpu::new();
    for h in [
        heads(9, 3, 64),
        heads(4, 1, 128),
        heads(8, 8, 32),
        heads(6, 2, 96),
    ] {
        for (rows, pos0, scale) in [(1, 0, 1.0), (5, 7, 1.0), (3, 1000, 1.3), (2, 31_000, 1.0)] {
            let nq = rows * h.n_heads * h.head_dim;
            let nk = rows * h.n_kv_heads * h.head_dim;
            let (q, k) = (randn(r, nq, 1.0), randn(r, nk, 1.0));
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

#[test]
fn rope_matches_at_any_position() {
    let mut r = rng(5);
    on_every_gpu!(check_rope, &mut r);
}

#[test]
fn attention_matches_for_gqa_ratios_and_schedules() {
    if !any_gpu() {
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
            let reference = AttnReference::new(100 + (i * 10 + j) as u64, h, steps);
            on_every_gpu!(check_attention, &reference);
            // These short contexts take wgpu's one-split decode (no combine pass).
            #[cfg(feature = "wgpu")]
            assert_wgpu_decode_splits(h, steps, |n| n == 1);
        }
    }
}

/// Asserts that wgpu runs some decode step (<= 4 rows) of the schedule `steps` in a number of
/// splits that `want` accepts, so that a test is known to cover that decode path.
#[cfg(feature = "wgpu")]
fn assert_wgpu_decode_splits(h: Heads, steps: &[usize], want: impl Fn(usize) -> bool) {
    for (name, gpu) in gpus() {
        let mut pos0 = 0;
        let mut seen = vec![];
        for &rows in steps {
            seen.extend(gpu.attention_decode_splits(rows, pos0, h));
            pos0 += rows;
        }
        assert!(
            seen.iter().any(|&n| want(n)),
            "{name}: schedule {steps:?} decodes in {seen:?} splits"
        );
    }
}

#[test]
fn attention_long_prefill_after_a_prefix() {
    if !any_gpu() {
        return;
    }
    // Prefills of 32 rows or more (CUDA's cuBLAS attention) at pos0 > 0 with GQA group 4:
    // 40 rows after 24 positions, then 33 rows (97 positions: a count that is not a multiple of
    // 8, which the score rows are padded to), then a decode step over them.
    for (i, h) in [heads(8, 2, 64), heads(16, 4, 128)].into_iter().enumerate() {
        let reference = AttnReference::new(300 + i as u64, h, &[24, 40, 33, 1]);
        on_every_gpu!(check_attention, &reference);
    }
}

#[test]
fn attention_long_context_split_kv() {
    if !any_gpu() {
        return;
    }
    // ~1000 positions: a long prefill, then decode steps of one and three rows over it. With 8
    // kv heads, wgpu's splits are 32 positions long: two scoring rounds per workgroup.
    for (seed, h, steps) in [
        (7, heads(9, 3, 64), &[997, 1, 3][..]),
        (8, heads(8, 2, 128), &[1000, 1][..]),
        (9, heads(32, 8, 64), &[600, 1][..]),
    ] {
        let reference = AttnReference::new(seed, h, steps);
        on_every_gpu!(check_attention, &reference);
        // On wgpu: split-KV with a combine pass.
        #[cfg(feature = "wgpu")]
        assert_wgpu_decode_splits(h, steps, |n| n > 1);
    }
}

fn check_queue_order<B: Backend>(name: &str, gpu: &B) {
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

#[test]
fn upload_copy_and_read_keep_queue_order() {
    on_every_gpu!(check_queue_order);
}

/// The fused projections (parity/fused.rs) on float weights: the decode row counts (fused on
/// the GPUs) and a prefill one, k a multiple of 8, of 4 only, and neither (the float kernels'
/// loop paths), with and without biases, and an 8192-wide input (staged in one row per
/// workgroup where the device has the workgroup memory, else unfused).
fn check_fused_projections<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for rows in [1, 3, 5, 9] {
            for (n, k) in [(576, 1536), (130, 64), (100, 40), (50, 36), (24, 8192)] {
                for with_bias in [false, true] {
                    let weights = |r: &mut ChaCha8Rng, n| encode(dtype, &randn(r, n * k, 0.5));
                    let case = FusedCase::new(r, dtype, [rows, n, k], with_bias, weights);
                    case.check(name, gpu);
                }
            }
        }
    }
}

#[test]
fn fused_projections_match() {
    let mut r = rng(9);
    on_every_gpu!(check_fused_projections, &mut r);
    // Weights over the storage binding limit: the residual mat-vec adds chunk by chunk, the
    // norm-folded ones fall back to the separate ops.
    #[cfg(feature = "wgpu")]
    if let Some(gpu) = chunked() {
        for (rows, n, k) in [(1, 1000, 12), (3, 300, 64)] {
            let weights = |r: &mut ChaCha8Rng, n| encode(DType::BF16, &randn(r, n * k, 0.5));
            FusedCase::new(&mut r, DType::BF16, [rows, n, k], true, weights).check("chunked", gpu);
        }
    }
}

/// One rope_kv_append schedule: a sequence fed in steps of `steps` rows.
struct RopeKvCase<'a> {
    h: Heads,
    kv: DType,
    scale: f32,
    steps: &'a [usize],
    table: &'a [u32],
    pool_blocks: usize,
    inv_freq: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

/// q and k (rotated in place) after every step, and the K and V cache bytes at the end.
type RopeKvRun = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<u8>, Vec<u8>);

fn run_rope_kv<B: Backend>(b: &B, c: &RopeKvCase) -> RopeKvRun {
    let (qw, kw) = (c.h.n_heads * c.h.head_dim, c.h.n_kv_heads * c.h.head_dim);
    let cache_bytes = c.pool_blocks * KV_BLOCK * kw * if c.kv == DType::F16 { 2 } else { 4 };
    // NaN in every slot: unwritten ones stay NaN.
    let nan_word = if c.kv == DType::F16 {
        0x7e00_7e00u32
    } else {
        f32::NAN.to_bits()
    };
    let poison = vec![nan_word; cache_bytes / 4];
    let mut kc = Buf::exact(b, cache_bytes).unwrap();
    let mut vc = Buf::exact(b, cache_bytes).unwrap();
    b.upload(&mut kc, 0, bytemuck::cast_slice(&poison)).unwrap();
    b.upload(&mut vc, 0, bytemuck::cast_slice(&poison)).unwrap();
    let table = u32_buf(b, c.table);
    let inv_freq = f32_buf(b, c.inv_freq);
    let (mut qs, mut ks) = (vec![], vec![]);
    let mut pos0 = 0;
    for &rows in c.steps {
        let mut q = f32_buf(b, &c.q[pos0 * qw..(pos0 + rows) * qw]);
        let mut k = f32_buf(b, &c.k[pos0 * kw..(pos0 + rows) * kw]);
        let v = f32_buf(b, &c.v[pos0 * kw..(pos0 + rows) * kw]);
        let cache = KvSlot {
            k: &mut kc,
            v: &mut vc,
            table: &table,
            dtype: c.kv,
        };
        let rope = RopeArgs {
            inv_freq: &inv_freq,
            attn_scale: c.scale,
        };
        b.rope_kv_append(&mut q, &mut k, &v, cache, rope, rows, pos0, c.h)
            .unwrap();
        qs.push(read_f32(b, &q, rows * qw));
        ks.push(read_f32(b, &k, rows * kw));
        pos0 += rows;
    }
    let mut kbytes = vec![0u8; cache_bytes];
    let mut vbytes = vec![0u8; cache_bytes];
    b.read(&kc, 0, &mut kbytes).unwrap();
    b.read(&vc, 0, &mut vbytes).unwrap();
    (qs, ks, kbytes, vbytes)
}

/// rope_kv_append (one pass on the GPUs) against the CPU's rope then kv_append: a sequence fed
/// in steps of one and several rows through a paged cache whose block table is out of order
/// and whose unwritten slots hold NaN, crossing block boundaries at pos0 > 0, for both cache
/// dtypes; q and k (rotated in place) after every step and the cache contents at the end.
fn check_rope_kv_append<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    let cpu = Cpu::new();
    // GQA 4 and 3, MHA; head_dim 6 is not a multiple of 4 (the unfused path on wgpu).
    for (h, scale) in [
        (heads(8, 2, 64), 1.0),
        (heads(9, 3, 32), 1.3),
        (heads(4, 4, 128), 1.0),
        (heads(4, 2, 6), 1.0),
    ] {
        // Positions 0..13, then one at a time across the block boundary at 16, then 6 and 3.
        let steps = [13, 1, 1, 1, 1, 6, 3];
        let total: usize = steps.iter().sum();
        let blocks = total.div_ceil(KV_BLOCK);
        let pool_blocks = blocks + 2;
        // Blocks in reverse order, skipping block 0 (never written: NaN).
        let table: Vec<u32> = (0..blocks as u32)
            .map(|b| pool_blocks as u32 - 1 - b)
            .collect();
        let f = inv_freq(h.head_dim, 10000.0);
        let (qw, kw) = (h.n_heads * h.head_dim, h.n_kv_heads * h.head_dim);
        let (q, k, v) = (
            randn(r, total * qw, 1.0),
            randn(r, total * kw, 1.0),
            randn(r, total * kw, 1.0),
        );
        for kv in [DType::F32, DType::F16] {
            let case = RopeKvCase {
                h,
                kv,
                scale,
                steps: &steps,
                table: &table,
                pool_blocks,
                inv_freq: &f,
                q: &q,
                k: &k,
                v: &v,
            };
            let what = format!("{name} rope_kv_append {h:?} {kv}");
            let (cq, ck, ckc, cvc) = run_rope_kv(&cpu, &case);
            let (gq, gk, gkc, gvc) = run_rope_kv(gpu, &case);
            // As in check_rope: a few ulps of sin / cos.
            let tol = 1e-9;
            for (i, (rows, (a, b))) in steps.iter().zip(cq.iter().zip(&gq)).enumerate() {
                assert_close(&format!("{what} step {i} ({rows} rows) q"), a, b, tol);
                assert_close(&format!("{what} step {i} k"), &ck[i], &gk[i], tol);
            }
            let written = |bytes: &[u8]| -> Vec<f32> {
                cache_values(kv, bytes)
                    .into_iter()
                    .filter(|x| !x.is_nan())
                    .collect()
            };
            let (kg, vg) = (written(&gkc), written(&gvc));
            assert_eq!(kg.len(), total * kw, "{what}: K values written");
            assert_eq!(vg.len(), total * kw, "{what}: V values written");
            // The rotated k stored in the cache is the k returned (up to the f16 rounding).
            let tol = if kv == DType::F16 { TOL_F16_KV } else { tol };
            assert_close(&format!("{what} K cache"), &written(&ckc), &kg, tol);
            assert_close(&format!("{what} V cache"), &written(&cvc), &vg, tol);
        }
    }
}

#[test]
fn rope_kv_append_matches_rope_then_kv_append() {
    let mut r = rng(10);
    on_every_gpu!(check_rope_kv_append, &mut r);
}
