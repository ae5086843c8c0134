// attention: causal GQA attention over the paged KV cache (layout in kv_append.cu).
// out[r, h] = softmax(q[r, h] . K[0..=pos0 + r]^T * scale) V, K/V of kv head h / group.
//
// attention_decode (few query rows over an f32 cache, or a head_dim attention_decode_f16 does not
// take; flash-decoding): grid (split, kv head, row). A block owns one
// split of split_len positions and every query head of its kv head's group, so each K and V row
// is read once for the whole group. Positions go in chunks of 128: thread t scores position t of
// the chunk against every head (q in shared memory, K read 4 values at a time), one warp per head
// turns the scores into online-softmax weights, then each warp accumulates every fourth
// position's V row (lanes split head_dim) and the warps' sums meet in shared memory at the end.
// The block writes its unnormalised output, running max and sum; attention_combine merges splits.
// Both decode kernels take rows_mode: the rows of many sequences (serving's batched decode), each
// over its own context and blocks (row_pos / row_blocks in common.cuh); splits past a row's
// context stay empty (max -inf, sum 0).
//
// attention_decode_f16 (few query rows, f16 cache, head_dim a power of two from 8 to 256): grid
// (head, row, split), one block per query head and split of split_len positions (one split, and
// the output written directly, up to a few thousand positions; more, merged by
// attention_combine, past that). head_dim / 8 lanes read a K or V row, 16 bytes (8 values) each,
// so one load of the block covers 16 warps x 32 / (head_dim / 8) positions; each thread issues
// the K and V loads of DEC16_UNROLL positions at once and folds them into its own online softmax
// (running max, sum and 8 output dims). The lanes of a warp that hold the same dims merge their
// (max, sum, dims) by shuffles, the warps through shared memory. One pass over the cache and one
// barrier: at short contexts the kernel is a few dependent loads long. Blocks of one kv head's
// query heads are neighbours in the grid, so the group's K and V rows come from L2 after the
// first read.
//
// attention_prefill (many query rows; flash-attention style): grid (query tile of 32 rows,
// head); four threads per query row share its head_dim (dims sub, sub + 4, ...), K and V tiles
// of 16 positions are staged in shared memory as f32, and each tile updates the online softmax
// once (max over the tile, one rescale).
//
// Long prefills run on cuBLAS instead (attention_gemm.rs), in one of two precisions. Exact
// (CudaOptions::exact): attention_gather copies the paged K and V into contiguous f32 matrices,
// SGEMMs give the scores, attention_softmax turns them into f32 weights in place, and an SGEMM
// multiplies them with V. Default: attention_gather_f16 copies K and V as f16 (an f16 cache bit
// for bit) and rounds Q to f16, tensor-core GEMMs (f16 inputs, f32 accumulation) give f32
// scores, and attention_softmax_f16 writes the weights as f16 over the first half of each f32
// score row, for the P V GEMM to read.
#include "common.cuh"

#define KV_BLOCK 16
#define DEC_THREADS 128
#define DEC_MAX_GROUP 16
#define DEC_DIMS 4 /* head_dim <= 32 * DEC_DIMS in the decode kernel */
#define DEC16_THREADS 512
#define DEC16_WARPS (DEC16_THREADS / 32)
#define DEC16_UNROLL 8
#define PRE_ROWS 32
#define PRE_TILE 16

__device__ __forceinline__ size_t kv_row(const u32* table, u32 pos, u32 kvh, u32 n_kv, u32 hd) {
    return (((size_t)table[pos / KV_BLOCK] * KV_BLOCK + pos % KV_BLOCK) * n_kv + kvh) * hd;
}

__device__ __forceinline__ float kv_get(const void* cache, size_t i, u32 f16) {
    return f16 ? f16_to_f32(((const u16*)cache)[i]) : ((const float*)cache)[i];
}

