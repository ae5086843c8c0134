// attention_decode: split-KV (flash-decoding) attention for a few query rows over the paged
// KV cache. The context of row r (positions 0..=pos0 + r) is cut into splits of split_len
// positions (a multiple of 16, at most SPLIT_MAX); a workgroup owns one (split, group of gc
// query heads sharing a kv head, row) and writes an unnormalised partial result: its max score
// m, sum of exp(score - m) l, and the weighted sum of V rows. attention_combine.wgsl merges the
// splits. Many workgroups per head keep the GPU busy on long contexts with one query row. When
// the whole context fits one split (override DIRECT), the first binding is the output instead
// and each workgroup writes its heads' final o / l: no combine pass.
// Inside: one thread per position scores it against the gc heads (K read once for all of
// them), 16 threads per head reduce max and sum, then each thread accumulates P . V for its
// head dims (V read once for all heads). Per-head values travel as two vec4 (heads 0-3, 4-7 of
// the workgroup, zero past gc) so that no private array is indexed at run time. Cache layout [block][16][kv_head][head_dim], f16 (two
// per u32) or f32 (override KV_F16). Partials: [row][head][split][head_dim + 2] (o..., m, l);
// DIRECT output: [row][head][head_dim].

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

const KV_BLOCK: u32 = 16u;
const WG: u32 = 128u;
const SPLIT_MAX: u32 = 128u;
// Most query heads per workgroup; head_dim <= 2 * WG.
const GC_MAX: u32 = 8u;
const MASKED: f32 = -1e30;
override KV_F16: bool = true;
override HD_MAX: u32 = 256u;
override DIRECT: bool = false;

@group(0) @binding(0) var<uniform> params: Params;
// The partials, or with DIRECT the output.
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> k_cache: array<u32>;
@group(0) @binding(4) var<storage, read> v_cache: array<u32>;
@group(0) @binding(5) var<storage, read> table: array<u32>;

// [dim][2]: q of heads 0-3 and 4-7; [position][2]: their scores, then probabilities.
var<workgroup> qs: array<vec4<f32>, 2u * HD_MAX>;
var<workgroup> ps: array<vec4<f32>, 2u * SPLIT_MAX>;
var<workgroup> red: array<f32, WG>;
var<workgroup> stats: array<f32, 2u * GC_MAX>;
// The split's cache blocks, read from the block table once.
var<workgroup> blocks: array<u32, SPLIT_MAX / KV_BLOCK>;

// Query heads per workgroup: the largest divisor of the GQA group size that is <= GC_MAX, so
// that a workgroup's heads share one kv head (the host computes the same number).
fn heads_per_workgroup() -> u32 {
    let group = params.n_heads / params.n_kv_heads;
    var c = GC_MAX;
    while (group % c != 0u) {
        c -= 1u;
    }
    return c;
}

// Component g (0..8) of the head pair (lo, hi).
fn head(lo: vec4<f32>, hi: vec4<f32>, g: u32) -> f32 {
    let v = select(lo, hi, g >= 4u);
    return select(select(v.x, v.y, g % 4u == 1u), select(v.z, v.w, g % 4u == 3u), g % 4u >= 2u);
}

// Element index of (position start + p, kv head, dim 0) in the cache (p < split_len).
fn cache_base(p: u32, kvh: u32) -> u32 {
    let slot = blocks[p / KV_BLOCK] * KV_BLOCK + p % KV_BLOCK;
    return (slot * params.n_kv_heads + kvh) * params.head_dim;
}

fn k_pair(e: u32) -> vec2<f32> {
    if (KV_F16) {
        return unpack2x16float(k_cache[e / 2u]);
    }
    return vec2<f32>(bitcast<f32>(k_cache[e]), bitcast<f32>(k_cache[e + 1u]));
}

fn v_at(e: u32) -> f32 {
    if (KV_F16) {
        return unpack2x16float(v_cache[e / 2u])[e % 2u];
    }
    return bitcast<f32>(v_cache[e]);
}

