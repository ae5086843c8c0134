// attention_decode: split-KV (flash-decoding) attention for a few query rows over the paged
// KV cache. The context of row r (positions 0..=pos0 + r) is cut into splits of split_len
// positions (a multiple of 16, at most SPLIT_MAX); a workgroup owns one (split, group of gc
// query heads sharing a kv head, row) and writes an unnormalised partial result: its max score
// m, sum of exp(score - m) l, and the weighted sum of V rows. attention_combine.wgsl merges the
// splits. Many workgroups per head keep the GPU busy on long contexts with one query row. When
// the whole context fits one split (override DIRECT), the first binding is the output instead
// and each workgroup writes its heads' final o / l: no combine pass.
// Inside: TPP threads score each position against the gc heads (K read once for all of them;
// each thread takes every TPP-th pair of dims, the TPP partial dots meet in workgroup memory),
// 16 threads per head reduce max and sum, then the threads split into (pair of head dims,
// slice of positions) and accumulate P . V with four V rows in flight (V read once for all
// heads); the slices' sums meet in workgroup memory. Loads in flight, not arithmetic, bound
// this kernel at short contexts: no thread walks a whole K row or every position of V.
// Per-head values travel as two vec4 (heads 0-3, 4-7 of the workgroup, zero past gc) so that
// no private array is indexed at run time. Cache layout [block][16][kv_head][head_dim], f16
// (two per u32) or f32 (override KV_F16). Partials: [row][head][split][head_dim + 2] (o..., m, l);
// DIRECT output: [row][head][head_dim].
// Override ROWS: the rows of many sequences (serving's batched decode): `table` is the batch's
// layout [pos: rows][table offset: rows][block tables] (batch.rs RowsView), row r attends
// positions 0..=table[r] of the blocks at table[table[rows + r]], and params.pos0 holds the
// batch's largest context, which sets the number of splits.

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
override ROWS: bool = false;

@group(0) @binding(0) var<uniform> params: Params;
// The partials, or with DIRECT the output.
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> k_cache: array<u32>;
@group(0) @binding(4) var<storage, read> v_cache: array<u32>;
@group(0) @binding(5) var<storage, read> table: array<u32>;

// Threads per position in the score phase: each takes every TPP-th pair of dims, so that a
// workgroup scores WG / TPP positions at once with few loads per thread, and the threads that
// share a K row read neighbouring words.
const TPP: u32 = 8u;

// [dim][2]: q of heads 0-3 and 4-7; [position][2]: their scores, then probabilities.
var<workgroup> qs: array<vec4<f32>, 2u * HD_MAX>;
var<workgroup> ps: array<vec4<f32>, 2u * SPLIT_MAX>;
// Per-thread partial sums (score dots, then P . V), added up across threads.
var<workgroup> part: array<vec4<f32>, 2u * WG>;
// After the scores, ps holds one more per-thread pair of partial sums.
const_assert SPLIT_MAX >= WG;
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

// Positions row r attends (its last position + 1) and where its block table starts.
fn row_ctx(r: u32) -> u32 {
    if (ROWS) {
        return table[r] + 1u;
    }
    return params.pos0 + r + 1u;
}

fn row_table(r: u32) -> u32 {
    if (ROWS) {
        return table[params.rows + r];
    }
    return 0u;
}

