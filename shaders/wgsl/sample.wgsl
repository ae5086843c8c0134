// sample: picks one token from logits[vocab] and writes it to out[out_index], following the
// reference rules of src/sample.rs exactly. One workgroup of WG threads:
// 1. argmax (lowest id among equal maxima); greedy (temperature <= 0 or top_k == 1) stops here.
// 2. p = exp((l - max) / temperature) into the scratch `probs`.
// 3. top-k: the k-th largest logit by a 4-pass radix select (8-bit digits of the order-preserving
//    u32 key, histograms in workgroup atomics); tokens below it get probs = -1 (dropped).
// 4. top-p: the threshold t on q = p / mass is the largest float with sum(q >= t) >= top_p, found
//    by binary search over the bit patterns of non-negative floats (which order like u32).
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
var<workgroup> redu: array<u32, WG>;
var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> digit: array<u32, 2>;
var<workgroup> pick: atomic<u32>;
var<workgroup> last_kept: atomic<u32>;

// Sum of v over the workgroup (every thread gets it).
fn sum_all(lid: u32, v: f32) -> f32 {
    redf[lid] = v;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            redf[lid] += redf[lid + s];
        }
    }
    workgroupBarrier();
    let total = redf[0];
    workgroupBarrier();
    return total;
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
    // 1. argmax.
    var bv = 0.0;
    var bi = NONE;
    for (var i = lid; i < vocab; i += WG) {
        let l = logits[i];
        if (bi == NONE || l > bv) {
            bv = l;
            bi = i;
        }
    }
    redf[lid] = bv;
    redu[lid] = bi;
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) {
            let ov = redf[lid + s];
            let oi = redu[lid + s];
            let take = oi != NONE && (redu[lid] == NONE || ov > redf[lid] || (ov == redf[lid] && oi < redu[lid]));
            if (take) {
                redf[lid] = ov;
                redu[lid] = oi;
            }
        }
    }
    workgroupBarrier();
    let max_logit = redf[0];
    let best = redu[0];
    if (params.temperature <= 0.0 || params.top_k == 1u) {
        if (lid == 0u) {
            out[params.out_index] = best;
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
            for (var d = lid; d < 256u; d += WG) {
                atomicStore(&hist[d], 0u);
            }
            workgroupBarrier();
            for (var i = lid; i < vocab; i += WG) {
                let kk = key(logits[i]);
                if ((kk & mask) == prefix) {
                    atomicAdd(&hist[(kk >> shift) & 255u], 1u);
                }
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
        var p = exp((l - max_logit) / params.temperature);
        if (use_top_k && !(l >= kth)) {
            p = -1.0;
        } else {
            mass_part += p;
        }
        probs[i] = p;
    }
    // 4. top-p threshold (as bits of q = p / mass); 0 keeps everything.
    var t_bits = 0u;
    if (params.top_p < 1.0) {
        let mass = sum_all(lid, mass_part);
        var lo = 0u;
        var hi = bitcast<u32>(1.0 / mass) + 1u;
        for (var it = 0u; it < 32u; it++) {
            let mid = lo + (hi - lo) / 2u;
            var part = 0.0;
            for (var i = lid; i < vocab; i += WG) {
                let p = probs[i];
                if (p >= 0.0) {
                    let q = p / mass;
                    if (bitcast<u32>(q) >= mid) {
                        part += q;
                    }
                }
            }
            if (sum_all(lid, part) >= params.top_p) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        t_bits = lo;
        // Fold the rule into probs: q < t is dropped.
        for (var i = lid; i < vocab; i += WG) {
            let p = probs[i];
            if (p >= 0.0 && bitcast<u32>(p / mass) < t_bits) {
                probs[i] = -1.0;
            }
        }
    }
    // 5 + 6. min-p and the id-order walk, over contiguous runs: probs written by other
    // threads must be visible first.
    storageBarrier();
    let chunk = (vocab + WG - 1u) / WG;
    let first = min(lid * chunk, vocab);
    let end = min(first + chunk, vocab);
    var run = 0.0;
    for (var i = first; i < end; i++) {
        let p = probs[i];
        if (p >= 0.0 && p >= params.min_p) {
            run += p;
        }
    }
    let kept_mass = sum_all(lid, run);
    let goal = params.uniform * kept_mass;
    // Exclusive scan of the runs (Hillis-Steele).
    redf[lid] = run;
    for (var s = 1u; s < WG; s <<= 1u) {
        workgroupBarrier();
        var v = redf[lid];
        if (lid >= s) {
            v += redf[lid - s];
        }
        workgroupBarrier();
        redf[lid] = v;
    }
    if (lid == 0u) {
        atomicStore(&pick, NONE);
        atomicStore(&last_kept, 0u);
    }
    workgroupBarrier();
    var acc = select(0.0, redf[max(lid, 1u) - 1u], lid > 0u);
    var last = NONE;
    var found = false;
    for (var i = first; i < end; i++) {
        let p = probs[i];
        if (p >= 0.0 && p >= params.min_p) {
            acc += p;
            if (!found && acc > goal) {
                atomicMin(&pick, i);
                found = true;
            }
            last = i;
        }
    }
    if (last != NONE) {
        atomicMax(&last_kept, last);
    }
    workgroupBarrier();
    if (lid == 0u) {
        let chosen = atomicLoad(&pick);
        out[params.out_index] = select(chosen, atomicLoad(&last_kept), chosen == NONE);
    }
}
