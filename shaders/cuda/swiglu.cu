// swiglu: out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)). One thread per element.
// swiglu_backward: with sig = 1 / (1 + exp(-g)), dup = dout silu(g) and
// dgate = dout up sig (1 + g (1 - sig)) (silu' = sig + g sig (1 - sig)). One thread per element.
#include "common.cuh"

extern "C" __global__ void swiglu(float* out, const float* gate, const float* up,
                                  ElementwiseParams p) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" __global__ void swiglu_backward(float* dgate, float* dup, const float* dout,
                                           const float* gate, const float* up,
                                           ElementwiseParams p) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) {
        const float g = gate[i], sig = 1.0f / (1.0f + expf(-g));
        dup[i] = dout[i] * g * sig;
        dgate[i] = dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
    }
}