// Splits of every row: they cover the longest context of the call.
fn splits() -> u32 {
    let n_ctx = select(params.pos0 + params.rows, params.pos0, ROWS);
    return (n_ctx + params.split_len - 1u) / params.split_len;
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

// Dims 2 i, 2 i + 1 of the K or V row at element e (e even); zero past the row's n_pairs pairs.
fn k_pair(e: u32, i: u32, n_pairs: u32) -> vec2<f32> {
    if (i >= n_pairs) {
        return vec2<f32>(0.0);
    }
    if (KV_F16) {
        return unpack2x16float(k_cache[e / 2u + i]);
    }
    return vec2<f32>(bitcast<f32>(k_cache[e + 2u * i]), bitcast<f32>(k_cache[e + 2u * i + 1u]));
}

fn v_pair(e: u32, i: u32) -> vec2<f32> {
    if (KV_F16) {
        return unpack2x16float(v_cache[e / 2u + i]);
    }
    return vec2<f32>(bitcast<f32>(v_cache[e + 2u * i]), bitcast<f32>(v_cache[e + 2u * i + 1u]));
}

// q . k for dims pair i of the gc heads: k.x times q of dim 2 i, k.y times q of dim 2 i + 1
// (pairs past the row, whose k is zero, read the last pair's q).
fn dot_lo(k: vec2<f32>, i: u32) -> vec4<f32> {
    let j = 4u * min(i, HD_MAX / 2u - 1u);
    return qs[j] * k.x + qs[j + 2u] * k.y;
}

fn dot_hi(k: vec2<f32>, i: u32) -> vec4<f32> {
    let j = 4u * min(i, HD_MAX / 2u - 1u);
    return qs[j + 1u] * k.x + qs[j + 3u] * k.y;
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
    let n_ctx = row_ctx(r);
    let n_valid = min(params.split_len, max(n_ctx, start) - start);
    for (var i = lid; i < GC_MAX * hd; i += WG) {
        let d = i / GC_MAX;
        let g = i % GC_MAX;
        qs[2u * d + g / 4u][g % 4u] = select(0.0, q[(r * params.n_heads + h0 + g) * hd + d], g < gc);
    }
    if (lid < (n_valid + KV_BLOCK - 1u) / KV_BLOCK) {
        blocks[lid] = table[row_table(r) + start / KV_BLOCK + lid];
    }
    workgroupBarrier();
    // Scores: TPP threads per position, WG / TPP positions per round; thread sub of a position
    // takes dim pairs sub, sub + TPP, ..., four loads at a time.
    let n_pairs = hd / 2u;
    let sub = lid % TPP;
    for (var c0 = 0u; c0 < n_valid; c0 += WG / TPP) {
        let pos = c0 + lid / TPP;
        var lo = vec4<f32>(0.0);
        var hi = vec4<f32>(0.0);
        if (pos < n_valid) {
            let e = cache_base(pos, kvh);
            for (var i = sub; i < n_pairs; i += 4u * TPP) {
                let k0 = k_pair(e, i, n_pairs);
                let k1 = k_pair(e, i + TPP, n_pairs);
                let k2 = k_pair(e, i + 2u * TPP, n_pairs);
                let k3 = k_pair(e, i + 3u * TPP, n_pairs);
                lo += dot_lo(k0, i) + dot_lo(k1, i + TPP) + dot_lo(k2, i + 2u * TPP)
                    + dot_lo(k3, i + 3u * TPP);
                hi += dot_hi(k0, i) + dot_hi(k1, i + TPP) + dot_hi(k2, i + 2u * TPP)
                    + dot_hi(k3, i + 3u * TPP);
            }
        }
        part[2u * lid] = lo;
        part[2u * lid + 1u] = hi;
        workgroupBarrier();
        // Thread 2 j + half adds the TPP partial dots of position c0 + j, heads half * 4 ...
        let j = lid / 2u;
        if (j < WG / TPP && c0 + j < n_valid) {
            let half = lid % 2u;
            var s = vec4<f32>(0.0);
            for (var t = 0u; t < TPP; t++) {
                s += part[2u * (j * TPP + t) + half];
            }
            ps[2u * (c0 + j) + half] = s * params.scale;
        }
        workgroupBarrier();
    }
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
    // P . V: thread (slice sl, pair i) sums positions sl, sl + slices, ... of dims 2 i and
    // 2 i + 1 for every head, four V rows in flight; a is dim 2 i, b dim 2 i + 1.
    let slices = WG / n_pairs;
    let i = lid % n_pairs;
    let sl = lid / n_pairs;
    var a_lo = vec4<f32>(0.0);
    var a_hi = vec4<f32>(0.0);
    var b_lo = vec4<f32>(0.0);
    var b_hi = vec4<f32>(0.0);
    if (sl < slices) {
        var p = sl;
        for (; p + 3u * slices < n_valid; p += 4u * slices) {
            let v0 = v_pair(cache_base(p, kvh), i);
            let v1 = v_pair(cache_base(p + slices, kvh), i);
            let v2 = v_pair(cache_base(p + 2u * slices, kvh), i);
            let v3 = v_pair(cache_base(p + 3u * slices, kvh), i);
            let w0 = 2u * p;
            let w1 = 2u * (p + slices);
            let w2 = 2u * (p + 2u * slices);
            let w3 = 2u * (p + 3u * slices);
            a_lo += ps[w0] * v0.x + ps[w1] * v1.x + ps[w2] * v2.x + ps[w3] * v3.x;
            a_hi += ps[w0 + 1u] * v0.x + ps[w1 + 1u] * v1.x + ps[w2 + 1u] * v2.x + ps[w3 + 1u] * v3.x;
            b_lo += ps[w0] * v0.y + ps[w1] * v1.y + ps[w2] * v2.y + ps[w3] * v3.y;
            b_hi += ps[w0 + 1u] * v0.y + ps[w1 + 1u] * v1.y + ps[w2 + 1u] * v2.y + ps[w3 + 1u] * v3.y;
        }
        for (; p < n_valid; p += slices) {
            let v = v_pair(cache_base(p, kvh), i);
            a_lo += ps[2u * p] * v.x;
            a_hi += ps[2u * p + 1u] * v.x;
            b_lo += ps[2u * p] * v.y;
            b_hi += ps[2u * p + 1u] * v.y;
        }
    }
    // The slices' sums meet in part (a) and ps (b), free now; slice 0 adds them up.
    workgroupBarrier();
    part[2u * lid] = a_lo;
    part[2u * lid + 1u] = a_hi;
    ps[2u * lid] = b_lo;
    ps[2u * lid + 1u] = b_hi;
    workgroupBarrier();
    if (lid >= n_pairs) {
        return;
    }
    for (var s = 1u; s < slices; s++) {
        let t = s * n_pairs + lid;
        a_lo += part[2u * t];
        a_hi += part[2u * t + 1u];
        b_lo += ps[2u * t];
        b_hi += ps[2u * t + 1u];
    }
    if (DIRECT) {
        for (var gg = 0u; gg < gc; gg++) {
            let base = (r * params.n_heads + h0 + gg) * hd + 2u * lid;
            let l = stats[2u * gg + 1u];
            partials[base] = head(a_lo, a_hi, gg) / l;
            partials[base + 1u] = head(b_lo, b_hi, gg) / l;
        }
        return;
    }
    let n_splits = splits();
    let stride = hd + 2u;
    for (var gg = 0u; gg < gc; gg++) {
        let base = ((r * params.n_heads + h0 + gg) * n_splits + split) * stride;
        partials[base + 2u * lid] = head(a_lo, a_hi, gg);
        partials[base + 2u * lid + 1u] = head(b_lo, b_hi, gg);
        if (lid == 0u) {
            partials[base + hd] = stats[2u * gg];
            partials[base + hd + 1u] = stats[2u * gg + 1u];
        }
    }
}
