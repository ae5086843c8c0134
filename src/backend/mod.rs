//! The one seam between the model and the hardware.
//!
//! Contract (every implementation keeps it; tests/backend_parity.rs checks it against `cpu`):
//! - Ops only enqueue work on one in-order queue. `read`, `read_finish` and `sync` are the only
//!   waits; an op sees the results of every op enqueued before it, and `upload` is ordered the
//!   same way.
//! - Every op writes into caller-owned buffers: the ones it writes are taken `&mut`, inputs `&`.
//!   No op allocates in the hot path.
//! - Activations are f32 `[rows, width]`, row-major. Weights (`Weight`) keep their stored dtype
//!   and are widened / dequantized inside the op. Norm weights and biases are f32.
//! - Paged KV cache: per layer one K and one V buffer laid out `[block][KV_BLOCK][kv_head][head_dim]`
//!   in f16 or f32; a sequence's block table (u32 block ids) maps position p to block
//!   `table[p / KV_BLOCK]`, slot `p % KV_BLOCK`.
//! - Device errors are sticky: an op that fails to enqueue returns the error at once, an error
//!   raised while executing is returned by the next `read` / `sync`.

use crate::batch::{BatchView, RowsView};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pool::{Buf, Pool};
use std::sync::Arc;

pub mod checks;
pub mod cpu;
pub mod cpu_train;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod params;
pub mod select;
pub mod train;
#[cfg(feature = "wgpu")]
pub mod wgpu;

/// A weight matrix `[rows, cols]` (HF `[out_features, in_features]`) in its stored dtype.
pub struct Weight<B: Backend> {
    pub buf: Buf<B>,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

/// Activations on their way through an RMSNorm into a projection:
/// rms_norm(x)[r, i] = x[r, i] / sqrt(mean_j(x[r, j]^2) + eps) * weight[i].
pub struct RmsNormed<'a, B: Backend> {
    /// [rows, dim] f32, not yet normalized.
    pub x: &'a Buf<B>,
    /// [dim] f32.
    pub weight: &'a Buf<B>,
    pub eps: f32,
}

impl<B: Backend> Clone for RmsNormed<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for RmsNormed<'_, B> {}

/// Head layout shared by rope, kv_append and attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// One layer's paged KV storage plus the sequence's block table, as attention reads it.
pub struct KvView<'a, B: Backend> {
    pub k: &'a Buf<B>,
    pub v: &'a Buf<B>,
    /// u32 block ids of the sequence.
    pub table: &'a Buf<B>,
    /// F16 or F32.
    pub dtype: DType,
}

/// One layer's paged KV storage plus the sequence's block table, as new rows are stored in it.
pub struct KvSlot<'a, B: Backend> {
    pub k: &'a mut Buf<B>,
    pub v: &'a mut Buf<B>,
    /// u32 block ids of the sequence.
    pub table: &'a Buf<B>,
    /// F16 or F32.
    pub dtype: DType,
}

/// RoPE settings of one forward call: inverse frequencies [head_dim / 2] f32 and the scale of
/// cos and sin (1 except for yarn / longrope).
#[derive(Clone, Copy)]
pub struct RopeArgs<'a, B: Backend> {
    pub inv_freq: &'a Buf<B>,
    pub attn_scale: f32,
}

/// Sampling settings the `sample` op applies on the device (penalties are applied by the host
/// to logits beforehand; see sample.rs for the exact semantics every backend follows).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOp {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// Uniform random number in [0, 1) from the host RNG.
    pub uniform: f32,
}

/// What a backend knows about its memory, for checking that a model fits before uploading it.
/// Every field is None where the backend cannot tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Memory of the device (bytes).
    pub total: Option<u64>,
    /// Memory free for new buffers now (bytes).
    pub available: Option<u64>,
    /// Largest single buffer the device can allocate (bytes).
    pub max_buffer: Option<u64>,
}

/// A read started by `Backend::read_start`, finished by `read_finish` of the same backend.
#[derive(Debug)]
pub enum PendingRead {
    /// The bytes, already on the host (backends that read at once).
    Done(Vec<u8>),
    /// A backend's ticket for a read still in flight, and its length in bytes.
    InFlight { ticket: u64, bytes: usize },
}

