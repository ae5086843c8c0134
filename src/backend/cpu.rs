//! The reference backend: plain f32 loops over host memory, one function per op, readable in one
//! sitting. Every GPU kernel is tested against these; it is also the fallback when a machine has
//! no GPU adapter. Only `matmul` and `attention` split their outer loop over threads, because
//! they are where all the time goes.

use super::{Backend, Heads, KvSlot, KvView, SampleOp, Weight};
use crate::backend::params::KV_BLOCK;
use crate::batch::{BatchView, RowsView};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pool::{Buf, Pool};
use crate::quant::dequantize;
use half::f16;
use std::sync::Arc;

pub struct Cpu {
    pool: Arc<Pool<Cpu>>,
    pub(super) threads: usize,
}

impl Default for Cpu {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Cpu {
            pool: Arc::new(Pool::default()),
            threads,
        }
    }
}

impl Cpu {
    pub fn new() -> Self {
        Self::default()
    }
}

// Host buffers are Vec<u32> so that f32 / u32 views are always aligned.
pub(super) fn f32s(b: &Buf<Cpu>) -> &[f32] {
    bytemuck::cast_slice(b.raw())
}
pub(super) fn f32s_mut(b: &mut Buf<Cpu>) -> &mut [f32] {
    bytemuck::cast_slice_mut(b.raw_mut())
}
pub(super) fn u32s(b: &Buf<Cpu>) -> &[u32] {
    b.raw()
}
pub(super) fn bytes(b: &Buf<Cpu>) -> &[u8] {
    bytemuck::cast_slice(b.raw())
}

/// Reads element `i` of a KV cache stored as f16 or f32.
fn kv_get(cache: &[u32], dtype: DType, i: usize) -> f32 {
    match dtype {
        DType::F16 => {
            let halves: &[u16] = bytemuck::cast_slice(cache);
            f16::from_bits(halves[i]).to_f32()
        }
        _ => f32::from_bits(cache[i]),
    }
}

/// Index of (position, kv head, dim 0) of a sequence in the paged layout.
fn kv_index(table: &[u32], pos: usize, kvh: usize, heads: Heads) -> usize {
    let block = table[pos / KV_BLOCK] as usize;
    ((block * KV_BLOCK + pos % KV_BLOCK) * heads.n_kv_heads + kvh) * heads.head_dim
}

/// Splits `out` into chunks of `chunk` elements and runs `f(chunk_index, chunk)` on up to
/// `threads` threads.
pub(super) fn par_chunks(
    threads: usize,
    out: &mut [f32],
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    let n_chunks = out.len().div_ceil(chunk.max(1));
    let per_thread = n_chunks.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (t, part) in out.chunks_mut(per_thread * chunk).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, c) in part.chunks_mut(chunk).enumerate() {
                    f(t * per_thread + i, c);
                }
            });
        }
    });
}

impl Backend for Cpu {
    type Raw = Vec<u32>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn device_name(&self) -> String {
        format!("host CPU ({} threads)", self.threads)
    }

