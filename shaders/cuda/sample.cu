// sample: picks one token from logits[vocab] and writes it to out[out_index], following the
// reference rules of src/sample.rs (the same steps as shaders/wgsl/sample.wgsl). One block:
// 1. argmax (lowest id among equal maxima); greedy (temperature <= 0 or top_k == 1) stops here.
// 2. p = exp((l - max) / temperature) into the scratch `probs`.
// 3. top-k: the k-th largest logit by a 4-pass radix select over 8-bit digits of the
//    order-preserving key, histograms in shared atomics; tokens below it get p = -1 (dropped).
// With at most 64 top-k survivors (the usual case) one thread sorts them by id and applies top-p,
// min-p and the id-order walk in the reference's order of operations. Otherwise sample_walk.cu,
// launched right after, does steps 4-6 over the whole vocabulary; probs[vocab] tells it whether
// the token is already chosen.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define SMALL 64

__device__ __forceinline__ u32 key_of(float f) {
    const u32 b = __float_as_uint(f);
    return (b >> 31) ? ~b : (b ^ 0x80000000u);
}

__device__ __forceinline__ float unkey(u32 k) {
    return __uint_as_float((k >> 31) ? (k ^ 0x80000000u) : ~k);
}

// Steps 4-6 for at most SMALL survivors on one thread, exactly in the reference's order.
__device__ u32 pick_small(u32* ids, float* ps, u32 count, u32 best, const SampleParams& p) {
    for (u32 i = 1; i < count; i++) {
        const u32 id = ids[i];
        const float v = ps[i];
        u32 j = i;
        while (j > 0 && ids[j - 1] > id) {
            ids[j] = ids[j - 1];
            ps[j] = ps[j - 1];
            j--;
        }
        ids[j] = id;
        ps[j] = v;
    }
    float mass = 0.0f;
    for (u32 i = 0; i < count; i++) mass += ps[i];
    // t: the q at which the descending running sum first reaches top_p (else the smallest q).
    float t = 0.0f;
    if (p.top_p < 1.0f) {
        float acc = 0.0f, above = 2.0f;
        bool done = false;
        while (!done) {
            float q = -1.0f;
            for (u32 i = 0; i < count; i++) {
                const float v = ps[i] / mass;
                if (v < above) q = fmaxf(q, v);
            }
            if (q < 0.0f) break;
            for (u32 i = 0; i < count; i++)
                if (!done && ps[i] / mass == q) {
                    acc += q;
                    done = acc >= p.top_p;
                }
            t = q;
            above = q;
        }
    }
    float kept = 0.0f;
    for (u32 i = 0; i < count; i++)
        if (ps[i] / mass >= t && ps[i] >= p.min_p) kept += ps[i];
    const float goal = p.uniform * kept;
    float acc = 0.0f;
    u32 last = best;
    for (u32 i = 0; i < count; i++)
        if (ps[i] / mass >= t && ps[i] >= p.min_p) {
            acc += ps[i];
            last = ids[i];
            if (acc > goal) return last;
        }
    return last;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample(u32* out, const float* logits, float* probs, SampleParams p) {
    __shared__ u32 hist[256];
    __shared__ u32 digit[2];
    __shared__ u32 best_key, best_id, n_small;
    __shared__ u32 small_id[SMALL];
    __shared__ float small_p[SMALL];
    const u32 t = threadIdx.x, vocab = p.vocab;
    if (t == 0) {
        best_key = 0;
        best_id = NONE_U32;
        n_small = 0;
    }
    __syncthreads();
    // 1. argmax: each thread's first maximum, then the largest key and the lowest id holding it.
    float bv = logits[min(t, vocab - 1)];
    u32 bi = t;
    for (u32 i = t + SAMPLE_THREADS; i < vocab; i += SAMPLE_THREADS)
        if (logits[i] > bv) {
            bv = logits[i];
            bi = i;
        }
    if (bi < vocab) atomicMax(&best_key, key_of(bv));
    __syncthreads();
    const u32 top = best_key;
    if (bi < vocab && key_of(bv) == top) atomicMin(&best_id, bi);
    __syncthreads();
    const float max_logit = unkey(top);
    const u32 best = best_id;
    if (p.temperature <= 0.0f || p.top_k == 1) {
        if (t == 0) {
            out[p.out_index] = best;
            probs[vocab] = __uint_as_float(1u);
        }
        return;
    }
    // 3. top-k threshold: the k-th largest logit, ties kept.
    const bool use_top_k = p.top_k > 0 && p.top_k < vocab;
    float kth = 0.0f;
    if (use_top_k) {
        u32 prefix = 0, remaining = p.top_k;
        for (int level = 0; level < 4; level++) {
            const u32 shift = 24 - 8 * level;
            const u32 mask = level == 0 ? 0u : ~((1u << (shift + 8)) - 1u);
            for (u32 d = t; d < 256; d += SAMPLE_THREADS) hist[d] = 0;
            __syncthreads();
            for (u32 i = t; i < vocab; i += SAMPLE_THREADS) {
                const u32 k = key_of(logits[i]);
                if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (t == 0) {
                u32 cum = 0;
                for (int d = 255; d >= 0; d--) {
                    const u32 c = hist[d];
                    if (cum + c >= remaining) {
                        digit[0] = prefix | ((u32)d << shift);
                        digit[1] = remaining - cum;
                        break;
                    }
                    cum += c;
                }
            }
            __syncthreads();
            prefix = digit[0];
            remaining = digit[1];
            __syncthreads();
        }
        kth = unkey(prefix);
    }
    // 2. probabilities; dropped tokens are marked -1. Top-k survivors are also gathered.
    for (u32 i = t; i < vocab; i += SAMPLE_THREADS) {
        const float l = logits[i];
        const float pr = (!use_top_k || l >= kth) ? expf((l - max_logit) / p.temperature) : -1.0f;
        probs[i] = pr;
        if (use_top_k && pr >= 0.0f) {
            const u32 at = atomicAdd(&n_small, 1u);
            if (at < SMALL) {
                small_id[at] = i;
                small_p[at] = pr;
            }
        }
    }
    __syncthreads();
    const u32 count = n_small;
    if (use_top_k && count <= SMALL) {
        if (t == 0) {
            out[p.out_index] = pick_small(small_id, small_p, count, best, p);
            probs[vocab] = __uint_as_float(1u);
        }
        return;
    }
    if (t == 0) probs[vocab] = 0.0f;
}