// K row of position pos dotted with every head's q (q in shared memory), f16 or f32 cache,
// loaded 4 values at a time when head_dim allows (rows are then 8- or 16-byte aligned).
__device__ __forceinline__ void score_row(float* dot, const float* qs, const void* k_cache,
                                          size_t base, u32 hd, u32 group, u32 f16) {
    if ((hd & 3) == 0) {
        // Unrolled so that several K loads are in flight: the loop is latency-bound otherwise.
#pragma unroll 8
        for (u32 d = 0; d < hd; d += 4) {
            float k[4];
            if (f16) {
                const uint2 w = *(const uint2*)((const u16*)k_cache + base + d);
                k[0] = f16_to_f32((u16)(w.x & 0xffffu));
                k[1] = f16_to_f32((u16)(w.x >> 16));
                k[2] = f16_to_f32((u16)(w.y & 0xffffu));
                k[3] = f16_to_f32((u16)(w.y >> 16));
            } else {
                const float4 w = *(const float4*)((const float*)k_cache + base + d);
                k[0] = w.x; k[1] = w.y; k[2] = w.z; k[3] = w.w;
            }
#pragma unroll
            for (int h = 0; h < DEC_MAX_GROUP; h++)
                if (h < group) {
                    const float* qh = qs + h * hd + d;
                    dot[h] += qh[0] * k[0] + qh[1] * k[1] + qh[2] * k[2] + qh[3] * k[3];
                }
        }
    } else {
        for (u32 d = 0; d < hd; d++) {
            const float k = kv_get(k_cache, base + d, f16);
#pragma unroll
            for (int h = 0; h < DEC_MAX_GROUP; h++)
                if (h < group) dot[h] += qs[h * hd + d] * k;
        }
    }
}

