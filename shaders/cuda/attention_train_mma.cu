// attention_train_mma: training's packed causal GQA attention (the forward keeping each row's
// logsumexp, and its FlashAttention-2 backward) on tensor cores, for head sizes 64 and 128.
// attention_train.cu holds the f32 kernels of the same ops (the exact variant and the other head
// sizes) and the delta pass D = rowsum(dO * O) both paths share. q [rows, H * hd], k and v
// [rows, KV * hd], all f32; sequence s owns rows cu[s]..cu[s + 1], and a row attends the rows of
// its own sequence up to itself.
//
// Half type: bf16 operands of mma.sync m16n8k16, f32 accumulation. The inputs are f32 buffers
// and bf16 keeps f32's exponent range: no activation overflows (f16 stops at 65504) and no
// gradient underflows (dO and dS of a loss averaged over thousands of tokens reach f16's
// subnormals, 6e-8, with no loss scaling to lift them). The price is 8 significant bits: a
// relative error of at most 2^-8 per rounded operand (Q, K, V, dO, P, dS) where f16 has 2^-11.
// Scores, softmax statistics and every product accumulate in f32; out, lse and the gradients
// are written as f32.
//
// Tiles are rounded to bf16 as they are staged in shared memory: a thread reads 8 consecutive
// f32 of a row (two float4, a row's octets on consecutive threads) and stores one 16-byte bf16
// octet. Staged rows are HD + 8 values apart, so the 8 rows an ldmatrix phase reads fall in
// distinct banks. Rows past a sequence's end are staged as zeros with lse = +inf (P = 0), and
// are never written.
//
// Fragments (m16n8k16, lane = 4 g + t): A holds rows g, g + 8 and columns 2t, 2t + 1 (+ 8), B
// column g and rows 2t, 2t + 1 (+ 8), C rows g, g + 8 and columns 2t, 2t + 1. A 16 x 16 block of
// score accumulators is, value for value, the A operand of the product that follows (P V, dS K,
// P^T dO, dS^T Q), so probabilities never leave registers. A tile staged [row][dim] is read by
// ldmatrix as the B operand of a product over dims (Q K^T, dO V^T) and by ldmatrix.trans as the
// B operand of a product over rows (P V, dS K, P^T dO, dS^T Q).
//
// Parallel decomposition: blocks of 4 warps, each warp owning 16 of the block's 64 rows.
// - attention_packed_mma_<64|128>: grid (heads, query tiles of 64, sequences), the last tiles
//   (the longest causal rows) first. The warp's Q fragments stay in registers; the block walks
//   K/V tiles of 64 keys up to its last row, each warp skipping the tiles past its own last row:
//   S = Q K^T, the causal mask on the diagonal tile, online softmax (running max and sum per
//   row; the 4 lanes of a quad share a row; exp2 of log2-scaled scores), O += P V with P
//   rounded to bf16. out = O / sum, lse = max + ln(sum).
// - attention_bwd_dq_mma_<hd>: grid as the forward. Q and dO fragments in registers, K/V tiles
//   of DQ_KEYS keys: S = Q K^T, dP = dO V^T, P = exp(scale S - lse), dS = P (dP - D),
//   dQ += dS K; dq = scale dQ.
// - attention_bwd_dkdv_mma_<hd>: grid (kv heads, key tiles of 64, sequences), tile 0 (the one
//   the most queries see) first. K and V stay staged; the block walks the query heads of its kv
//   head's group one after another and, for each, the query tiles of DKDV_QUERIES rows from the
//   block's first key on: S^T = K Q^T, dP^T = V dO^T, P^T and dS^T as above, dV += P^T dO,
//   dK += dS^T Q. The group's sums stay in registers: no atomics, and the result does not
//   depend on scheduling. dk = scale dK.
// Register budget: DQ_KEYS and DKDV_QUERIES are 64 at head_dim 64 and 32 at 128, which keeps
// every kernel's scores, dP and accumulators in registers without spills.
#include "common.cuh"

#define MT_THREADS 128
#define MT_ROWS 64   /* rows a block owns: 4 warps x 16 */
#define MT_KEYS 64   /* keys per staged tile of the forward */
#define MT_PAD 8     /* bf16 padding per staged row */
#define MT_LOG2E 1.4426950408889634f
#define MT_LN2 0.6931471805599453f

