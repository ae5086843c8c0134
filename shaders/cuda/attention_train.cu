// attention_train: causal GQA attention over a packed batch (training's forward, keeping each
// row's logsumexp) and its backward, FlashAttention-2 style: no [T, T] matrix ever reaches
// global memory. q [rows, H * hd], k and v [rows, KV * hd], all f32; sequence s owns rows
// cu[s]..cu[s + 1] and a row attends the rows of its own sequence up to itself.
// Parallel decomposition (all three main kernels alike): a block of 4 warps per (tile, head,
// sequence), grid (tiles over the longest sequence, heads, sequences); blocks past their
// sequence's end return. Each warp owns 4 rows of its block's tile; the other side of the
// product is staged in shared memory 32 rows at a time, one row per lane (row stride hd + 1:
// lanes read 32 different banks), so a lane computes the dot products of its staged row with
// the warp's 4 rows, and the warp's sums over the 32 staged rows go through shuffles into
// per-lane accumulators that hold dims lane, lane + 32, ... (NC of them: hd <= 32 NC).
// - attention_packed_<64|128|256>: 16 query rows per block, key tiles of 32; online softmax
//   (running max and sum per row), out = O / sum, lse = max + log(sum).
// - attention_bwd_delta: D[r, h] = dout[r, h] . out[r, h] (one warp per (row, head)).
// - attention_bwd_dq_*: 16 query rows per block, key tiles of 32: P = exp(s - lse),
//   dS = P (dout . v - D), dq = scale dS . K.
// - attention_bwd_dkdv_*: 16 keys of one kv head per block, query tiles of 32, the group's
//   query heads one after another: dv = P^T . dout, dk = scale dS^T . q (summed over the
//   group in registers: no atomics, the result does not depend on scheduling).
// All math is f32 on CUDA cores. Speed work goes here later: bf16 tiles on tensor cores
// (mma.sync as attention_flash.cu does), cp.async double buffering, one dk/dv + dq kernel with
// dq accumulated in f32 atomics as FA2 does.
#include "common.cuh"

#define AT_WARPS 4
#define AT_RPW 4                     /* rows each warp owns */
#define AT_BR (AT_WARPS * AT_RPW)    /* rows each block owns */
#define AT_BC 32                     /* rows staged per step: one per lane */
#define AT_THREADS (AT_WARPS * 32)

// The block's sequence: first row and length, clamped to the batch (a bad cu_seqlens reads
// nothing outside the buffers).
__device__ __forceinline__ void seq_bounds(const u32* cu, u32 rows, u32* s0, u32* len) {
    const u32 a = min(cu[blockIdx.z], rows), b = min(cu[blockIdx.z + 1], rows);
    *s0 = a;
    *len = b > a ? b - a : 0;
}

// dst[r * stride + d] = src row (s0 + r0 + r), head columns col..col + hd, for r < n (else 0),
// for r < count rows of the tile.
__device__ __forceinline__ void stage(float* dst, u32 stride, const float* src, u32 width,
                                      u32 col, u32 first, u32 n, u32 count, u32 hd) {
    for (u32 t = threadIdx.x; t < count * hd; t += AT_THREADS) {
        const u32 r = t / hd, d = t % hd;
        dst[r * stride + d] = r < n ? src[(size_t)(first + r) * width + col + d] : 0.0f;
    }
}

