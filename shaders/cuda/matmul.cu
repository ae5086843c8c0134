// matmul: out[r, col0 + o] = sum_i x[r, i] * w[o, i], weights in any stored format, f32 sums.
// Decode (few rows) runs `matvec_<dtype>`: one warp per output feature walks its weight row
// two octets per lane at a time (16-byte loads for 16-bit weights, whole quant sub-blocks decoded as
// src/quant_blocks.rs does), each octet feeding up to 4 input rows (grid y picks which 4); a
// warp shuffle reduces the lanes. Fused variants: `matvec_qkv` (rms_norm + q, k, v projections)
// and `matvec_swiglu` (rms_norm + gate and up projections + swiglu): each block stages the
// normed input in shared memory (one pass over x that also sums its squares), then the warps
// stream their weight rows against it. Prefill (many rows) goes to cuBLAS: `widen_<dtype>` writes the
// weights as f32 (exact path) or f16/bf16 (tensor-core path, with `round_x` rounding the
// activations to the same type) into a scratch matrix the GEMM reads. Training's matmul backward
// uses the same kernels: `widen_<dtype>_bf16` dequantizes slices of f16 and block-format weights
// to bf16, and `round_x_bf16` rounds the f32 gradients and activations, for bf16 GEMMs.
#include "common.cuh"

#define MATVEC_WARPS 8

// Weight value e of a row (scalar path for rows whose length is not a multiple of 8).
template <int DT>
__device__ __forceinline__ float load1(const u8* row, u32 e) {
    if (DT == DT_F32) return ((const float*)row)[e];
    if (DT == DT_F16) return f16_to_f32(((const u16*)row)[e]);
    return bf16_to_f32(((const u16*)row)[e]);
}

// acc[r] += this lane's share of weight row `row` . x row r, for r < nr (lanes of a warp
// together cover the row). Each pass a lane takes the octets at e and e + 256: both weight
// loads are in flight before the sums, each load instruction reads 512 contiguous bytes of
// 16-bit weights across the warp, and the lanes' x reads (global or shared memory) are 32
// bytes apart (2-way bank conflicts at most).
template <int DT>
__device__ __forceinline__ void row_dots(float* acc, const u8* row, const float* xr, u32 k,
                                         u32 nr, u32 lane) {
    if ((k & 7) == 0) {
        for (u32 e = 8 * lane; e < k; e += 512) {
            const bool two = e + 256 < k;
            float wv[16];
            load8<DT>(row, e, wv);
            if (two) {
                load8<DT>(row, e + 256, wv + 8);
            } else {
#pragma unroll
                for (int j = 8; j < 16; j++) wv[j] = 0.0f;
            }
#pragma unroll
            for (int r = 0; r < 4; r++) {
                if (r < nr) {
                    const float* xe = xr + (size_t)r * k + e;
                    const float4 a = ((const float4*)xe)[0], b = ((const float4*)xe)[1];
                    float s = wv[0] * a.x + wv[1] * a.y + wv[2] * a.z + wv[3] * a.w +
                              wv[4] * b.x + wv[5] * b.y + wv[6] * b.z + wv[7] * b.w;
                    if (two) {
                        const float4 c = ((const float4*)(xe + 256))[0];
                        const float4 d = ((const float4*)(xe + 256))[1];
                        s += wv[8] * c.x + wv[9] * c.y + wv[10] * c.z + wv[11] * c.w +
                             wv[12] * d.x + wv[13] * d.y + wv[14] * d.z + wv[15] * d.w;
                    }
                    acc[r] += s;
                }
            }
        }
    } else if (DT < DT_Q8_0) {
        // Rows that are not whole octets (quant rows always are: their blocks are 32 wide).
        for (u32 e = lane; e < k; e += 32) {
            float wv = load1<DT < DT_Q8_0 ? DT : DT_F32>(row, e);
#pragma unroll
            for (int r = 0; r < 4; r++)
                if (r < nr) acc[r] += wv * xr[(size_t)r * k + e];
        }
    }
}

// p.accumulate: out += x . w^T (the residual add in the epilogue), else out = x . w^T.
template <int DT>
__device__ void matvec(float* out, const float* x, const u8* w, MatmulParams p) {
    const u32 lane = threadIdx.x & 31;
    const u32 o = blockIdx.x * MATVEC_WARPS + (threadIdx.x >> 5);
    const u32 r0 = blockIdx.y * 4;
    const u32 nr = min(p.rows - r0, 4u);
    if (o >= p.n) return;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    row_dots<DT>(acc, w + (size_t)o * row_bytes<DT>(p.k), x + (size_t)r0 * p.k, p.k, nr, lane);
#pragma unroll
    for (int r = 0; r < 4; r++) {
        float s = warp_sum(acc[r]);
        if (lane == 0 && r < nr) {
            float* at = out + (size_t)(r0 + r) * p.out_stride + p.col0 + o;
            *at = p.accumulate ? *at + s : s;
        }
    }
}

