// sample_walk: steps 4-6 of sample.wgsl (which documents the rules) over the whole vocabulary,
// for the cases sample.wgsl leaves open (no top-k, or more than 64 top-k survivors). Reads the
// probabilities sample.wgsl left in `probs` (-1 = dropped by top-k) and, after them, a word
// saying whether the token is already chosen. One workgroup of WG threads:
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
@group(0) @binding(2) var<storage, read> probs: array<f32>;

var<workgroup> redf: array<f32, WG>;
var<workgroup> pick: atomic<u32>;
var<workgroup> last_kept: atomic<u32>;
var<workgroup> chosen_already: u32;

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

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    let vocab = params.vocab;
    if (lid == 0u) {
        atomicStore(&pick, NONE);
        atomicStore(&last_kept, 0u);
        chosen_already = bitcast<u32>(probs[vocab]);
    }
    if (workgroupUniformLoad(&chosen_already) != 0u) {
        return;
    }
    let chunk = (vocab + WG - 1u) / WG;
    let first = min(lid * chunk, vocab);
    let end = min(first + chunk, vocab);
    var mass_part = 0.0;
    for (var i = lid; i < vocab; i += WG) { mass_part += max(probs[i], 0.0); }
    let mass = sum_all(lid, mass_part);
    // 4. top-p threshold (as bits of q = p / mass); 0 keeps everything.
    var t_bits = 0u;
    if (params.top_p < 1.0) {
        var lo = 0u;
        var hi = bitcast<u32>(1.0 / mass) + 1u;
        for (var it = 0u; it < 32u; it++) {
            let mid = lo + (hi - lo) / 2u;
            var part = 0.0;
            for (var i = lid; i < vocab; i += WG) {
                let q = probs[i] / mass;
                part += select(0.0, q, q >= 0.0 && bitcast<u32>(q) >= mid);
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
