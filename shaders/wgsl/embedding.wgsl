// embedding: out[t, :] = table[tokens[t], :] widened to f32.
// One thread per output element (t, i), over a 2D grid of 1D workgroups. The table is f32, f16
// or bf16 (override DTYPE = 0 / 1 / 2), bound as u32 words; 16-bit values sit two per word,
// element 2j in the low half (f16 widened by unpack2x16float, bf16 by a 16-bit shift).
// Tables over one storage binding are bound in row chunks [row0, row0 + chunk_rows), one dispatch
// each; a token outside the chunk is written by the dispatch whose chunk holds it. A token id at
// or past the vocabulary gives a NaN row, so a bad id shows up in the logits instead of passing
// silently (the host cannot check ids that were sampled on the device).

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

override DTYPE: u32 = 0u;
override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> tokens: array<u32>;
@group(0) @binding(3) var<storage, read> table: array<u32>;

// Element e of the bound chunk, widened.
fn widen(e: u32) -> f32 {
    if (DTYPE == 0u) {
        return bitcast<f32>(table[e]);
    }
    let word = table[e >> 1u];
    if (DTYPE == 1u) {
        return unpack2x16float(word)[e & 1u];
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, (e & 1u) == 1u));
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = (wg.y * nwg.x + wg.x) * WG + lid;
    let dim = params.dim;
    if (g >= params.n_tokens * dim) {
        return;
    }
    let t = g / dim;
    let i = g % dim;
    let id = tokens[t];
    if (id >= params.vocab) {
        if (params.row0 == 0u) {
            out[g] = bitcast<f32>(0x7fc00000u | (id & 0u));
        }
        return;
    }
    if (id < params.row0 || id - params.row0 >= params.chunk_rows) {
        return;
    }
    out[g] = widen((id - params.row0) * dim + i);
}