// ---- bf16 tensor-core primitives ----

__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// c (16 x 8, f32) += a (16 x 16, bf16, row) . b (16 x 8, bf16, col).
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// Four 8 x 8 matrices of 16-bit values: lane l gives the address of row l % 8 of matrix l / 8;
// register m receives row (lane / 4), values 2 (lane % 4) and 2 (lane % 4) + 1 of matrix m.
__device__ __forceinline__ void ldsm_x4(u32* r, const u16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// As ldsm_x4, transposed: register m receives rows 2 (lane % 4) and 2 (lane % 4) + 1 of
// column lane / 4 of matrix m.
__device__ __forceinline__ void ldsm_x4_trans(u32* r, const u16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// Barrier `id` (1 or 2) over the 128 threads of one warpgroup.
__device__ __forceinline__ void warpgroup_sync(u32 id) {
    asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory");
}

// ---- staged tiles ----

// The A operand of rows r0..r0 + 15 over columns c0..c0 + 15 of a staged tile.
template <int HD>
__device__ __forceinline__ void frag_a(u32* a, const u16* tile, u32 r0, u32 c0) {
    const u32 lane = threadIdx.x & 31;
    ldsm_x4(a, tile + (r0 + (lane & 15)) * (HD + MT_PAD) + c0 + (lane >> 4) * 8);
}

// B operands of a product over columns c0..c0 + 15 (k) of a staged tile whose rows are the
// output's columns (n): b[0], b[1] for rows r0..r0 + 7, b[2], b[3] for rows r0 + 8..r0 + 15.
template <int HD>
__device__ __forceinline__ void frag_b(u32* b, const u16* tile, u32 r0, u32 c0) {
    const u32 lane = threadIdx.x & 31;
    ldsm_x4(b, tile + (r0 + (lane & 7) + ((lane >> 4) << 3)) * (HD + MT_PAD) + c0 +
                   ((lane >> 3) & 1) * 8);
}

// B operands of a product over rows r0..r0 + 15 (k) of a staged tile whose columns are the
// output's (n): b[0], b[1] for columns c0..c0 + 7, b[2], b[3] for columns c0 + 8..c0 + 15.
template <int HD>
__device__ __forceinline__ void frag_bt(u32* b, const u16* tile, u32 r0, u32 c0) {
    const u32 lane = threadIdx.x & 31;
    ldsm_x4_trans(b, tile + (r0 + (lane & 7) + (lane & 8)) * (HD + MT_PAD) + c0 + (lane >> 4) * 8);
}

// Rows first..first + n of src (`width` floats a row, columns col..col + HD), rounded to bf16,
// into rows 0..n of a staged tile of COUNT rows; rows n..COUNT are zeros. NT threads share the
// work; this one is thread `tid` of them.
template <int HD, int COUNT, int NT = MT_THREADS>
__device__ __forceinline__ void stage_bf16(u16* tile, const float* src, u32 width, u32 col,
                                           u32 first, u32 n, u32 tid = threadIdx.x) {
    constexpr u32 OCTETS = HD / 8, ITER = COUNT * OCTETS / NT;
    static_assert(COUNT * OCTETS % NT == 0, "whole passes of the threads");
#pragma unroll
    for (u32 it = 0; it < ITER; it++) {
        const u32 c = it * NT + tid, r = c / OCTETS, d = (c % OCTETS) * 8;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (r < n) {
            const float4* s = (const float4*)(src + (size_t)(first + r) * width + col + d);
            const float4 x = s[0], y = s[1];
            w = make_uint4(pack_bf16x2(x.x, x.y), pack_bf16x2(x.z, x.w), pack_bf16x2(y.x, y.y),
                           pack_bf16x2(y.z, y.w));
        }
        *(uint4*)(tile + r * (HD + MT_PAD) + d) = w;
    }
}

// The A fragments of a warp's 16 rows of one head, straight from f32 rows: ra for rows g, rb for
// rows g + 8 (null past the sequence: zeros).
template <int HD>
__device__ __forceinline__ void frag_rows(u32 (*f)[4], const float* ra, const float* rb) {
    const u32 t = threadIdx.x & 3;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const u32 d = kk * 16 + half * 8 + 2 * t;
            const float2 a = ra ? *(const float2*)(ra + d) : make_float2(0.0f, 0.0f);
            const float2 b = rb ? *(const float2*)(rb + d) : make_float2(0.0f, 0.0f);
            f[kk][2 * half] = pack_bf16x2(a.x, a.y);
            f[kk][2 * half + 1] = pack_bf16x2(b.x, b.y);
        }
    }
}

