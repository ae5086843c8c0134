// sample: picks one token from logits[vocab] and writes it to out[out_index], following the
// reference rules of src/sample.rs exactly. One workgroup of WG threads:
// 1. argmax (lowest id among equal maxima); greedy (temperature <= 0 or top_k == 1) stops here.
// 2. p = exp((l - max) / temperature) into the scratch `probs`.
// 3. top-k: the k-th largest logit by a 4-pass radix select (8-bit digits of the order-preserving
//    u32 key, histograms in workgroup atomics); tokens below it get probs = -1 (dropped).
// 4. top-p: the threshold t on q = p / mass is the largest float with sum(q >= t) >= top_p, found
//    by binary search over the bit patterns of non-negative floats (which order like u32); with
//    top-k on, over the survivors compacted into workgroup memory.
// 5. min-p: p >= min_p (max p is 1).
// 6. id-order walk: each thread owns a contiguous run of ids, an exclusive scan of the runs'
//    kept mass gives every run its start, and the first id whose running sum passes
//    uniform * kept mass wins (atomicMin); if rounding leaves none, the last kept id.

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
var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> digit: array<u32, 2>;
var<workgroup> best_key: atomic<u32>;
var<workgroup> best_id: atomic<u32>;
var<workgroup> pick: atomic<u32>;
var<workgroup> last_kept: atomic<u32>;
// Top-k survivors' q in id order, when they fit.
const CAP: u32 = 1024u;
var<workgroup> cand: array<f32, CAP>;
var<workgroup> cand_count: u32;

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

// Sum of v over the threads before this one (Hillis-Steele scan).
fn scan_exclusive(lid: u32, v: f32) -> f32 {
    redf[lid] = v;
    for (var s = 1u; s < WG; s <<= 1u) {
        workgroupBarrier();
        var t = redf[lid];
        if (lid >= s) { t += redf[lid - s]; }
        workgroupBarrier();
        redf[lid] = t;
    }
    workgroupBarrier();
    let before = select(0.0, redf[max(lid, 1u) - 1u], lid > 0u);
    workgroupBarrier();
    return before;
}

// Whether a token of weight p (-1: dropped by top-k) survives top-p and min-p.
fn kept(p: f32, mass: f32, t_bits: u32) -> bool {
    return p >= 0.0 && bitcast<u32>(p / mass) >= t_bits && p >= params.min_p;
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
        atomicStore(&pick, NONE);
        atomicStore(&last_kept, 0u);
        atomicStore(&best_key, 0u);
        atomicStore(&best_id, NONE);
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
        if (lid == 0u) { out[params.out_index] = best; }
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
            for (var d = lid; d < 256u; d += WG) { atomicStore(&hist[d], 0u); }
            workgroupBarrier();
            for (var i = lid; i < vocab; i += WG) {
                let kk = key(logits[i]);
                if ((kk & mask) == prefix) { atomicAdd(&hist[(kk >> shift) & 255u], 1u); }
            }
            workgroupBarrier();
            if (lid == 0u) {
                var cum = 0u;
                for (var d = 255i; d >= 0i; d--) {
                    let c = atomicLoad(&hist[d]);
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
    // 2. probabilities; dropped tokens are marked -1.
    var mass_part = 0.0;
    for (var i = lid; i < vocab; i += WG) {
        let l = logits[i];
        let p = select(-1.0, exp((l - max_logit) / params.temperature), !use_top_k || l >= kth);
        mass_part += max(p, 0.0);
        probs[i] = p;
    }
    // Steps 4-6 read contiguous runs of ids, written by other threads.
    storageBarrier();
    let chunk = (vocab + WG - 1u) / WG;
    let first = min(lid * chunk, vocab);
    let end = min(first + chunk, vocab);
    let mass = sum_all(lid, mass_part);
    // 4. top-p threshold (as bits of q = p / mass); 0 keeps everything.
    var t_bits = 0u;
    if (params.top_p < 1.0) {
        // With top-k on, the few kept q are compacted (in id order, so the sums are
        // deterministic) into workgroup memory, and the search reads them, not the vocabulary.
        var n_run = 0.0;
        if (use_top_k) {
            for (var i = first; i < end; i++) { n_run += select(0.0, 1.0, probs[i] >= 0.0); }
        }
        let at = scan_exclusive(lid, n_run);
        if (lid == WG - 1u) { cand_count = u32(at + n_run); }
        workgroupBarrier();
        let count = cand_count;
        let in_list = use_top_k && count <= CAP;
        if (in_list) {
            var j = u32(at);
            for (var i = first; i < end; i++) {
                let p = probs[i];
                if (p >= 0.0) {
                    cand[j] = p / mass;
                    j++;
                }
            }
        }
        workgroupBarrier();
        var lo = 0u;
        var hi = bitcast<u32>(1.0 / mass) + 1u;
        for (var it = 0u; it < 32u; it++) {
            let mid = lo + (hi - lo) / 2u;
            var part = 0.0;
            if (in_list) {
                for (var i = lid; i < count; i += WG) {
                    part += select(0.0, cand[i], bitcast<u32>(cand[i]) >= mid);
                }
            } else {
                for (var i = lid; i < vocab; i += WG) {
                    let q = probs[i] / mass;
                    part += select(0.0, q, q >= 0.0 && bitcast<u32>(q) >= mid);
                }
            }
            if (sum_all(lid, part) >= params.top_p) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        t_bits = lo;
    }
    // 5 + 6. min-p and the id-order walk.
    var run = 0.0;
    for (var i = first; i < end; i++) {
        let p = probs[i];
        run += select(0.0, p, kept(p, mass, t_bits));
    }
    let goal = params.uniform * sum_all(lid, run);
    var acc = scan_exclusive(lid, run);
    var last = NONE;
    var found = false;
    for (var i = first; i < end; i++) {
        let p = probs[i];
        if (kept(p, mass, t_bits)) {
            acc += p;
            if (!found && acc > goal) {
                atomicMin(&pick, i);
                found = true;
            }
            last = i;
        }
    }
    if (last != NONE) { atomicMax(&last_kept, last); }
    workgroupBarrier();
    if (lid == 0u) {
        let chosen = atomicLoad(&pick);
        out[params.out_index] = select(chosen, atomicLoad(&last_kept), chosen == NONE);
    }
}
