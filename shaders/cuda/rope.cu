// rope: rotates q[rows, n_heads, head_dim] and k[rows, n_kv_heads, head_dim] in place, HF's
// half-split convention: (x[i], x[i + half]) turns by angle pos * inv_freq[i] (computed in f32,
// as HF does), cos and sin scaled by attn_scale. One thread per (row, head, i < half) pair, the
// q heads first, then the k heads.
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
