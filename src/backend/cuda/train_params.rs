//! Parameter blocks of the training kernels, `#[repr(C)]` and mirrored 1:1 by the structs of the
//! same names in shaders/cuda/common.cuh. They live beside the CUDA backend rather than in
//! src/backend/params.rs because no WGSL shader takes them yet; they move there when wgpu trains.

use bytemuck::{Pod, Zeroable};

/// rope_rows / rope_backward over x[rows, n_heads, head_dim], row r at position pos[r].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct RopeRowsParams {
    pub rows: u32,
    pub n_heads: u32,
    pub head_dim: u32,
    pub attn_scale: f32,
}

/// attention_train.cu: q [rows, n_heads * head_dim], k, v [rows, n_kv_heads * head_dim] of
/// n_seqs packed sequences; scale = 1 / sqrt(head_dim).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct PackedAttnParams {
    pub rows: u32,
    pub n_seqs: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub scale: f32,
    pub _pad: [u32; 2],
}

/// y[i] += alpha * x[i] for i < n.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AxpyParams {
    pub n: u32,
    pub alpha: f32,
    pub _pad: [u32; 2],
}

/// dropout: keep element i where dropout_hash(seed, i) >= threshold, scaled by `scale`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct DropoutParams {
    pub n: u32,
    pub threshold: u32,
    pub seed: u32,
    pub scale: f32,
}

/// One chunk of cross_entropy_rows: rows of vocab logits, dlogits scaled by `scale`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct CrossEntropyParams {
    pub rows: u32,
    pub vocab: u32,
    pub scale: f32,
    pub _pad: u32,
}

/// One AdamW step (train.rs's `AdamW`), bias corrections folded on the host:
/// step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AdamWParams {
    pub n: u32,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub grad_scale: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub _pad: [u32; 3],
}
