// attention_flash: causal GQA attention for long prefills on tensor cores, without writing the
// scores to memory (flash attention: online softmax over key tiles).
// Parallel decomposition: one block of 4 warps per (64 query rows, query head); each warp owns
// 16 query rows. The block walks the keys in tiles of 64 positions up to its last row's
// diagonal: the tile's K (row-major) and V (transposed) are staged in shared memory as f16, read
// straight from the paged cache; every warp computes its 16 x 64 scores with mma.sync
// m16n8k16 (f16 in, f32 accumulate), updates each row's running max and sum (the four lanes of
// a quad share a row), rescales its 16 x head_dim output and adds P V with P rounded to f16 from
// the score registers (the accumulator layout of S is the operand layout of P) and V read
// transposed by ldmatrix. Blocks run from
// the last rows first (the longest causal rows) so that the tail of the grid is short.
// Tiles are double-buffered: tile i + 1 is on its way (cp.async for an f16 cache) while the
// warps work on tile i. Shared memory (dynamic): 2 stages x (K, V) x 64 x (head_dim + 8) f16.
// Precision: Q, K, V and the weights exp(s - max) <= 1 are f16 (relative error 2^-11 each);
// scores, max, sums and the output accumulate in f32.
#include "common.cuh"

#define KV_BLOCK 16
#define FLASH_ROWS 64  /* query rows per block: 4 warps x 16 */
#define FLASH_KEYS 64  /* key positions per tile */
#define FLASH_PAD 8    /* f16 padding per shared row: rows land 4 banks apart */

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// c (16 x 8, f32) += a (16 x 16, f16, row) . b (16 x 8, f16, col).
__device__ __forceinline__ void mma_16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-memory address of a generic pointer into shared memory (for ldmatrix).
__device__ __forceinline__ u32 shared_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// B fragments of two 8-dim n-tiles of a 16-key slice of row-major V in shared memory: lane l
// points at key (l % 8) + 8 ((l / 8) % 2), dims 8 (l / 16)..; .trans hands each lane the
// pairs of keys (2t, 2t + 1) of dim g that the col-major operand wants.
__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const u16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_addr(row)));
}

// 16 bytes global -> shared without passing through registers; zeros when !valid.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// Eight values of an f32 cache row rounded to f16.
__device__ __forceinline__ uint4 f32_octet(const void* cache, size_t at) {
    const float4 a = *(const float4*)((const float*)cache + at);
    const float4 b = *(const float4*)((const float*)cache + at + 4);
    return make_uint4(pack_f16x2(a.x, a.y), pack_f16x2(a.z, a.w), pack_f16x2(b.x, b.y),
                      pack_f16x2(b.z, b.w));
}

