// matmul_f16: out[r, col0 + o] = sum_i x[r, i] * w[o, i] for f16 weights on adapters with
// SHADER_F16: the weights are read as native f16 (16 bytes = one mat2x4<f16> = 8 values) and
// converted to f32, instead of unpacked from u32 words as in matmul.wgsl (the portable path).
// Accumulation is f32. Same kernels as matmul.wgsl:
//   matvec (decode, few rows): a team of TEAM threads owns one output feature and walks its row
//     in octets of 8 weights (16-byte loads for 16-bit weights), each octet feeding up to 4
//     input rows (grid y picks which 4); the team's sums are reduced in workgroup memory.
//   tiled (prefill, many rows): one 64 x 128 output tile per workgroup; 16-deep slices of x and
//     of the weights (widened once, reused by all 64 rows) are staged in workgroup memory; every
//     thread accumulates 4 x 8 outputs in registers.
// Rows that are not a whole number of octets take a scalar path with element loads. Weights
// larger than one storage binding are bound in row chunks: col0 is the chunk's first output
// feature, out_stride the full output width.

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

// Weight e + j of the row at element b, zero past k.
fn w_or_zero(b: u32, e: u32, j: u32) -> f32 {
    return select(0.0, w_at(b + j), e + j < params.k);
}

// Weights e..e+8 of feature f of the bound chunk (zero past k).
fn w_octet(f: u32, e: u32) -> array<vec4<f32>, 2> {
    let k = params.k;
    let b = f * k + e;
    if (k % 8u == 0u) {
        return widen8(b / 8u);
    }
    return array<vec4<f32>, 2>(
        vec4<f32>(w_at(b), w_or_zero(b, e, 1u), w_or_zero(b, e, 2u), w_or_zero(b, e, 3u)),
        vec4<f32>(w_or_zero(b, e, 4u), w_or_zero(b, e, 5u), w_or_zero(b, e, 6u), w_or_zero(b, e, 7u)),
    );
}

var<workgroup> partial: array<vec4<f32>, TEAM * TEAMS>;

// The octet's dot product with x[r, e..e+8] (zero for rows past the matrix).
fn xdot(wv: array<vec4<f32>, 2>, r: u32, e: u32) -> f32 {
    return dot(wv[0], x_quad(r, e)) + dot(wv[1], x_quad(r, e + 4u));
}

@compute @workgroup_size(TEAM * TEAMS)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % TEAM;
    let o = wg.x * TEAMS + lid / TEAM;
    let r0 = wg.y * 4u;
    let nr = min(params.rows - r0, 4u);
    var acc = vec4<f32>(0.0);
    if (o < params.n) {
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
        let b = r0 * params.out_stride + params.col0 + o;
        out[b] = t.x;
        if (nr > 1u) {
            out[b + params.out_stride] = t.y;
        }
        if (nr > 2u) {
            out[b + 2u * params.out_stride] = t.z;
        }
        if (nr > 3u) {
            out[b + 3u * params.out_stride] = t.w;
        }
    }
}

const BM: u32 = 64u;
const BN: u32 = 128u;
const BK: u32 = 16u;
// Slices stored k-major, vec4 along m / n: xs[kk][m / 4] (16 x 16), ws[kk][n / 4] (16 x 32).
var<workgroup> xs: array<vec4<f32>, 256>;
var<workgroup> ws: array<vec4<f32>, 512>;

// x[m, e..e+4], zero past the rows or k.
fn x_quad(m: u32, e: u32) -> vec4<f32> {
    let k = params.k;
    if (m >= params.rows || e >= k) {
        return vec4<f32>(0.0);
    }
    let b = m * k + e;
    if (k % 4u == 0u) {
        return x[b / 4u];
    }
    return vec4<f32>(x_at(b), select(0.0, x_at(b + 1u), e + 1u < k), select(0.0, x_at(b + 2u), e + 2u < k), select(0.0, x_at(b + 3u), e + 3u < k));
}

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
