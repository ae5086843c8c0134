// adamw: one fused AdamW step (PyTorch's torch.optim.AdamW, decoupled weight decay) over n f32
// parameters with f32 moments, exactly as src/backend/train.rs writes it:
//   g = grad * grad_scale; p *= 1 - lr * wd; m += (g - m) (1 - b1) (PyTorch's lerp, the same
//   m = b1 m + (1 - b1) g); v = b2 v + (1 - b2) g^2; p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed once on the host.
// write_weight_<f16|bf16>: stores the f32 master copy into the weight the forward reads, rounded
// to nearest even. One thread per element for both.
#include "common.cuh"

extern "C" __global__ void adamw(float* param, float* m, float* v, const float* grad,
                                 AdamWParams p) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= p.n) return;
    const float g = grad[i] * p.grad_scale;
    const float w = param[i] * (1.0f - p.lr * p.weight_decay);
    const float mi = m[i] + (g - m[i]) * (1.0f - p.beta1);
    const float vi = v[i] * p.beta2 + (1.0f - p.beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] = w - p.step_size * mi / (sqrtf(vi) / p.bc2_sqrt + p.eps);
}

extern "C" __global__ void write_weight_f16(u16* w, const float* src, ElementwiseParams p) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) w[i] = f32_to_f16(src[i]);
}

extern "C" __global__ void write_weight_bf16(u16* w, const float* src, ElementwiseParams p) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.n) w[i] = f32_to_bf16(src[i]);
}
