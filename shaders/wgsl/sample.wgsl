// sample: picks one token from logits[vocab] and writes it to out[out_index], following the
// reference rules of src/sample.rs exactly. One workgroup of WG threads:
// 1. argmax (lowest id among equal maxima); greedy (temperature <= 0 or top_k == 1) stops here.
// 2. p = exp((l - max) / temperature) into the scratch `probs`.
// 3. top-k: the k-th largest logit by a 4-pass radix select (8-bit digits of the order-preserving
//    u32 key, histograms in workgroup atomics); tokens below it get probs = -1 (dropped).
// With top-k keeping at most 64 tokens (the usual case), one thread then sorts the survivors by
// id and applies top-p, min-p and the id-order walk in the reference's order of operations.
// Otherwise sample_walk.wgsl, dispatched right after, does steps 4-6 over the whole vocabulary;
// the word after the probabilities tells it whether the token is already chosen.

struct Params {
    vocab: u32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    temperature: f32,
    uniform: f32,
    out_index: u32,
    _pad: u32,
}

override WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> logits: array<f32>;
@group(0) @binding(3) var<storage, read_write> probs: array<f32>;

var<workgroup> redf: array<f32, WG>;
// Eight copies of the 256-bin histogram (thread lid counts into copy lid % 8): logits crowd
// into a few bins, and one copy would serialise most of the atomic adds.
var<workgroup> hist: array<atomic<u32>, 2048>;
var<workgroup> digit: array<u32, 2>;
var<workgroup> best_key: atomic<u32>;
var<workgroup> best_id: atomic<u32>;
// Top-k survivors (id, p), when there are at most SMALL of them.
const SMALL: u32 = 64u;
var<workgroup> small_id: array<u32, SMALL>;
var<workgroup> small_p: array<f32, SMALL>;
var<workgroup> n_small: atomic<u32>;
var<workgroup> small_count: u32;

// Sum of v over the workgroup (every thread gets it).
fn sum_all(lid: u32, v: f32) -> f32 {
    redf[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) { redf[lid] += redf[lid + s]; }
    }
    workgroupBarrier();
    let total = redf[0];
    workgroupBarrier();
    return total;
}

// Steps 4-6 for at most SMALL top-k survivors, on one thread, in the reference's order of
// operations: sort by id, mass, top-p by walking q in descending order, min-p, id-order walk.
fn pick_small(count: u32, best: u32) -> u32 {
    for (var i = 1u; i < count; i++) {
        let id = small_id[i];
        let p = small_p[i];
        var j = i;
        while (j > 0u && small_id[j - 1u] > id) {
            small_id[j] = small_id[j - 1u];
            small_p[j] = small_p[j - 1u];
            j--;
        }
        small_id[j] = id;
        small_p[j] = p;
    }
    var mass = 0.0;
    for (var i = 0u; i < count; i++) { mass += small_p[i]; }
    // t: the q at which the descending running sum first reaches top_p (else the smallest q).
    var t = 0.0;
    if (params.top_p < 1.0) {
        var acc = 0.0;
        var above = 2.0;
        var done = false;
        while (!done) {
            var q = -1.0;
            for (var i = 0u; i < count; i++) {
                let v = small_p[i] / mass;
                if (v < above) { q = max(q, v); }
            }
            if (q < 0.0) { break; }
            for (var i = 0u; i < count; i++) {
                if (!done && small_p[i] / mass == q) {
                    acc += q;
                    done = acc >= params.top_p;
                }
            }
            t = q;
            above = q;
        }
    }
    var kept_mass = 0.0;
    for (var i = 0u; i < count; i++) {
        let p = small_p[i];
        if (p / mass >= t && p >= params.min_p) { kept_mass += p; }
    }
    let goal = params.uniform * kept_mass;
    var acc = 0.0;
    var last = best;
    for (var i = 0u; i < count; i++) {
        let p = small_p[i];
        if (p / mass >= t && p >= params.min_p) {
            acc += p;
            last = small_id[i];
            if (acc > goal) { return last; }
        }
    }
    return last;
}