    /// System memory from /proc/meminfo (Linux); unknown elsewhere.
    fn memory_limits(&self) -> super::MemoryLimits {
        let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |key: &str| -> Option<u64> {
            let line = info.lines().find(|l| l.starts_with(key))?;
            let kib: u64 = line[key.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            kib.checked_mul(1024)
        };
        super::MemoryLimits {
            total: field("MemTotal:"),
            available: field("MemAvailable:"),
            // A host buffer is one Vec, bounded only by memory.
            max_buffer: None,
        }
    }

    fn alloc_raw(&self, bytes: usize) -> Result<Vec<u32>> {
        let words = bytes.div_ceil(4);
        let mut v = Vec::new();
        v.try_reserve_exact(words)
            .map_err(|_| Error::Device(format!("out of host memory allocating {bytes} bytes")))?;
        v.resize(words, 0);
        Ok(v)
    }

    fn pool(&self) -> &Arc<Pool<Self>> {
        &self.pool
    }

    fn upload(&self, dst: &mut Buf<Self>, offset: usize, data: &[u8]) -> Result<()> {
        let d: &mut [u8] = bytemuck::cast_slice_mut(dst.raw_mut());
        d[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn copy(
        &self,
        dst: &mut Buf<Self>,
        dst_offset: usize,
        src: &Buf<Self>,
        src_offset: usize,
        n: usize,
    ) -> Result<()> {
        let s = &bytes(src)[src_offset..src_offset + n];
        let d: &mut [u8] = bytemuck::cast_slice_mut(dst.raw_mut());
        d[dst_offset..dst_offset + n].copy_from_slice(s);
        Ok(())
    }

    fn read(&self, src: &Buf<Self>, offset: usize, out: &mut [u8]) -> Result<()> {
        out.copy_from_slice(&bytes(src)[offset..offset + out.len()]);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn embedding(
        &self,
        out: &mut Buf<Self>,
        tokens: &Buf<Self>,
        table: &Weight<Self>,
        n_tokens: usize,
    ) -> Result<()> {
        let dim = table.cols;
        let row_bytes = table
            .dtype
            .bytes_for(dim)
            .expect("embedding row of whole blocks");
        let tokens = &u32s(tokens)[..n_tokens];
        let out = &mut f32s_mut(out)[..n_tokens * dim];
        for (o, &t) in out.chunks_exact_mut(dim).zip(tokens) {
            let t = t as usize;
            assert!(
                t < table.rows,
                "token id {t} past the embedding ({} rows)",
                table.rows
            );
            dequantize(
                table.dtype,
                &bytes(&table.buf)[t * row_bytes..(t + 1) * row_bytes],
                o,
            );
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Buf<Self>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let (x, w) = (&f32s(x)[..rows * dim], &f32s(w)[..dim]);
        for (o, x) in f32s_mut(out)[..rows * dim]
            .chunks_exact_mut(dim)
            .zip(x.chunks_exact(dim))
        {
            let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let inv = 1.0 / (ss + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * inv * w;
            }
        }
        Ok(())
    }

    fn matmul(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
    ) -> Result<()> {
        let (n, k) = (w.rows, w.cols);
        let row_bytes = w.dtype.bytes_for(k).expect("weight row of whole blocks");
        let x = &f32s(x)[..rows * k];
        let wb = bytes(&w.buf);
        let out = &mut f32s_mut(out)[..rows * n];
        // Parallel over chunks of 64 output features; each thread widens a weight row once
        // and uses it for every input row.
        const COLS: usize = 64;
        let mut tmp = vec![0.0f32; n * rows];
        par_chunks(self.threads, &mut tmp, COLS * rows, |c, chunk| {
            let mut wrow = vec![0.0f32; k];
            for (j, col) in chunk.chunks_exact_mut(rows).enumerate() {
                let o = c * COLS + j;
                dequantize(w.dtype, &wb[o * row_bytes..(o + 1) * row_bytes], &mut wrow);
                for (r, dst) in col.iter_mut().enumerate() {
                    *dst = x[r * k..(r + 1) * k]
                        .iter()
                        .zip(&wrow)
                        .map(|(a, b)| a * b)
                        .sum();
                }
            }
        });
        // tmp is [n][rows]; transpose into out[rows][n].
        for o in 0..n {
            for r in 0..rows {
                out[r * n + o] = tmp[o * rows + r];
            }
        }
        Ok(())
    }

    fn add_bias(&self, x: &mut Buf<Self>, bias: &Buf<Self>, rows: usize, n: usize) -> Result<()> {
        let bias = &f32s(bias)[..n];
        for row in f32s_mut(x)[..rows * n].chunks_exact_mut(n) {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
        Ok(())
    }

    fn rope(
        &self,
        q: &mut Buf<Self>,
        k: &mut Buf<Self>,
        inv_freq: &Buf<Self>,
        rows: usize,
        pos0: usize,
        h: Heads,
        attn_scale: f32,
    ) -> Result<()> {
        let half = h.head_dim / 2;
        let inv_freq = &f32s(inv_freq)[..half];
        let rotate = |x: &mut [f32], n_heads: usize| {
            for (r, row) in x[..rows * n_heads * h.head_dim]
                .chunks_exact_mut(n_heads * h.head_dim)
                .enumerate()
            {
                let pos = (pos0 + r) as f32;
                for head in row.chunks_exact_mut(h.head_dim) {
                    for i in 0..half {
                        // HF: freqs = inv_freq * pos in f32, cos/sin scaled by attention_scaling.
                        let angle = pos * inv_freq[i];
                        let (sin, cos) = (angle.sin() * attn_scale, angle.cos() * attn_scale);
                        let (x1, x2) = (head[i], head[i + half]);
                        head[i] = x1 * cos - x2 * sin;
                        head[i + half] = x2 * cos + x1 * sin;
                    }
                }
            }
        };
        rotate(f32s_mut(q), h.n_heads);
        rotate(f32s_mut(k), h.n_kv_heads);
        Ok(())
    }

    fn kv_append(
        &self,
        k_cache: &mut Buf<Self>,
        v_cache: &mut Buf<Self>,
        kv_dtype: DType,
        table: &Buf<Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        rows: usize,
        pos0: usize,
        h: Heads,
    ) -> Result<()> {
        let table = u32s(table);
        let width = h.n_kv_heads * h.head_dim;
        for (cache, src) in [(k_cache, k), (v_cache, v)] {
            let src = &f32s(src)[..rows * width];
            for r in 0..rows {
                let base = kv_index(table, pos0 + r, 0, h);
                let row = &src[r * width..(r + 1) * width];
                match kv_dtype {
                    DType::F16 => {
                        let halves: &mut [u16] = bytemuck::cast_slice_mut(cache.raw_mut());
                        for (d, s) in halves[base..base + width].iter_mut().zip(row) {
                            *d = f16::from_f32(*s).to_bits();
                        }
                    }
                    _ => f32s_mut(cache)[base..base + width].copy_from_slice(row),
                }
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        out: &mut Buf<Self>,
        q: &Buf<Self>,
        kv: KvView<'_, Self>,
        rows: usize,
        pos0: usize,
        h: Heads,
    ) -> Result<()> {
        let hd = h.head_dim;
        let (q, table) = (&f32s(q)[..rows * h.n_heads * hd], u32s(kv.table));
        // One chunk per (row, head), over positions 0..=pos0 + r.
        par_chunks(
            self.threads,
            &mut f32s_mut(out)[..rows * h.n_heads * hd],
            hd,
            |i, o| {
                let (r, head) = (i / h.n_heads, i % h.n_heads);
                attend_paged(o, &q[i * hd..(i + 1) * hd], &kv, table, pos0 + r, head, h);
            },
        );
        Ok(())
    }

    fn kv_append_rows(
        &self,
        cache: KvSlot<'_, Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        rows: RowsView<'_, Self>,
        h: Heads,
    ) -> Result<()> {
        let meta = u32s(cache.table);
        let (pos, row_table) = (&meta[..rows.rows], &meta[rows.rows..2 * rows.rows]);
        let width = h.n_kv_heads * h.head_dim;
        for (cache_buf, src) in [(cache.k, k), (cache.v, v)] {
            let src = &f32s(src)[..rows.rows * width];
            for (r, row) in src.chunks_exact(width).enumerate() {
                let table = &meta[row_table[r] as usize..];
                let base = kv_index(table, pos[r] as usize, 0, h);
                match cache.dtype {
                    DType::F16 => {
                        let halves: &mut [u16] = bytemuck::cast_slice_mut(cache_buf.raw_mut());
                        for (d, s) in halves[base..base + width].iter_mut().zip(row) {
                            *d = f16::from_f32(*s).to_bits();
                        }
                    }
                    _ => f32s_mut(cache_buf)[base..base + width].copy_from_slice(row),
                }
            }
        }
        Ok(())
    }

    fn attention_rows(
        &self,
        out: &mut Buf<Self>,
        q: &Buf<Self>,
        kv: KvView<'_, Self>,
        rows: RowsView<'_, Self>,
        h: Heads,
    ) -> Result<()> {
        let hd = h.head_dim;
        let n = rows.rows * h.n_heads * hd;
        let (q, meta) = (&f32s(q)[..n], u32s(kv.table));
        let (pos, row_table) = (&meta[..rows.rows], &meta[rows.rows..2 * rows.rows]);
        // As `attention`, row r over positions 0..=pos[r] of its own sequence's table.
        par_chunks(self.threads, &mut f32s_mut(out)[..n], hd, |i, o| {
            let (r, head) = (i / h.n_heads, i % h.n_heads);
            let table = &meta[row_table[r] as usize..];
            attend_paged(
                o,
                &q[i * hd..(i + 1) * hd],
                &kv,
                table,
                pos[r] as usize,
                head,
                h,
            );
        });
        Ok(())
    }

    fn swiglu(
        &self,
        out: &mut Buf<Self>,
        gate: &Buf<Self>,
        up: &Buf<Self>,
        n: usize,
    ) -> Result<()> {
        let (g, u) = (&f32s(gate)[..n], &f32s(up)[..n]);
        for ((o, g), u) in f32s_mut(out)[..n].iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
        Ok(())
    }

    fn add(&self, x: &mut Buf<Self>, y: &Buf<Self>, n: usize) -> Result<()> {
        let y = &f32s(y)[..n];
        f32s_mut(x)[..n]
            .iter_mut()
            .zip(y)
            .for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn dropout(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        p: f32,
        seed: u32,
        n: usize,
    ) -> Result<()> {
        let (threshold, scale) = (super::dropout_threshold(p), 1.0 / (1.0 - p));
        let x = &f32s(x)[..n];
        for (i, (o, v)) in f32s_mut(out)[..n].iter_mut().zip(x).enumerate() {
            let keep = super::dropout_hash(seed, i as u32) >= threshold;
            *o = if keep { v * scale } else { 0.0 };
        }
        Ok(())
    }

    fn add_scaled(&self, x: &mut Buf<Self>, y: &Buf<Self>, alpha: f32, n: usize) -> Result<()> {
        let y = &f32s(y)[..n];
        f32s_mut(x)[..n]
            .iter_mut()
            .zip(y)
            .for_each(|(a, b)| *a += alpha * b);
        Ok(())
    }

    fn rope_rows(
        &self,
        x: &mut Buf<Self>,
        inv_freq: &Buf<Self>,
        pos: &Buf<Self>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        attn_scale: f32,
    ) -> Result<()> {
        let pos = &u32s(pos)[..rows];
        let inv_freq = &f32s(inv_freq)[..head_dim / 2];
        rotate_rows(
            f32s_mut(x),
            inv_freq,
            pos,
            n_heads,
            head_dim,
            attn_scale,
            1.0,
        );
        Ok(())
    }

    fn attention_packed(
        &self,
        out: &mut Buf<Self>,
        lse: Option<&mut Buf<Self>>,
        q: &Buf<Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        batch: BatchView<'_, Self>,
        h: Heads,
    ) -> Result<()> {
        let (rows, hd, nh) = (batch.rows, h.head_dim, h.n_heads);
        let (kvw, group) = (h.n_kv_heads * hd, nh / h.n_kv_heads);
        let scale = 1.0 / (hd as f32).sqrt();
        let (q, k, v) = (f32s(q), f32s(k), f32s(v));
        let starts = seq_starts(batch);
        // One chunk per (row, head): its output and, last, its logsumexp; the scores run over
        // the rows of its sequence up to itself.
        let mut o = vec![0.0f32; rows * nh * (hd + 1)];
        par_chunks(self.threads, &mut o, hd + 1, |i, o| {
            let (r, head) = (i / nh, i % nh);
            let kvh = head / group;
            let qv = &q[i * hd..(i + 1) * hd];
            let keys = starts[r]..=r;
            let scores: Vec<f32> = keys
                .clone()
                .map(|j| dot(qv, &k[j * kvw + kvh * hd..][..hd]) * scale)
                .collect();
            let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = scores.iter().map(|s| (s - max).exp()).sum();
            o.fill(0.0);
            for (j, s) in keys.zip(&scores) {
                let p = (s - max).exp() / sum;
                for (od, vd) in o[..hd].iter_mut().zip(&v[j * kvw + kvh * hd..][..hd]) {
                    *od += p * vd;
                }
            }
            o[hd] = max + sum.ln();
        });
        let out = f32s_mut(out);
        for (i, c) in o.chunks_exact(hd + 1).enumerate() {
            out[i * hd..(i + 1) * hd].copy_from_slice(&c[..hd]);
        }
        if let Some(lse) = lse {
            let lse = f32s_mut(lse);
            for (i, c) in o.chunks_exact(hd + 1).enumerate() {
                lse[i] = c[hd];
            }
        }
        Ok(())
    }

    fn sample(
        &self,
        out: &mut Buf<Self>,
        out_index: usize,
        logits: &Buf<Self>,
        vocab: usize,
        s: SampleOp,
    ) -> Result<()> {
        let token = crate::sample::sample_logits(&f32s(logits)[..vocab], &s);
        out.raw_mut()[out_index] = token;
        Ok(())
    }
}

/// o = softmax(qv . K[0..=last]^T / sqrt(head_dim)) V for query head `head`, K and V the rows
/// of its kv head in the paged cache through `table`.
fn attend_paged(
    o: &mut [f32],
    qv: &[f32],
    kv: &KvView<'_, Cpu>,
    table: &[u32],
    last: usize,
    head: usize,
    h: Heads,
) {
    let hd = h.head_dim;
    let kvh = head / (h.n_heads / h.n_kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let (kc, vc) = (kv.k.raw().as_slice(), kv.v.raw().as_slice());
    let mut scores: Vec<f32> = (0..=last)
        .map(|p| {
            let base = kv_index(table, p, kvh, h);
            (0..hd)
                .map(|d| qv[d] * kv_get(kc, kv.dtype, base + d))
                .sum::<f32>()
                * scale
        })
        .collect();
    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    o.fill(0.0);
    for (p, s) in scores.iter().enumerate() {
        let base = kv_index(table, p, kvh, h);
        for (d, od) in o.iter_mut().enumerate() {
            *od += s / sum * kv_get(vc, kv.dtype, base + d);
        }
    }
}

pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// For each row of a packed batch, the first row of its sequence.
pub(super) fn seq_starts(batch: BatchView<'_, Cpu>) -> Vec<usize> {
    let cu = &u32s(batch.cu_seqlens)[..batch.n_seqs + 1];
    let mut starts = vec![0; batch.rows];
    for w in cu.windows(2) {
        starts[w[0] as usize..w[1] as usize].fill(w[0] as usize);
    }
    starts
}

/// HF half-split RoPE on x [rows, n_heads, head_dim], row r at position pos[r]; `dir` 1
/// rotates by +angle (forward), -1 by -angle (the backward: the transposed rotation).
pub(super) fn rotate_rows(
    x: &mut [f32],
    inv_freq: &[f32],
    pos: &[u32],
    n_heads: usize,
    head_dim: usize,
    attn_scale: f32,
    dir: f32,
) {
    let half = head_dim / 2;
    for (row, &p) in x.chunks_exact_mut(n_heads * head_dim).zip(pos) {
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                // As in `rope`: the angle in f32, cos and sin scaled by attention_scaling.
                let angle = p as f32 * inv_freq[i];
                let (sin, cos) = (dir * angle.sin() * attn_scale, angle.cos() * attn_scale);
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * cos - x2 * sin;
                head[i + half] = x2 * cos + x1 * sin;
            }
        }
    }
}
