// common.cuh: what every kernel in shaders/cuda/ shares. NVRTC compiles each <op>.cu on its own
// with this header; no CUDA toolkit headers are needed (f16 is converted with PTX cvt, bf16 with
// shifts), so the kernels build wherever the driver's libnvrtc is.
// Conventions (mirroring shaders/wgsl/): activations are f32 row-major; weights keep their stored
// dtype and are widened in the kernel; each kernel's parameter struct mirrors the #[repr(C)]
// struct of the same name in src/backend/params.rs, passed by value. Kernels that depend on the
// sequence position take `pos_dev`: when it is non-null the position is read from the device
// (CUDA-graph replays of a decode step), else params.pos0 is used.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef signed char i8;

#define NONE_U32 0xffffffffu
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("{ .reg .b16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("{ .reg .b16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even (NaN stays NaN).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets it.
__device__ __forceinline__ float block_sum(float v, float* shared32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared32[warp] = v;
    __syncthreads();
    float t = lane < warps ? shared32[lane] : 0.0f;
    return warp_sum(t);
}

__device__ __forceinline__ u32 position(const u32* pos_dev, u32 pos0) {
    return pos_dev ? *pos_dev : pos0;
}

// The rows of a paged-cache kernel: one sequence's rows, row r at position pos0 + r (pos0 read
// from pos_dev when set) of `table`; or, with rows_mode, the rows of many sequences (serving's
// batched decode, batch.rs RowsView), `table` then being the batch's layout
// [pos: rows][table offset: rows][block tables]: row r at position table[r] of the blocks at
// table + table[rows + r].
__device__ __forceinline__ u32 row_pos(const u32* table, u32 rows_mode, u32 rows, u32 r,
                                       const u32* pos_dev, u32 pos0) {
    return rows_mode ? table[r] : position(pos_dev, pos0) + r;
}

__device__ __forceinline__ const u32* row_blocks(const u32* table, u32 rows_mode, u32 rows,
                                                 u32 r) {
    return rows_mode ? table + table[rows + r] : table;
}

// ---- parameter blocks (src/backend/params.rs) ----
struct EmbeddingParams { u32 n_tokens, dim, row0, chunk_rows, vocab, _pad[3]; };
struct RmsNormParams { u32 rows, dim; float eps; u32 _pad; };
struct MatmulParams { u32 rows, n, k, out_stride, col0, accumulate, _pad[2]; };
struct NormMatvecParams { u32 rows, k, n0, n1, n2; float eps; u32 _pad[2]; };
struct AddBiasParams { u32 rows, n, _pad[2]; };
struct RopeParams { u32 rows, n_heads, n_kv_heads, head_dim, pos0; float attn_scale; u32 _pad[2]; };
struct KvAppendParams { u32 rows, n_kv_heads, head_dim, pos0, kv_f16, _pad[3]; };
struct AttentionParams { u32 rows, n_heads, n_kv_heads, head_dim, pos0, kv_f16; float scale; u32 split_len; };
struct ElementwiseParams { u32 n, _pad[3]; };
struct SampleParams { u32 vocab, top_k; float top_p, min_p, temperature, uniform; u32 out_index, _pad; };
// Training's blocks (src/backend/cuda/train_params.rs: CUDA is the only GPU backend that trains).
struct RopeRowsParams { u32 rows, n_heads, head_dim; float attn_scale; };
struct PackedAttnParams { u32 rows, n_seqs, n_heads, n_kv_heads, head_dim; float scale; u32 _pad[2]; };
struct AxpyParams { u32 n; float alpha; u32 _pad[2]; };
struct DropoutParams { u32 n, threshold, seed; float scale; };
struct CrossEntropyParams { u32 rows, vocab; float scale; u32 _pad; };
struct AdamWParams { u32 n; float lr, beta1, beta2, eps, weight_decay, grad_scale, step_size, bc2_sqrt; u32 _pad[3]; };

// ---- weight formats (src/dtype.rs; GGUF block layouts as src/quant_blocks.rs decodes them) ----
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_Q8_0 3
#define DT_Q4_0 4
#define DT_Q4_1 5
#define DT_Q4K 6
#define DT_Q6K 7

__device__ __forceinline__ float f16_at(const u8* p) { return f16_to_f32(*(const u16*)p); }

// Q4_K: 6-bit scale and min of sub-block j from the 12 packed bytes at s.
__device__ __forceinline__ void scale_min_k4(const u8* s, int j, float* sc, float* mn) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *mn = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
        *mn = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// Values 8p..8p+8 of 32-value unit u of a quantized row starting at `row` (a whole Q8_0 / Q4_0 /
// Q4_1 block, or one of the eight 32-value sub-blocks of a Q4_K / Q6_K super-block).
template <int DT>
__device__ __forceinline__ void decode8(const u8* row, u32 u, u32 p, float* v) {
    if (DT == DT_Q8_0) {
        const u8* b = row + u * 34;
        float d = f16_at(b);
        const i8* q = (const i8*)(b + 2 + 8 * p);
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = (float)q[i] * d;
    } else if (DT == DT_Q4_0 || DT == DT_Q4_1) {
        // Byte j holds value j (low nibble) and j + 16 (high nibble).
        const u8* b = row + u * (DT == DT_Q4_0 ? 18 : 20);
        float d = f16_at(b);
        const u8* q = b + (DT == DT_Q4_0 ? 2 : 4) + 8 * (p % 2);
        int shift = 4 * (p / 2);
        if (DT == DT_Q4_0) {
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = ((float)((q[i] >> shift) & 15) - 8.0f) * d;
        } else {
            float m = f16_at(b + 2);
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = (float)((q[i] >> shift) & 15) * d + m;
        }
    } else if (DT == DT_Q4K) {
        // Sub-block j of the super-block: 32 bytes of group j / 2, low nibbles for even j.
        const u8* b = row + (u / 8) * 144;
        int j = u % 8;
        float sc, mn;
        scale_min_k4(b + 4, j, &sc, &mn);
        float d = f16_at(b) * sc, m = f16_at(b + 2) * mn;
        const u8* q = b + 16 + 32 * (j / 2) + 8 * p;
        int shift = 4 * (j % 2);
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = d * (float)((q[i] >> shift) & 15) - m;
    } else {
        // Q6_K: half n = j / 4 of the super-block, quarter qq = j % 4 (nibble and qh bits).
        const u8* b = row + (u / 8) * 210;
        int j = u % 8, n = j / 4, qq = j % 4;
        const u8* ql = b + 64 * n + 32 * (qq % 2) + 8 * p;
        const u8* qh = b + 128 + 32 * n + 8 * p;
        float d = f16_at(b + 208) * (float)(i8)b[192 + 8 * n + p / 2 + 2 * qq];
        int ls = 4 * (qq / 2), hs = 2 * qq;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int q = ((ql[i] >> ls) & 15) | (((qh[i] >> hs) & 3) << 4);
            v[i] = d * (float)(q - 32);
        }
    }
}

// Block geometry of a quantized format: values and bytes per block.
template <int DT> struct QBlock { enum { ELEMS = 1, BYTES = 1 }; }; // float formats: unused
template <> struct QBlock<DT_Q8_0> { enum { ELEMS = 32, BYTES = 34 }; };
template <> struct QBlock<DT_Q4_0> { enum { ELEMS = 32, BYTES = 18 }; };
template <> struct QBlock<DT_Q4_1> { enum { ELEMS = 32, BYTES = 20 }; };
template <> struct QBlock<DT_Q4K> { enum { ELEMS = 256, BYTES = 144 }; };
template <> struct QBlock<DT_Q6K> { enum { ELEMS = 256, BYTES = 210 }; };

// Eight f16 or bf16 values packed in 16 bytes (element 2i in the low half of word i), widened.
template <int DT>
__device__ __forceinline__ void widen8(uint4 w, float* v) {
    u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u16 lo = (u16)(words[i] & 0xffffu), hi = (u16)(words[i] >> 16);
        v[2 * i] = DT == DT_F16 ? f16_to_f32(lo) : bf16_to_f32(lo);
        v[2 * i + 1] = DT == DT_F16 ? f16_to_f32(hi) : bf16_to_f32(hi);
    }
}

// Eight widened values e..e+8 (e a multiple of 8) of a weight row in any format.
template <int DT>
__device__ __forceinline__ void load8(const u8* row, u32 e, float* v) {
    if (DT == DT_F32) {
        const float4* p = (const float4*)((const float*)row + e);
        float4 a = p[0], b = p[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else if (DT == DT_F16 || DT == DT_BF16) {
        widen8<DT>(*(const uint4*)((const u16*)row + e), v);
    } else {
        decode8<DT>(row, e / 32, (e % 32) / 8, v);
    }
}

// Bytes of one row of k values (k a whole number of blocks).
template <int DT>
__device__ __forceinline__ size_t row_bytes(u32 k) {
    if (DT == DT_F32) return (size_t)k * 4;
    if (DT == DT_F16 || DT == DT_BF16) return (size_t)k * 2;
    return (size_t)(k / QBlock<DT>::ELEMS) * QBlock<DT>::BYTES;
}
