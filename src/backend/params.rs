//! Per-kernel parameter blocks, `#[repr(C)]` and mirrored 1:1 by the `Params` struct at the top
//! of each shader (shaders/wgsl/<op>.wgsl). Sizes are multiples of 16 bytes so they can sit in
//! a uniform buffer at any 256-byte-aligned offset. tests/shaders_valid.rs checks that the WGSL
//! struct sizes equal these.

use bytemuck::{Pod, Zeroable};

/// Positions per paged-KV block (DESIGN.md: `[block][BLOCK][kv_head][head_dim]`).
pub const KV_BLOCK: usize = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct EmbeddingParams {
    pub n_tokens: u32,
    pub dim: u32,
    /// Table rows [row0, row0 + chunk_rows) are bound (tables over one storage binding are
    /// looked up in row chunks); tokens outside the chunk are left to the other chunks.
    pub row0: u32,
    pub chunk_rows: u32,
    /// Rows of the whole table: a token id at or past it yields a NaN row.
    pub vocab: u32,
    pub _pad: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct RmsNormParams {
    pub rows: u32,
    pub dim: u32,
    pub eps: f32,
    pub _pad: u32,
}

/// Mat-vecs with the input's RMSNorm folded in (CUDA's norm_qkv and ffn_gate_up): up to three
/// weight matrices of n0, n1, n2 rows of k, one output each; `rows` input rows of k.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NormMatvecParams {
    pub rows: u32,
    pub k: u32,
    pub n0: u32,
    pub n1: u32,
    pub n2: u32,
    pub eps: f32,
    pub _pad: [u32; 2],
}

/// out[r, col0 + o] = x[r, :] . w[o, :] for o < n (w: n rows of k; out rows are out_stride wide).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct MatmulParams {
    pub rows: u32,
    pub n: u32,
    pub k: u32,
    /// Row stride of `out` (the full output width when w is bound in row chunks).
    pub out_stride: u32,
    /// First output column of this chunk (0 unless w is bound in row chunks).
    pub col0: u32,
    /// 1: add into `out` instead of overwriting it (CUDA's residual epilogue; WGSL ignores it).
    pub accumulate: u32,
    pub _pad: [u32; 2],
}

/// x[rows, n] += bias[n]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AddBiasParams {
    pub rows: u32,
    pub n: u32,
    pub _pad: [u32; 2],
}

/// Rotates q[rows, n_heads, head_dim] and k[rows, n_kv_heads, head_dim] in place; row r is at
/// position pos0 + r. HF half-split convention; cos and sin are scaled by attn_scale.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct RopeParams {
    pub rows: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub pos0: u32,
    pub attn_scale: f32,
    pub _pad: [u32; 2],
}

/// Writes k/v[rows, n_kv_heads, head_dim] at positions pos0.. of a sequence's paged cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct KvAppendParams {
    pub rows: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub pos0: u32,
    /// 1: the cache holds f16 (two per u32), 0: f32.
    pub kv_f16: u32,
    pub _pad: [u32; 3],
}

/// Causal GQA attention of q[rows, n_heads, head_dim] (row r at position pos0 + r) over the
/// sequence's paged cache, positions 0..=pos0 + r.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionParams {
    pub rows: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub pos0: u32,
    pub kv_f16: u32,
    pub scale: f32,
    /// Positions each split of the decode kernel covers (split-KV); unused by prefill.
    pub split_len: u32,
}

/// out[i] = silu(gate[i]) * up[i], or x[i] += y[i] for `add`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ElementwiseParams {
    pub n: u32,
    pub _pad: [u32; 3],
}

/// x[i] += alpha * y[i] for i < n (add.wgsl: the residual update with alpha 1, LoRA's scaled
/// update otherwise).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AddParams {
    pub n: u32,
    pub alpha: f32,
    pub _pad: [u32; 2],
}

/// Picks one token from logits[vocab] and writes it to out[out_index].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SampleParams {
    pub vocab: u32,
    /// 0 = off.
    pub top_k: u32,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// <= 0: greedy (argmax).
    pub temperature: f32,
    /// Uniform random number in [0, 1) drawn by the host RNG.
    pub uniform: f32,
    pub out_index: u32,
    pub _pad: u32,
}
