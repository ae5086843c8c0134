//! The row ops of batched decoding (serving: one forward call over the rows of many
//! sequences, batch.rs RowsView) on every GPU variant against the CPU reference: rope_rows at
//! each row's position, kv_append_rows into each row's own blocks, and attention_rows over each
//! row's own context, for batches that mix decode rows with prompt chunks, contexts that cross
//! block boundaries with block tables out of order, GQA ratios 1/3/4/8, both KV dtypes, and
//! contexts long enough for split-KV. The CPU's attention_rows is itself checked, bit for bit,
//! against the one-sequence `attention` op run for each sequence alone. Cache slots no sequence
//! owns (and those past a sequence's end) hold NaN, and outputs are poisoned: any NaN fails.

#![cfg(any(feature = "wgpu", feature = "cuda"))]

mod common;
#[macro_use]
mod parity;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::params::KV_BLOCK;
use anyllama::backend::{Backend, Heads, KvSlot, KvView};
use anyllama::batch::{RowsBatch, SeqRows};
use anyllama::dtype::DType;
use anyllama::pool::Buf;
use parity::*;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// One batch: sequences (block table, positions already cached, rows in the batch), the cache
/// contents before the call, and the batch's q, k, v rows.
struct RowsCase {
    h: Heads,
    kv: DType,
    pool_blocks: usize,
    seqs: Vec<(Vec<u32>, usize, usize)>,
    k_cache: Vec<u8>,
    v_cache: Vec<u8>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn nan_word(kv: DType) -> u32 {
    if kv == DType::F16 {
        0x7e00_7e00
    } else {
        f32::NAN.to_bits()
    }
}

impl RowsCase {
    fn new(r: &mut ChaCha8Rng, h: Heads, kv: DType, seqs: &[(usize, usize)]) -> RowsCase {
        let need: Vec<usize> = seqs
            .iter()
            .map(|&(p, n)| (p + n).div_ceil(KV_BLOCK))
            .collect();
        let pool_blocks = need.iter().sum::<usize>() + 3;
        let mut ids: Vec<u32> = (0..pool_blocks as u32).collect();
        ids.shuffle(r);
        let width = h.n_kv_heads * h.head_dim;
        let mut kc = vec![f32::NAN; pool_blocks * KV_BLOCK * width];
        let mut vc = kc.clone();
        let mut tables = Vec::new();
        let mut next = 0;
        for (&(pos0, _), &n) in seqs.iter().zip(&need) {
            let table = ids[next..next + n].to_vec();
            next += n;
            for p in 0..pos0 {
                let slot = table[p / KV_BLOCK] as usize * KV_BLOCK + p % KV_BLOCK;
                kc[slot * width..(slot + 1) * width].copy_from_slice(&randn(r, width, 1.0));
                vc[slot * width..(slot + 1) * width].copy_from_slice(&randn(r, width, 1.0));
            }
            tables.push(table);
        }
        let rows: usize = seqs.iter().map(|s| s.1).sum();
        let cache = |c: &[f32]| -> Vec<u8> {
            let mut bytes = encode(kv, c);
            if kv == DType::F16 {
                // encode's f16 NaN may differ from the canonical one; any NaN poisons.
                for (b, v) in bytes.chunks_exact_mut(2).zip(c) {
                    if v.is_nan() {
                        b.copy_from_slice(&(nan_word(kv) as u16).to_le_bytes());
                    }
                }
            }
            bytes
        };
        RowsCase {
            h,
            kv,
            pool_blocks,
            seqs: tables
                .into_iter()
                .zip(seqs)
                .map(|(t, &(p, n))| (t, p, n))
                .collect(),
            k_cache: cache(&kc),
            v_cache: cache(&vc),
            q: randn(r, rows * h.n_heads * h.head_dim, 1.0),
            k: randn(r, rows * width, 1.0),
            v: randn(r, rows * width, 1.0),
        }
    }

    fn rows(&self) -> usize {
        self.seqs.iter().map(|s| s.2).sum()
    }

