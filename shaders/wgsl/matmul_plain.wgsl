// matmul_plain: out[r, col0 + o] = sum_i x[r, i] * w[o, i]   (out = x . w^T), f32 accumulation,
// over one weight matrix. Appended by the backend to a weight-storage file (matmul.wgsl,
// matmul_f16.wgsl, matmul_quant.wgsl), whose w_octet / x_quad read the weights and inputs; this
// part binds the matrix and gives them w_word. Entry points:
//   matvec (decode, few rows): a team of TEAM threads owns one output feature and walks its row
//     in octets of 8 weights, each octet feeding up to 4 input rows (grid y picks which 4); one
//     row alone takes four octets per step (row_dot); the team's sums are reduced in workgroup
//     memory. matvec_add and matvec_add_bias are the same
//     kernel with the residual add in the epilogue: out[r, o] += sum (+ bias[o]), so that a
//     projection into the residual stream is one dispatch.
//   tiled (prefill, many rows): one 64 x 128 output tile per workgroup; 16-deep slices of x and
//     of the weights (widened once, reused by all 64 rows) are staged in workgroup memory; every
//     thread accumulates 4 x 8 outputs in registers.
// Weights larger than one storage binding are bound in row chunks: col0 is the chunk's first
// output feature, out_stride the full output width.

struct Params {
    rows: u32,
    n: u32,
    k: u32,
    out_stride: u32,
    col0: u32,
    accumulate: u32,
    _pad0: u32,
    _pad1: u32,
}

override TEAM: u32 = 32u;
override TEAMS: u32 = 8u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read> w: array<WWord>;
// matvec_add_bias only.
@group(0) @binding(4) var<storage, read> bias: array<f32>;

fn w_word(i: u32) -> WWord {
    return w[i];
}

var<workgroup> partial: array<vec4<f32>, TEAM * TEAMS>;

// The octet's dot product with x[r, e..e+8] (zero for rows past the matrix).
fn xdot(wv: array<vec4<f32>, 2>, r: u32, e: u32) -> f32 {
    return dot(wv[0], x_quad(r, e)) + dot(wv[1], x_quad(r, e + 4u));
}

// One input row (decode): the lane's octets of feature o dotted with x[0], four octets per
// iteration so that four weight loads are in flight per thread (at 8B shapes the k and v
// matrices make one workgroup per SM, and one load at a time left the memory system idle). The
// 4-row loop below would hold four octets of x per row, too many registers for this.
fn row_dot(o: u32, lane: u32) -> f32 {
    let step = 8u * TEAM;
    var s = vec4<f32>(0.0);
    var e = 8u * lane;
    for (; e + 3u * step < params.k; e += 4u * step) {
        let w0 = w_octet(o, e);
        let w1 = w_octet(o, e + step);
        let w2 = w_octet(o, e + 2u * step);
        let w3 = w_octet(o, e + 3u * step);
        s += vec4<f32>(xdot(w0, 0u, e), xdot(w1, 0u, e + step), xdot(w2, 0u, e + 2u * step), xdot(w3, 0u, e + 3u * step));
    }
    for (; e < params.k; e += step) {
        s.x += xdot(w_octet(o, e), 0u, e);
    }
    return s.x + s.y + s.z + s.w;
}

// The mat-vec of the workgroup's output features; lane 0 of each team stores its feature's
// sums for up to 4 rows: mode 0 writes them, 1 adds them to out, 2 adds them plus `b`.
fn matvec_rows(wg: vec3<u32>, lid: u32, mode: u32, b: f32) {
    let lane = lid % TEAM;
    let o = wg.x * TEAMS + lid / TEAM;
    let r0 = wg.y * 4u;
    let nr = min(params.rows - r0, 4u);
    var acc = vec4<f32>(0.0);
    if (o < params.n && params.rows == 1u) {
        acc.x = row_dot(o, lane);
    } else if (o < params.n) {
        for (var e = 8u * lane; e < params.k; e += 8u * TEAM) {
            let wv = w_octet(o, e);
            acc += vec4<f32>(xdot(wv, r0, e), xdot(wv, r0 + 1u, e), xdot(wv, r0 + 2u, e), xdot(wv, r0 + 3u, e));
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
        let t = partial[lid];
        let i = r0 * params.out_stride + params.col0 + o;
        put(i, t.x, mode, b);
        if (nr > 1u) {
            put(i + params.out_stride, t.y, mode, b);
        }
        if (nr > 2u) {
            put(i + 2u * params.out_stride, t.z, mode, b);
        }
        if (nr > 3u) {
            put(i + 3u * params.out_stride, t.w, mode, b);
        }
    }
}

fn put(i: u32, v: f32, mode: u32, b: f32) {
    if (mode == 0u) {
        out[i] = v;
    } else if (mode == 1u) {
        out[i] += v;
    } else {
        out[i] += v + b;
    }
}

@compute @workgroup_size(TEAM * TEAMS)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_rows(wg, lid, 0u, 0.0);
}

