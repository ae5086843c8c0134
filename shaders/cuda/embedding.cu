// embedding: out[t, :] = table[tokens[t], :] widened to f32. One thread per octet of an output
// row (rows are whole octets: quant rows are whole 32-value blocks, float rows use the scalar
// path otherwise). A token id at or past the vocabulary gives a NaN row, so a bad id shows up in
// the logits instead of passing silently (ids sampled on the device never visit the host).
// embedding_backward: dtable[tokens[t], i] += dout[t, i], one thread per (t, i) with atomicAdd
// (a token may repeat in the batch); ids at or past the vocabulary add nothing.
#include "common.cuh"

template <int DT>
__device__ void embedding(float* out, const u32* tokens, const u8* table, EmbeddingParams p) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool octets = DT >= DT_Q8_0 || (p.dim & 7) == 0;
    const u32 per_row = octets ? p.dim / 8 : p.dim;
    if (i >= (size_t)p.n_tokens * per_row) return;
    const u32 t = (u32)(i / per_row), c = (u32)(i % per_row);
    const u32 id = tokens[t];
    float* o = out + (size_t)t * p.dim;
    if (id >= p.vocab) {
        const float nan = __uint_as_float(0x7fc00000u);
        if (octets)
            for (int j = 0; j < 8; j++) o[c * 8 + j] = nan;
        else
            o[c] = nan;
        return;
    }
    const u8* row = table + (size_t)id * row_bytes<DT>(p.dim);
    if (octets) {
        float v[8];
        load8<DT>(row, c * 8, v);
#pragma unroll
        for (int j = 0; j < 8; j++) o[c * 8 + j] = v[j];
    } else if (DT == DT_F32) {
        o[c] = ((const float*)row)[c];
    } else if (DT == DT_F16) {
        o[c] = f16_to_f32(((const u16*)row)[c]);
    } else {
        o[c] = bf16_to_f32(((const u16*)row)[c]);
    }
}

#define EMBEDDING(NAME, DT)                                                                   \
    extern "C" __global__ void embedding_##NAME(float* out, const u32* tokens, const u8* table, \
                                                EmbeddingParams p) {                          \
        embedding<DT>(out, tokens, table, p);                                                 \
    }

EMBEDDING(f32, DT_F32)
EMBEDDING(f16, DT_F16)
EMBEDDING(bf16, DT_BF16)
EMBEDDING(q8_0, DT_Q8_0)
EMBEDDING(q4_0, DT_Q4_0)
EMBEDDING(q4_1, DT_Q4_1)
EMBEDDING(q4k, DT_Q4K)
EMBEDDING(q6k, DT_Q6K)

extern "C" __global__ void embedding_backward(float* dtable, const float* dout,
                                              const u32* tokens, EmbeddingParams p) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)p.n_tokens * p.dim) return;
    const u32 t = (u32)(i / p.dim), c = (u32)(i % p.dim);
    const u32 id = tokens[t];
    if (id < p.vocab) atomicAdd(dtable + (size_t)id * p.dim + c, dout[i]);
}
