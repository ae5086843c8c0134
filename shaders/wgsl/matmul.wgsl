// matmul: out[r, col0 + o] = sum_i x[r, i] * w[o, i]   (out = x . w^T), f32 accumulation.
// Weights are f32, f16 or bf16 (override DTYPE = 0 / 1 / 2), bound as 16-byte words; 16-bit
// values sit two per u32, element 2j in the low half. f16 widens with unpack2x16float (portable:
// matmul_f16.wgsl is the variant for adapters with SHADER_F16), bf16 with a 16-bit shift (exact).
// Two entry points:
//   matvec (decode, few rows): a team of TEAM threads owns one output feature and strides over
//     the row in 16-byte loads; each weight word feeds up to 4 input rows (grid y picks which 4).
//     Teams reduce their partial sums through workgroup memory.
//   tiled (prefill, many rows): one 64x64 output tile per workgroup; 16-deep slices of x and w
//     are staged in workgroup memory (w widened once per slice and reused by all 64 rows); every
//     thread owns 4x4 outputs.
// Rows that are not a whole number of 16-byte words take a scalar path with element loads.
// Weights larger than one storage binding are bound in row chunks: col0 is the chunk's first
// output feature, out_stride the full output width.

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

override DTYPE: u32 = 0u;
override TEAM: u32 = 32u;
override TEAMS: u32 = 8u;
// Weight values per 16-byte word.
override PER_WORD: u32 = select(8u, 4u, DTYPE == 0u);

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;

fn widen2(word: u32) -> vec2<f32> {
    if (DTYPE == 1u) {
        return unpack2x16float(word);
    }
    return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
}

// Eight 16-bit weights of one word, as two vec4.
fn widen8(v: vec4<u32>) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(
        vec4<f32>(widen2(v.x), widen2(v.y)),
        vec4<f32>(widen2(v.z), widen2(v.w)),
    );
}

// Weight element e of the bound chunk (any alignment).
fn w_at(e: u32) -> f32 {
    if (DTYPE == 0u) {
        return bitcast<f32>(w[e >> 2u][e & 3u]);
    }
    let word = e >> 1u;
    return widen2(w[word >> 2u][word & 3u])[e & 1u];
}

fn x_at(e: u32) -> f32 {
    return x[e >> 2u][e & 3u];
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
        if (k % PER_WORD == 0u) {
            let words = k / PER_WORD;
            let kx = k / 4u;
            for (var c = lane; c < words; c += TEAM) {
                let wv = w[o * words + c];
                if (DTYPE == 0u) {
                    let wf = bitcast<vec4<f32>>(wv);
                    for (var j = 0u; j < nr; j++) {
                        acc[j] += dot(wf, x[(r0 + j) * kx + c]);
                    }
                } else {
                    let wf = widen8(wv);
                    for (var j = 0u; j < nr; j++) {
                        let xb = (r0 + j) * kx + 2u * c;
                        acc[j] += dot(wf[0], x[xb]) + dot(wf[1], x[xb + 1u]);
                    }
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
// Slices stored [kk][m / 4] and [kk][n / 4]: a thread reads one vec4 of each per kk.
var<workgroup> xs: array<vec4<f32>, 256>;
var<workgroup> ws: array<vec4<f32>, 256>;

@compute @workgroup_size(256)
fn tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let tx = lid % 16u;
    let ty = lid / 16u;
    let m0 = wg.y * BM;
    let n0 = wg.x * BN;
    let k = params.k;
    let aligned = k % PER_WORD == 0u;
    // Staging roles: x row / w feature `sr`, k offset `sk` (4 values per thread).
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
        if (aligned && DTYPE != 0u) {
            // 16-bit weights: 128 threads each widen one word of 8 values.
            if (lid < 128u) {
                let f = lid / 2u;
                let ko = (lid % 2u) * 8u;
                let gf = n0 + f;
                var wf = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
                if (gf < params.n && k0 + ko < k) {
                    wf = widen8(w[(gf * k + k0 + ko) / 8u]);
                }
                for (var j = 0u; j < 8u; j++) {
                    ws[(ko + j) * 16u + f / 4u][f % 4u] = wf[j / 4u][j % 4u];
                }
            }
        } else {
            var wv = vec4<f32>(0.0);
            let gf = n0 + sr;
            if (gf < params.n) {
                if (aligned) {
                    if (k0 + sk < k) {
                        wv = bitcast<vec4<f32>>(w[(gf * k + k0 + sk) / 4u]);
                    }
                } else {
                    for (var j = 0u; j < 4u; j++) {
                        if (k0 + sk + j < k) {
                            wv[j] = w_at(gf * k + k0 + sk + j);
                        }
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
