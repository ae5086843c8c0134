// matmul_f16: the weight reader for f16 weights on adapters with SHADER_F16: the weights are read
// as native f16 (16 bytes = one mat2x4<f16> = 8 values) and converted to f32, instead of
// unpacked from u32 words as in matmul.wgsl (the portable path). Same interface as matmul.wgsl:
// w_octet(o, e) returns weights e..e+8 of output feature o (zero past k; rows that are not a
// whole number of octets take a scalar path with element loads), x_quad(m, e) inputs e..e+4 of
// row m, for the kernels of the appended part (matmul_plain.wgsl or matmul_norm.wgsl), which
// declares the params block and the weight bindings and defines w_word(i), the i-th 16-byte
// word of the matrix being read.

enable f16;

alias WWord = mat2x4<f16>;

@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;

// Eight weights (one 16-byte word) as two vec4<f32>.
fn widen8(i: u32) -> array<vec4<f32>, 2> {
    let m = w_word(i);
    return array<vec4<f32>, 2>(vec4<f32>(m[0]), vec4<f32>(m[1]));
}

// Weight element e of the bound chunk (any alignment).
fn w_at(e: u32) -> f32 {
    return f32(w_word(e / 8u)[(e / 4u) % 2u][e % 4u]);
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