// The block's sequence: first row and length, clamped to the batch (a bad cu_seqlens reads
// nothing outside the buffers).
__device__ __forceinline__ void mma_seq_bounds(const u32* cu, u32 rows, u32* s0, u32* len) {
    const u32 a = min(cu[blockIdx.z], rows), b = min(cu[blockIdx.z + 1], rows);
    *s0 = a;
    *len = b > a ? b - a : 0;
}

// ---- forward ----

template <int HD>
__device__ __forceinline__ void forward_mma(float* out, float* lse, const float* q,
                                            const float* k, const float* v, const u32* cu,
                                            PackedAttnParams p) {
    constexpr u32 ST = HD + MT_PAD;
    extern __shared__ __align__(16) u16 smem[];
    u16* sk = smem;               // [MT_KEYS][ST]
    u16* sv = smem + MT_KEYS * ST;  // [MT_KEYS][ST]
    u32 s0, len;
    mma_seq_bounds(cu, p.rows, &s0, &len);
    const u32 i0 = (gridDim.y - 1 - blockIdx.y) * MT_ROWS;
    if (i0 >= len) return;
    const u32 h = blockIdx.x, kvh = h / (p.n_heads / p.n_kv_heads);
    const u32 qw = p.n_heads * HD, kw = p.n_kv_heads * HD;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const u32 w0 = i0 + warp * 16, ra = w0 + g, rb = ra + 8;
    const u32 last = min(i0 + MT_ROWS, len) - 1;
    const bool live = w0 < len;
    const u32 wlast = min(w0 + 15, len - 1);
    const float sl2 = p.scale * MT_LOG2E;

    u32 qf[HD / 16][4];
    frag_rows<HD>(qf, ra < len ? q + (size_t)(s0 + ra) * qw + h * HD : nullptr,
                  rb < len ? q + (size_t)(s0 + rb) * qw + h * HD : nullptr);
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;

    for (u32 j0 = 0; j0 <= last; j0 += MT_KEYS) {
        const u32 n = min((u32)MT_KEYS, len - j0);
        __syncthreads();  // the previous tile is consumed
        stage_bf16<HD, MT_KEYS>(sk, k, kw, kvh * HD, s0 + j0, n);
        stage_bf16<HD, MT_KEYS>(sv, v, kw, kvh * HD, s0 + j0, n);
        __syncthreads();
        if (!live || j0 > wlast) continue;
        // S (16 x 64) = Q K^T: n-tile j holds keys j0 + 8j + 2t + {0, 1} of rows g, g + 8.
        float s[MT_KEYS / 8][4];
#pragma unroll
        for (int j = 0; j < MT_KEYS / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int jp = 0; jp < MT_KEYS / 16; jp++) {
                u32 b[4];
                frag_b<HD>(b, sk, jp * 16, kk * 16);
                mma_bf16(s[2 * jp], qf[kk], b[0], b[1]);
                mma_bf16(s[2 * jp + 1], qf[kk], b[2], b[3]);
            }
        }
        // Online softmax in log2 units: mask past each row's diagonal, new max, rescale.
        const bool diag = j0 + MT_KEYS - 1 > w0;
        float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
        for (int j = 0; j < MT_KEYS / 8; j++) {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const u32 key = j0 + j * 8 + 2 * t + i;
                float sa = s[j][i] * sl2, sb = s[j][2 + i] * sl2;
                if (diag) {
                    sa = key <= ra ? sa : -INFINITY;
                    sb = key <= rb ? sb : -INFINITY;
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
        // Key 0 is in every row's first tile, so the running max is finite from there on.
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
        // O += P V: keys 16 kk.. are n-tiles 2 kk and 2 kk + 1 of S.
#pragma unroll
        for (int kk = 0; kk < MT_KEYS / 16; kk++) {
            u32 pf[4];
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const float* sj = s[2 * kk + half];
                const float a0 = exp2f(sj[0] - m_a), a1 = exp2f(sj[1] - m_a);
                const float b0 = exp2f(sj[2] - m_b), b1 = exp2f(sj[3] - m_b);
                l_a += a0 + a1;
                l_b += b0 + b1;
                pf[2 * half] = pack_bf16x2(a0, a1);
                pf[2 * half + 1] = pack_bf16x2(b0, b1);
            }
#pragma unroll
            for (int i = 0; i < HD / 8; i += 2) {
                u32 b[4];
                frag_bt<HD>(b, sv, kk * 16, i * 8);
                mma_bf16(o[i], pf, b[0], b[1]);
                mma_bf16(o[i + 1], pf, b[2], b[3]);
            }
        }
    }
    if (!live) return;
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
    }
    const float inv_a = 1.0f / l_a, inv_b = 1.0f / l_b;
    float* oa = out + (size_t)(s0 + ra) * qw + h * HD + 2 * t;
    float* ob = out + (size_t)(s0 + rb) * qw + h * HD + 2 * t;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        if (ra < len) *(float2*)(oa + i * 8) = make_float2(o[i][0] * inv_a, o[i][1] * inv_a);
        if (rb < len) *(float2*)(ob + i * 8) = make_float2(o[i][2] * inv_b, o[i][3] * inv_b);
    }
    if (lse && t == 0) {
        if (ra < len) lse[(size_t)(s0 + ra) * p.n_heads + h] = (m_a + log2f(l_a)) * MT_LN2;
        if (rb < len) lse[(size_t)(s0 + rb) * p.n_heads + h] = (m_b + log2f(l_b)) * MT_LN2;
    }
}

