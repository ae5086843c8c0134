// rms_norm: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w. One block per row: each thread sums
// the squares of a strided slice, warp shuffles and one shared-memory step reduce them.
// `rms_norm` writes f32; `rms_norm_f16` / `rms_norm_bf16` write the same values rounded to the
// half type (round to nearest even), as the input of prefill GEMMs on tensor cores: the norm's
// output is rounded once for every projection that reads it, with no f32 copy in between.
#include "common.cuh"

// OUT 0: f32, 1: f16, 2: bf16.
template <int OUT>
__device__ void rms_norm_row(void* out, const float* x, const float* w, RmsNormParams p) {
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * p.dim;
    const size_t o = (size_t)blockIdx.x * p.dim;
    float ss = 0.0f;
    for (u32 i = threadIdx.x; i < p.dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)p.dim + p.eps);
    for (u32 i = threadIdx.x; i < p.dim; i += blockDim.x) {
        const float v = xr[i] * inv * w[i];
        if (OUT == 0) ((float*)out)[o + i] = v;
        else if (OUT == 1) ((u16*)out)[o + i] = f32_to_f16(v);
        else ((u16*)out)[o + i] = f32_to_bf16(v);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    rms_norm(float* out, const float* x, const float* w, RmsNormParams p) {
    rms_norm_row<0>(out, x, w, p);
}

extern "C" __global__ void __launch_bounds__(1024)
    rms_norm_f16(u16* out, const float* x, const float* w, RmsNormParams p) {
    rms_norm_row<1>(out, x, w, p);
}

extern "C" __global__ void __launch_bounds__(1024)
    rms_norm_bf16(u16* out, const float* x, const float* w, RmsNormParams p) {
    rms_norm_row<2>(out, x, w, p);
}
