// cross_entropy: the softmax and loss of one chunk of rows of classifier logits, in place.
// The host runs the chunk's logits = x . W^T on cuBLAS into a scratch [rows, vocab], then
// `cross_entropy_rows` (one block per row): one pass keeps each thread's running max and sum of
// exp (online softmax), merged over the block; a second pass overwrites the logits with
// dlogits = scale (softmax - onehot(label)) (0 for an ignored row, label < 0) and the row's loss
// logsumexp - logit[label] goes to row_loss[row] (0 when ignored, NaN for a label past the
// vocabulary). The host then runs dx = dlogits . W (and dw += dlogits^T . x) on cuBLAS and,
// after the last chunk, `cross_entropy_sum` adds the rows' losses in order (one block, no
// atomics) into loss[0].
#include "common.cuh"

#define CE_THREADS 1024

// Merges running (max, sum of exp(. - max)) pairs.
__device__ __forceinline__ void ms_merge(float* m, float* s, float m2, float s2) {
    const float mn = fmaxf(*m, m2);
    if (mn == -INFINITY) return;
    *s = *s * expf(*m - mn) + s2 * expf(m2 - mn);
    *m = mn;
}

extern "C" __global__ void __launch_bounds__(CE_THREADS)
    cross_entropy_rows(float* logits, float* row_loss, const int* labels, CrossEntropyParams p) {
    __shared__ float sm[32], ss[32];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float* row = logits + (size_t)blockIdx.x * p.vocab;
    const int label = labels[blockIdx.x];
    // The label's logit, read before any thread overwrites the row.
    const float at_label = (label >= 0 && (u32)label < p.vocab) ? row[label] : 0.0f;
    float m = -INFINITY, s = 0.0f;
    for (u32 i = threadIdx.x; i < p.vocab; i += blockDim.x) ms_merge(&m, &s, row[i], 1.0f);
    for (int o = 16; o > 0; o >>= 1)
        ms_merge(&m, &s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = -INFINITY;
    s = 0.0f;
    for (u32 w = 0; w < blockDim.x / 32; w++) ms_merge(&m, &s, sm[w], ss[w]);
    const float lse = m + logf(s);
    const bool used = label >= 0;
    for (u32 i = threadIdx.x; i < p.vocab; i += blockDim.x) {
        const float prob = expf(row[i] - lse);
        row[i] = used ? p.scale * (prob - ((u32)label == i ? 1.0f : 0.0f)) : 0.0f;
    }
    if (threadIdx.x == 0) {
        const float nan = __uint_as_float(0x7fc00000u);
        row_loss[blockIdx.x] = !used ? 0.0f : (u32)label < p.vocab ? lse - at_label : nan;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    cross_entropy_sum(float* loss, const float* row_loss, u32 rows) {
    __shared__ float red[32];
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < rows; i += blockDim.x) s += row_loss[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) loss[0] = s;
}
