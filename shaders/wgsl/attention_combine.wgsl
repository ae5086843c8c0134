// attention_combine: merges the per-split partials of attention_decode.wgsl into the output.
// One workgroup per (head, row); every thread reads the splits' (m, l), takes the global max M
// and then owns head dims lid, lid + WG, ...: out = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s.
// Splits past a row's context have l = 0 and add nothing.
// Partials: [row][head][split][head_dim + 2] (o..., m, l).

struct Params {
    rows: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    pos0: u32,
    kv_f16: u32,
    scale: f32,
    split_len: u32,
}

override WG: u32 = 128u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> partials: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let hd = params.head_dim;
    let h = wg.x;
    let r = wg.y;
    let n_splits = (params.pos0 + params.rows + params.split_len - 1u) / params.split_len;
    let stride = hd + 2u;
    let base = (r * params.n_heads + h) * n_splits * stride;
    var big = -1e30;
    for (var s = 0u; s < n_splits; s++) {
        if (partials[base + s * stride + hd + 1u] > 0.0) {
            big = max(big, partials[base + s * stride + hd]);
        }
    }
    var total = 0.0;
    for (var s = 0u; s < n_splits; s++) {
        let l = partials[base + s * stride + hd + 1u];
        if (l > 0.0) {
            total += exp(partials[base + s * stride + hd] - big) * l;
        }
    }
    let out_base = (r * params.n_heads + h) * hd;
    for (var d = lid; d < hd; d += WG) {
        var o = 0.0;
        for (var s = 0u; s < n_splits; s++) {
            let b = base + s * stride;
            let l = partials[b + hd + 1u];
            if (l > 0.0) {
                o += exp(partials[b + hd] - big) * partials[b + d];
            }
        }
        out[out_base + d] = o / total;
    }
}
