// swiglu: out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)). One thread per element.
#include "common.cuh"

extern "C" __global__ void swiglu(float* out, const float* gate, const float* up,
                                  ElementwiseParams p) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}