template <int NC>
__device__ void attention_packed(float* out, float* lse, const float* q, const float* k,
                                 const float* v, const u32* cu, PackedAttnParams p) {
    extern __shared__ float sm[];
    const u32 hd = p.head_dim, ks = hd + 1;
    float* sq = sm;                 // [AT_BR][hd]: the block's query rows
    float* sk = sq + AT_BR * hd;    // [AT_BC][hd + 1]
    float* sv = sk + AT_BC * ks;    // [AT_BC][hd]
    u32 s0, len;
    seq_bounds(cu, p.rows, &s0, &len);
    const u32 i0 = blockIdx.x * AT_BR, h = blockIdx.y;
    if (i0 >= len) return;
    const u32 kvh = h / (p.n_heads / p.n_kv_heads);
    const u32 qw = p.n_heads * hd, kw = p.n_kv_heads * hd;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 nq = min((u32)AT_BR, len - i0), kend = i0 + nq;
    stage(sq, hd, q, qw, h * hd, s0 + i0, nq, AT_BR, hd);
    float o[AT_RPW][NC], m[AT_RPW], l[AT_RPW];
#pragma unroll
    for (int rr = 0; rr < AT_RPW; rr++) {
        m[rr] = -INFINITY;
        l[rr] = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; c++) o[rr][c] = 0.0f;
    }
    for (u32 j0 = 0; j0 < kend; j0 += AT_BC) {
        const u32 nk = min((u32)AT_BC, kend - j0);
        __syncthreads();  // the previous tile is consumed
        stage(sk, ks, k, kw, kvh * hd, s0 + j0, nk, AT_BC, hd);
        stage(sv, hd, v, kw, kvh * hd, s0 + j0, nk, AT_BC, hd);
        __syncthreads();
        float s[AT_RPW] = {};
        for (u32 d = 0; d < hd; d++) {
            const float kd = sk[lane * ks + d];
#pragma unroll
            for (int rr = 0; rr < AT_RPW; rr++) s[rr] += sq[(warp * AT_RPW + rr) * hd + d] * kd;
        }
        const u32 j = j0 + lane;
        float pj[AT_RPW];
#pragma unroll
        for (int rr = 0; rr < AT_RPW; rr++) {
            // Key 0 is in every row's first tile, so the max is finite from then on.
            const u32 i = i0 + warp * AT_RPW + rr;
            const float sc = (j <= i && j < kend) ? s[rr] * p.scale : -INFINITY;
            const float mn = fmaxf(m[rr], warp_max(sc));
            const float alpha = expf(m[rr] - mn);
            pj[rr] = expf(sc - mn);
            l[rr] = l[rr] * alpha + warp_sum(pj[rr]);
            m[rr] = mn;
#pragma unroll
            for (int c = 0; c < NC; c++) o[rr][c] *= alpha;
        }
        for (u32 jj = 0; jj < nk; jj++) {
            float pb[AT_RPW];
#pragma unroll
            for (int rr = 0; rr < AT_RPW; rr++) pb[rr] = __shfl_sync(0xffffffffu, pj[rr], jj);
#pragma unroll
            for (int c = 0; c < NC; c++) {
                const u32 d = lane + 32 * c;
                const float vd = d < hd ? sv[jj * hd + d] : 0.0f;
#pragma unroll
                for (int rr = 0; rr < AT_RPW; rr++) o[rr][c] += pb[rr] * vd;
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < AT_RPW; rr++) {
        const u32 i = i0 + warp * AT_RPW + rr;
        if (i >= kend) continue;
        const size_t row = s0 + i;
        const float inv = 1.0f / l[rr];
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const u32 d = lane + 32 * c;
            if (d < hd) out[row * qw + h * hd + d] = o[rr][c] * inv;
        }
        if (lse && lane == 0) lse[row * p.n_heads + h] = m[rr] + logf(l[rr]);
    }
}

// D[r * H + h] = dout[r, h, :] . out[r, h, :]; one warp per (row, head).
extern "C" __global__ void attention_bwd_delta(float* delta, const float* dout, const float* out,
                                               PackedAttnParams p) {
    const size_t w = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const u32 lane = threadIdx.x & 31;
    if (w >= (size_t)p.rows * p.n_heads) return;
    const float* a = dout + w * p.head_dim;
    const float* b = out + w * p.head_dim;
    float s = 0.0f;
    for (u32 d = lane; d < p.head_dim; d += 32) s += a[d] * b[d];
    s = warp_sum(s);
    if (lane == 0) delta[w] = s;
}