// Order-preserving key of a float: a < b <=> key(a) < key(b) (as total_cmp).
fn key(f: f32) -> u32 {
    let b = bitcast<u32>(f);
    return select(b ^ 0x80000000u, ~b, (b >> 31u) == 1u);
}

fn unkey(k: u32) -> f32 {
    return bitcast<f32>(select(~k, k ^ 0x80000000u, (k >> 31u) == 1u));
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    let vocab = params.vocab;
    if (lid == 0u) {
        atomicStore(&best_key, 0u);
        atomicStore(&best_id, NONE);
        atomicStore(&n_small, 0u);
    }
    workgroupBarrier();
    // 1. argmax: each thread's first maximum, then the largest key and the lowest id holding it.
    var bv = logits[min(lid, vocab - 1u)];
    var bi = lid;
    for (var i = lid + WG; i < vocab; i += WG) {
        if (logits[i] > bv) {
            bv = logits[i];
            bi = i;
        }
    }
    if (bi < vocab) { atomicMax(&best_key, key(bv)); }
    workgroupBarrier();
    let top = atomicLoad(&best_key);
    if (bi < vocab && key(bv) == top) { atomicMin(&best_id, bi); }
    workgroupBarrier();
    let max_logit = unkey(top);
    let best = atomicLoad(&best_id);
    if (params.temperature <= 0.0 || params.top_k == 1u) {
        if (lid == 0u) {
            out[params.out_index] = best;
            probs[vocab] = bitcast<f32>(1u);
        }
        return;
    }
    // 3. top-k threshold: the k-th largest logit, ties kept.
    let use_top_k = params.top_k > 0u && params.top_k < vocab;
    var kth = 0.0;
    if (use_top_k) {
        var prefix = 0u;
        var remaining = params.top_k;
        for (var level = 0u; level < 4u; level++) {
            let shift = 24u - 8u * level;
            let mask = select(~((1u << (shift + 8u)) - 1u), 0u, level == 0u);
            for (var d = lid; d < 2048u; d += WG) { atomicStore(&hist[d], 0u); }
            workgroupBarrier();
            for (var i = lid; i < vocab; i += WG) {
                let kk = key(logits[i]);
                if ((kk & mask) == prefix) { atomicAdd(&hist[(lid % 8u) * 256u + ((kk >> shift) & 255u)], 1u); }
            }
            workgroupBarrier();
            if (lid == 0u) {
                var cum = 0u;
                for (var d = 255i; d >= 0i; d--) {
                    var c = 0u;
                    for (var copy = 0u; copy < 8u; copy++) { c += atomicLoad(&hist[copy * 256u + u32(d)]); }
                    if (cum + c >= remaining) {
                        digit[0] = prefix | (u32(d) << shift);
                        digit[1] = remaining - cum;
                        break;
                    }
                    cum += c;
                }
            }
            workgroupBarrier();
            prefix = digit[0];
            remaining = digit[1];
            workgroupBarrier();
        }
        kth = unkey(prefix);
    }
    // 2. probabilities; dropped tokens are marked -1. Top-k survivors are also gathered.
    for (var i = lid; i < vocab; i += WG) {
        let l = logits[i];
        let p = select(-1.0, exp((l - max_logit) / params.temperature), !use_top_k || l >= kth);
        probs[i] = p;
        if (use_top_k && p >= 0.0) {
            let at = atomicAdd(&n_small, 1u);
            if (at < SMALL) {
                small_id[at] = i;
                small_p[at] = p;
            }
        }
    }
    workgroupBarrier();
    if (lid == 0u) { small_count = atomicLoad(&n_small); }
    let count = workgroupUniformLoad(&small_count);
    if (use_top_k && count <= SMALL) {
        // The usual case (top-k of a few dozen): one thread finishes exactly as the reference.
        if (lid == 0u) {
            out[params.out_index] = pick_small(count, best);
            probs[vocab] = bitcast<f32>(1u);
        }
        return;
    }
    // Steps 4-6 over the whole vocabulary: sample_walk.wgsl, dispatched next.
    if (lid == 0u) { probs[vocab] = 0.0; }
}
