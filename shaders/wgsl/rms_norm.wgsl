// rms_norm: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w.
// One workgroup per row (2D grid of workgroups for many rows): each thread sums the squares of
// a strided slice (four loads in flight per step: the row is one latency-bound pass), a tree
// reduction in workgroup memory gives the row's sum, then every thread scales its slice.

struct Params {
    rows: u32,
    dim: u32,
    eps: f32,
    _pad: u32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = wg.y * nwg.x + wg.x;
    if (r >= params.rows) {
        return;
    }
    let dim = params.dim;
    let base = r * dim;
    // Four elements per thread per step (independent loads in flight), then the tail.
    var sq = vec4<f32>(0.0);
    var i = lid;
    for (; i + 3u * WG < dim; i += 4u * WG) {
        let v = vec4<f32>(x[base + i], x[base + i + WG], x[base + i + 2u * WG], x[base + i + 3u * WG]);
        sq += v * v;
    }
    for (; i < dim; i += WG) {
        let v = x[base + i];
        sq.x += v * v;
    }
    let ss = sq.x + sq.y + sq.z + sq.w;
    red[lid] = ss;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            red[lid] += red[lid + s];
        }
    }
    workgroupBarrier();
    let inv = 1.0 / sqrt(red[0] / f32(dim) + params.eps);
    var j = lid;
    for (; j + 3u * WG < dim; j += 4u * WG) {
        let v = vec4<f32>(x[base + j], x[base + j + WG], x[base + j + 2u * WG], x[base + j + 3u * WG]);
        let g = vec4<f32>(w[j], w[j + WG], w[j + 2u * WG], w[j + 3u * WG]);
        let y = v * inv * g;
        out[base + j] = y.x;
        out[base + j + WG] = y.y;
        out[base + j + 2u * WG] = y.z;
        out[base + j + 3u * WG] = y.w;
    }
    for (; j < dim; j += WG) {
        out[base + j] = x[base + j] * inv * w[j];
    }
}
