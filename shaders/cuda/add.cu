// add: x[i] += y[i] (the residual connection). One thread per element.
// The vector ops of a training step, also one thread per element: `zero` (x = 0), `axpy`
// (y += alpha x: gradients of a tied weight, LoRA's scaled update), `dropout` (LoRA's input
// dropout: a counter-based mask, the bits of src/backend/mod.rs `dropout_hash`, so recomputes
// and the cpu draw the same mask). `sum_squares` adds
// sum(x^2) to out[0] without atomics, so the gradient norm does not depend on scheduling:
// `sum_squares_partial` runs a fixed grid of blocks, each a grid-stride loop and a block sum
// into part[block]; `sum_squares_finish` (one block) adds the partials in order.
#include "common.cuh"

extern "C" __global__ void add(float* x, const float* y, ElementwiseParams p) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) x[i] += y[i];
}

extern "C" __global__ void zero(float* x, ElementwiseParams p) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) x[i] = 0.0f;
}

extern "C" __global__ void axpy(float* y, const float* x, AxpyParams p) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) y[i] += p.alpha * x[i];
}

extern "C" __global__ void dropout(float* out, const float* x, DropoutParams p) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    u32 h = (i * 0x9E3779B1u) ^ p.seed;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    out[i] = h >= p.threshold ? x[i] * p.scale : 0.0f;
}

extern "C" __global__ void __launch_bounds__(256)
    sum_squares_partial(float* part, const float* x, ElementwiseParams p) {
    __shared__ float red[32];
    float s = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n;
         i += (size_t)gridDim.x * blockDim.x)
        s += x[i] * x[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

extern "C" __global__ void __launch_bounds__(1024)
    sum_squares_finish(float* out, const float* part, u32 n_parts) {
    __shared__ float red[32];
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < n_parts; i += blockDim.x) s += part[i];
    s = block_sum(s, red);
    if (threadIdx.x == 0) out[0] += s;
}