// Shared memory: max(q [group][hd] + scores [group][128] + max/sum/correction [group] x 3,
// the four warps' partial outputs [4][group][hd]).
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    attention_decode(float* part_o, float* part_ml, const float* q, const void* k_cache,
                     const void* v_cache, const u32* table_arg, AttentionParams p,
                     u32 n_splits, const u32* pos_dev, u32 rows_mode) {
    extern __shared__ float sh_decode[];
    const u32 split = blockIdx.x, kvh = blockIdx.y, r = blockIdx.z, t = threadIdx.x;
    const u32 warp = t >> 5, lane = t & 31;
    const u32 hd = p.head_dim, group = p.n_heads / p.n_kv_heads;
    float* qs = sh_decode;
    float* sc = qs + group * hd;
    float* m = sc + group * DEC_THREADS;
    float* l = m + group;
    float* corr = l + group;
    const u32 n_pos = row_pos(table_arg, rows_mode, p.rows, r, pos_dev, p.pos0) + 1;
    const u32* table = row_blocks(table_arg, rows_mode, p.rows, r);
    const u32 s0 = split * p.split_len, s1 = min(s0 + p.split_len, n_pos);
    const float* qr = q + ((size_t)r * p.n_heads + kvh * group) * hd;
    for (u32 i = t; i < group * hd; i += DEC_THREADS) qs[i] = qr[i];
    if (t < group) {
        m[t] = -INFINITY;
        l[t] = 0.0f;
    }
    // acc[h][i]: this warp's share (positions j = warp mod 4) of head h, dim lane + 32 i.
    float acc[DEC_MAX_GROUP][DEC_DIMS];
#pragma unroll
    for (int h = 0; h < DEC_MAX_GROUP; h++)
#pragma unroll
        for (int i = 0; i < DEC_DIMS; i++) acc[h][i] = 0.0f;
    __syncthreads();
    for (u32 c0 = s0; c0 < s1; c0 += DEC_THREADS) {
        const u32 n = min(s1 - c0, (u32)DEC_THREADS);
        // 1. scores of position c0 + t against every head of the group
        float dot[DEC_MAX_GROUP];
#pragma unroll
        for (int h = 0; h < DEC_MAX_GROUP; h++) dot[h] = 0.0f;
        if (t < n)
            score_row(dot, qs, k_cache, kv_row(table, c0 + t, kvh, p.n_kv_heads, hd), hd, group,
                      p.kv_f16);
#pragma unroll
        for (int h = 0; h < DEC_MAX_GROUP; h++)
            if (h < group) sc[h * DEC_THREADS + t] = t < n ? dot[h] * p.scale : -INFINITY;
        __syncthreads();
        // 2. online softmax, one warp per head
        for (u32 h = warp; h < group; h += DEC_THREADS / 32) {
            float* s = sc + h * DEC_THREADS;
            float cm = -INFINITY;
            for (u32 j = lane; j < DEC_THREADS; j += 32) cm = fmaxf(cm, s[j]);
            cm = warp_max(cm);
            const float m_new = fmaxf(m[h], cm);
            float sum = 0.0f;
            for (u32 j = lane; j < DEC_THREADS; j += 32) {
                const float e = expf(s[j] - m_new);
                s[j] = e;
                sum += e;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float c = expf(m[h] - m_new);
                corr[h] = c;
                l[h] = l[h] * c + sum;
                m[h] = m_new;
            }
        }
        __syncthreads();
        // 3. weighted sum of V: warp w takes positions w, w + 4, ...; lanes split the dims, so
        //    every load of a V row is coalesced and the four warps' loads are independent.
#pragma unroll
        for (int h = 0; h < DEC_MAX_GROUP; h++)
            if (h < group)
#pragma unroll
                for (int i = 0; i < DEC_DIMS; i++) acc[h][i] *= corr[h];
#pragma unroll 4
        for (u32 j = warp; j < n; j += DEC_THREADS / 32) {
            const size_t base = kv_row(table, c0 + j, kvh, p.n_kv_heads, hd);
            float v[DEC_DIMS];
#pragma unroll
            for (int i = 0; i < DEC_DIMS; i++) {
                const u32 d = lane + 32 * i;
                v[i] = d < hd ? kv_get(v_cache, base + d, p.kv_f16) : 0.0f;
            }
#pragma unroll
            for (int h = 0; h < DEC_MAX_GROUP; h++)
                if (h < group) {
                    const float w = sc[h * DEC_THREADS + j];
#pragma unroll
                    for (int i = 0; i < DEC_DIMS; i++) acc[h][i] += w * v[i];
                }
        }
        __syncthreads();
    }
    // The four warps' partial sums, added through shared memory (reusing q and scores).
    float ml[2 * DEC_MAX_GROUP];
    for (u32 h = 0; h < group; h++) {
        ml[2 * h] = m[h];
        ml[2 * h + 1] = l[h];
    }
    __syncthreads();
    float* red = sh_decode;
#pragma unroll
    for (int h = 0; h < DEC_MAX_GROUP; h++)
        if (h < group)
#pragma unroll
            for (int i = 0; i < DEC_DIMS; i++) {
                const u32 d = lane + 32 * i;
                if (d < hd) red[(warp * group + h) * hd + d] = acc[h][i];
            }
    __syncthreads();
    for (u32 i = t; i < group * hd; i += DEC_THREADS) {
        const u32 h = i / hd, d = i % hd;
        float o = 0.0f;
        for (u32 w = 0; w < DEC_THREADS / 32; w++) o += red[(w * group + h) * hd + d];
        const size_t row = ((size_t)r * p.n_heads + kvh * group + h) * n_splits + split;
        part_o[row * hd + d] = o;
        if (d == 0) {
            part_ml[2 * row] = ml[2 * h];
            part_ml[2 * row + 1] = ml[2 * h + 1];
        }
    }
}

// Folds (om, ol, oacc) into the running (m, l, acc) of an online softmax; m = -inf: nothing yet.
__device__ __forceinline__ void softmax_merge(float& m, float& l, float* acc, float om, float ol,
                                              const float* oacc) {
    const float nm = fmaxf(m, om);
    if (nm == -INFINITY) return;
    const float a = m == -INFINITY ? 0.0f : expf(m - nm);
    const float b = om == -INFINITY ? 0.0f : expf(om - nm);
    l = l * a + ol * b;
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = acc[i] * a + oacc[i] * b;
    m = nm;
}

