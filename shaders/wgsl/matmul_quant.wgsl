// matmul_quant: out[r, col0 + o] = sum_i x[r, i] * w[o, i] for weights in GGUF block formats
// (override QTYPE: 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q4_K, 4 Q6_K), decoded in the kernel exactly as
// src/quant_blocks.rs does, f32 accumulation. The raw GGUF bytes are bound as u32 words; blocks
// of 34, 18 or 210 bytes start on any even byte, so reads go through byte-offset helpers.
// Every format is read in octets: values 8p..8p+8 of a 32-value unit u (a whole Q8_0 / Q4_0 /
// Q4_1 block, or one of the eight 32-value sub-blocks of a Q4_K / Q6_K super-block); decode8
// returns one octet with its scales applied. The kernels are those of matmul.wgsl:
//   matvec (decode, few rows): a team of TEAM threads owns one output feature and walks its row
//     in octets of 8 weights (16-byte loads for 16-bit weights), each octet feeding up to 4
//     input rows (grid y picks which 4); the team's sums are reduced in workgroup memory.
//   tiled (prefill, many rows): one 64 x 128 output tile per workgroup; 16-deep slices of x and
//     of the weights (widened once, reused by all 64 rows) are staged in workgroup memory; every
//     thread accumulates 4 x 8 outputs in registers.
// Rows are a whole number of blocks, so k is a multiple of 32 (of 256 for the K formats).

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

override QTYPE: u32 = 0u;
override TEAM: u32 = 32u;
override TEAMS: u32 = 8u;
override BLOCK_ELEMS: u32 = select(32u, 256u, QTYPE >= 3u);
override BLOCK_BYTES: u32 = select(select(select(select(34u, 18u, QTYPE == 1u), 20u, QTYPE == 2u), 144u, QTYPE == 3u), 210u, QTYPE == 4u);

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> w: array<u32>;

// Four bytes starting at byte b (any alignment), little-endian.
fn word_at(b: u32) -> u32 {
    let i = b / 4u;
    let s = (b % 4u) * 8u;
    return select((w[i] >> s) | (w[i + 1u] << (32u - s)), w[i], s == 0u);
}

fn byte_at(b: u32) -> u32 {
    return (w[b >> 2u] >> ((b & 3u) * 8u)) & 0xffu;
}

// The f16 at even byte b.
fn f16_at(b: u32) -> f32 {
    return unpack2x16float(w[b >> 2u])[(b >> 1u) & 1u];
}

// Q4_K: 6-bit scale and min of sub-block j from the 12 packed bytes at s.
fn scale_min_k4(s: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(byte_at(s + j) & 63u), f32(byte_at(s + j + 4u) & 63u));
    }
    let sc = (byte_at(s + j + 4u) & 15u) | ((byte_at(s + j - 4u) >> 6u) << 4u);
    let mn = (byte_at(s + j + 4u) >> 4u) | ((byte_at(s + j) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

// Values 8p..8p+8 of 32-value unit u of the row starting at byte rb.
fn decode8(rb: u32, u: u32, p: u32) -> array<vec4<f32>, 2> {
    if (QTYPE == 0u) {
        let base = rb + u * 34u;
        let d = f16_at(base);
        let b = base + 2u + 8u * p;
        return array<vec4<f32>, 2>(vec4<f32>(unpack4xI8(word_at(b))) * d, vec4<f32>(unpack4xI8(word_at(b + 4u))) * d);
    }
    if (QTYPE == 1u || QTYPE == 2u) {
        // Byte j holds value j (low nibble) and j + 16 (high nibble).
        let base = rb + u * BLOCK_BYTES;
        let d = f16_at(base);
        let b = base + select(2u, 4u, QTYPE == 2u) + 8u * (p % 2u);
        let shift = 4u * (p / 2u);
        let lo = vec4<f32>(unpack4xU8((word_at(b) >> shift) & 0x0f0f0f0fu));
        let hi = vec4<f32>(unpack4xU8((word_at(b + 4u) >> shift) & 0x0f0f0f0fu));
        if (QTYPE == 1u) {
            return array<vec4<f32>, 2>((lo - 8.0) * d, (hi - 8.0) * d);
        }
        let m = f16_at(base + 2u);
        return array<vec4<f32>, 2>(lo * d + m, hi * d + m);
    }
    if (QTYPE == 3u) {
        // Sub-block j of the super-block: 32 bytes of group j / 2, low nibbles for even j.
        let base = rb + (u / 8u) * 144u;
        let j = u % 8u;
        let sm = scale_min_k4(base + 4u, j);
        let d = f16_at(base) * sm.x;
        let mn = f16_at(base + 2u) * sm.y;
        let b = base + 16u + 32u * (j / 2u) + 8u * p;
        let shift = 4u * (j % 2u);
        let lo = vec4<f32>(unpack4xU8((word_at(b) >> shift) & 0x0f0f0f0fu));
        let hi = vec4<f32>(unpack4xU8((word_at(b + 4u) >> shift) & 0x0f0f0f0fu));
        return array<vec4<f32>, 2>(d * lo - mn, d * hi - mn);
    }
    // Q6_K: half n = j / 4 of the super-block, quarter qq = j % 4 (nibble and qh bits).
    let base = rb + (u / 8u) * 210u;
    let j = u % 8u;
    let n = j / 4u;
    let qq = j % 4u;
    let qlb = base + 64u * n + 32u * (qq % 2u) + 8u * p;
    let qhb = base + 128u + 32u * n + 8u * p;
    let sc = bitcast<i32>(byte_at(base + 192u + 8u * n + p / 2u + 2u * qq) << 24u) >> 24u;
    let d = f16_at(base + 208u) * f32(sc);
    let ls = 4u * (qq / 2u);
    let hs = 2u * qq;
    let lo = unpack4xU8((word_at(qlb) >> ls) & 0x0f0f0f0fu) | (unpack4xU8((word_at(qhb) >> hs) & 0x03030303u) << vec4<u32>(4u));
    let hi = unpack4xU8((word_at(qlb + 4u) >> ls) & 0x0f0f0f0fu) | (unpack4xU8((word_at(qhb + 4u) >> hs) & 0x03030303u) << vec4<u32>(4u));
    return array<vec4<f32>, 2>(d * vec4<f32>(vec4<i32>(lo) - 32), d * vec4<f32>(vec4<i32>(hi) - 32));
}


// Weights e..e+8 of feature f of the bound chunk (rows are whole blocks: e + 8 <= k).
fn w_octet(f: u32, e: u32) -> array<vec4<f32>, 2> {
    let row_bytes = (params.k / BLOCK_ELEMS) * BLOCK_BYTES;
    return decode8(f * row_bytes, e / 32u, (e % 32u) / 8u);
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

// x[m, e..e+4], zero past the rows (k is a multiple of 32: quads never straddle it).
fn x_quad(m: u32, e: u32) -> vec4<f32> {
    if (m >= params.rows || e >= params.k) {
        return vec4<f32>(0.0);
    }
    return x[(m * params.k + e) / 4u];
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
