//! Per-op kernel benchmarks at Llama-3.1-8B shapes, on every backend this machine has (wgpu when
//! an adapter opens, CUDA when built with `--features cuda` and a driver is present, the CPU
//! backend for the cheap ops), so a regression shows up per op:
//!   cargo bench --bench ops [--features cuda] [-- <filter>]   (e.g. `-- matmul/cuda`)
//! Each timed batch enqueues the op `iters` times and ends with `sync`, so the time per op
//! includes its whole execution on the device, as inside a forward pass (a sync every
//! SYNC_EVERY ops keeps the queue of pending work bounded).

use anyllama::backend::cpu::Cpu;
use anyllama::backend::{Backend, Heads, SampleOp, Weight};
use anyllama::bench::synthetic::{random_chunk, random_weight, shape};
use anyllama::config::ModelConfig;
use anyllama::dtype::DType;
use anyllama::kv_cache::KvCache;
use anyllama::pool::Buf;
use criterion::{criterion_group, criterion_main, Criterion};
use std::time::{Duration, Instant};

const SYNC_EVERY: u64 = 64;

/// Times `op` per call: `iters` calls, a sync every SYNC_EVERY and one at the end.
fn time_op<B: Backend>(
    b: &B,
    iters: u64,
    op: &mut dyn FnMut() -> anyllama::Result<()>,
) -> Duration {
    b.sync().expect("sync");
    let t = Instant::now();
    for i in 1..=iters {
        op().expect("op");
        if i % SYNC_EVERY == 0 {
            b.sync().expect("sync");
        }
    }
    b.sync().expect("sync");
    t.elapsed()
}

/// A device buffer of `n` random f32 values in [-1, 1).
fn random_f32<B: Backend>(b: &B, n: usize, seed: u64) -> Buf<B> {
    let host = random_chunk(DType::F32, n * 4, seed).expect("f32 chunk");
    // random_chunk makes weights of spread 0.02: scale them up to activation size
    let vals: Vec<f32> = bytemuck::cast_slice::<u8, f32>(&host)
        .iter()
        .map(|v| v * 25.0)
        .collect();
    let mut buf = b.alloc(n * 4).expect("alloc");
    b.upload(&mut buf, 0, bytemuck::cast_slice(&vals))
        .expect("upload");
    buf
}

fn cfg_8b() -> ModelConfig {
    shape("llama-3.1-8b").expect("known shape").config()
}

/// Matrix-vector products of decode and a prefill GEMM, in the dtypes that matter.
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
fn matmuls<B: Backend>(c: &mut Criterion, b: &B) {
    let cfg = cfg_8b();
    let (dim, ffn) = (cfg.dim, cfg.ffn_dim);
    let mut g = c.benchmark_group("matmul");
    g.sample_size(10);
    for dtype in [DType::BF16, DType::Q8_0, DType::Q4K] {
        for (rows_w, cols) in [(ffn, dim), (dim, ffn)] {
            let w: Weight<B> = random_weight(b, rows_w, cols, dtype, 1).expect("weight");
            let x = random_f32(b, cols, 2);
            let mut out = b.alloc(rows_w * 4).expect("alloc");
            let id = format!("{}/decode_{cols}x{rows_w}_{dtype}", b.name());
            g.bench_function(id, |bn| {
                bn.iter_custom(|iters| time_op(b, iters, &mut || b.matmul(&mut out, &x, &w, 1)))
            });
        }
    }
    let rows = 512;
    for dtype in [DType::BF16, DType::Q8_0] {
        let w: Weight<B> = random_weight(b, dim, dim, dtype, 3).expect("weight");
        let x = random_f32(b, rows * dim, 4);
        let mut out = b.alloc(rows * dim * 4).expect("alloc");
        let id = format!("{}/prefill_{rows}x{dim}x{dim}_{dtype}", b.name());
        g.bench_function(id, |bn| {
            bn.iter_custom(|iters| time_op(b, iters, &mut || b.matmul(&mut out, &x, &w, rows)))
        });
    }
    g.finish();
}