extern "C" __global__ void __launch_bounds__(DEC16_THREADS)
    attention_decode_f16(float* out, float* part_o, float* part_ml, const float* q,
                         const u16* k_cache, const u16* v_cache, const u32* table_arg,
                         AttentionParams p, u32 n_splits, const u32* pos_dev, u32 rows_mode) {
    __shared__ float red[DEC16_WARPS][256];
    __shared__ float red_ml[DEC16_WARPS][2];
    const u32 head = blockIdx.x, r = blockIdx.y, split = blockIdx.z, t = threadIdx.x;
    const u32 warp = t >> 5, lane = t & 31;
    // lpp lanes per position (each holds dims 8 sub .. 8 sub + 7), ppw positions per warp load.
    const u32 hd = p.head_dim, lpp = hd / 8, ppw = 32 / lpp;
    const u32 sub = lane % lpp, slot = lane / lpp;
    const u32 kvh = head / (p.n_heads / p.n_kv_heads);
    // This split's positions s0..n_pos (one split: split_len covers the whole context).
    const u32 s0 = split * p.split_len;
    const u32 n_pos =
        min(s0 + p.split_len, row_pos(table_arg, rows_mode, p.rows, r, pos_dev, p.pos0) + 1);
    const u32* table = row_blocks(table_arg, rows_mode, p.rows, r);
    const u32 stride = DEC16_WARPS * ppw, first = s0 + warp * ppw + slot;
    float qv[8];
    const float* qr = q + ((size_t)r * p.n_heads + head) * hd + 8 * sub;
#pragma unroll
    for (int i = 0; i < 8; i++) qv[i] = qr[i] * p.scale;
    float m = -INFINITY, l = 0.0f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.0f;
    // The loop bound is block-uniform, so every lane reaches the shuffles.
    for (u32 j0 = 0; s0 + j0 < n_pos; j0 += DEC16_UNROLL * stride) {
        uint4 kw[DEC16_UNROLL], vw[DEC16_UNROLL];
#pragma unroll
        for (int u = 0; u < DEC16_UNROLL; u++) {
            const u32 j = j0 + u * stride + first;
            kw[u] = vw[u] = make_uint4(0, 0, 0, 0);
            if (j < n_pos) {
                const size_t at = kv_row(table, j, kvh, p.n_kv_heads, hd) + 8 * sub;
                kw[u] = *(const uint4*)(k_cache + at);
                vw[u] = *(const uint4*)(v_cache + at);
            }
        }
        float s[DEC16_UNROLL], cm = -INFINITY;
#pragma unroll
        for (int u = 0; u < DEC16_UNROLL; u++) {
            float k[8];
            widen8<DT_F16>(kw[u], k);
            float dot = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; i++) dot += qv[i] * k[i];
            for (u32 o = 1; o < lpp; o <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            s[u] = j0 + u * stride + first < n_pos ? dot : -INFINITY;
            cm = fmaxf(cm, s[u]);
        }
        if (cm == -INFINITY) continue;  // none of this slot's positions are in the context
        float cl = 0.0f, cacc[8];
#pragma unroll
        for (int i = 0; i < 8; i++) cacc[i] = 0.0f;
#pragma unroll
        for (int u = 0; u < DEC16_UNROLL; u++) {
            const float e = s[u] == -INFINITY ? 0.0f : expf(s[u] - cm);
            float v[8];
            widen8<DT_F16>(vw[u], v);
            cl += e;
#pragma unroll
            for (int i = 0; i < 8; i++) cacc[i] += e * v[i];
        }
        softmax_merge(m, l, acc, cm, cl, cacc);
    }
    // Lanes of a warp with the same sub differ in the lane bits from lpp up.
    for (u32 o = lpp; o < 32; o <<= 1) {
        float oacc[8];
#pragma unroll
        for (int i = 0; i < 8; i++) oacc[i] = __shfl_xor_sync(0xffffffffu, acc[i], o);
        const float om = __shfl_xor_sync(0xffffffffu, m, o);
        const float ol = __shfl_xor_sync(0xffffffffu, l, o);
        softmax_merge(m, l, acc, om, ol, oacc);
    }
    if (slot == 0) {
#pragma unroll
        for (int i = 0; i < 8; i++) red[warp][8 * sub + i] = acc[i];
        if (sub == 0) {
            red_ml[warp][0] = m;
            red_ml[warp][1] = l;
        }
    }
    __syncthreads();
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < DEC16_WARPS; w++) mx = fmaxf(mx, red_ml[w][0]);
    // One split: the output. Several: this split's unnormalised output, max and sum (max -inf
    // and sum 0 for a split past the context), for attention_combine.
    const size_t row = (size_t)r * p.n_heads + head;
    for (u32 d = t; d < hd; d += DEC16_THREADS) {
        float sum = 0.0f, total = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC16_WARPS; w++) {
            const float wm = red_ml[w][0];
            if (wm == -INFINITY) continue;  // a warp that saw no position
            const float c = expf(wm - mx);
            sum += red[w][d] * c;
            total += red_ml[w][1] * c;
        }
        if (n_splits == 1) {
            out[row * hd + d] = sum / total;
        } else {
            const size_t part = row * n_splits + split;
            part_o[part * hd + d] = sum;
            if (d == 0) {
                part_ml[2 * part] = mx;
                part_ml[2 * part + 1] = total;
            }
        }
    }
}

