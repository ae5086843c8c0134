// attention_decode: split-KV (flash-decoding) attention for a few query rows over the paged
// KV cache. The context of row r (positions 0..=pos0 + r) is cut into splits of split_len
// positions (a multiple of 16, at most SPLIT_MAX); a workgroup owns one (split, group of gc
// query heads sharing a kv head, row) and writes an unnormalised partial result: its max score
// m, sum of exp(score - m) l, and the weighted sum of V rows. attention_combine.wgsl merges the
// splits. Many workgroups per head keep the GPU busy on long contexts with one query row.
// Inside: one thread per position scores it against the gc heads (K read once for all of
// them), 16 threads per head reduce max and sum, then each thread accumulates P . V for its
// head dims (V read once for all heads). Cache layout [block][16][kv_head][head_dim], f16 (two
// per u32) or f32 (override KV_F16). Partials: [row][head][split][head_dim + 2] (o..., m, l).

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
// Most query heads per workgroup, and head dims per thread (head_dim <= WG * DPT).
const GC_MAX: u32 = 8u;
const DPT: u32 = 2u;
const MASKED: f32 = -1e30;
override KV_F16: bool = true;
override HD_MAX: u32 = 256u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> k_cache: array<u32>;
@group(0) @binding(4) var<storage, read> v_cache: array<u32>;
@group(0) @binding(5) var<storage, read> table: array<u32>;

var<workgroup> qs: array<f32, GC_MAX * HD_MAX>;
var<workgroup> ps: array<f32, GC_MAX * SPLIT_MAX>;
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
    for (var i = lid; i < gc * hd; i += WG) {
        qs[i] = q[(r * params.n_heads + h0) * hd + i];
    }
    if (lid < (n_valid + KV_BLOCK - 1u) / KV_BLOCK) {
        blocks[lid] = table[start / KV_BLOCK + lid];
    }
    workgroupBarrier();
    // Scores: thread t scores position start + t for all gc heads.
    if (lid < n_valid) {
        let e = cache_base(lid, kvh);
        var dots: array<f32, GC_MAX>;
        for (var d = 0u; d < hd; d += 2u) {
            let kp = k_pair(e + d);
            for (var g = 0u; g < gc; g++) {
                dots[g] += qs[g * hd + d] * kp.x + qs[g * hd + d + 1u] * kp.y;
            }
        }
        for (var g = 0u; g < gc; g++) {
            ps[g * SPLIT_MAX + lid] = dots[g] * params.scale;
        }
    }
    workgroupBarrier();
    // Max and sum of exp per head: 16 threads per head slot g.
    let g = lid / 16u;
    let lane = lid % 16u;
    var mx = MASKED;
    if (g < gc) {
        for (var j = lane; j < n_valid; j += 16u) {
            mx = max(mx, ps[g * SPLIT_MAX + j]);
        }
    }
    red[lid] = mx;
    reduce16(lane, lid, true);
    let m = red[g * 16u];
    workgroupBarrier();
    var sum = 0.0;
    if (g < gc) {
        for (var j = lane; j < n_valid; j += 16u) {
            let p = exp(ps[g * SPLIT_MAX + j] - m);
            ps[g * SPLIT_MAX + j] = p;
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
    // P . V: thread owns dims lid + WG * j of every head.
    var acc: array<f32, GC_MAX * DPT>;
    for (var p = 0u; p < n_valid; p++) {
        let e = cache_base(p, kvh);
        for (var j = 0u; j < DPT; j++) {
            let d = lid + WG * j;
            if (d < hd) {
                let v = v_at(e + d);
                for (var gg = 0u; gg < gc; gg++) {
                    acc[gg * DPT + j] += ps[gg * SPLIT_MAX + p] * v;
                }
            }
        }
    }
    let n_splits = (params.pos0 + params.rows + params.split_len - 1u) / params.split_len;
    let stride = hd + 2u;
    for (var gg = 0u; gg < gc; gg++) {
        let base = ((r * params.n_heads + h0 + gg) * n_splits + split) * stride;
        for (var j = 0u; j < DPT; j++) {
            let d = lid + WG * j;
            if (d < hd) {
                partials[base + d] = acc[gg * DPT + j];
            }
        }
        if (lid == 0u) {
            partials[base + hd] = stats[2u * gg];
            partials[base + hd + 1u] = stats[2u * gg + 1u];
        }
    }
}
