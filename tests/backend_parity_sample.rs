//! The sample op, every GPU variant against the CPU reference rules (src/sample.rs): identical token ids for
//! many seeded logit vectors and settings (greedy, temperature, top-k with ties, top-p, min-p),
//! differing only where the reference's own f32 rounding decides the draw; and ops that pass
//! data between dispatches through scratch buffers (sampling, split-KV attention) staying whole
//! when threads share one device.

#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;
#[macro_use]
mod parity;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::{Backend, SampleOp};
use parity::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// (temperature, top_k, top_p, min_p) of the sampling cases.
const SETTINGS: [(f32, usize, f32, f32); 10] = [
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

fn check_sample<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    let cpu = Cpu::new();
    let mut outs_c = u32_buf(&cpu, &[u32::MAX; 4]);
    let mut outs_g = u32_buf(gpu, &[u32::MAX; 4]);
    let (mut same, mut rounding) = (0, 0);
    for case in 0..400 {
        let vocab = [7, 1000, 49152, 32001][case % 4];
        let (temperature, top_k, top_p, min_p) = SETTINGS[(case / 4) % SETTINGS.len()];
        // Like a language model's: a low flat floor and a few tens of likely tokens. Flat
        // logits only for small vocabularies: over a big flat one the reference's own f32
        // sums (top-p mass, walk) drift by more than a token's probability.
        let flat = vocab <= 1000 && case % 8 >= 4;
        let mut logits = randn(r, vocab, if flat { 8.0 } else { 2.0 });
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

#[test]
fn sample_picks_the_same_token() {
    let mut r = rng(9);
    on_every_gpu!(check_sample, &mut r);
}

/// Threads sharing one device: an op that runs several dispatches through an internal scratch
/// buffer (split-KV attention, sampling) must not let another thread's op in between. Each
/// thread enqueues many such ops back to back before reading any result; whether the threads
/// interleave at the wrong moment depends on scheduling, so this is a stress test.
#[cfg(feature = "wgpu")]
fn check_threads_share_scratch<B: Backend + Sync>(name: &str, gpu: &B) {
    use anyllama::backend::params::KV_BLOCK;
    use anyllama::backend::KvView;
    use anyllama::dtype::DType;
    use anyllama::pool::Buf;
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
                        &format!("{name} thread {t} attention"),
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
                        "{name} thread {t} sample {i}: cpu {c} gpu {g}"
                    );
                }
            });
        }
    });
}

// Only wgpu: `Cuda` is not Sync (it keeps CUDA graph handles), so threads cannot share one and
// the compiler already rules out what this test looks for; should it become Sync, it belongs
// here too.
#[cfg(feature = "wgpu")]
#[test]
fn ops_with_scratch_stay_whole_under_threads() {
    // One variant: the variants share their scratch handling.
    if let Some((name, gpu)) = gpus().first() {
        check_threads_share_scratch(name, gpu);
    }
}
