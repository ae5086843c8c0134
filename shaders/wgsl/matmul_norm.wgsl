// matmul_norm: decode mat-vecs with the input's RMSNorm folded in, appended by the backend to a
// weight-storage file (matmul.wgsl, matmul_f16.wgsl, matmul_quant.wgsl) whose w_octet reads the
// weights. With h = x * g and inv[r] = 1 / sqrt(mean(x[r]^2) + eps), rms_norm(x) . w^T is
// inv[r] * (h . w^T), so each workgroup first stages h for its rows (up to 4) in workgroup
// memory, summing the squares of x on the way, then runs the mat-vec of matmul_plain.wgsl over
// the staged rows (a team of TEAM threads per output feature, octets of 8 weights feeding 4
// rows, team sums reduced in workgroup memory) and scales the sums by inv in the epilogue.
//   matvec_qkv: q, k, v = rms_norm(x) . (wq, wk, wv)^T. Workgroups cover the features of wq,
//     then of wk, then of wv (TEAMS per workgroup, each matrix starting a new workgroup), so a
//     workgroup reads one matrix: w_word reads the one w_mat names (WGSL cannot pass a buffer
//     to a function, so the storage file's reader reaches the three bindings through it).
//   matvec_gate_up (_bias): out = silu(h . w1^T + b1) * (h . w3^T + b3): each team reads the
//     gate row of its feature, then its up row.
// STAGE floats of workgroup memory hold the staged rows, each padded with zeros to a multiple
// of 8 values; a workgroup takes min(4, STAGE / padded k) rows (the host picks the same).

struct Params {
    rows: u32,
    k: u32,
    n0: u32,
    n1: u32,
    n2: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
}

override TEAM: u32 = 32u;
override TEAMS: u32 = 8u;
override STAGE: u32 = 2048u;

@group(0) @binding(0) var<uniform> params: Params;
// Weight matrices 0, 1, 2 (q, k, v or gate, up, up again) and the norm weight g [k].
@group(0) @binding(3) var<storage, read> w: array<WWord>;
@group(0) @binding(4) var<storage, read> w_b: array<WWord>;
@group(0) @binding(5) var<storage, read> w_c: array<WWord>;
@group(0) @binding(6) var<storage, read> norm: array<f32>;
// matvec_qkv: the k and v outputs (q is `out`).
@group(0) @binding(7) var<storage, read_write> out_b: array<f32>;
@group(0) @binding(8) var<storage, read_write> out_c: array<f32>;
// matvec_gate_up_bias: b1 and b3.
@group(0) @binding(9) var<storage, read> bias_a: array<f32>;
@group(0) @binding(10) var<storage, read> bias_b: array<f32>;

// The matrix w_word reads: 0 (w), 1 (w_b) or 2 (w_c).
var<private> w_mat: u32;

fn w_word(i: u32) -> WWord {
    if (w_mat == 1u) {
        return w_b[i];
    }
    if (w_mat == 2u) {
        return w_c[i];
    }
    return w[i];
}

var<workgroup> partial: array<vec4<f32>, TEAM * TEAMS>;
var<workgroup> staged: array<vec4<f32>, STAGE / 4u>;

// Staged floats per row: k padded to whole octets.
fn stride() -> u32 {
    return (params.k + 7u) / 8u * 8u;
}

// Input rows per workgroup.
fn group_rows() -> u32 {
    return min(4u, STAGE / stride());
}

// Stages h = x * g of rows r0..r0+nr and returns inv of each (components past nr: unused).
// The whole workgroup calls it.
fn stage_normed(lid: u32, r0: u32, nr: u32) -> vec4<f32> {
    let quads = stride() / 4u;
    var ss = vec4<f32>(0.0);
    for (var r = 0u; r < nr; r++) {
        for (var j = lid; j < quads; j += TEAM * TEAMS) {
            let e = 4u * j;
            let v = x_quad(r0 + r, e);
            var g = vec4<f32>(0.0);
            for (var c = 0u; c < 4u; c++) {
                if (e + c < params.k) {
                    g[c] = norm[e + c];
                }
            }
            ss[r] += dot(v, v);
            staged[r * quads + j] = v * g;
        }
    }
    partial[lid] = ss;
    for (var s = TEAM * TEAMS / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            partial[lid] += partial[lid + s];
        }
    }
    workgroupBarrier();
    let total = partial[0];
    // Every thread has read partial[0] before partial is reused.
    workgroupBarrier();
    return 1.0 / sqrt(total / f32(params.k) + params.eps);
}

// Staged inputs e..e+4 of row r (zero for rows past nr).
fn staged_quad(r: u32, nr: u32, e: u32) -> vec4<f32> {
    if (r >= nr) {
        return vec4<f32>(0.0);
    }
    return staged[r * (stride() / 4u) + e / 4u];
}

