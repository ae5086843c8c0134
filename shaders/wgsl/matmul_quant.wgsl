// matmul_quant: the weight reader for GGUF block formats (override QTYPE: 0 Q8_0, 1 Q4_0,
// 2 Q4_1, 3 Q4_K, 4 Q6_K), decoded exactly as src/quant_blocks.rs does. The raw GGUF bytes are
// read as u32 words; blocks of 34, 18 or 210 bytes start on any even byte, so reads go through
// byte-offset helpers. Every format is read in octets: values 8p..8p+8 of a 32-value unit u (a
// whole Q8_0 / Q4_0 / Q4_1 block, or one of the eight 32-value sub-blocks of a Q4_K / Q6_K
// super-block); decode8 returns one octet with its scales applied. Same interface as
// matmul.wgsl: w_octet(o, e) returns weights e..e+8 of output feature o, x_quad(m, e) inputs
// e..e+4 of row m, for the kernels of the appended part (matmul_plain.wgsl or
// matmul_norm.wgsl), which declares the params block and the weight bindings and defines
// w_word(i), the i-th u32 of the matrix being read. Rows are a whole number of blocks, so k is
// a multiple of 32 (of 256 for the K formats).

alias WWord = u32;

override QTYPE: u32 = 0u;
override BLOCK_ELEMS: u32 = select(32u, 256u, QTYPE >= 3u);
override BLOCK_BYTES: u32 = select(select(select(select(34u, 18u, QTYPE == 1u), 20u, QTYPE == 2u), 144u, QTYPE == 3u), 210u, QTYPE == 4u);

@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;

// Four bytes starting at byte b (any alignment), little-endian.
fn word_at(b: u32) -> u32 {
    let i = b / 4u;
    let s = (b % 4u) * 8u;
    return select((w_word(i) >> s) | (w_word(i + 1u) << (32u - s)), w_word(i), s == 0u);
}

fn byte_at(b: u32) -> u32 {
    return (w_word(b >> 2u) >> ((b & 3u) * 8u)) & 0xffu;
}

// The f16 at even byte b.
fn f16_at(b: u32) -> f32 {
    return unpack2x16float(w_word(b >> 2u))[(b >> 1u) & 1u];
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

// x[m, e..e+4], zero past the rows (k is a multiple of 32: quads never straddle it).
fn x_quad(m: u32, e: u32) -> vec4<f32> {
    if (m >= params.rows || e >= params.k) {
        return vec4<f32>(0.0);
    }
    return x[(m * params.k + e) / 4u];
}