// Reduces red[g * 16 .. g * 16 + 16] into red[g * 16] (max or sum) for every head slot g.
fn reduce16(lane: u32, lid: u32, is_max: bool) {
    for (var s = 8u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lane < s) {
            let a = red[lid];
            let b = red[lid + s];
            red[lid] = select(a + b, max(a, b), is_max);
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let hd = params.head_dim;
    let gc = heads_per_workgroup();
    let split = wg.x;
    let h0 = wg.y * gc;
    let r = wg.z;
    let kvh = h0 / (params.n_heads / params.n_kv_heads);
    let start = split * params.split_len;
    let n_ctx = params.pos0 + r + 1u;
    let n_valid = min(params.split_len, max(n_ctx, start) - start);
    for (var i = lid; i < GC_MAX * hd; i += WG) {
        let d = i / GC_MAX;
        let g = i % GC_MAX;
        qs[2u * d + g / 4u][g % 4u] = select(0.0, q[(r * params.n_heads + h0 + g) * hd + d], g < gc);
    }
    if (lid < (n_valid + KV_BLOCK - 1u) / KV_BLOCK) {
        blocks[lid] = table[start / KV_BLOCK + lid];
    }
    workgroupBarrier();
    // Scores: thread t scores position start + t for all heads.
    if (lid < n_valid) {
        let e = cache_base(lid, kvh);
        var lo = vec4<f32>(0.0);
        var hi = vec4<f32>(0.0);
        for (var d = 0u; d < hd; d += 2u) {
            let kp = k_pair(e + d);
            lo += qs[2u * d] * kp.x + qs[2u * d + 2u] * kp.y;
            hi += qs[2u * d + 1u] * kp.x + qs[2u * d + 3u] * kp.y;
        }
        ps[2u * lid] = lo * params.scale;
        ps[2u * lid + 1u] = hi * params.scale;
    }
    workgroupBarrier();
    // Max and sum of exp per head: 16 threads per head slot g.
    let g = lid / 16u;
    let lane = lid % 16u;
    let gi = g / 4u;
    let gk = g % 4u;
    var mx = MASKED;
    if (g < gc) {
        for (var j = lane; j < n_valid; j += 16u) {
            mx = max(mx, ps[2u * j + gi][gk]);
        }
    }
    red[lid] = mx;
    reduce16(lane, lid, true);
    let m = red[g * 16u];
    workgroupBarrier();
    var sum = 0.0;
    if (g < gc) {
        for (var j = lane; j < n_valid; j += 16u) {
            let p = exp(ps[2u * j + gi][gk] - m);
            ps[2u * j + gi][gk] = p;
            sum += p;
        }
    }
    red[lid] = sum;
    reduce16(lane, lid, false);
    if (lane == 0u && g < gc) {
        stats[2u * g] = m;
        stats[2u * g + 1u] = red[lid];
    }
    workgroupBarrier();
    // P . V: thread owns dims lid and lid + WG of every head.
    var a_lo = vec4<f32>(0.0);
    var a_hi = vec4<f32>(0.0);
    var b_lo = vec4<f32>(0.0);
    var b_hi = vec4<f32>(0.0);
    for (var p = 0u; p < n_valid; p++) {
        let e = cache_base(p, kvh);
        let w_lo = ps[2u * p];
        let w_hi = ps[2u * p + 1u];
        if (lid < hd) {
            let v = v_at(e + lid);
            a_lo += w_lo * v;
            a_hi += w_hi * v;
        }
        if (lid + WG < hd) {
            let v = v_at(e + lid + WG);
            b_lo += w_lo * v;
            b_hi += w_hi * v;
        }
    }
    if (DIRECT) {
        for (var gg = 0u; gg < gc; gg++) {
            let base = (r * params.n_heads + h0 + gg) * hd;
            let l = stats[2u * gg + 1u];
            if (lid < hd) { partials[base + lid] = head(a_lo, a_hi, gg) / l; }
            if (lid + WG < hd) { partials[base + lid + WG] = head(b_lo, b_hi, gg) / l; }
        }
        return;
    }
    let n_splits = (params.pos0 + params.rows + params.split_len - 1u) / params.split_len;
    let stride = hd + 2u;
    for (var gg = 0u; gg < gc; gg++) {
        let base = ((r * params.n_heads + h0 + gg) * n_splits + split) * stride;
        if (lid < hd) { partials[base + lid] = head(a_lo, a_hi, gg); }
        if (lid + WG < hd) { partials[base + lid + WG] = head(b_lo, b_hi, gg); }
        if (lid == 0u) {
            partials[base + hd] = stats[2u * gg];
            partials[base + hd + 1u] = stats[2u * gg + 1u];
        }
    }
}
