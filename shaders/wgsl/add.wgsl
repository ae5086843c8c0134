// add: x[i] += alpha * y[i]: the residual stream update (alpha 1, where 1 * y is y exactly)
// and a LoRA adapter's scaled output added into its projection's (alpha = the adapter's scale).
// One thread per element over a 2D grid of 1D workgroups.

struct Params {
    n: u32,
    alpha: f32,
    _pad0: u32,
    _pad1: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> y: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wg.y * nwg.x + wg.x) * WG + lid;
    if (g < params.n) {
        x[g] += params.alpha * y[g];
    }
}