// Merges the splits of (row, head) = (blockIdx.y, blockIdx.x): rescale each split's output by
// exp(m_split - m), divide by the rescaled sum of l. Empty splits have m = -inf, l = 0.
extern "C" __global__ void attention_combine(float* out, const float* part_o,
                                             const float* part_ml, AttentionParams p,
                                             u32 n_splits) {
    const u32 head = blockIdx.x, r = blockIdx.y, hd = p.head_dim;
    const size_t row = (size_t)r * p.n_heads + head;
    const float* ml = part_ml + 2 * row * n_splits;
    float mx = -INFINITY;
    for (u32 s = 0; s < n_splits; s++) mx = fmaxf(mx, ml[2 * s]);
    float total = 0.0f;
    for (u32 s = 0; s < n_splits; s++)
        if (ml[2 * s + 1] > 0.0f) total += ml[2 * s + 1] * expf(ml[2 * s] - mx);
    for (u32 d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (u32 s = 0; s < n_splits; s++)
            if (ml[2 * s + 1] > 0.0f)
                o += part_o[(row * n_splits + s) * hd + d] * expf(ml[2 * s] - mx);
        out[row * hd + d] = o / total;
    }
}

// HPT: dims per thread (head_dim <= 4 * HPT). Shared memory: K and V tiles [16][head_dim] f32.
template <int HPT>
__device__ void attention_prefill(float* out, const float* q, const void* k_cache,
                                  const void* v_cache, const u32* table, AttentionParams p) {
    extern __shared__ float sh_prefill[];
    const u32 hd = p.head_dim, t = threadIdx.x, sub = t & 3;
    const u32 head = blockIdx.y, kvh = head / (p.n_heads / p.n_kv_heads);
    const u32 r0 = blockIdx.x * PRE_ROWS;
    const u32 r = min(r0 + t / 4, p.rows - 1);
    const u32 qpos = p.pos0 + r;
    const u32 last = p.pos0 + min(r0 + PRE_ROWS, p.rows) - 1;
    float* ks = sh_prefill;
    float* vs = sh_prefill + PRE_TILE * hd;
    float qv[HPT], acc[HPT];
    const float* qr = q + ((size_t)r * p.n_heads + head) * hd;
#pragma unroll
    for (int j = 0; j < HPT; j++) {
        const u32 d = j * 4 + sub;
        qv[j] = d < hd ? qr[d] * p.scale : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (u32 p0 = 0; p0 <= last; p0 += PRE_TILE) {
        const u32 n = min(last + 1 - p0, (u32)PRE_TILE);
        __syncthreads();
        for (u32 i = t; i < n * hd; i += blockDim.x) {
            const u32 j = i / hd, d = i % hd;
            const size_t at = kv_row(table, p0 + j, kvh, p.n_kv_heads, hd) + d;
            ks[i] = kv_get(k_cache, at, p.kv_f16);
            vs[i] = kv_get(v_cache, at, p.kv_f16);
        }
        __syncthreads();
        float s[PRE_TILE];
        float tm = -INFINITY;
#pragma unroll
        for (int j = 0; j < PRE_TILE; j++) {
            float dot = 0.0f;
            if (j < n) {
#pragma unroll
                for (int x = 0; x < HPT; x++) {
                    const u32 d = x * 4 + sub;
                    if (d < hd) dot += qv[x] * ks[j * hd + d];
                }
            }
            dot += __shfl_xor_sync(0xffffffffu, dot, 1);
            dot += __shfl_xor_sync(0xffffffffu, dot, 2);
            s[j] = (j < n && p0 + j <= qpos) ? dot : -INFINITY;
            tm = fmaxf(tm, s[j]);
        }
        if (tm == -INFINITY) continue;
        const float m_new = fmaxf(m, tm);
        const float c = expf(m - m_new);
        l *= c;
#pragma unroll
        for (int x = 0; x < HPT; x++) acc[x] *= c;
#pragma unroll
        for (int j = 0; j < PRE_TILE; j++) {
            if (s[j] == -INFINITY) continue;
            const float e = expf(s[j] - m_new);
            l += e;
#pragma unroll
            for (int x = 0; x < HPT; x++) {
                const u32 d = x * 4 + sub;
                if (d < hd) acc[x] += e * vs[j * hd + d];
            }
        }
        m = m_new;
    }
    if (r0 + t / 4 < p.rows) {
        float* o = out + ((size_t)r * p.n_heads + head) * hd;
#pragma unroll
        for (int x = 0; x < HPT; x++) {
            const u32 d = x * 4 + sub;
            if (d < hd) o[d] = acc[x] / l;
        }
    }
}

#define PREFILL(HPT)                                                                          \
    extern "C" __global__ void __launch_bounds__(PRE_ROWS * 4) attention_prefill_##HPT(        \
        float* out, const float* q, const void* k_cache, const void* v_cache,                 \
        const u32* table, AttentionParams p) {                                                \
        attention_prefill<HPT>(out, q, k_cache, v_cache, table, p);                           \
    }