// ---- backward ----

template <int HD, int NK>
__device__ __forceinline__ void dq_mma(float* dq, const float* dout, const float* q,
                                       const float* k, const float* v, const float* lse,
                                       const float* delta, const u32* cu, PackedAttnParams p) {
    constexpr u32 ST = HD + MT_PAD;
    extern __shared__ __align__(16) u16 smem[];
    u16* sk = smem;          // [NK][ST]
    u16* sv = smem + NK * ST;  // [NK][ST]
    u32 s0, len;
    mma_seq_bounds(cu, p.rows, &s0, &len);
    const u32 i0 = (gridDim.y - 1 - blockIdx.y) * MT_ROWS;
    if (i0 >= len) return;
    const u32 h = blockIdx.x, kvh = h / (p.n_heads / p.n_kv_heads);
    const u32 kw = p.n_kv_heads * HD;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const u32 w0 = i0 + warp * 16, ra = w0 + g, rb = ra + 8;
    const u32 last = min(i0 + MT_ROWS, len) - 1;
    const bool live = w0 < len;
    const u32 wlast = min(w0 + 15, len - 1);
    const float sl2 = p.scale * MT_LOG2E;

    const bool in_a = ra < len, in_b = rb < len;
    const size_t at_a = (size_t)(s0 + ra) * p.n_heads + h, at_b = (size_t)(s0 + rb) * p.n_heads + h;
    u32 qf[HD / 16][4], df[HD / 16][4];
    frag_rows<HD>(qf, in_a ? q + at_a * HD : nullptr, in_b ? q + at_b * HD : nullptr);
    frag_rows<HD>(df, in_a ? dout + at_a * HD : nullptr, in_b ? dout + at_b * HD : nullptr);
    // Rows past the sequence: lse +inf makes their P 0.
    const float lse_a = in_a ? lse[at_a] * MT_LOG2E : INFINITY;
    const float lse_b = in_b ? lse[at_b] * MT_LOG2E : INFINITY;
    const float d_a = in_a ? delta[at_a] : 0.0f, d_b = in_b ? delta[at_b] : 0.0f;
    float acc[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

    for (u32 j0 = 0; j0 <= last; j0 += NK) {
        const u32 n = min((u32)NK, len - j0);
        __syncthreads();
        stage_bf16<HD, NK>(sk, k, kw, kvh * HD, s0 + j0, n);
        stage_bf16<HD, NK>(sv, v, kw, kvh * HD, s0 + j0, n);
        __syncthreads();
        if (!live || j0 > wlast) continue;
        // S = Q K^T and dP = dO V^T (16 x NK each).
        float s[NK / 8][4], dp[NK / 8][4];
#pragma unroll
        for (int j = 0; j < NK / 8; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int jp = 0; jp < NK / 16; jp++) {
                u32 b[4];
                frag_b<HD>(b, sk, jp * 16, kk * 16);
                mma_bf16(s[2 * jp], qf[kk], b[0], b[1]);
                mma_bf16(s[2 * jp + 1], qf[kk], b[2], b[3]);
                frag_b<HD>(b, sv, jp * 16, kk * 16);
                mma_bf16(dp[2 * jp], df[kk], b[0], b[1]);
                mma_bf16(dp[2 * jp + 1], df[kk], b[2], b[3]);
            }
        }
        // dS = P (dP - D), into s.
        const bool diag = j0 + NK - 1 > w0;
#pragma unroll
        for (int j = 0; j < NK / 8; j++) {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const u32 key = j0 + j * 8 + 2 * t + i;
                float pa = exp2f(s[j][i] * sl2 - lse_a), pb = exp2f(s[j][2 + i] * sl2 - lse_b);
                if (diag) {
                    pa = key <= ra ? pa : 0.0f;
                    pb = key <= rb ? pb : 0.0f;
                }
                s[j][i] = pa * (dp[j][i] - d_a);
                s[j][2 + i] = pb * (dp[j][2 + i] - d_b);
            }
        }
        // dQ += dS K: keys 16 kk.. are n-tiles 2 kk and 2 kk + 1 of dS.
#pragma unroll
        for (int kk = 0; kk < NK / 16; kk++) {
            const u32 a[4] = {
                pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
#pragma unroll
            for (int i = 0; i < HD / 8; i += 2) {
                u32 b[4];
                frag_bt<HD>(b, sk, kk * 16, i * 8);
                mma_bf16(acc[i], a, b[0], b[1]);
                mma_bf16(acc[i + 1], a, b[2], b[3]);
            }
        }
    }
    if (!live) return;
    float* qa = dq + at_a * HD + 2 * t;
    float* qb = dq + at_b * HD + 2 * t;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        if (in_a) *(float2*)(qa + i * 8) = make_float2(acc[i][0] * p.scale, acc[i][1] * p.scale);
        if (in_b) *(float2*)(qb + i * 8) = make_float2(acc[i][2] * p.scale, acc[i][3] * p.scale);
    }
}

