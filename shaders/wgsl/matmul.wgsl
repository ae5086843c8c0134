// matmul: the weight reader for f32, f16 and bf16 weights (override DTYPE = 0 / 1 / 2), bound
// as 16-byte words; 16-bit values sit two per u32, element 2j in the low half. f16 widens with
// unpack2x16float (portable: matmul_f16.wgsl is the variant for adapters with SHADER_F16), bf16
// with a 16-bit shift (exact). w_octet(o, e) returns weights e..e+8 of output feature o (zero
// past k; rows that are not a whole number of octets take a scalar path with element loads),
// x_quad(m, e) inputs e..e+4 of row m. The kernels that use them live in the part the backend
// appends to this file: matmul_plain.wgsl (mat-vec, residual mat-vec, tiled GEMM over one weight
// matrix) or matmul_norm.wgsl (mat-vecs with the input's RMSNorm folded in, over up to three
// matrices). That part declares the params block and the weight bindings and defines
// w_word(i), the i-th 16-byte word of the matrix being read; everything here reads through it.

alias WWord = vec4<u32>;

override DTYPE: u32 = 0u;

@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;

fn widen2(word: u32) -> vec2<f32> {
    if (DTYPE == 1u) {
        return unpack2x16float(word);
    }
    return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
}

// Eight 16-bit weights of one 16-byte word.
fn widen8(v: vec4<u32>) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(vec4<f32>(widen2(v.x), widen2(v.y)), vec4<f32>(widen2(v.z), widen2(v.w)));
}

// Weight element e of the bound chunk (any alignment).
fn w_at(e: u32) -> f32 {
    if (DTYPE == 0u) {
        return bitcast<f32>(w_word(e / 4u)[e % 4u]);
    }
    let word = e / 2u;
    return widen2(w_word(word / 4u)[word % 4u])[e % 2u];
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
        if (DTYPE == 0u) {
            return array<vec4<f32>, 2>(bitcast<vec4<f32>>(w_word(b / 4u)), bitcast<vec4<f32>>(w_word(b / 4u + 1u)));
        }
        return widen8(w_word(b / 8u));
    }
    return array<vec4<f32>, 2>(
        vec4<f32>(w_at(b), w_or_zero(b, e, 1u), w_or_zero(b, e, 2u), w_or_zero(b, e, 3u)),
        vec4<f32>(w_or_zero(b, e, 4u), w_or_zero(b, e, 5u), w_or_zero(b, e, 6u), w_or_zero(b, e, 7u)),
    );
}

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
