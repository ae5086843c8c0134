// embedding_quant: out[t, :] = table[tokens[t], :] for tables in GGUF block formats (override
// QTYPE: 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q4_K, 4 Q6_K), decoded as src/quant_blocks.rs does.
// One thread per (token, octet of 8 values); the decoding helpers are the ones of
// matmul_quant.wgsl (octet p of 32-value unit u, byte-offset reads of the raw GGUF bytes).
// Chunked tables and bad token ids behave as in embedding.wgsl: rows [row0, row0 + chunk_rows)
// are bound, and an id at or past the vocabulary gives a NaN row.

struct Params {
    n_tokens: u32,
    dim: u32,
    row0: u32,
    chunk_rows: u32,
    vocab: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override QTYPE: u32 = 0u;
override WG: u32 = 256u;
override BLOCK_ELEMS: u32 = select(32u, 256u, QTYPE >= 3u);
override BLOCK_BYTES: u32 = select(select(select(select(34u, 18u, QTYPE == 1u), 20u, QTYPE == 2u), 144u, QTYPE == 3u), 210u, QTYPE == 4u);

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<u32>;
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

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wg.y * nwg.x + wg.x) * WG + lid;
    let dim = params.dim;
    let octets = dim / 8u;
    if (g >= params.n_tokens * octets) {
        return;
    }
    let t = g / octets;
    let c = g % octets;
    let id = tokens[t];
    let o = t * dim + 8u * c;
    if (id >= params.vocab) {
        if (params.row0 == 0u) {
            for (var j = 0u; j < 8u; j++) {
                out[o + j] = bitcast<f32>(0x7fc00000u | (id & 0u));
            }
        }
        return;
    }
    if (id < params.row0 || id - params.row0 >= params.chunk_rows) {
        return;
    }
    let row_bytes = (dim / BLOCK_ELEMS) * BLOCK_BYTES;
    let v = decode8((id - params.row0) * row_bytes, c / 4u, c % 4u);
    for (var j = 0u; j < 8u; j++) {
        out[o + j] = v[j / 4u][j % 4u];
    }
}
