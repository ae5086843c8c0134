// attention_prefill: causal GQA attention for many query rows over the paged KV cache, as a
// tiled flash kernel (online softmax, nothing quadratic in memory).
// A workgroup owns one head and a tile of BQ = 16 query rows (row r at position pos0 + r) and
// walks the cache one KV block (16 positions) at a time: stage the block's K in workgroup memory,
// score all 16x16 (row, position) pairs (one per thread, masked past each row's position), stage
// V over K, then each thread rescales its running max / sum / output for its row and adds
// P . V for its slice of head dims. Positions past the sequence read as zero, so uninitialised
// cache memory never reaches the result.
// Cache layout [block][16][kv_head][head_dim], f16 (two per u32) or f32 (override KV_F16).
// HD_MAX (override) bounds head_dim; the host picks it from the workgroup memory limit.

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
const BQ: u32 = 16u;
// Dims per thread: head_dim / 16, at most 16 (head_dim <= 256).
const DPT: u32 = 16u;
const MASKED: f32 = -1e30;
override KV_F16: bool = true;
override HD_MAX: u32 = 128u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> k_cache: array<u32>;
@group(0) @binding(4) var<storage, read> v_cache: array<u32>;
@group(0) @binding(5) var<storage, read> table: array<u32>;

var<workgroup> qs: array<f32, BQ * HD_MAX>;
// One K or V block, rows padded by one float so that a column walk has no bank conflicts.
var<workgroup> kvs: array<f32, KV_BLOCK * (HD_MAX + 1u)>;
var<workgroup> scores: array<f32, 256>;
var<workgroup> probs: array<f32, 256>;

// Values (d, d + 1) of the cache word holding element e (even) of K (is_k) or V.
fn cache_pair(is_k: bool, e: u32) -> vec2<f32> {
    if (KV_F16) {
        let word = select(v_cache[e / 2u], k_cache[e / 2u], is_k);
        return unpack2x16float(word);
    }
    if (is_k) {
        return vec2<f32>(bitcast<f32>(k_cache[e]), bitcast<f32>(k_cache[e + 1u]));
    }
    return vec2<f32>(bitcast<f32>(v_cache[e]), bitcast<f32>(v_cache[e + 1u]));
}

// Stages K or V of block `b` of the sequence for kv head `kvh`; positions >= n_ctx read as 0.
fn stage_block(is_k: bool, b: u32, kvh: u32, n_ctx: u32, lid: u32) {
    let hd = params.head_dim;
    let half = hd / 2u;
    let ld = hd + 1u;
    let blk = table[b];
    for (var i = lid; i < KV_BLOCK * half; i += 256u) {
        let slot = i / half;
        let d = (i % half) * 2u;
        var v = vec2<f32>(0.0);
        if (b * KV_BLOCK + slot < n_ctx) {
            let e = ((blk * KV_BLOCK + slot) * params.n_kv_heads + kvh) * hd + d;
            v = cache_pair(is_k, e);
        }
        kvs[slot * ld + d] = v.x;
        kvs[slot * ld + d + 1u] = v.y;
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let hd = params.head_dim;
    let ld = hd + 1u;
    let h = wg.y;
    let kvh = h / (params.n_heads / params.n_kv_heads);
    let q0 = wg.x * BQ;
    let n_ctx = params.pos0 + params.rows;
    let row_w = params.n_heads * hd;
    // Stage the tile's queries.
    for (var i = lid; i < BQ * hd; i += 256u) {
        let r = q0 + i / hd;
        var v = 0.0;
        if (r < params.rows) {
            v = q[r * row_w + h * hd + i % hd];
        }
        qs[i] = v;
    }
    // Thread roles: score (qi, kj) and output row qi with dims kj + 16 * j.
    let qi = lid / 16u;
    let kj = lid % 16u;
    let row_valid = q0 + qi < params.rows;
    let qpos = params.pos0 + q0 + qi;
    var m = MASKED;
    var l = 0.0;
    var acc: array<f32, DPT>;
    let last_pos = min(params.pos0 + q0 + BQ, n_ctx) - 1u;
    let n_blocks = last_pos / KV_BLOCK + 1u;
    for (var b = 0u; b < n_blocks; b++) {
        workgroupBarrier();
        stage_block(true, b, kvh, n_ctx, lid);
        workgroupBarrier();
        let kpos = b * KV_BLOCK + kj;
        var s = MASKED;
        if (row_valid && kpos <= qpos) {
            var dot = 0.0;
            for (var d = 0u; d < hd; d++) {
                dot += qs[qi * hd + d] * kvs[kj * ld + d];
            }
            s = dot * params.scale;
        }
        scores[lid] = s;
        workgroupBarrier();
        stage_block(false, b, kvh, n_ctx, lid);
        var mx = MASKED;
        for (var j = 0u; j < 16u; j++) {
            mx = max(mx, scores[qi * 16u + j]);
        }
        let m_new = max(m, mx);
        let alpha = exp(m - m_new);
        probs[lid] = select(0.0, exp(s - m_new), s > MASKED);
        m = m_new;
        workgroupBarrier();
        var psum = 0.0;
        for (var j = 0u; j < 16u; j++) {
            psum += probs[qi * 16u + j];
        }
        l = l * alpha + psum;
        for (var j = 0u; j < DPT; j++) {
            let d = kj + 16u * j;
            if (d < hd) {
                var pv = 0.0;
                for (var p = 0u; p < 16u; p++) {
                    pv += probs[qi * 16u + p] * kvs[p * ld + d];
                }
                acc[j] = acc[j] * alpha + pv;
            }
        }
    }
    if (row_valid) {
        let base = (q0 + qi) * row_w + h * hd;
        for (var j = 0u; j < DPT; j++) {
            let d = kj + 16u * j;
            if (d < hd) {
                out[base + d] = acc[j] / l;
            }
        }
    }
}