    /// The same cache with only sequence j in the batch, and its first row in this batch.
    fn only(&self, j: usize) -> (RowsCase, usize) {
        let first: usize = self.seqs[..j].iter().map(|s| s.2).sum();
        let n = self.seqs[j].2;
        let (qw, kw) = (
            self.h.n_heads * self.h.head_dim,
            self.h.n_kv_heads * self.h.head_dim,
        );
        let case = RowsCase {
            h: self.h,
            kv: self.kv,
            pool_blocks: self.pool_blocks,
            seqs: vec![self.seqs[j].clone()],
            k_cache: self.k_cache.clone(),
            v_cache: self.v_cache.clone(),
            q: self.q[first * qw..(first + n) * qw].to_vec(),
            k: self.k[first * kw..(first + n) * kw].to_vec(),
            v: self.v[first * kw..(first + n) * kw].to_vec(),
        };
        (case, first)
    }
}

/// The attention output and the K, V cache values after a batch.
type RowsRun = (Vec<f32>, Vec<f32>, Vec<f32>);

/// kv_append_rows then attention_rows on `b`.
fn run_rows<B: Backend>(b: &B, c: &RowsCase) -> RowsRun {
    let (rows, h) = (c.rows(), c.h);
    let mut batch = RowsBatch::new(b, rows, c.pool_blocks).unwrap();
    let seqs: Vec<SeqRows> = c
        .seqs
        .iter()
        .map(|(t, p, n)| SeqRows {
            table: t,
            pos0: *p,
            rows: *n,
        })
        .collect();
    batch.set(b, &seqs).unwrap();
    let view = batch.view();
    let (mut kc, mut vc) = (upload(b, &c.k_cache), upload(b, &c.v_cache));
    let (kb, vb, qb) = (f32_buf(b, &c.k), f32_buf(b, &c.v), f32_buf(b, &c.q));
    let cache = KvSlot {
        k: &mut kc,
        v: &mut vc,
        table: view.meta,
        dtype: c.kv,
    };
    b.kv_append_rows(cache, &kb, &vb, view, h).unwrap();
    let n = rows * h.n_heads * h.head_dim;
    let mut out = poisoned(b, n);
    let kv = KvView {
        k: &kc,
        v: &vc,
        table: view.meta,
        dtype: c.kv,
    };
    b.attention_rows(&mut out, &qb, kv, view, h).unwrap();
    let read = |buf: &Buf<B>| {
        let mut bytes = vec![0u8; c.k_cache.len()];
        b.read(buf, 0, &mut bytes).unwrap();
        cache_values(c.kv, &bytes)
    };
    (read_f32(b, &out, n), read(&kc), read(&vc))
}

/// The CPU's attention_rows equals `attention` run on each sequence alone, bit for bit.
fn check_cpu_rows_match_per_sequence(c: &RowsCase, rows_out: &[f32], k: &[f32], v: &[f32]) {
    let cpu = Cpu::new();
    let h = c.h;
    let (kc, vc) = (
        upload(&cpu, &encode(c.kv, k)),
        upload(&cpu, &encode(c.kv, v)),
    );
    let qw = h.n_heads * h.head_dim;
    let mut first = 0;
    for (table, pos0, n) in &c.seqs {
        let tb = u32_buf(&cpu, table);
        let qb = f32_buf(&cpu, &c.q[first * qw..(first + n) * qw]);
        let mut out = poisoned(&cpu, n * qw);
        let view = KvView {
            k: &kc,
            v: &vc,
            table: &tb,
            dtype: c.kv,
        };
        cpu.attention(&mut out, &qb, view, *n, *pos0, h).unwrap();
        let alone = read_f32(&cpu, &out, n * qw);
        let batched = &rows_out[first * qw..(first + n) * qw];
        assert!(
            alone
                .iter()
                .zip(batched)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "cpu attention_rows differs from attention for a sequence at pos0 {pos0} ({n} rows)"
        );
        first += n;
    }
}

/// Batches: decode rows only (short contexts: one split on wgpu), decode rows mixed with prompt
/// chunks (one at position 0, one after a prefix) over contexts past 128 positions (split-KV),
/// and a long context beside a fresh one.
const BATCHES: [&[(usize, usize)]; 3] = [
    &[(0, 1), (5, 1), (16, 1), (37, 1), (62, 1)],
    &[(0, 20), (130, 1), (7, 3), (300, 1), (15, 33)],
    &[(1000, 1), (2, 1), (0, 2)],
];

fn check_rows<B: Backend>(name: &str, gpu: &B, cases: &[(RowsCase, RowsRun)]) {
    for (c, (out, k, v)) in cases {
        let (g_out, g_k, g_v) = run_rows(gpu, c);
        let what = format!(
            "{name} rows {:?} {:?} kv {}",
            c.h,
            c.seqs.iter().map(|s| (s.1, s.2)).collect::<Vec<_>>(),
            c.kv
        );
        // Cache slots the batch did not write keep their NaN on both sides.
        let written = |cpu: &[f32], gpu: &[f32]| {
            for (i, (a, b)) in cpu.iter().zip(gpu).enumerate() {
                assert!(
                    a.is_nan() == b.is_nan() && (a.is_nan() || a.to_bits() == b.to_bits()),
                    "{what}: cache value {i}: cpu {a} gpu {b}"
                );
            }
        };
        written(k, &g_k);
        written(v, &g_v);
        assert_close(&what, out, &g_out, attention_tolerance(name, c.kv, 1));
        // Batch invariance: each sequence run alone gives its rows of the batch, bit for bit
        // (the server promises a request the tokens it gets alone).
        let qw = c.h.n_heads * c.h.head_dim;
        for j in 0..c.seqs.len() {
            let (alone, first) = c.only(j);
            let (a_out, _, _) = run_rows(gpu, &alone);
            let batched = &g_out[first * qw..][..a_out.len()];
            assert!(
                a_out
                    .iter()
                    .zip(batched)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: sequence {j} alone differs from its rows in the batch"
            );
        }
    }
}

#[test]
fn row_ops_match_for_mixed_batches() {
    let mut r = rng(41);
    let cpu = Cpu::new();
    let mut cases = Vec::new();
    for h in [
        heads(4, 4, 64),
        heads(9, 3, 64),
        heads(8, 2, 128),
        heads(8, 1, 96),
    ] {
        for kv in [DType::F32, DType::F16] {
            for seqs in BATCHES {
                let c = RowsCase::new(&mut r, h, kv, seqs);
                let run = run_rows(&cpu, &c);
                check_cpu_rows_match_per_sequence(&c, &run.0, &run.1, &run.2);
                cases.push((c, run));
            }
        }
    }
    on_every_gpu!(check_rows, &cases);
}

fn check_rope_rows<B: Backend>(name: &str, gpu: &B, r: &mut ChaCha8Rng) {
    let cpu = Cpu::new();
    for (n_heads, head_dim) in [(9, 64), (4, 128), (6, 96)] {
        let pos: Vec<u32> = vec![0, 31_000, 7, 8, 9, 1000, 3];
        let rows = pos.len();
        let n = rows * n_heads * head_dim;
        let x = randn(r, n, 1.0);
        let f: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let (mut xc, mut xg) = (f32_buf(&cpu, &x), f32_buf(gpu, &x));
        cpu.rope_rows(
            &mut xc,
            &f32_buf(&cpu, &f),
            &u32_buf(&cpu, &pos),
            rows,
            n_heads,
            head_dim,
            1.3,
        )
        .unwrap();
        gpu.rope_rows(
            &mut xg,
            &f32_buf(gpu, &f),
            &u32_buf(gpu, &pos),
            rows,
            n_heads,
            head_dim,
            1.3,
        )
        .unwrap();
        // sin / cos of angles of tens of thousands of radians: a few ulps of the angle.
        assert_close(
            &format!("{name} rope_rows heads {n_heads} head_dim {head_dim}"),
            &read_f32(&cpu, &xc, n),
            &read_f32(gpu, &xg, n),
            1e-8,
        );
    }
}

#[test]
fn rope_rows_matches_at_each_rows_position() {
    let mut r = rng(42);
    on_every_gpu!(check_rope_rows, &mut r);
}