template <int NC>
__device__ void attention_bwd_dq(float* dq, const float* dout, const float* q, const float* k,
                                 const float* v, const float* lse, const float* delta,
                                 const u32* cu, PackedAttnParams p) {
    extern __shared__ float sm[];
    const u32 hd = p.head_dim, ks = hd + 1;
    float* sq = sm;                 // [AT_BR][hd]
    float* sdo = sq + AT_BR * hd;   // [AT_BR][hd]
    float* sk = sdo + AT_BR * hd;   // [AT_BC][hd + 1]
    float* sv = sk + AT_BC * ks;    // [AT_BC][hd + 1]
    u32 s0, len;
    seq_bounds(cu, p.rows, &s0, &len);
    const u32 i0 = blockIdx.x * AT_BR, h = blockIdx.y;
    if (i0 >= len) return;
    const u32 kvh = h / (p.n_heads / p.n_kv_heads);
    const u32 qw = p.n_heads * hd, kw = p.n_kv_heads * hd;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 nq = min((u32)AT_BR, len - i0), kend = i0 + nq;
    stage(sq, hd, q, qw, h * hd, s0 + i0, nq, AT_BR, hd);
    stage(sdo, hd, dout, qw, h * hd, s0 + i0, nq, AT_BR, hd);
    float acc[AT_RPW][NC], lr[AT_RPW], dr[AT_RPW];
#pragma unroll
    for (int rr = 0; rr < AT_RPW; rr++) {
        const u32 i = i0 + warp * AT_RPW + rr;
        const size_t at = (size_t)(s0 + min(i, kend - 1)) * p.n_heads + h;
        lr[rr] = lse[at];
        dr[rr] = delta[at];
#pragma unroll
        for (int c = 0; c < NC; c++) acc[rr][c] = 0.0f;
    }
    for (u32 j0 = 0; j0 < kend; j0 += AT_BC) {
        const u32 nk = min((u32)AT_BC, kend - j0);
        __syncthreads();
        stage(sk, ks, k, kw, kvh * hd, s0 + j0, nk, AT_BC, hd);
        stage(sv, ks, v, kw, kvh * hd, s0 + j0, nk, AT_BC, hd);
        __syncthreads();
        float s[AT_RPW] = {}, dp[AT_RPW] = {};
        for (u32 d = 0; d < hd; d++) {
            const float kd = sk[lane * ks + d], vd = sv[lane * ks + d];
#pragma unroll
            for (int rr = 0; rr < AT_RPW; rr++) {
                s[rr] += sq[(warp * AT_RPW + rr) * hd + d] * kd;
                dp[rr] += sdo[(warp * AT_RPW + rr) * hd + d] * vd;
            }
        }
        const u32 j = j0 + lane;
        float ds[AT_RPW];
#pragma unroll
        for (int rr = 0; rr < AT_RPW; rr++) {
            const u32 i = i0 + warp * AT_RPW + rr;
            const float pr = (j <= i && i < kend) ? expf(s[rr] * p.scale - lr[rr]) : 0.0f;
            ds[rr] = pr * (dp[rr] - dr[rr]);
        }
        for (u32 jj = 0; jj < nk; jj++) {
            float b[AT_RPW];
#pragma unroll
            for (int rr = 0; rr < AT_RPW; rr++) b[rr] = __shfl_sync(0xffffffffu, ds[rr], jj);
#pragma unroll
            for (int c = 0; c < NC; c++) {
                const u32 d = lane + 32 * c;
                const float kd = d < hd ? sk[jj * ks + d] : 0.0f;
#pragma unroll
                for (int rr = 0; rr < AT_RPW; rr++) acc[rr][c] += b[rr] * kd;
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < AT_RPW; rr++) {
        const u32 i = i0 + warp * AT_RPW + rr;
        if (i >= kend) continue;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const u32 d = lane + 32 * c;
            if (d < hd) dq[(size_t)(s0 + i) * qw + h * hd + d] = acc[rr][c] * p.scale;
        }
    }
}

// blockIdx.y is the kv head here; the block walks the group's query heads.
template <int NC>
__device__ void attention_bwd_dkdv(float* dk, float* dv, const float* dout, const float* q,
                                   const float* k, const float* v, const float* lse,
                                   const float* delta, const u32* cu, PackedAttnParams p) {
    extern __shared__ float sm[];
    const u32 hd = p.head_dim, ks = hd + 1;
    float* sk = sm;                 // [AT_BR][hd]: the block's keys
    float* sv = sk + AT_BR * hd;    // [AT_BR][hd]
    float* sq = sv + AT_BR * hd;    // [AT_BC][hd + 1]: a tile of query rows
    float* sdo = sq + AT_BC * ks;   // [AT_BC][hd + 1]
    float* sl = sdo + AT_BC * ks;   // [AT_BC] lse
    float* sd = sl + AT_BC;         // [AT_BC] D
    u32 s0, len;
    seq_bounds(cu, p.rows, &s0, &len);
    const u32 j0 = blockIdx.x * AT_BR, kvh = blockIdx.y;
    if (j0 >= len) return;
    const u32 group = p.n_heads / p.n_kv_heads;
    const u32 qw = p.n_heads * hd, kw = p.n_kv_heads * hd;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 nk = min((u32)AT_BR, len - j0);
    stage(sk, hd, k, kw, kvh * hd, s0 + j0, nk, AT_BR, hd);
    stage(sv, hd, v, kw, kvh * hd, s0 + j0, nk, AT_BR, hd);
    float ak[AT_RPW][NC], av[AT_RPW][NC];
#pragma unroll
    for (int rr = 0; rr < AT_RPW; rr++)
#pragma unroll
        for (int c = 0; c < NC; c++) ak[rr][c] = av[rr][c] = 0.0f;
    for (u32 g = 0; g < group; g++) {
        const u32 h = kvh * group + g;
        // Query rows before the block's first key see none of its keys.
        for (u32 i0 = j0 / AT_BC * AT_BC; i0 < len; i0 += AT_BC) {
            const u32 nq = min((u32)AT_BC, len - i0);
            __syncthreads();
            stage(sq, ks, q, qw, h * hd, s0 + i0, nq, AT_BC, hd);
            stage(sdo, ks, dout, qw, h * hd, s0 + i0, nq, AT_BC, hd);
            if (threadIdx.x < AT_BC) {
                const bool in = threadIdx.x < nq;
                const size_t at = (size_t)(s0 + i0 + threadIdx.x) * p.n_heads + h;
                sl[threadIdx.x] = in ? lse[at] : 0.0f;
                sd[threadIdx.x] = in ? delta[at] : 0.0f;
            }
            __syncthreads();
            float s[AT_RPW] = {}, dp[AT_RPW] = {};
            for (u32 d = 0; d < hd; d++) {
                const float qd = sq[lane * ks + d], od = sdo[lane * ks + d];
#pragma unroll
                for (int rr = 0; rr < AT_RPW; rr++) {
                    s[rr] += qd * sk[(warp * AT_RPW + rr) * hd + d];
                    dp[rr] += od * sv[(warp * AT_RPW + rr) * hd + d];
                }
            }
            const u32 i = i0 + lane;
            float pr[AT_RPW], ds[AT_RPW];
#pragma unroll
            for (int rr = 0; rr < AT_RPW; rr++) {
                const u32 j = j0 + warp * AT_RPW + rr;
                const bool live = lane < nq && j <= i && j < j0 + nk;
                pr[rr] = live ? expf(s[rr] * p.scale - sl[lane]) : 0.0f;
                ds[rr] = pr[rr] * (dp[rr] - sd[lane]);
            }
            for (u32 ii = 0; ii < nq; ii++) {
                float bp[AT_RPW], bs[AT_RPW];
#pragma unroll
                for (int rr = 0; rr < AT_RPW; rr++) {
                    bp[rr] = __shfl_sync(0xffffffffu, pr[rr], ii);
                    bs[rr] = __shfl_sync(0xffffffffu, ds[rr], ii);
                }
#pragma unroll
                for (int c = 0; c < NC; c++) {
                    const u32 d = lane + 32 * c;
                    const float od = d < hd ? sdo[ii * ks + d] : 0.0f;
                    const float qd = d < hd ? sq[ii * ks + d] : 0.0f;
#pragma unroll
                    for (int rr = 0; rr < AT_RPW; rr++) {
                        av[rr][c] += bp[rr] * od;
                        ak[rr][c] += bs[rr] * qd;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < AT_RPW; rr++) {
        const u32 j = j0 + warp * AT_RPW + rr;
        if (j >= j0 + nk) continue;
        const size_t at = (size_t)(s0 + j) * kw + kvh * hd;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const u32 d = lane + 32 * c;
            if (d < hd) {
                dk[at + d] = ak[rr][c] * p.scale;
                dv[at + d] = av[rr][c];
            }
        }
    }
}

#define ATTENTION_TRAIN(HD, NC)                                                               \
    extern "C" __global__ void __launch_bounds__(AT_THREADS) attention_packed_##HD(           \
        float* out, float* lse, const float* q, const float* k, const float* v,              \
        const u32* cu, PackedAttnParams p) {                                                  \
        attention_packed<NC>(out, lse, q, k, v, cu, p);                                       \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(AT_THREADS) attention_bwd_dq_##HD(           \
        float* dq, const float* dout, const float* q, const float* k, const float* v,        \
        const float* lse, const float* delta, const u32* cu, PackedAttnParams p) {           \
        attention_bwd_dq<NC>(dq, dout, q, k, v, lse, delta, cu, p);                           \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(AT_THREADS) attention_bwd_dkdv_##HD(         \
        float* dk, float* dv, const float* dout, const float* q, const float* k,             \
        const float* v, const float* lse, const float* delta, const u32* cu,                 \
        PackedAttnParams p) {                                                                 \
        attention_bwd_dkdv<NC>(dk, dv, dout, q, k, v, lse, delta, cu, p);                     \
    }

ATTENTION_TRAIN(64, 2)
ATTENTION_TRAIN(128, 4)
ATTENTION_TRAIN(256, 8)
