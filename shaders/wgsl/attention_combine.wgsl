// attention_combine: merges the per-split partials of attention_decode.wgsl into the output.
// One workgroup per (head, row): the threads reduce the splits' max score M and total weight
// L = sum_s e^(m_s - M) l_s in parallel, stage the split weights e^(m_s - M) in workgroup memory
// (CHUNK splits at a time), then each thread sums its head dims over the splits:
// out = sum_s e^(m_s - M) o_s / L. Splits past a row's context have l = 0 and add nothing.
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
override ROWS: bool = false;
const CHUNK: u32 = 1024u;
const MASKED: f32 = -1e30;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> partials: array<f32>;

var<workgroup> red: array<f32, WG>;
var<workgroup> weight: array<f32, CHUNK>;

// Max (is_max) or sum of v over the workgroup; every thread gets it.
fn reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    red[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            red[lid] = select(red[lid] + red[lid + s], max(red[lid], red[lid + s]), is_max);
        }
    }
    workgroupBarrier();
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let hd = params.head_dim;
    let h = wg.x;
    let r = wg.y;
    // ROWS (attention_decode.wgsl): pos0 holds the batch's longest context.
    let n_ctx = select(params.pos0 + params.rows, params.pos0, ROWS);
    let n_splits = (n_ctx + params.split_len - 1u) / params.split_len;
    let stride = hd + 2u;
    let base = (r * params.n_heads + h) * n_splits * stride;
    var big = MASKED;
    for (var s = lid; s < n_splits; s += WG) {
        let b = base + s * stride + hd;
        big = max(big, select(MASKED, partials[b], partials[b + 1u] > 0.0));
    }
    big = reduce(lid, big, true);
    var total = 0.0;
    for (var s = lid; s < n_splits; s += WG) {
        let b = base + s * stride + hd;
        let l = partials[b + 1u];
        total += select(0.0, exp(partials[b] - big) * l, l > 0.0);
    }
    total = reduce(lid, total, false);
    // Head dims lid and lid + WG (head_dim <= 2 * WG).
    var o0 = 0.0;
    var o1 = 0.0;
    for (var c0 = 0u; c0 < n_splits; c0 += CHUNK) {
        let c1 = min(c0 + CHUNK, n_splits);
        for (var s = c0 + lid; s < c1; s += WG) {
            let b = base + s * stride + hd;
            weight[s - c0] = select(0.0, exp(partials[b] - big), partials[b + 1u] > 0.0);
        }
        workgroupBarrier();
        for (var s = c0; s < c1; s++) {
            let b = base + s * stride;
            let w = weight[s - c0];
            if (lid < hd) { o0 += w * partials[b + lid]; }
            if (lid + WG < hd) { o1 += w * partials[b + lid + WG]; }
        }
        workgroupBarrier();
    }
    let ob = (r * params.n_heads + h) * hd;
    if (lid < hd) { out[ob + lid] = o0 / total; }
    if (lid + WG < hd) { out[ob + lid + WG] = o1 / total; }
}