impl PendingRead {
    /// Copies the bytes of a `Done` read to `out` (which must have their length).
    pub fn take_done(self, out: &mut [u8]) -> Result<()> {
        match self {
            PendingRead::Done(data) if data.len() == out.len() => {
                out.copy_from_slice(&data);
                Ok(())
            }
            PendingRead::Done(data) => Err(Error::Device(format!(
                "a read of {} bytes finished into {} bytes",
                data.len(),
                out.len()
            ))),
            PendingRead::InFlight { .. } => Err(Error::Device(
                "a read in flight was finished by a backend that did not start it".into(),
            )),
        }
    }
}

pub trait Backend: Sized + 'static {
    /// One raw device allocation (wgpu::Buffer, a host Vec, a CUDA slice).
    type Raw: Send + Sync + 'static;

    /// Short backend name ("cpu", "wgpu") and a description of the device.
    fn name(&self) -> &'static str;
    fn device_name(&self) -> String;

    // ---- memory ----
    /// The device's memory limits; the default knows nothing.
    fn memory_limits(&self) -> MemoryLimits {
        MemoryLimits::default()
    }
    fn alloc_raw(&self, bytes: usize) -> Result<Self::Raw>;
    fn pool(&self) -> &Arc<Pool<Self>>;
    /// A pooled scratch buffer of at least `bytes` bytes; contents undefined.
    fn alloc(&self, bytes: usize) -> Result<Buf<Self>> {
        self.pool().alloc(self, bytes)
    }
    /// Writes `data` at byte `offset` of `dst` (ordered after previously enqueued ops).
    fn upload(&self, dst: &mut Buf<Self>, offset: usize, data: &[u8]) -> Result<()>;
    /// Copies `bytes` bytes between buffers.
    fn copy(
        &self,
        dst: &mut Buf<Self>,
        dst_offset: usize,
        src: &Buf<Self>,
        src_offset: usize,
        bytes: usize,
    ) -> Result<()>;
    /// Waits for every enqueued op and reads `out.len()` bytes from byte `offset` of `src`.
    fn read(&self, src: &Buf<Self>, offset: usize, out: &mut [u8]) -> Result<()>;
    /// Starts reading `bytes` bytes at byte `offset` of `src` as they are once the ops enqueued
    /// so far have run, without waiting: more ops may be enqueued (and run) before
    /// `read_finish` hands the bytes over. Generation uses it to enqueue the next decode step
    /// while the device still computes the current token. The default reads at once.
    fn read_start(&self, src: &Buf<Self>, offset: usize, bytes: usize) -> Result<PendingRead> {
        let mut data = vec![0; bytes];
        self.read(src, offset, &mut data)?;
        Ok(PendingRead::Done(data))
    }
    /// Waits for a read started by `read_start` and copies its bytes to `out`.
    fn read_finish(&self, read: PendingRead, out: &mut [u8]) -> Result<()> {
        read.take_done(out)
    }
    /// Waits for every enqueued op.
    fn sync(&self) -> Result<()>;
    /// Enqueues one decode step: the ops `ops` enqueues. A backend may call `ops` more than once
    /// (CUDA traces them, then records a graph it replays on later steps whose ops differ only
    /// in their positions); only the ops' effects of one call take place.
    fn decode_step(&self, ops: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        ops()
    }

    // ---- inference ops ----
    /// out[t, :] = table[tokens[t], :] widened to f32, for t < n_tokens (tokens: u32).
    fn embedding(
        &self,
        out: &mut Buf<Self>,
        tokens: &Buf<Self>,
        table: &Weight<Self>,
        n_tokens: usize,
    ) -> Result<()>;
    /// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w
    fn rms_norm(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Buf<Self>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()>;
    /// out[rows, w.rows] = x[rows, w.cols] . w^T
    fn matmul(
        &self,
        out: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
    ) -> Result<()>;
    /// x[rows, n] += bias[n]
    fn add_bias(&self, x: &mut Buf<Self>, bias: &Buf<Self>, rows: usize, n: usize) -> Result<()>;
    /// Rotates q and k in place (HF half-split RoPE); row r is at position pos0 + r; cos and
    /// sin are scaled by `attn_scale` (1 except for yarn / longrope).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        q: &mut Buf<Self>,
        k: &mut Buf<Self>,
        inv_freq: &Buf<Self>,
        rows: usize,
        pos0: usize,
        heads: Heads,
        attn_scale: f32,
    ) -> Result<()>;
    /// Stores k and v rows `[rows, n_kv_heads, head_dim]` at positions pos0.. of the paged cache.
    #[allow(clippy::too_many_arguments)]
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
        heads: Heads,
    ) -> Result<()>;
    /// Causal GQA attention: out[r, h] = softmax(q[r, h] . K[0..=pos0+r]^T / sqrt(head_dim)) V.
    fn attention(
        &self,
        out: &mut Buf<Self>,
        q: &Buf<Self>,
        kv: KvView<'_, Self>,
        rows: usize,
        pos0: usize,
        heads: Heads,
    ) -> Result<()>;
    /// out[i] = silu(gate[i]) * up[i] for i < n
    fn swiglu(&self, out: &mut Buf<Self>, gate: &Buf<Self>, up: &Buf<Self>, n: usize)
        -> Result<()>;
    /// x[i] += y[i] for i < n
    fn add(&self, x: &mut Buf<Self>, y: &Buf<Self>, n: usize) -> Result<()>;
    /// Inverted dropout with a counter-based mask: out[i] = x[i] / (1 - p) where
    /// `dropout_hash(seed, i) >= dropout_threshold(p)`, else 0, for i < n. The mask depends only
    /// on (seed, i), so a recompute (checkpointing, backward) and every backend draw the same
    /// one. LoRA's dropout in training; backends that train override it.
    fn dropout(
        &self,
        _out: &mut Buf<Self>,
        _x: &Buf<Self>,
        _p: f32,
        _seed: u32,
        _n: usize,
    ) -> Result<()> {
        Err(Error::Device(format!(
            "the {} backend does not apply LoRA dropout; use --backend cpu or cuda",
            self.name()
        )))
    }
    /// u[rows, a.rows] = x . A^T with A a LoRA adapter's f32 down-projection (a few rows):
    /// `matmul`'s product, apart so that a backend can run this thin product its own way.
    fn lora_down(
        &self,
        u: &mut Buf<Self>,
        x: &Buf<Self>,
        a: &Weight<Self>,
        rows: usize,
    ) -> Result<()> {
        self.matmul(u, x, a, rows)
    }
    /// out[rows, w.rows] += alpha * x[rows, w.cols] . w^T: a LoRA adapter's second product
    /// added into its projection's output. The default composes matmul into `tmp` and
    /// add_scaled; a backend may run it as one GEMM that accumulates into out.
    fn matmul_add_scaled(
        &self,
        out: &mut Buf<Self>,
        tmp: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        rows: usize,
        alpha: f32,
    ) -> Result<()> {
        self.matmul(tmp, x, w, rows)?;
        self.add_scaled(out, tmp, alpha, rows * w.rows)
    }
    /// x[i] += alpha * y[i] for i < n (LoRA's scaled update). The default serves alpha = 1
    /// only; backends that run LoRA override it.
    fn add_scaled(&self, x: &mut Buf<Self>, y: &Buf<Self>, alpha: f32, n: usize) -> Result<()> {
        if alpha == 1.0 {
            return self.add(x, y, n);
        }
        Err(Error::Device(format!(
            "the {} backend does not apply LoRA adapters yet; use --backend cpu or cuda",
            self.name()
        )))
    }
    /// resid[rows, w.rows] += x . w^T (+ bias): a projection into the residual stream. `tmp` is
    /// scratch of the output's size. Backends may fuse the add into the matmul's epilogue.
    #[allow(clippy::too_many_arguments)]
    fn matmul_residual(
        &self,
        resid: &mut Buf<Self>,
        tmp: &mut Buf<Self>,
        x: &Buf<Self>,
        w: &Weight<Self>,
        bias: Option<&Buf<Self>>,
        rows: usize,
    ) -> Result<()> {
        matmul_residual_unfused(self, resid, tmp, x, w, bias, rows)
    }
    /// q, k, v = rms_norm(x) . (wq, wk, wv)^T: the attention block's input norm and
    /// projections. `xb` is scratch for rms_norm(x) [rows, dim]. Backends may fold the norm
    /// into the projections (the pass that reads x also sums its squares).
    fn norm_qkv(
        &self,
        qkv: [&mut Buf<Self>; 3],
        xb: &mut Buf<Self>,
        x: RmsNormed<'_, Self>,
        w: [&Weight<Self>; 3],
        rows: usize,
    ) -> Result<()> {
        norm_qkv_unfused(self, qkv, xb, x, w, rows)
    }
    /// out[rows, w1.rows] = silu(h . w1^T + b1) * (h . w3^T + b3) with h = rms_norm(x): the
    /// feed-forward's input norm, gate and up projections and swiglu. `scratch` is (gate, up)
    /// of the output's size and h [rows, dim].
    fn ffn_gate_up(
        &self,
        out: &mut Buf<Self>,
        scratch: [&mut Buf<Self>; 3],
        x: RmsNormed<'_, Self>,
        w: (&Weight<Self>, &Weight<Self>),
        bias: (Option<&Buf<Self>>, Option<&Buf<Self>>),
        rows: usize,
    ) -> Result<()> {
        ffn_gate_up_unfused(self, out, scratch, x, w, bias, rows)
    }
    /// rope(q, k) then kv_append(k, v): rows at positions pos0.. are rotated (q and k in place)
    /// and k, v stored in the cache. Backends may rotate k on its way into the cache in one pass.
    #[allow(clippy::too_many_arguments)]
    fn rope_kv_append(
        &self,
        q: &mut Buf<Self>,
        k: &mut Buf<Self>,
        v: &Buf<Self>,
        cache: KvSlot<'_, Self>,
        rope: RopeArgs<'_, Self>,
        rows: usize,
        pos0: usize,
        heads: Heads,
    ) -> Result<()> {
        rope_kv_append_unfused(self, q, k, v, cache, rope, rows, pos0, heads)
    }
    // ---- batched forward ops (packed sequences; training, and serving later) ----
    /// Rotates x [rows, n_heads, head_dim] in place (HF half-split RoPE), row r at position
    /// pos[r] (u32 [rows]); cos and sin scaled by `attn_scale`. Backends that do not run packed
    /// batches yet return an error naming themselves.
    #[allow(clippy::too_many_arguments)]
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
        let _ = (x, inv_freq, pos, rows, n_heads, head_dim, attn_scale);
        Err(no_packed(self.name()))
    }
    /// Causal GQA attention within each sequence of a packed batch, over q [rows, H*hd] and
    /// k, v [rows, KV*hd] as they are (no cache): out[r, h] = softmax(q[r, h] . K_s^T / sqrt(hd))
    /// V_s over the rows of r's sequence up to r. With `lse`, writes each (row, head)'s
    /// natural logsumexp of the scaled scores to lse [rows, H] (training keeps it for backward).
    #[allow(clippy::too_many_arguments)]
    fn attention_packed(
        &self,
        out: &mut Buf<Self>,
        lse: Option<&mut Buf<Self>>,
        q: &Buf<Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        batch: BatchView<'_, Self>,
        heads: Heads,
    ) -> Result<()> {
        let _ = (out, lse, q, k, v, batch, heads);
        Err(no_packed(self.name()))
    }

    // ---- rows of many sequences over the paged cache (serving's batched decode) ----
    /// Stores k and v rows `[rows, n_kv_heads, head_dim]` in the paged cache, row r at its
    /// position in its own sequence's blocks (the layout of `RowsView`; `cache.table` is the
    /// batch's `meta`). Backends that do not run batched decoding return an error naming
    /// themselves.
    fn kv_append_rows(
        &self,
        cache: KvSlot<'_, Self>,
        k: &Buf<Self>,
        v: &Buf<Self>,
        rows: RowsView<'_, Self>,
        heads: Heads,
    ) -> Result<()> {
        let _ = (cache, k, v, rows, heads);
        Err(no_rows(self.name()))
    }
    /// Causal GQA attention of rows of many sequences over their paged caches (the layout of
    /// `RowsView`; `kv.table` is the batch's `meta`): out[r, h] = softmax(q[r, h] .
    /// K_s[0..=pos_r]^T / sqrt(head_dim)) V_s over r's own sequence s. Any mix of decode rows
    /// and prompt chunks; a row's result does not depend on the other rows of the batch.
    fn attention_rows(
        &self,
        out: &mut Buf<Self>,
        q: &Buf<Self>,
        kv: KvView<'_, Self>,
        rows: RowsView<'_, Self>,
        heads: Heads,
    ) -> Result<()> {
        let _ = (out, q, kv, rows, heads);
        Err(no_rows(self.name()))
    }

    /// Picks a token from logits[vocab] and writes it (u32) to out[out_index].
    fn sample(
        &self,
        out: &mut Buf<Self>,
        out_index: usize,
        logits: &Buf<Self>,
        vocab: usize,
        s: SampleOp,
    ) -> Result<()>;
}

