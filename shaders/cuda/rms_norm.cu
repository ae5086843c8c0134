// rms_norm: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w. One block per row: each thread sums
// the squares of a strided slice, warp shuffles and one shared-memory step reduce them.
// `rms_norm` writes f32; `rms_norm_f16` / `rms_norm_bf16` write the same values rounded to the
// half type (round to nearest even), as the input of prefill GEMMs on tensor cores: the norm's
// output is rounded once for every projection that reads it, with no f32 copy in between.
// Backward: `rms_norm_backward` (one block per row, two block sums: mean(x^2) and
// mean(dy * w * x)) writes dx = rstd (dy w - x rstd^2 mean(dy w x)) and each row's rstd;
// dweight[i] += sum_r dy[r, i] x[r, i] rstd[r] is a column sum, done without atomics in two
// passes: `rms_norm_dw_partial` sums row chunks (grid: column blocks x row chunks, one thread
// per column, reads coalesced along the row), `rms_norm_dw_finish` adds the chunks in order.
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

extern "C" __global__ void __launch_bounds__(1024)
    rms_norm_backward(float* dx, float* rstd, const float* dy, const float* x, const float* w,
                      RmsNormParams p) {
    __shared__ float red[32];
    const size_t o = (size_t)blockIdx.x * p.dim;
    const float *xr = x + o, *dyr = dy + o;
    float ss = 0.0f, sd = 0.0f;
    for (u32 i = threadIdx.x; i < p.dim; i += blockDim.x) {
        ss += xr[i] * xr[i];
        sd += dyr[i] * w[i] * xr[i];
    }
    ss = block_sum(ss, red);
    sd = block_sum(sd, red);
    const float inv = 1.0f / sqrtf(ss / (float)p.dim + p.eps);
    const float c = inv * inv * sd / (float)p.dim;
    for (u32 i = threadIdx.x; i < p.dim; i += blockDim.x)
        dx[o + i] = inv * (dyr[i] * w[i] - xr[i] * c);
    if (threadIdx.x == 0) rstd[blockIdx.x] = inv;
}

// part[chunk, i] = sum over rows r of the chunk (chunk_rows each) of dy[r, i] x[r, i] rstd[r].
extern "C" __global__ void rms_norm_dw_partial(float* part, const float* dy, const float* x,
                                               const float* rstd, RmsNormParams p,
                                               u32 chunk_rows) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.dim) return;
    const u32 r0 = blockIdx.y * chunk_rows, r1 = min(r0 + chunk_rows, p.rows);
    float s = 0.0f;
    for (u32 r = r0; r < r1; r++) {
        const size_t at = (size_t)r * p.dim + i;
        s += dy[at] * x[at] * rstd[r];
    }
    part[(size_t)blockIdx.y * p.dim + i] = s;
}

extern "C" __global__ void rms_norm_dw_finish(float* dweight, const float* part, RmsNormParams p,
                                              u32 chunks) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.dim) return;
    float s = 0.0f;
    for (u32 c = 0; c < chunks; c++) s += part[(size_t)c * p.dim + i];
    dweight[i] += s;
}