// The octet's dot product with staged row r at e..e+8.
fn hdot(wv: array<vec4<f32>, 2>, r: u32, nr: u32, e: u32) -> f32 {
    return dot(wv[0], staged_quad(r, nr, e)) + dot(wv[1], staged_quad(r, nr, e + 4u));
}

// This lane's share of feature o of matrix w_mat against the staged rows.
fn lane_dots(o: u32, lane: u32, nr: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var e = 8u * lane; e < params.k; e += 8u * TEAM) {
        let wv = w_octet(o, e);
        acc += vec4<f32>(hdot(wv, 0u, nr, e), hdot(wv, 1u, nr, e), hdot(wv, 2u, nr, e), hdot(wv, 3u, nr, e));
    }
    return acc;
}

// The team's total of acc (valid in lane 0). The whole workgroup calls it; a second call
// needs a workgroupBarrier before it.
fn team_sum(lid: u32, lane: u32, acc: vec4<f32>) -> vec4<f32> {
    partial[lid] = acc;
    for (var s = TEAM / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lane < s) {
            partial[lid] += partial[lid + s];
        }
    }
    return partial[lid];
}

@compute @workgroup_size(TEAM * TEAMS)
fn matvec_qkv(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % TEAM;
    let r0 = wg.y * group_rows();
    let nr = min(params.rows - r0, group_rows());
    let inv = stage_normed(lid, r0, nr);
    // The workgroup's matrix m, its height n and its first workgroup.
    let g0 = (params.n0 + TEAMS - 1u) / TEAMS;
    let g1 = g0 + (params.n1 + TEAMS - 1u) / TEAMS;
    var m = 0u;
    var n = params.n0;
    var first = 0u;
    if (wg.x >= g1) {
        m = 2u;
        n = params.n2;
        first = g1;
    } else if (wg.x >= g0) {
        m = 1u;
        n = params.n1;
        first = g0;
    }
    let o = (wg.x - first) * TEAMS + lid / TEAM;
    // One loop per matrix, each with a constant w_mat, so that w_word's choice can be resolved
    // outside the loop.
    var acc = vec4<f32>(0.0);
    if (o < n) {
        if (m == 0u) {
            w_mat = 0u;
            acc = lane_dots(o, lane, nr);
        } else if (m == 1u) {
            w_mat = 1u;
            acc = lane_dots(o, lane, nr);
        } else {
            w_mat = 2u;
            acc = lane_dots(o, lane, nr);
        }
    }
    let t = team_sum(lid, lane, acc) * inv;
    if (lane == 0u && o < n) {
        for (var r = 0u; r < nr; r++) {
            let i = (r0 + r) * n + o;
            if (m == 0u) {
                out[i] = t[r];
            } else if (m == 1u) {
                out_b[i] = t[r];
            } else {
                out_c[i] = t[r];
            }
        }
    }
}

// out[r, o] = silu(gate + b.x) * (up + b.y) for the workgroup's features.
fn gate_up(wg: vec3<u32>, lid: u32, b: vec2<f32>) {
    let lane = lid % TEAM;
    let r0 = wg.y * group_rows();
    let nr = min(params.rows - r0, group_rows());
    let inv = stage_normed(lid, r0, nr);
    let o = wg.x * TEAMS + lid / TEAM;
    var gs = vec4<f32>(0.0);
    var us = vec4<f32>(0.0);
    if (o < params.n0) {
        // The gate row, then the up row: one matrix per loop, so that w_word's choice is a
        // constant inside each (switching matrices inside one loop ran at half the bandwidth
        // of the plain mat-vec on an 8B shape).
        w_mat = 0u;
        gs = lane_dots(o, lane, nr);
        w_mat = 1u;
        us = lane_dots(o, lane, nr);
    }
    let g = team_sum(lid, lane, gs) * inv + b.x;
    workgroupBarrier();
    let u = team_sum(lid, lane, us) * inv + b.y;
    if (lane == 0u && o < params.n0) {
        for (var r = 0u; r < nr; r++) {
            out[(r0 + r) * params.n0 + o] = g[r] / (1.0 + exp(-g[r])) * u[r];
        }
    }
}

@compute @workgroup_size(TEAM * TEAMS)
fn matvec_gate_up(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    gate_up(wg, lid, vec2<f32>(0.0));
}

@compute @workgroup_size(TEAM * TEAMS)
fn matvec_gate_up_bias(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = wg.x * TEAMS + lid / TEAM;
    var b = vec2<f32>(0.0);
    if (o < params.n0) {
        b = vec2<f32>(bias_a[o], bias_b[o]);
    }
    gate_up(wg, lid, b);
}