fn no_rows(backend: &str) -> Error {
    Error::Device(format!(
        "the {backend} backend does not run batched decoding over the paged cache"
    ))
}

fn no_packed(backend: &str) -> Error {
    Error::Device(format!(
        "the {backend} backend does not run packed batches (training) yet; use --backend cpu or cuda"
    ))
}

/// `matmul_residual` as three ops (every backend's default; fused backends fall back to it).
#[allow(clippy::too_many_arguments)]
pub fn matmul_residual_unfused<B: Backend>(
    b: &B,
    resid: &mut Buf<B>,
    tmp: &mut Buf<B>,
    x: &Buf<B>,
    w: &Weight<B>,
    bias: Option<&Buf<B>>,
    rows: usize,
) -> Result<()> {
    b.matmul(tmp, x, w, rows)?;
    if let Some(bias) = bias {
        b.add_bias(tmp, bias, rows, w.rows)?;
    }
    b.add(resid, tmp, rows * w.rows)
}

/// `rope_kv_append` as two ops (every backend's default; fused backends fall back to it).
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_append_unfused<B: Backend>(
    b: &B,
    q: &mut Buf<B>,
    k: &mut Buf<B>,
    v: &Buf<B>,
    cache: KvSlot<'_, B>,
    rope: RopeArgs<'_, B>,
    rows: usize,
    pos0: usize,
    heads: Heads,
) -> Result<()> {
    b.rope(q, k, rope.inv_freq, rows, pos0, heads, rope.attn_scale)?;
    let KvSlot {
        k: kc,
        v: vc,
        table,
        dtype,
    } = cache;
    b.kv_append(kc, vc, dtype, table, k, v, rows, pos0, heads)
}

