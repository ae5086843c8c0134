// matmul: out[r, col0 + o] = sum_i x[r, i] * w[o, i], weights in any stored format, f32 sums.
// Decode (few rows) runs `matvec_<dtype>`: one warp per output feature walks its weight row
// two octets per lane at a time (16-byte loads for 16-bit weights, whole quant sub-blocks decoded as
// src/quant_blocks.rs does), each octet feeding up to 4 input rows (grid y picks which 4); a
// warp shuffle reduces the lanes. Prefill (many rows) goes to cuBLAS: `widen_<dtype>` writes the
// weights as f32 (exact path) or f16/bf16 (tensor-core path, with `round_x` rounding the
// activations to the same type) into a scratch matrix the GEMM reads.
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
// together cover the row).
template <int DT>
__device__ __forceinline__ void row_dots(float* acc, const u8* row, const float* xr,
                                         MatmulParams p, u32 nr, u32 lane) {
    if ((p.k & 15) == 0) {
        // Two octets per lane per pass: both weight loads are in flight before the sums.
        for (u32 e = 16 * lane; e < p.k; e += 512) {
            float wv[16];
            load8<DT>(row, e, wv);
            load8<DT>(row, e + 8, wv + 8);
#pragma unroll
            for (int r = 0; r < 4; r++) {
                if (r < nr) {
                    const float4* xp = (const float4*)(xr + (size_t)r * p.k + e);
                    float s = 0.0f;
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        const float4 a = xp[q];
                        s += wv[4 * q] * a.x + wv[4 * q + 1] * a.y + wv[4 * q + 2] * a.z +
                             wv[4 * q + 3] * a.w;
                    }
                    acc[r] += s;
                }
            }
        }
    } else if (DT >= DT_Q8_0 || (p.k & 7) == 0) {
        for (u32 e = 8 * lane; e < p.k; e += 256) {
            float wv[8];
            load8<DT>(row, e, wv);
#pragma unroll
            for (int r = 0; r < 4; r++) {
                if (r < nr) {
                    const float4* xp = (const float4*)(xr + (size_t)r * p.k + e);
                    float4 a = xp[0], b = xp[1];
                    acc[r] += wv[0] * a.x + wv[1] * a.y + wv[2] * a.z + wv[3] * a.w +
                              wv[4] * b.x + wv[5] * b.y + wv[6] * b.z + wv[7] * b.w;
                }
            }
        }
    } else if (DT < DT_Q8_0) {
        for (u32 e = lane; e < p.k; e += 32) {
            float wv = load1<DT < DT_Q8_0 ? DT : DT_F32>(row, e);
#pragma unroll
            for (int r = 0; r < 4; r++)
                if (r < nr) acc[r] += wv * xr[(size_t)r * p.k + e];
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
    row_dots<DT>(acc, w + (size_t)o * row_bytes<DT>(p.k), x + (size_t)r0 * p.k, p, nr, lane);
#pragma unroll
    for (int r = 0; r < 4; r++) {
        float s = warp_sum(acc[r]);
        if (lane == 0 && r < nr) {
            float* at = out + (size_t)(r0 + r) * p.out_stride + p.col0 + o;
            *at = p.accumulate ? *at + s : s;
        }
    }
}

// out[r, o] = silu(x[r] . w1[o]) * (x[r] . w3[o]): the feed-forward's gate and up projections
// and swiglu in one pass (one warp reads both weight rows of feature o).
template <int DT>
__device__ void matvec_swiglu(float* out, const float* x, const u8* w1, const u8* w3,
                              MatmulParams p) {
    const u32 lane = threadIdx.x & 31;
    const u32 o = blockIdx.x * MATVEC_WARPS + (threadIdx.x >> 5);
    const u32 r0 = blockIdx.y * 4;
    const u32 nr = min(p.rows - r0, 4u);
    if (o >= p.n) return;
    const float* xr = x + (size_t)r0 * p.k;
    float g[4] = {0.0f, 0.0f, 0.0f, 0.0f}, u[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    row_dots<DT>(g, w1 + (size_t)o * row_bytes<DT>(p.k), xr, p, nr, lane);
    row_dots<DT>(u, w3 + (size_t)o * row_bytes<DT>(p.k), xr, p, nr, lane);
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const float gs = warp_sum(g[r]), us = warp_sum(u[r]);
        if (lane == 0 && r < nr)
            out[(size_t)(r0 + r) * p.out_stride + p.col0 + o] = gs / (1.0f + expf(-gs)) * us;
    }
}

// dst[o, e] = w[o, e] widened; OUT 0: f32, 1: f16, 2: bf16. One thread per octet.
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
        float* out, const float* x, const u8* w1, const u8* w3, MatmulParams p) {             \
        matvec_swiglu<DT>(out, x, w1, w3, p);                                                 \
    }                                                                                         \
    extern "C" __global__ void widen_##NAME##_f32(void* dst, const u8* w, u32 n, u32 k) {     \
        widen<DT, 0>(dst, w, n, k);                                                           \
    }                                                                                         \
    extern "C" __global__ void widen_##NAME##_f16(void* dst, const u8* w, u32 n, u32 k) {     \
        widen<DT, 1>(dst, w, n, k);                                                           \
    }

MATMUL_KERNELS(f32, DT_F32)
MATMUL_KERNELS(f16, DT_F16)
MATMUL_KERNELS(bf16, DT_BF16)
MATMUL_KERNELS(q8_0, DT_Q8_0)
MATMUL_KERNELS(q4_0, DT_Q4_0)
MATMUL_KERNELS(q4_1, DT_Q4_1)
MATMUL_KERNELS(q4k, DT_Q4K)
MATMUL_KERNELS(q6k, DT_Q6K)

// dst[i] = x[i] rounded to f16 (OUT 1) or bf16 (OUT 2), for the tensor-core GEMM's input.
extern "C" __global__ void round_x_f16(u16* dst, const float* x, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = f32_to_f16(x[i]);
}

extern "C" __global__ void round_x_bf16(u16* dst, const float* x, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = f32_to_bf16(x[i]);
}