// blockIdx.x is the kv head. 8 warps: warp w owns keys 16 (w % 4).. of the block's tile, and
// warpgroup w / 4 takes every other (query head, query tile) item of the group's walk; the two
// sums meet in shared memory at the end.
template <int HD, int BQ>
__device__ __forceinline__ void dkdv_mma(float* dk, float* dv, const float* dout, const float* q,
                                         const float* k, const float* v, const float* lse,
                                         const float* delta, const u32* cu, PackedAttnParams p) {
    constexpr u32 ST = HD + MT_PAD;
    constexpr u32 WG_BYTES = 2 * BQ * ST * 2 + 2 * BQ * 4;  // one warpgroup's query tile
    extern __shared__ __align__(16) u16 smem[];
    u16* sk = smem;               // [MT_ROWS][ST]: the block's keys
    u16* sv = sk + MT_ROWS * ST;  // [MT_ROWS][ST]
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2;
    const u32 g = lane >> 2, t = lane & 3, wq = warp & 3;
    u8* mine = (u8*)(sv + MT_ROWS * ST) + wg * WG_BYTES;
    u16* sq = (u16*)mine;                // [BQ][ST]: a tile of query rows
    u16* sdo = sq + BQ * ST;             // [BQ][ST]
    float* sl = (float*)(sdo + BQ * ST);  // [BQ] lse in log2 units (+inf past the sequence)
    float* sd = sl + BQ;                 // [BQ] D
    u32 s0, len;
    mma_seq_bounds(cu, p.rows, &s0, &len);
    const u32 j0 = blockIdx.y * MT_ROWS;
    if (j0 >= len) return;
    const u32 kvh = blockIdx.x, group = p.n_heads / p.n_kv_heads;
    const u32 qw = p.n_heads * HD, kw = p.n_kv_heads * HD;
    const u32 w0 = j0 + wq * 16, ka = w0 + g, kb = ka + 8;
    const bool live = w0 < len;
    const float sl2 = p.scale * MT_LOG2E;
    const u32 nk = min((u32)MT_ROWS, len - j0);
    stage_bf16<HD, MT_ROWS, 2 * MT_THREADS>(sk, k, kw, kvh * HD, s0 + j0, nk);
    stage_bf16<HD, MT_ROWS, 2 * MT_THREADS>(sv, v, kw, kvh * HD, s0 + j0, nk);
    __syncthreads();
    float ak[HD / 8][4], av[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        ak[i][0] = ak[i][1] = ak[i][2] = ak[i][3] = 0.0f;
        av[i][0] = av[i][1] = av[i][2] = av[i][3] = 0.0f;
    }
    // Query rows before the block's first key see none of its keys.
    const u32 tiles = (len - j0 + BQ - 1) / BQ, items = group * tiles;
    const u32 gt = tid & (MT_THREADS - 1);
    for (u32 item = wg; item < items; item += 2) {
        const u32 h = kvh * group + item / tiles, i0 = j0 + (item % tiles) * BQ;
        const u32 nq = min((u32)BQ, len - i0);
        warpgroup_sync(1 + wg);  // the group's previous tile is consumed
        stage_bf16<HD, BQ>(sq, q, qw, h * HD, s0 + i0, nq, gt);
        stage_bf16<HD, BQ>(sdo, dout, qw, h * HD, s0 + i0, nq, gt);
        if (gt < BQ) {
            const bool in = gt < nq;
            const size_t at = (size_t)(s0 + i0 + gt) * p.n_heads + h;
            sl[gt] = in ? lse[at] * MT_LOG2E : INFINITY;
            sd[gt] = in ? delta[at] : 0.0f;
        }
        warpgroup_sync(1 + wg);
        // The warp's keys past every query of the tile: nothing to add.
        if (!live || w0 >= i0 + BQ) continue;
        // S^T = K Q^T and dP^T = V dO^T (16 keys x BQ queries): n-tile j holds queries
        // i0 + 8j + 2t + {0, 1} of keys g, g + 8.
        float s[BQ / 8][4], dp[BQ / 8][4];
#pragma unroll
        for (int j = 0; j < BQ / 8; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            u32 kf[4], vf[4];
            frag_a<HD>(kf, sk, wq * 16, kk * 16);
            frag_a<HD>(vf, sv, wq * 16, kk * 16);
#pragma unroll
            for (int jp = 0; jp < BQ / 16; jp++) {
                u32 b[4];
                frag_b<HD>(b, sq, jp * 16, kk * 16);
                mma_bf16(s[2 * jp], kf, b[0], b[1]);
                mma_bf16(s[2 * jp + 1], kf, b[2], b[3]);
                frag_b<HD>(b, sdo, jp * 16, kk * 16);
                mma_bf16(dp[2 * jp], vf, b[0], b[1]);
                mma_bf16(dp[2 * jp + 1], vf, b[2], b[3]);
            }
        }
        // P^T into s, dS^T = P^T (dP^T - D) into dp; the mask where a key passes a query.
        const bool diag = w0 + 15 > i0;
#pragma unroll
        for (int j = 0; j < BQ / 8; j++) {
#pragma unroll
            for (int i = 0; i < 2; i++) {
                const u32 qi = j * 8 + 2 * t + i, query = i0 + qi;
                const float l2 = sl[qi], dd = sd[qi];
                float pa = exp2f(s[j][i] * sl2 - l2), pb = exp2f(s[j][2 + i] * sl2 - l2);
                if (diag) {
                    pa = ka <= query ? pa : 0.0f;
                    pb = kb <= query ? pb : 0.0f;
                }
                s[j][i] = pa;
                s[j][2 + i] = pb;
                dp[j][i] = pa * (dp[j][i] - dd);
                dp[j][2 + i] = pb * (dp[j][2 + i] - dd);
            }
        }
        // dV += P^T dO and dK += dS^T Q: queries 16 kk.. are n-tiles 2 kk and 2 kk + 1.
#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++) {
            const u32 pf[4] = {
                pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
            const u32 sf[4] = {
                pack_bf16x2(dp[2 * kk][0], dp[2 * kk][1]),
                pack_bf16x2(dp[2 * kk][2], dp[2 * kk][3]),
                pack_bf16x2(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                pack_bf16x2(dp[2 * kk + 1][2], dp[2 * kk + 1][3]),
            };
#pragma unroll
            for (int i = 0; i < HD / 8; i += 2) {
                u32 b[4];
                frag_bt<HD>(b, sdo, kk * 16, i * 8);
                mma_bf16(av[i], pf, b[0], b[1]);
                mma_bf16(av[i + 1], pf, b[2], b[3]);
                frag_bt<HD>(b, sq, kk * 16, i * 8);
                mma_bf16(ak[i], sf, b[0], b[1]);
                mma_bf16(ak[i + 1], sf, b[2], b[3]);
            }
        }
    }
    // Warpgroup 1 hands its sums to warpgroup 0 through shared memory (over the tiles, which
    // are consumed): value e of n-tile i of lane l of warp w % 4 at ((w % 4) HD/8 + i) 4 + e,
    // times 32, plus l; dv after dk.
    float* red = (float*)smem;
    constexpr u32 RED = 4 * (HD / 8) * 4 * 32;
    __syncthreads();
    if (wg == 1) {
#pragma unroll
        for (int i = 0; i < HD / 8; i++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const u32 at = ((wq * (HD / 8) + i) * 4 + e) * 32 + lane;
                red[at] = ak[i][e];
                red[RED + at] = av[i][e];
            }
        }
    }
    __syncthreads();
    if (wg == 1 || !live) return;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const u32 at = ((wq * (HD / 8) + i) * 4 + e) * 32 + lane;
            ak[i][e] += red[at];
            av[i][e] += red[RED + at];
        }
    }
    const size_t at_a = (size_t)(s0 + ka) * kw + kvh * HD + 2 * t;
    const size_t at_b = (size_t)(s0 + kb) * kw + kvh * HD + 2 * t;
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        if (ka < len) {
            *(float2*)(dk + at_a + i * 8) = make_float2(ak[i][0] * p.scale, ak[i][1] * p.scale);
            *(float2*)(dv + at_a + i * 8) = make_float2(av[i][0], av[i][1]);
        }
        if (kb < len) {
            *(float2*)(dk + at_b + i * 8) = make_float2(ak[i][2] * p.scale, ak[i][3] * p.scale);
            *(float2*)(dv + at_b + i * 8) = make_float2(av[i][2], av[i][3]);
        }
    }
}