/// `norm_qkv` as separate ops (every backend's default; fused backends fall back to it).
pub fn norm_qkv_unfused<B: Backend>(
    b: &B,
    [q, k, v]: [&mut Buf<B>; 3],
    xb: &mut Buf<B>,
    x: RmsNormed<'_, B>,
    [wq, wk, wv]: [&Weight<B>; 3],
    rows: usize,
) -> Result<()> {
    b.rms_norm(xb, x.x, x.weight, rows, wq.cols, x.eps)?;
    b.matmul(q, xb, wq, rows)?;
    b.matmul(k, xb, wk, rows)?;
    b.matmul(v, xb, wv, rows)
}

/// `ffn_gate_up` as separate ops (every backend's default; fused backends fall back to it).
pub fn ffn_gate_up_unfused<B: Backend>(
    b: &B,
    out: &mut Buf<B>,
    [gate, up, h]: [&mut Buf<B>; 3],
    x: RmsNormed<'_, B>,
    w: (&Weight<B>, &Weight<B>),
    bias: (Option<&Buf<B>>, Option<&Buf<B>>),
    rows: usize,
) -> Result<()> {
    let n = w.0.rows;
    b.rms_norm(h, x.x, x.weight, rows, w.0.cols, x.eps)?;
    b.matmul(gate, h, w.0, rows)?;
    b.matmul(up, h, w.1, rows)?;
    if let Some(b1) = bias.0 {
        b.add_bias(gate, b1, rows, n)?;
    }
    if let Some(b3) = bias.1 {
        b.add_bias(up, b3, rows, n)?;
    }
    b.swiglu(out, gate, up, rows * n)
}

/// The integer hash of `Backend::dropout`'s mask (a murmur3-style finalizer of the element index
/// mixed with the seed); shaders/cuda/add.cu computes the same bits.
pub fn dropout_hash(seed: u32, i: u32) -> u32 {
    let mut h = i.wrapping_mul(0x9E37_79B1) ^ seed;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// Hashes at or above this keep their element: a fraction 1 - p of them (0 <= p < 1).
pub fn dropout_threshold(p: f32) -> u32 {
    (p.clamp(0.0, 1.0) as f64 * 4_294_967_296.0).min(u32::MAX as f64) as u32
}
