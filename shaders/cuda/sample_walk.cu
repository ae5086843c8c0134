// sample_walk: steps 4-6 of sample.cu (which documents the rules) over the whole vocabulary, for
// the cases sample.cu leaves open (no top-k, or more than 64 top-k survivors). Reads the
// probabilities sample.cu left in `probs` (-1 = dropped by top-k) and the word after them saying
// whether the token is already chosen. One block:
// 4. top-p: the threshold t on q = p / mass is the largest float with sum(q >= t) >= top_p,
//    found by binary search over the bit patterns of non-negative floats (which order like u32).
// 5. min-p: p >= min_p (max p is 1).
// 6. id-order walk: each thread owns a contiguous run of ids, an exclusive scan of the runs' kept
//    mass gives every run its start, and the first id whose running sum passes uniform * kept
//    mass wins (atomicMin); if rounding leaves none, the last kept id.
#include "common.cuh"

#define WALK_THREADS 1024

__device__ __forceinline__ bool kept(float pr, float mass, u32 t_bits, float min_p) {
    return pr >= 0.0f && __float_as_uint(pr / mass) >= t_bits && pr >= min_p;
}

// Sum of v over the threads before this one.
__device__ float scan_exclusive(float v, float* buf) {
    const u32 t = threadIdx.x;
    buf[t] = v;
    for (u32 s = 1; s < WALK_THREADS; s <<= 1) {
        __syncthreads();
        float x = buf[t];
        if (t >= s) x += buf[t - s];
        __syncthreads();
        buf[t] = x;
    }
    __syncthreads();
    const float before = t > 0 ? buf[t - 1] : 0.0f;
    __syncthreads();
    return before;
}

extern "C" __global__ void __launch_bounds__(WALK_THREADS)
    sample_walk(u32* out, const float* probs, SampleParams p) {
    __shared__ float red[32];
    __shared__ float buf[WALK_THREADS];
    __shared__ u32 pick, last_kept;
    const u32 t = threadIdx.x, vocab = p.vocab;
    if (__float_as_uint(probs[vocab]) != 0u) return;
    if (t == 0) {
        pick = NONE_U32;
        last_kept = 0;
    }
    const u32 chunk = (vocab + WALK_THREADS - 1) / WALK_THREADS;
    const u32 first = min(t * chunk, vocab), end = min(first + chunk, vocab);
    float part = 0.0f;
    for (u32 i = t; i < vocab; i += WALK_THREADS) part += fmaxf(probs[i], 0.0f);
    const float mass = block_sum(part, red);
    u32 t_bits = 0;
    if (p.top_p < 1.0f) {
        u32 lo = 0, hi = __float_as_uint(1.0f / mass) + 1u;
        for (int it = 0; it < 32; it++) {
            const u32 mid = lo + (hi - lo) / 2;
            float s = 0.0f;
            for (u32 i = t; i < vocab; i += WALK_THREADS) {
                const float q = probs[i] / mass;
                if (q >= 0.0f && __float_as_uint(q) >= mid) s += q;
            }
            if (block_sum(s, red) >= p.top_p) lo = mid;
            else hi = mid;
        }
        t_bits = lo;
    }
    float run = 0.0f;
    for (u32 i = first; i < end; i++)
        if (kept(probs[i], mass, t_bits, p.min_p)) run += probs[i];
    const float goal = p.uniform * block_sum(run, red);
    float acc = scan_exclusive(run, buf);
    u32 last = NONE_U32;
    bool found = false;
    for (u32 i = first; i < end; i++) {
        const float pr = probs[i];
        if (kept(pr, mass, t_bits, p.min_p)) {
            acc += pr;
            if (!found && acc > goal) {
                atomicMin(&pick, i);
                found = true;
            }
            last = i;
        }
    }
    if (last != NONE_U32) atomicMax(&last_kept, last);
    __syncthreads();
    if (t == 0) out[p.out_index] = pick != NONE_U32 ? pick : last_kept;
}