/// The cheap per-token ops: rms_norm, rope, swiglu, sample.
fn elementwise<B: Backend>(c: &mut Criterion, b: &B) {
    let cfg = cfg_8b();
    let heads = Heads {
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
    };
    let name = b.name();
    let mut g = c.benchmark_group("ops");
    g.sample_size(20);

    let x = random_f32(b, cfg.dim, 5);
    let mut w = b.alloc(cfg.dim * 4).expect("alloc");
    b.upload(&mut w, 0, bytemuck::cast_slice(&vec![1f32; cfg.dim]))
        .expect("upload");
    let mut out = b.alloc(cfg.dim * 4).expect("alloc");
    g.bench_function(format!("{name}/rms_norm_{}", cfg.dim), |bn| {
        bn.iter_custom(|iters| {
            time_op(b, iters, &mut || {
                b.rms_norm(&mut out, &x, &w, 1, cfg.dim, 1e-5)
            })
        })
    });

    let mut q = random_f32(b, cfg.q_dim(), 6);
    let mut k = random_f32(b, cfg.kv_dim(), 7);
    let freqs = anyllama::rope::rope_freqs(&cfg, 1);
    let mut inv_freq = b.alloc(freqs.inv_freq.len() * 4).expect("alloc");
    b.upload(&mut inv_freq, 0, bytemuck::cast_slice(&freqs.inv_freq))
        .expect("upload");
    g.bench_function(format!("{name}/rope_32x8x128"), |bn| {
        bn.iter_custom(|iters| {
            time_op(b, iters, &mut || {
                b.rope(&mut q, &mut k, &inv_freq, 1, 1000, heads, 1.0)
            })
        })
    });

    let gate = random_f32(b, cfg.ffn_dim, 8);
    let up = random_f32(b, cfg.ffn_dim, 9);
    let mut hb = b.alloc(cfg.ffn_dim * 4).expect("alloc");
    g.bench_function(format!("{name}/swiglu_{}", cfg.ffn_dim), |bn| {
        bn.iter_custom(|iters| {
            time_op(b, iters, &mut || b.swiglu(&mut hb, &gate, &up, cfg.ffn_dim))
        })
    });

    let logits = random_f32(b, cfg.vocab_size, 10);
    let mut ids = b.alloc(4).expect("alloc");
    let greedy = SampleOp {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        uniform: 0.5,
    };
    let nucleus = SampleOp {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        uniform: 0.5,
    };
    for (label, s) in [("greedy", greedy), ("top_k_p", nucleus)] {
        g.bench_function(format!("{name}/sample_{label}_{}", cfg.vocab_size), |bn| {
            bn.iter_custom(|iters| {
                time_op(b, iters, &mut || {
                    b.sample(&mut ids, 0, &logits, cfg.vocab_size, s)
                })
            })
        });
    }
    g.finish();
}

/// Decode attention (one query row) over `contexts` cached positions of an f16 paged cache.
fn attention<B: Backend>(c: &mut Criterion, b: &B, contexts: &[usize]) {
    let cfg = cfg_8b();
    let heads = Heads {
        n_heads: cfg.n_heads,
        n_kv_heads: cfg.n_kv_heads,
        head_dim: cfg.head_dim,
    };
    let mut one_layer = cfg.clone();
    one_layer.n_layers = 1;
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    for &ctx in contexts {
        let blocks = ctx.div_ceil(anyllama::backend::params::KV_BLOCK);
        let mut kv = KvCache::new(b, &one_layer, blocks, DType::F16).expect("kv cache");
        let mut seq = kv.new_sequence(b, ctx).expect("sequence");
        kv.reserve(b, &mut seq, ctx).expect("reserve");
        seq.len = ctx - 1;
        let q = random_f32(b, cfg.q_dim(), 11);
        let mut out = b.alloc(cfg.q_dim() * 4).expect("alloc");
        g.bench_function(format!("{}/decode_ctx{ctx}", b.name()), |bn| {
            bn.iter_custom(|iters| {
                time_op(b, iters, &mut || {
                    b.attention(&mut out, &q, kv.view(0, &seq), 1, ctx - 1, heads)
                })
            })
        });
    }
    g.finish();
}

/// Every op group on a GPU backend that opened (or why it did not). Decode attention at 512
/// and 4096 positions: on CUDA that is both of its paths (one block per head up to 2048
/// positions, splits past that).
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
fn on_gpu<B: Backend>(c: &mut Criterion, label: &str, opened: anyllama::Result<B>) {
    match opened {
        Ok(b) => {
            eprintln!("{label} on {}", b.device_name());
            matmuls(c, &b);
            elementwise(c, &b);
            attention(c, &b, &[512, 4096]);
        }
        Err(e) => eprintln!("{label} skipped: {e}"),
    }
}

fn benches(c: &mut Criterion) {
    #[cfg(feature = "wgpu")]
    on_gpu(c, "wgpu", anyllama::backend::wgpu::Wgpu::new(None));
    #[cfg(feature = "cuda")]
    on_gpu(c, "cuda", anyllama::backend::cuda::Cuda::new(None));
    // The CPU reference only for what it does in reasonable time at these shapes.
    let cpu = Cpu::new();
    elementwise(c, &cpu);
    attention(c, &cpu, &[512]);
}

criterion_group!(ops, benches);
criterion_main!(ops);
