// rms_norm: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w. One block per row: each thread sums
// the squares of a strided slice, warp shuffles and one shared-memory step reduce them.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
    rms_norm(float* out, const float* x, const float* w, RmsNormParams p) {
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * p.dim;
    float* o = out + (size_t)blockIdx.x * p.dim;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < p.dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)p.dim + p.eps);
    for (u32 i = threadIdx.x; i < p.dim; i += blockDim.x) o[i] = xr[i] * inv * w[i];
}