PREFILL(16)
PREFILL(32)
PREFILL(64)

// Long prefills go through cuBLAS instead (attention_gemm.rs). Exact path: attention_gather copies
// positions 0..n_pos of one layer's paged K and V into contiguous f32 [kv head][position][head_dim]
// matrices, the scores S = Q K^T come from a batched GEMM (one batch per kv head, one call per
// query head of the group), attention_softmax turns each score row into causal softmax weights
// in place, and a second batched GEMM multiplies them with V.
extern "C" __global__ void attention_gather(float* k_out, float* v_out, const void* k_cache,
                                            const void* v_cache, const u32* table,
                                            AttentionParams p, u32 n_pos) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 hd = p.head_dim;
    if (i >= (size_t)p.n_kv_heads * n_pos * hd) return;
    const u32 d = (u32)(i % hd);
    const u32 pos = (u32)((i / hd) % n_pos);
    const u32 kvh = (u32)(i / ((size_t)hd * n_pos));
    const size_t at = kv_row(table, pos, kvh, p.n_kv_heads, hd) + d;
    k_out[i] = kv_get(k_cache, at, p.kv_f16);
    v_out[i] = kv_get(v_cache, at, p.kv_f16);
}

// One block per score row (kv head blockIdx.y, query row blockIdx.x) of s [kv head][rows][n_pos]:
// weights softmax(s * scale) over positions 0..=pos0 + row, zero after.
extern "C" __global__ void __launch_bounds__(256)
    attention_softmax(float* s, AttentionParams p, u32 n_pos) {
    __shared__ float red[32];
    const u32 r = blockIdx.x;
    float* row = s + ((size_t)blockIdx.y * p.rows + r) * n_pos;
    const u32 n = min(p.pos0 + r + 1, n_pos);
    float mx = -INFINITY;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, row[j] * p.scale);
    {  // block max: warp max, then across warps
        __shared__ float wm[32];
        float v = warp_max(mx);
        if ((threadIdx.x & 31) == 0) wm[threadIdx.x >> 5] = v;
        __syncthreads();
        v = (threadIdx.x & 31) < (blockDim.x >> 5) ? wm[threadIdx.x & 31] : -INFINITY;
        mx = warp_max(v);
    }
    float sum = 0.0f;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf(row[j] * p.scale - mx);
        row[j] = e;
        sum += e;
    }
    sum = block_sum(sum, red);
    const float inv = 1.0f / sum;
    for (u32 j = threadIdx.x; j < n_pos; j += blockDim.x) row[j] = j < n ? row[j] * inv : 0.0f;
}

// ---- Default (tensor-core) path of the cuBLAS prefill attention ----