template <int HD>
__device__ __forceinline__ void flash(float* out, const float* q, const void* k_cache,
                                      const void* v_cache, const u32* table, AttentionParams p) {
    extern __shared__ __align__(16) u16 smem[];
    typedef u16 Tile[FLASH_KEYS][HD + FLASH_PAD];
    Tile* tiles = (Tile*)smem;  // stage s: K tiles[2 s], V tiles[2 s + 1]
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u32 g = lane >> 2, t = lane & 3;
    const u32 head = blockIdx.y, kvh = head / (p.n_heads / p.n_kv_heads);
    const u32 row0 = (gridDim.x - 1 - blockIdx.x) * FLASH_ROWS;
    const u32 wrow0 = row0 + warp * 16;
    const u32 n_pos = p.pos0 + p.rows;
    const u32 block_last = min(row0 + FLASH_ROWS, p.rows) - 1;
    const u32 n_keys = p.pos0 + block_last + 1;
    const u32 warp_last_key = p.pos0 + min(wrow0 + 15, p.rows - 1);
    const bool warp_live = wrow0 < p.rows;
    const float scale = p.scale * 1.4426950408889634f;  // scores in log2 units for exp2f

    // This warp's 16 query rows as mma A fragments (rows past p.rows are zero).
    u32 qf[HD / 16][4];
    {
        const u32 ra = wrow0 + g, rb = ra + 8;
        const float* qa = q + ((size_t)ra * p.n_heads + head) * HD;
        const float* qb = q + ((size_t)rb * p.n_heads + head) * HD;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const u32 d = kk * 16 + half * 8 + 2 * t;
                const float2 a = ra < p.rows ? *(const float2*)(qa + d) : make_float2(0.f, 0.f);
                const float2 b = rb < p.rows ? *(const float2*)(qb + d) : make_float2(0.f, 0.f);
                qf[kk][2 * half] = pack_f16x2(a.x, a.y);
                qf[kk][2 * half + 1] = pack_f16x2(b.x, b.y);
            }
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    const u32 lim_a = p.pos0 + wrow0 + g, lim_b = lim_a + 8;

    // Stage K and V of positions t0.. (zero past n_pos) into stage st: 16 bytes per thread per
    // step, a key row's octets on consecutive threads.
    auto load_tile = [&](u32 t0, u32 st) {
        Tile& ks = tiles[2 * st];
        Tile& vs = tiles[2 * st + 1];
        for (u32 c = tid; c < FLASH_KEYS * HD / 8; c += blockDim.x) {
            const u32 key = c / (HD / 8), d8 = (c % (HD / 8)) * 8, pos = t0 + key;
            const bool valid = pos < n_pos;
            const size_t at =
                valid ? (((size_t)table[pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK) * p.n_kv_heads +
                         kvh) * HD + d8
                      : 0;
            if (p.kv_f16) {
                cp_async16(&ks[key][d8], (const u16*)k_cache + at, valid);
                cp_async16(&vs[key][d8], (const u16*)v_cache + at, valid);
            } else {
                const uint4 zero = make_uint4(0, 0, 0, 0);
                *(uint4*)&ks[key][d8] = valid ? f32_octet(k_cache, at) : zero;
                *(uint4*)&vs[key][d8] = valid ? f32_octet(v_cache, at) : zero;
            }
        }
        cp_async_commit();
    };
    load_tile(0, 0);
    for (u32 t0 = 0, st = 0; t0 < n_keys; t0 += FLASH_KEYS, st ^= 1) {
        if (t0 + FLASH_KEYS < n_keys) {
            load_tile(t0 + FLASH_KEYS, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        Tile& ks = tiles[2 * st];
        Tile& vs = tiles[2 * st + 1];
        if (warp_live && t0 <= warp_last_key) {
            // S (16 x 64) = Q K^T: n-tile j holds keys t0 + 8j + 2t + {0, 1} of rows g, g + 8.
            float s[FLASH_KEYS / 8][4];
#pragma unroll
            for (int j = 0; j < FLASH_KEYS / 8; j++) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < HD / 16; kk++) {
                    const u16* kr = &ks[j * 8 + g][kk * 16 + 2 * t];
                    mma_16816(s[j], qf[kk], *(const u32*)kr, *(const u32*)(kr + 8));
                }
            }
            // Online softmax: mask past each row's diagonal, new max, rescale, weights.
            const bool diag = t0 + FLASH_KEYS - 1 > lim_a;
            float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
            for (int j = 0; j < FLASH_KEYS / 8; j++) {
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    const u32 key = t0 + j * 8 + 2 * t + i;
                    float sa = s[j][i] * scale, sb = s[j][2 + i] * scale;
                    if (diag) {
                        sa = key <= lim_a ? sa : -INFINITY;
                        sb = key <= lim_b ? sb : -INFINITY;
                    }
                    s[j][i] = sa;
                    s[j][2 + i] = sb;
                    mx_a = fmaxf(mx_a, sa);
                    mx_b = fmaxf(mx_b, sb);
                }
            }
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
                mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
                mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
            }
            // Every row has key 0 in tile 0, so the running max is finite from there on.
            const float nm_a = fmaxf(m_a, mx_a), nm_b = fmaxf(m_b, mx_b);
            const float corr_a = exp2f(m_a - nm_a), corr_b = exp2f(m_b - nm_b);
            m_a = nm_a;
            m_b = nm_b;
            l_a *= corr_a;
            l_b *= corr_b;
#pragma unroll
            for (int i = 0; i < HD / 8; i++) {
                o[i][0] *= corr_a;
                o[i][1] *= corr_a;
                o[i][2] *= corr_b;
                o[i][3] *= corr_b;
            }
            // O += P V, P as A fragments: keys 16 kk.. are n-tiles 2 kk and 2 kk + 1 of S.
#pragma unroll
            for (int kk = 0; kk < FLASH_KEYS / 16; kk++) {
                u32 pf[4];
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    const float* sj = s[2 * kk + half];
                    const float a0 = exp2f(sj[0] - m_a), a1 = exp2f(sj[1] - m_a);
                    const float b0 = exp2f(sj[2] - m_b), b1 = exp2f(sj[3] - m_b);
                    l_a += a0 + a1;
                    l_b += b0 + b1;
                    pf[2 * half] = pack_f16x2(a0, a1);
                    pf[2 * half + 1] = pack_f16x2(b0, b1);
                }
                const u32 vkey = kk * 16 + (lane & 7) + (lane & 8), vdim = (lane >> 4) * 8;
#pragma unroll
                for (int i = 0; i < HD / 8; i += 2) {
                    u32 b[4];
                    ldmatrix_x4_trans(b, &vs[vkey][i * 8 + vdim]);
                    mma_16816(o[i], pf, b[0], b[1]);
                    mma_16816(o[i + 1], pf, b[2], b[3]);
                }
            }
        }
        __syncthreads();
    }
    if (!warp_live) return;
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
    }
    const u32 ra = wrow0 + g, rb = ra + 8;
    const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        const u32 d = i * 8 + 2 * t;
        if (ra < p.rows)
            *(float2*)(out + ((size_t)ra * p.n_heads + head) * HD + d) =
                make_float2(o[i][0] * inv_a, o[i][1] * inv_a);
        if (rb < p.rows)
            *(float2*)(out + ((size_t)rb * p.n_heads + head) * HD + d) =
                make_float2(o[i][2] * inv_b, o[i][3] * inv_b);
    }
}

// out [rows][n_heads][hd] f32, q [rows][n_heads][hd] f32, the paged cache as kv_append writes
// it. Grid (ceil(rows / 64), n_heads), 128 threads, 4 (head_dim + 8) 128 bytes of shared memory.
extern "C" __global__ void __launch_bounds__(128)
    attention_flash_64(float* out, const float* q, const void* k_cache, const void* v_cache,
                       const u32* table, AttentionParams p) {
    flash<64>(out, q, k_cache, v_cache, table, p);
}

extern "C" __global__ void __launch_bounds__(128)
    attention_flash_128(float* out, const float* q, const void* k_cache, const void* v_cache,
                        const u32* table, AttentionParams p) {
    flash<128>(out, q, k_cache, v_cache, table, p);
}
