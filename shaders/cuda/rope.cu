// rope: rotates q[rows, n_heads, head_dim] and k[rows, n_kv_heads, head_dim] in place, HF's
// half-split convention: (x[i], x[i + half]) turns by angle pos * inv_freq[i] (computed in f32,
// as HF does), cos and sin scaled by attn_scale. One thread per (row, head, i < half) pair, the
// q heads first, then the k heads.
// rope_rows / rope_backward: the packed-batch form over one tensor x[rows, n_heads, head_dim],
// row r at position pos[r]; the backward turns by -angle (the rotation is orthogonal, so its
// transpose is its inverse), with the same scale. One thread per (row, head, i < half) pair.
#include "common.cuh"

extern "C" __global__ void rope(float* q, float* k, const float* inv_freq, RopeParams p,
                                const u32* pos_dev) {
    const u32 half = p.head_dim / 2;
    const u32 heads = p.n_heads + p.n_kv_heads;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)p.rows * heads * half) return;
    const u32 j = (u32)(i % half);
    const u32 h = (u32)((i / half) % heads);
    const u32 r = (u32)(i / ((size_t)half * heads));
    const float pos = (float)(position(pos_dev, p.pos0) + r);
    float* x = h < p.n_heads ? q + ((size_t)r * p.n_heads + h) * p.head_dim
                             : k + ((size_t)r * p.n_kv_heads + (h - p.n_heads)) * p.head_dim;
    const float angle = pos * inv_freq[j];
    const float c = cosf(angle) * p.attn_scale, s = sinf(angle) * p.attn_scale;
    const float x1 = x[j], x2 = x[j + half];
    x[j] = x1 * c - x2 * s;
    x[j + half] = x2 * c + x1 * s;
}

// sin_sign: 1 for the forward rotation, -1 for its transpose (the backward).
__device__ __forceinline__ void rope_rows_pair(float* x, const float* inv_freq, const u32* pos,
                                               RopeRowsParams p, float sin_sign) {
    const u32 half = p.head_dim / 2;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)p.rows * p.n_heads * half) return;
    const u32 j = (u32)(i % half);
    const size_t rh = i / half;  // row * n_heads + head
    float* h = x + rh * p.head_dim;
    const float angle = (float)pos[rh / p.n_heads] * inv_freq[j];
    const float c = cosf(angle) * p.attn_scale, s = sin_sign * sinf(angle) * p.attn_scale;
    const float x1 = h[j], x2 = h[j + half];
    h[j] = x1 * c - x2 * s;
    h[j + half] = x2 * c + x1 * s;
}

extern "C" __global__ void rope_rows(float* x, const float* inv_freq, const u32* pos,
                                     RopeRowsParams p) {
    rope_rows_pair(x, inv_freq, pos, p, 1.0f);
}

extern "C" __global__ void rope_backward(float* dx, const float* inv_freq, const u32* pos,
                                         RopeRowsParams p) {
    rope_rows_pair(dx, inv_freq, pos, p, -1.0f);
}