// K and V of positions 0..n_pos as f16 [kv head][position][head_dim] (an f16 cache copied bit for
// bit, an f32 one rounded), and q [rows][n_heads][head_dim] rounded to f16 in the same layout.
// One thread per element of whichever is larger.
extern "C" __global__ void attention_gather_f16(u16* k_out, u16* v_out, u16* q_out,
                                                const void* k_cache, const void* v_cache,
                                                const u32* table, const float* q,
                                                AttentionParams p, u32 n_pos) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 hd = p.head_dim;
    if (i < (size_t)p.rows * p.n_heads * hd) q_out[i] = f32_to_f16(q[i]);
    if (i >= (size_t)p.n_kv_heads * n_pos * hd) return;
    const u32 d = (u32)(i % hd);
    const u32 pos = (u32)((i / hd) % n_pos);
    const u32 kvh = (u32)(i / ((size_t)hd * n_pos));
    const size_t at = kv_row(table, pos, kvh, p.n_kv_heads, hd) + d;
    if (p.kv_f16) {
        k_out[i] = ((const u16*)k_cache)[at];
        v_out[i] = ((const u16*)v_cache)[at];
    } else {
        k_out[i] = f32_to_f16(((const float*)k_cache)[at]);
        v_out[i] = f32_to_f16(((const float*)v_cache)[at]);
    }
}

// Merges (max m, sum l of exp(x - m)) with another pair; m = -inf stands for no values yet.
// Symmetric bit for bit, so every lane of a butterfly ends with the same pair.
__device__ __forceinline__ void max_sum_merge(float& m, float& l, float om, float ol) {
    const float nm = fmaxf(m, om);
    if (nm == -INFINITY) return;
    l = (m == -INFINITY ? 0.0f : l * expf(m - nm)) + (om == -INFINITY ? 0.0f : ol * expf(om - nm));
    m = nm;
}

// Every thread of the block (a multiple of 32 threads, at most 1024) gets the block's pair.
__device__ __forceinline__ void block_max_sum(float& m, float& l) {
    __shared__ float sm[32], sl[32];
    for (int o = 16; o > 0; o >>= 1)
        max_sum_merge(m, l, __shfl_xor_sync(0xffffffffu, m, o),
                      __shfl_xor_sync(0xffffffffu, l, o));
    const u32 lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) {
        sm[threadIdx.x >> 5] = m;
        sl[threadIdx.x >> 5] = l;
    }
    __syncthreads();
    m = lane < warps ? sm[lane] : -INFINITY;
    l = lane < warps ? sl[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1)
        max_sum_merge(m, l, __shfl_xor_sync(0xffffffffu, m, o),
                      __shfl_xor_sync(0xffffffffu, l, o));
}

// One block per score row (kv head blockIdx.y, query row blockIdx.x) of the f32 scores
// s [kv head][rows][ld]: the weights softmax(s * scale) over positions 0..=pos0 + row, zero
// after, times p_scale, as f16 over the start of the same row (so P [kv head][rows][2 ld] f16).
// p_scale (2^15) keeps the weights of long rows in f16's normal range: the largest weight of a
// row is at least 1 / n_pos, and weights times 2^15 stay below 65504. The P V GEMM's alpha
// divides it out exactly.
// One pass for the max and the sum (online, per thread), one to write. Writing f16 value j
// overwrites f32 values j / 2 .. : chunk c of blockDim.x values lands on f32 values below
// (c + 1) blockDim.x / 2 <= (c + 1) blockDim.x, all read in chunks 0..=c, before the barrier.
extern "C" __global__ void __launch_bounds__(256)
    attention_softmax_f16(float* s, AttentionParams p, u32 n_pos, u32 ld, float p_scale) {
    const u32 r = blockIdx.x;
    float* row = s + ((size_t)blockIdx.y * p.rows + r) * ld;
    const u32 n = min(p.pos0 + r + 1, n_pos);
    float m = -INFINITY, l = 0.0f;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
        const float x = row[j] * p.scale;
        if (x > m) {
            l = l * expf(m - x) + 1.0f;
            m = x;
        } else {
            l += expf(x - m);
        }
    }
    block_max_sum(m, l);
    const float inv = p_scale / l;
    u16* weights = (u16*)row;
    for (u32 c0 = 0; c0 < n_pos; c0 += blockDim.x) {
        const u32 j = c0 + threadIdx.x;
        const float w = j < n ? expf(row[j] * p.scale - m) * inv : 0.0f;
        __syncthreads();
        if (j < n_pos) weights[j] = f32_to_f16(w);
    }
}
