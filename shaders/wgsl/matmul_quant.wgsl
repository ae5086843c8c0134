// matmul_quant: out[r, col0 + o] = sum_i x[r, i] * w[o, i] for weights in GGUF block formats
// (override QTYPE: 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q4_K, 4 Q6_K), decoded in the kernel exactly as
// src/quant_blocks.rs does, f32 accumulation. The raw GGUF bytes are bound as u32 words; blocks
// of 34, 18 or 210 bytes start on any even byte, so reads go through byte-offset helpers.
// Every format is read in octets: values 8p..8p+8 of a 32-value unit u (a whole Q8_0 / Q4_0 /
// Q4_1 block, or one of the eight 32-value sub-blocks of a Q4_K / Q6_K super-block); decode8
// returns one octet with its scales applied. Same decomposition as matmul.wgsl:
//   matvec (decode): a team of TEAM threads per output feature walks the row's octets (adjacent
//     lanes read adjacent bytes), each octet feeding up to 4 input rows; workgroup reduction.
//   tiled (prefill): 64x64 output tile per workgroup, 16-deep slices (two octets per weight row)
//     decoded once into workgroup memory and reused by all 64 rows; 4x4 outputs per thread.
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
    let i = b >> 2u;
    let s = (b & 3u) * 8u;
    if (s == 0u) {
        return w[i];
    }
    return (w[i] >> s) | (w[i + 1u] << (32u - s));
}

fn byte_at(b: u32) -> u32 {
    return (w[b >> 2u] >> ((b & 3u) * 8u)) & 0xffu;
}

// The f16 at even byte b.
fn f16_at(b: u32) -> f32 {
    return unpack2x16float(w[b >> 2u])[(b >> 1u) & 1u];
}

// Byte j (0..8) of the 8 bytes (lo, hi).
fn byte8(lo: u32, hi: u32, j: u32) -> u32 {
    return (select(lo, hi, j >= 4u) >> ((j % 4u) * 8u)) & 0xffu;
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
    var v: array<f32, 8>;
    if (QTYPE == 0u) {
        let base = rb + u * 34u;
        let d = f16_at(base);
        let lo = word_at(base + 2u + 8u * p);
        let hi = word_at(base + 6u + 8u * p);
        for (var j = 0u; j < 8u; j++) {
            let q = bitcast<i32>(byte8(lo, hi, j) << 24u) >> 24u;
            v[j] = f32(q) * d;
        }
    } else if (QTYPE == 1u || QTYPE == 2u) {
        // Byte j holds value j (low nibble) and j + 16 (high nibble).
        let base = rb + u * BLOCK_BYTES;
        let d = f16_at(base);
        let qb = base + select(2u, 4u, QTYPE == 2u) + 8u * (p % 2u);
        let lo = word_at(qb);
        let hi = word_at(qb + 4u);
        let shift = 4u * (p / 2u);
        if (QTYPE == 1u) {
            for (var j = 0u; j < 8u; j++) {
                v[j] = f32(i32((byte8(lo, hi, j) >> shift) & 15u) - 8) * d;
            }
        } else {
            let m = f16_at(base + 2u);
            for (var j = 0u; j < 8u; j++) {
                v[j] = f32((byte8(lo, hi, j) >> shift) & 15u) * d + m;
            }
        }
    } else if (QTYPE == 3u) {
        // Sub-block j of the super-block: 32 bytes of group j / 2, low nibbles for even j.
        let base = rb + (u / 8u) * 144u;
        let j = u % 8u;
        let sm = scale_min_k4(base + 4u, j);
        let d = f16_at(base) * sm.x;
        let mn = f16_at(base + 2u) * sm.y;
        let qb = base + 16u + 32u * (j / 2u) + 8u * p;
        let lo = word_at(qb);
        let hi = word_at(qb + 4u);
        let shift = 4u * (j % 2u);
        for (var i = 0u; i < 8u; i++) {
            v[i] = d * f32((byte8(lo, hi, i) >> shift) & 15u) - mn;
        }
    } else {
        // Q6_K: half n = j / 4 of the super-block, quarter qq = j % 4 (nibble and qh bits).
        let base = rb + (u / 8u) * 210u;
        let j = u % 8u;
        let n = j / 4u;
        let qq = j % 4u;
        let l0 = 8u * p;
        let qlb = base + 64u * n + 32u * (qq % 2u) + l0;
        let qhb = base + 128u + 32u * n + l0;
        let ql_lo = word_at(qlb);
        let ql_hi = word_at(qlb + 4u);
        let qh_lo = word_at(qhb);
        let qh_hi = word_at(qhb + 4u);
        let sc = bitcast<i32>(byte_at(base + 192u + 8u * n + l0 / 16u + 2u * qq) << 24u) >> 24u;
        let d = f16_at(base + 208u) * f32(sc);
        for (var i = 0u; i < 8u; i++) {
            let low = (byte8(ql_lo, ql_hi, i) >> (4u * (qq / 2u))) & 15u;
            let high = (byte8(qh_lo, qh_hi, i) >> (2u * qq)) & 3u;
            v[i] = d * f32(i32(low | (high << 4u)) - 32);
        }
    }
    return array<vec4<f32>, 2>(vec4<f32>(v[0], v[1], v[2], v[3]), vec4<f32>(v[4], v[5], v[6], v[7]));
}

var<workgroup> partial: array<vec4<f32>, TEAM * TEAMS>;

@compute @workgroup_size(TEAM * TEAMS)
fn matvec(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let lane = lid % TEAM;
    let o = wg.x * TEAMS + lid / TEAM;
    let r0 = wg.y * 4u;
    let k = params.k;
    let nr = min(params.rows - r0, 4u);
    let row_bytes = (k / BLOCK_ELEMS) * BLOCK_BYTES;
    var acc = vec4<f32>(0.0);
    if (o < params.n) {
        for (var c = lane; c < k / 8u; c += TEAM) {
            let wf = decode8(o * row_bytes, c / 4u, c % 4u);
            for (var j = 0u; j < nr; j++) {
                let xb = ((r0 + j) * k) / 4u + 2u * c;
                acc[j] += dot(wf[0], x[xb]) + dot(wf[1], x[xb + 1u]);
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
    let row_bytes = (k / BLOCK_ELEMS) * BLOCK_BYTES;
    let sr = lid / 4u;
    let sk = (lid % 4u) * 4u;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < k; k0 += BK) {
        var xv = vec4<f32>(0.0);
        if (m0 + sr < params.rows) {
            xv = x[((m0 + sr) * k + k0 + sk) / 4u];
        }
        for (var j = 0u; j < 4u; j++) {
            xs[(sk + j) * 16u + sr / 4u][sr % 4u] = xv[j];
        }
        // 128 threads each decode one octet: feature lid / 2, values k0 + 8 * (lid % 2) ...
        if (lid < 128u) {
            let f = lid / 2u;
            let ko = (lid % 2u) * 8u;
            var wf = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
            if (n0 + f < params.n) {
                let e = k0 + ko;
                wf = decode8((n0 + f) * row_bytes, e / 32u, (e % 32u) / 8u);
            }
            for (var j = 0u; j < 8u; j++) {
                ws[(ko + j) * 16u + f / 4u][f % 4u] = wf[j / 4u][j % 4u];
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