// Threads: 128, and 256 for dk/dv. Shared memory (dynamic, bytes): the forward
// 2 MT_KEYS (HD + 8) 2; dq 2 DQ (HD + 8) 2; dk/dv 2 MT_ROWS (HD + 8) 2 + 2 (2 BQ (HD + 8) 2 +
// 2 BQ 4), at least the 2 x 4 (HD / 8) 4 32 floats of the final sum (src/backend/cuda/
// train_attention.rs mirrors it).
#define ATTENTION_TRAIN_MMA(HD, DQ, BQ)                                                       \
    extern "C" __global__ void __launch_bounds__(MT_THREADS) attention_packed_mma_##HD(       \
        float* out, float* lse, const float* q, const float* k, const float* v,              \
        const u32* cu, PackedAttnParams p) {                                                  \
        forward_mma<HD>(out, lse, q, k, v, cu, p);                                            \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(MT_THREADS) attention_bwd_dq_mma_##HD(       \
        float* dq, const float* dout, const float* q, const float* k, const float* v,        \
        const float* lse, const float* delta, const u32* cu, PackedAttnParams p) {           \
        dq_mma<HD, DQ>(dq, dout, q, k, v, lse, delta, cu, p);                                 \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(2 * MT_THREADS) attention_bwd_dkdv_mma_##HD( \
        float* dk, float* dv, const float* dout, const float* q, const float* k,             \
        const float* v, const float* lse, const float* delta, const u32* cu,                 \
        PackedAttnParams p) {                                                                 \
        dkdv_mma<HD, BQ>(dk, dv, dout, q, k, v, lse, delta, cu, p);                           \
    }

ATTENTION_TRAIN_MMA(64, 64, 64)
ATTENTION_TRAIN_MMA(128, 32, 32)