// The rms_norm the fused mat-vecs fold in: every block stages h = x * g for its nr (<= 4)
// rows in shared memory (the weight passes then read h from there) and gets each row's
// 1 / sqrt(mean(x^2) + eps) in inv[]. The whole block must call it (it synchronizes).
__device__ __forceinline__ void stage_normed(float* h, float* inv, const float* x, const float* g,
                                             NormMatvecParams p, u32 r0, u32 nr) {
    __shared__ float red[4][MATVEC_WARPS];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float ss[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float* xr = x + (size_t)r0 * p.k;
#pragma unroll
    for (u32 r = 0; r < 4; r++) {
        if (r < nr) {
            for (u32 e = threadIdx.x; e < p.k; e += blockDim.x) {
                const float v = xr[(size_t)r * p.k + e];
                ss[r] += v * v;
                h[r * p.k + e] = v * g[e];
            }
        }
    }
#pragma unroll
    for (u32 r = 0; r < 4; r++) {
        const float t = warp_sum(ss[r]);
        if (lane == 0) red[r][warp] = t;
    }
    __syncthreads();
#pragma unroll
    for (u32 r = 0; r < 4; r++) {
        float t = 0.0f;
        for (u32 i = 0; i < MATVEC_WARPS; i++) t += red[r][i];
        inv[r] = 1.0f / sqrtf(t / (float)p.k + p.eps);
    }
}

// q, k, v = rms_norm(x) . (wq, wk, wv)^T in one launch: warps take features across the three
// matrices (p.n0 rows of wq, then p.n1 of wk, then p.n2 of wv). Dynamic shared memory: nr * k
// floats.
template <int DT>
__device__ void matvec_qkv(float* q, float* k, float* v, const float* x, const float* g,
                           const u8* wq, const u8* wk, const u8* wv, NormMatvecParams p) {
    extern __shared__ float h[];
    const u32 lane = threadIdx.x & 31;
    u32 o = blockIdx.x * MATVEC_WARPS + (threadIdx.x >> 5);
    const u32 r0 = blockIdx.y * 4;
    const u32 nr = min(p.rows - r0, 4u);
    float inv[4];
    stage_normed(h, inv, x, g, p, r0, nr);
    float* out = q;
    const u8* w = wq;
    u32 n = p.n0;
    if (o >= p.n0) {
        o -= p.n0, out = k, w = wk, n = p.n1;
        if (o >= p.n1) {
            o -= p.n1, out = v, w = wv, n = p.n2;
            if (o >= p.n2) return;
        }
    }
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    row_dots<DT>(acc, w + (size_t)o * row_bytes<DT>(p.k), h, p.k, nr, lane);
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const float s = warp_sum(acc[r]) * inv[r];
        if (lane == 0 && r < nr) out[(size_t)(r0 + r) * n + o] = s;
    }
}

// out[r, o] = silu(h[r] . w1[o]) * (h[r] . w3[o]), h = rms_norm(x) with weight g: the
// feed-forward's norm, gate and up projections and swiglu in one pass (one warp reads both
// weight rows of feature o). Dynamic shared memory: nr * k floats.
template <int DT>
__device__ void matvec_swiglu(float* out, const float* x, const u8* w1, const u8* w3,
                              const float* g, NormMatvecParams p) {
    extern __shared__ float h[];
    const u32 lane = threadIdx.x & 31;
    const u32 o = blockIdx.x * MATVEC_WARPS + (threadIdx.x >> 5);
    const u32 r0 = blockIdx.y * 4;
    const u32 nr = min(p.rows - r0, 4u);
    float inv[4];
    stage_normed(h, inv, x, g, p, r0, nr);
    if (o >= p.n0) return;
    float gs[4] = {0.0f, 0.0f, 0.0f, 0.0f}, us[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    row_dots<DT>(gs, w1 + (size_t)o * row_bytes<DT>(p.k), h, p.k, nr, lane);
    row_dots<DT>(us, w3 + (size_t)o * row_bytes<DT>(p.k), h, p.k, nr, lane);
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const float a = warp_sum(gs[r]) * inv[r], b = warp_sum(us[r]) * inv[r];
        if (lane == 0 && r < nr) out[(size_t)(r0 + r) * p.n0 + o] = a / (1.0f + expf(-a)) * b;
    }
}

