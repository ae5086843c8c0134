// rope_kv_append: rope then kv_append in one pass. Rotates q[rows, n_heads, head_dim] and
// k[rows, n_kv_heads, head_dim] in place (HF half-split RoPE, the math of rope.cu: angle
// pos * inv_freq[j] in f32, cos and sin scaled by attn_scale) and stores the rotated k and v
// at positions pos0.. of the sequence's paged cache (the layout of kv_append.cu: block
// table[pos / 16], slot pos % 16, [block][16][kv_head][head_dim], f16 rounded to nearest or f32).
// One thread per (row, head, j < head_dim / 2) pair, q heads first, then kv heads; a kv-head
// thread also stores its two k values and the v values at the same dims (j, j + half), so every
// cache element is written by exactly one thread.
#include "common.cuh"

#define KV_BLOCK 16

__device__ __forceinline__ void kv_store(void* cache, size_t at, float x, u32 f16) {
    if (f16)
        ((u16*)cache)[at] = f32_to_f16(x);
    else
        ((float*)cache)[at] = x;
}

extern "C" __global__ void rope_kv_append(float* q, float* k, const float* v, void* k_cache,
                                          void* v_cache, const u32* table,
                                          const float* inv_freq, RopeParams p, u32 kv_f16,
                                          const u32* pos_dev) {
    const u32 half = p.head_dim / 2;
    const u32 heads = p.n_heads + p.n_kv_heads;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)p.rows * heads * half) return;
    const u32 j = (u32)(i % half);
    const u32 h = (u32)((i / half) % heads);
    const u32 r = (u32)(i / ((size_t)half * heads));
    const u32 pos = position(pos_dev, p.pos0) + r;
    const float angle = (float)pos * inv_freq[j];
    const float c = cosf(angle) * p.attn_scale, s = sinf(angle) * p.attn_scale;
    if (h < p.n_heads) {
        float* x = q + ((size_t)r * p.n_heads + h) * p.head_dim;
        const float x1 = x[j], x2 = x[j + half];
        x[j] = x1 * c - x2 * s;
        x[j + half] = x2 * c + x1 * s;
        return;
    }
    const u32 kvh = h - p.n_heads;
    const size_t src = ((size_t)r * p.n_kv_heads + kvh) * p.head_dim;
    float* x = k + src;
    const float x1 = x[j], x2 = x[j + half];
    const float k1 = x1 * c - x2 * s, k2 = x2 * c + x1 * s;
    x[j] = k1;
    x[j + half] = k2;
    const size_t at = (((size_t)table[pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK) * p.n_kv_heads +
                       kvh) * p.head_dim;
    kv_store(k_cache, at + j, k1, kv_f16);
    kv_store(k_cache, at + j + half, k2, kv_f16);
    kv_store(v_cache, at + j, v[src + j], kv_f16);
    kv_store(v_cache, at + j + half, v[src + j + half], kv_f16);
}