@compute @workgroup_size(TEAM * TEAMS)
fn matvec_add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    matvec_rows(wg, lid, 1u, 0.0);
}

@compute @workgroup_size(TEAM * TEAMS)
fn matvec_add_bias(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let o = wg.x * TEAMS + lid / TEAM;
    var b = 0.0;
    if (o < params.n) {
        b = bias[params.col0 + o];
    }
    matvec_rows(wg, lid, 2u, b);
}

const BM: u32 = 64u;
const BN: u32 = 128u;
const BK: u32 = 16u;
// Slices stored k-major, vec4 along m / n: xs[kk][m / 4] (16 x 16), ws[kk][n / 4] (16 x 32).
var<workgroup> xs: array<vec4<f32>, 256>;
var<workgroup> ws: array<vec4<f32>, 512>;

// Four outputs of row m from feature nb on (columns past n are skipped).
fn store4(m: u32, nb: u32, v: vec4<f32>) {
    let o = m * params.out_stride + params.col0 + nb;
    let n = select(0u, params.n, m < params.rows);
    if (nb < n) { out[o] = v.x; }
    if (nb + 1u < n) { out[o + 1u] = v.y; }
    if (nb + 2u < n) { out[o + 2u] = v.z; }
    if (nb + 3u < n) { out[o + 3u] = v.w; }
}

@compute @workgroup_size(256)
fn tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // Outputs: rows 4ty..4ty+4, features 4tx..4tx+4 and 64+4tx..64+4tx+4 of the tile.
    let tx = lid % 16u;
    let ty = lid / 16u;
    let m0 = wg.y * BM;
    let n0 = wg.x * BN;
    // Staging: x row xm, k offset xk (4 values); w feature wf, k offset wk (8 values).
    let xm = lid / 4u;
    let xk = (lid % 4u) * 4u;
    let wf = lid / 2u;
    let wk = (lid % 2u) * 8u;
    let xi = xk * 16u + xm / 4u;
    let xc = xm % 4u;
    let wi = wk * 32u + wf / 4u;
    let wc = wf % 4u;
    // c[2i] / c[2i + 1]: row 4ty + i, the low / high four features (constant indices only).
    var c: array<vec4<f32>, 8>;
    for (var k0 = 0u; k0 < params.k; k0 += BK) {
        let xv = x_quad(m0 + xm, k0 + xk);
        xs[xi][xc] = xv.x;
        xs[xi + 16u][xc] = xv.y;
        xs[xi + 32u][xc] = xv.z;
        xs[xi + 48u][xc] = xv.w;
        var wv = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
        if (n0 + wf < params.n && k0 + wk < params.k) {
            wv = w_octet(n0 + wf, k0 + wk);
        }
        ws[wi][wc] = wv[0].x;
        ws[wi + 32u][wc] = wv[0].y;
        ws[wi + 64u][wc] = wv[0].z;
        ws[wi + 96u][wc] = wv[0].w;
        ws[wi + 128u][wc] = wv[1].x;
        ws[wi + 160u][wc] = wv[1].y;
        ws[wi + 192u][wc] = wv[1].z;
        ws[wi + 224u][wc] = wv[1].w;
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = xs[kk * 16u + ty];
            let b0 = ws[kk * 32u + tx];
            let b1 = ws[kk * 32u + 16u + tx];
            c[0] += a.x * b0;
            c[1] += a.x * b1;
            c[2] += a.y * b0;
            c[3] += a.y * b1;
            c[4] += a.z * b0;
            c[5] += a.z * b1;
            c[6] += a.w * b0;
            c[7] += a.w * b1;
        }
        workgroupBarrier();
    }
    let m = m0 + 4u * ty;
    let lo = n0 + 4u * tx;
    store4(m, lo, c[0]);
    store4(m, lo + 64u, c[1]);
    store4(m + 1u, lo, c[2]);
    store4(m + 1u, lo + 64u, c[3]);
    store4(m + 2u, lo, c[4]);
    store4(m + 2u, lo + 64u, c[5]);
    store4(m + 3u, lo, c[6]);
    store4(m + 3u, lo + 64u, c[7]);
}
