// kv_append: stores k/v[rows, n_kv_heads, head_dim] at positions pos0.. of a sequence's paged
// cache: position p lives in block table[p / 16], slot p % 16, laid out
// [block][16][kv_head][head_dim] in f16 (round to nearest) or f32. One thread per element.
// rows_mode: the rows of many sequences, each at its own position in its own blocks (row_pos /
// row_blocks in common.cuh).
#include "common.cuh"

#define KV_BLOCK 16

extern "C" __global__ void kv_append(void* k_cache, void* v_cache, const u32* table_arg,
                                     const float* k, const float* v, KvAppendParams p,
                                     const u32* pos_dev, u32 rows_mode) {
    const u32 width = p.n_kv_heads * p.head_dim;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)p.rows * width) return;
    const u32 r = (u32)(i / width), c = (u32)(i % width);
    const u32 pos = row_pos(table_arg, rows_mode, p.rows, r, pos_dev, p.pos0);
    const u32* table = row_blocks(table_arg, rows_mode, p.rows, r);
    const size_t at = ((size_t)table[pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK) * width + c;
    if (p.kv_f16) {
        ((u16*)k_cache)[at] = f32_to_f16(k[i]);
        ((u16*)v_cache)[at] = f32_to_f16(v[i]);
    } else {
        ((float*)k_cache)[at] = k[i];
        ((float*)v_cache)[at] = v[i];
    }
}
