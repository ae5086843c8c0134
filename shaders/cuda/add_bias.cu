// add_bias: x[r, i] += bias[i]. One thread per element.
#include "common.cuh"

extern "C" __global__ void add_bias(float* x, const float* bias, AddBiasParams p) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)p.rows * p.n) x[i] += bias[i % p.n];
}