// dst[o, e] = w[o, e] widened (rounded to nearest even where OUT is narrower than the stored
// values); OUT 0: f32, 1: f16, 2: bf16. One thread per octet.
template <int DT, int OUT>
__device__ void widen(void* dst, const u8* w, u32 n, u32 k) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const u32 octets = k / 8;
    if (i >= (size_t)n * octets) return;
    const u32 o = (u32)(i / octets), e = (u32)(i % octets) * 8;
    float v[8];
    load8<DT>(w + (size_t)o * row_bytes<DT>(k), e, v);
    const size_t at = (size_t)o * k + e;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        if (OUT == 0) ((float*)dst)[at + j] = v[j];
        else if (OUT == 1) ((u16*)dst)[at + j] = f32_to_f16(v[j]);
        else ((u16*)dst)[at + j] = f32_to_bf16(v[j]);
    }
}

#define MATMUL_KERNELS(NAME, DT)                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                         \
        matvec_##NAME(float* out, const float* x, const u8* w, MatmulParams p) {              \
        matvec<DT>(out, x, w, p);                                                             \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) matvec_swiglu_##NAME(                    \
        float* out, const float* x, const u8* w1, const u8* w3, const float* g,              \
        NormMatvecParams p) {                                                                 \
        matvec_swiglu<DT>(out, x, w1, w3, g, p);                                              \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) matvec_qkv_##NAME(                       \
        float* q, float* k, float* v, const float* x, const float* g, const u8* wq,          \
        const u8* wk, const u8* wv, NormMatvecParams p) {                                     \
        matvec_qkv<DT>(q, k, v, x, g, wq, wk, wv, p);                                         \
    }                                                                                         \
    extern "C" __global__ void widen_##NAME##_f32(void* dst, const u8* w, u32 n, u32 k) {     \
        widen<DT, 0>(dst, w, n, k);                                                           \
    }                                                                                         \
    extern "C" __global__ void widen_##NAME##_f16(void* dst, const u8* w, u32 n, u32 k) {     \
        widen<DT, 1>(dst, w, n, k);                                                           \
    }                                                                                         \
    extern "C" __global__ void widen_##NAME##_bf16(void* dst, const u8* w, u32 n, u32 k) {    \
        widen<DT, 2>(dst, w, n, k);                                                           \
    }

MATMUL_KERNELS(f32, DT_F32)
MATMUL_KERNELS(f16, DT_F16)
MATMUL_KERNELS(bf16, DT_BF16)
MATMUL_KERNELS(q8_0, DT_Q8_0)
MATMUL_KERNELS(q4_0, DT_Q4_0)
MATMUL_KERNELS(q4_1, DT_Q4_1)
MATMUL_KERNELS(q4k, DT_Q4K)
MATMUL_KERNELS(q6k, DT_Q6K)

// dst[i] = w[i] widened to f32, one thread per value: the f16 / bf16 matrices whose rows are
// not whole octets (training's matmul_dx widens weights for an f32 GEMM).
extern "C" __global__ void widen1_f16_f32(float* dst, const u16* w, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = f16_to_f32(w[i]);
}

extern "C" __global__ void widen1_bf16_f32(float* dst, const u16* w, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = bf16_to_f32(w[i]);
}

// dst[i] = x[i] rounded to f16 or bf16, for a tensor-core GEMM's operand. One thread per four
// values: one 16-byte load and one 8-byte store where both addresses are aligned for them (the
// pool's buffers always are), so the pass streams at the copy rate; a tail of fewer than four
// values, or unaligned addresses, take the scalar loop.
template <bool BF16>
__device__ __forceinline__ void round_x4(u16* dst, const float* x, u32 n) {
    const u32 i = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i >= n) return;
    const bool aligned = (((size_t)x | ((size_t)dst << 1)) & 15) == 0;
    if (aligned && i + 4 <= n) {
        const float4 v = *(const float4*)(x + i);
        const u16 a = BF16 ? f32_to_bf16(v.x) : f32_to_f16(v.x);
        const u16 b = BF16 ? f32_to_bf16(v.y) : f32_to_f16(v.y);
        const u16 c = BF16 ? f32_to_bf16(v.z) : f32_to_f16(v.z);
        const u16 d = BF16 ? f32_to_bf16(v.w) : f32_to_f16(v.w);
        *(uint2*)(dst + i) = make_uint2(a | ((u32)b << 16), c | ((u32)d << 16));
        return;
    }
    for (u32 j = i; j < n && j < i + 4; ++j) dst[j] = BF16 ? f32_to_bf16(x[j]) : f32_to_f16(x[j]);
}

extern "C" __global__ void round_x_f16(u16* dst, const float* x, u32 n) { round_x4<false>(dst, x, n); }

extern "C" __global__ void round_x_bf16(u16* dst, const float* x, u32 n) { round_x4<true>(dst, x, n); }
