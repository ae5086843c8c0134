// swiglu: out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
// swiglu_backward: with sig = 1 / (1 + exp(-g)), dup = dout silu(g) and
// dgate = dout up sig (1 + g (1 - sig)) (silu' = sig + g sig (1 - sig)).
// Both are bound by memory: one thread per four elements with 16-byte loads and stores (buffers
// start 16-byte aligned), the last partial quad element by element.
#include "common.cuh"

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

extern "C" __global__ void swiglu(float* out, const float* gate, const float* up,
                                  ElementwiseParams p) {
    const u32 i = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i + 4 <= p.n) {
        const float4 g = *(const float4*)(gate + i), u = *(const float4*)(up + i);
        *(float4*)(out + i) = make_float4(silu_mul(g.x, u.x), silu_mul(g.y, u.y),
                                          silu_mul(g.z, u.z), silu_mul(g.w, u.w));
    } else {
        for (u32 j = i; j < p.n; ++j) out[j] = silu_mul(gate[j], up[j]);
    }
}

// (dgate, dup) of one element.
__device__ __forceinline__ float2 swiglu_grad(float dout, float g, float u) {
    const float sig = 1.0f / (1.0f + expf(-g));
    return make_float2(dout * u * sig * (1.0f + g * (1.0f - sig)), dout * g * sig);
}

extern "C" __global__ void swiglu_backward(float* dgate, float* dup, const float* dout,
                                           const float* gate, const float* up,
                                           ElementwiseParams p) {
    const u32 i = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i + 4 <= p.n) {
        const float4 d = *(const float4*)(dout + i), g = *(const float4*)(gate + i),
                     u = *(const float4*)(up + i);
        const float2 a = swiglu_grad(d.x, g.x, u.x), b = swiglu_grad(d.y, g.y, u.y),
                     c = swiglu_grad(d.z, g.z, u.z), e = swiglu_grad(d.w, g.w, u.w);
        *(float4*)(dgate + i) = make_float4(a.x, b.x, c.x, e.x);
        *(float4*)(dup + i) = make_float4(a.y, b.y, c.y, e.y);
    } else {
        for (u32 j = i; j < p.n; ++j) {
            const float2 r = swiglu_grad(dout[j], gate[j], up[j]);
            dgate[j] = r.x;
            dup[j] = r.y;
        }
    }
}
