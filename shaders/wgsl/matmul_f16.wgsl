// matmul_f16: out[r, col0 + o] = sum_i x[r, i] * w[o, i] for f16 weights on adapters with
// SHADER_F16: the weights are read as native f16 (16 bytes = one mat2x4<f16> = 8 values) and
// converted to f32, instead of unpacked from u32 words as in matmul.wgsl (the portable path,
// which also documents the decomposition of both entry points):
//   matvec (decode): a team of TEAM threads per output feature, 16-byte loads, each weight word
//     used for up to 4 input rows, team sums reduced in workgroup memory.
//   tiled (prefill): 64x64 output tile per workgroup, 16-deep slices staged in workgroup
//     memory, 4x4 outputs per thread.
// Rows whose length is not a multiple of 8 take a scalar path. Accumulation is f32.

enable f16;

struct Params {
    rows: u32,
    n: u32,
    k: u32,
    out_stride: u32,
    col0: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override TEAM: u32 = 32u;
override TEAMS: u32 = 8u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> w: array<mat2x4<f16>>;

// Eight weights (one 16-byte word) as two vec4<f32>.
fn widen8(i: u32) -> array<vec4<f32>, 2> {
    let m = w[i];
    return array<vec4<f32>, 2>(vec4<f32>(m[0]), vec4<f32>(m[1]));
}

// Weight element e of the bound chunk (any alignment).
fn w_at(e: u32) -> f32 {
    return f32(w[e / 8u][(e / 4u) % 2u][e % 4u]);
}

fn x_at(e: u32) -> f32 {
    return x[e / 4u][e % 4u];
}

var<workgroup> partial: array<vec4<f32>, TEAM * TEAMS>;

@compute @workgroup_size(TEAM * TEAMS)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % TEAM;
    let o = wg.x * TEAMS + lid / TEAM;
    let r0 = wg.y * 4u;
    let k = params.k;
    let nr = min(params.rows - r0, 4u);
    var acc = vec4<f32>(0.0);
    if (o < params.n) {
        if (k % 8u == 0u) {
            let words = k / 8u;
            let kx = k / 4u;
            for (var c = lane; c < words; c += TEAM) {
                let wf = widen8(o * words + c);
                for (var j = 0u; j < nr; j++) {
                    let xb = (r0 + j) * kx + 2u * c;
                    acc[j] += dot(wf[0], x[xb]) + dot(wf[1], x[xb + 1u]);
                }
            }
        } else {
            for (var i = lane; i < k; i += TEAM) {
                let wf = w_at(o * k + i);
                for (var j = 0u; j < nr; j++) {
                    acc[j] += wf * x_at((r0 + j) * k + i);
                }
            }
        }
    }
    partial[lid] = acc;
    for (var s = TEAM / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lane < s) {
            partial[lid] += partial[lid + s];
        }
    }
    if (lane == 0u && o < params.n) {
        let total = partial[lid];
        for (var j = 0u; j < nr; j++) {
            out[(r0 + j) * params.out_stride + params.col0 + o] = total[j];
        }
    }
}

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
var<workgroup> xs: array<vec4<f32>, 256>;
var<workgroup> ws: array<vec4<f32>, 256>;

@compute @workgroup_size(256)
fn tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    let m0 = wg.y * BM;
    let n0 = wg.x * BN;
    let k = params.k;
    let aligned = k % 8u == 0u;
    let sr = lid / 4u;
    let sk = (lid % 4u) * 4u;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < k; k0 += BK) {
        var xv = vec4<f32>(0.0);
        let gm = m0 + sr;
        if (gm < params.rows) {
            if (aligned) {
                if (k0 + sk < k) {
                    xv = x[(gm * k + k0 + sk) / 4u];
                }
            } else {
                for (var j = 0u; j < 4u; j++) {
                    if (k0 + sk + j < k) {
                        xv[j] = x_at(gm * k + k0 + sk + j);
                    }
                }
            }
        }
        for (var j = 0u; j < 4u; j++) {
            xs[(sk + j) * 16u + sr / 4u][sr % 4u] = xv[j];
        }
        if (aligned) {
            if (lid < 128u) {
                let f = lid / 2u;
                let ko = (lid % 2u) * 8u;
                let gf = n0 + f;
                var wf = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
                if (gf < params.n && k0 + ko < k) {
                    wf = widen8((gf * k + k0 + ko) / 8u);
                }
                for (var j = 0u; j < 8u; j++) {
                    ws[(ko + j) * 16u + f / 4u][f % 4u] = wf[j / 4u][j % 4u];
                }
            }
        } else {
            var wv = vec4<f32>(0.0);
            let gf = n0 + sr;
            if (gf < params.n) {
                for (var j = 0u; j < 4u; j++) {
                    if (k0 + sk + j < k) {
                        wv[j] = w_at(gf * k + k0 + sk + j);
                    }
                }
            }
            for (var j = 0u; j < 4u; j++) {
                ws[(sk + j) * 16u + sr / 4u][sr % 4u] = wv[j];
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = xs[kk * 16u + ty];
            let b = ws[kk * 16u + tx];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + ty * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let nn = n0 + tx * 4u + j;
            if (m < params.rows && nn < params.n) {
                out[m * params.out_stride + params.col0 + nn] = acc[i][j];
            }
        }
    }
}
