//! Sampling: the user's settings, the host-side logits processors (repetition / presence /
//! frequency penalties) and the reference token choice that every backend's `sample` op follows.
//!
//! The choice, given logits l and a uniform number u in [0, 1):
//! 1. temperature <= 0 or top_k == 1: argmax (lowest id among equal maxima).
//! 2. p = softmax(l / temperature).
//! 3. top-k: keep tokens whose logit is >= the k-th largest logit (ties kept).
//! 4. top-p: renormalise the kept p to q; keep tokens with q >= t, where t is the largest value
//!    for which the kept mass of {q >= t} is still >= top_p (the smallest head of the sorted
//!    distribution that reaches top_p, as HF's TopPLogitsWarper).
//! 5. min-p: keep tokens with p >= min_p * max(p).
//! 6. Walk the kept tokens in id order accumulating p; return the first whose running sum
//!    exceeds u * (kept mass). Walking in id order (not sorted order) lets a GPU do it with one
//!    prefix sum; the distribution is the same.

use crate::backend::SampleOp;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What the user asked for (CLI flags, generation_config.json, API requests).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1.0 = off.
    pub top_p: f32,
    /// 0.0 = off.
    pub min_p: f32,
    /// 1.0 = off. HF semantics: logits of seen tokens divided (if > 0) or multiplied (if < 0).
    pub repetition_penalty: f32,
    /// 0.0 = off. Subtracted once from the logit of every token already seen (OpenAI semantics).
    pub presence_penalty: f32,
    /// 0.0 = off. Subtracted per occurrence (OpenAI semantics).
    pub frequency_penalty: f32,
    /// How many of the most recent tokens the penalties look at (0 = all).
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// True when logits must visit the host before sampling (penalties need the history).
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    pub fn validate(&self) -> crate::Result<()> {
        let bad = |m: &str| Err(crate::Error::Generation(m.to_string()));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repeat penalty must be a finite number > 0");
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return bad("presence / frequency penalties must be finite");
        }
        Ok(())
    }
}

/// The per-sequence random stream: same seed, same tokens.
pub struct Sampler {
    pub params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    /// The device op's settings for the next token (draws one uniform number).
    pub fn next_op(&mut self) -> SampleOp {
        let p = &self.params;
        SampleOp {
            temperature: if p.is_greedy() { 0.0 } else { p.temperature },
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            uniform: self.rng.random::<f32>(),
        }
    }
}

/// Applies repetition / presence / frequency penalties for the tokens in `history`.
pub fn apply_penalties(logits: &mut [f32], history: &[u32], p: &SamplingParams) {
    let recent = match p.penalty_last_n {
        0 => history,
        n => &history[history.len().saturating_sub(n)..],
    };
    let mut counts = std::collections::HashMap::<u32, u32>::new();
    for &t in recent {
        *counts.entry(t).or_default() += 1;
    }
    for (&t, &c) in &counts {
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if p.repetition_penalty != 1.0 {
            *l = if *l > 0.0 {
                *l / p.repetition_penalty
            } else {
                *l * p.repetition_penalty
            };
        }
        *l -= p.presence_penalty + p.frequency_penalty * c as f32;
    }
}

/// Steps 2-5 of the rules: which tokens survive the filters, and each token's unnormalised
/// probability weight exp((l - max) / temperature). Needs temperature > 0.
pub fn kept_set(logits: &[f32], s: &SampleOp) -> (Vec<bool>, Vec<f32>) {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let p: Vec<f32> = logits
        .iter()
        .map(|l| ((l - max) / s.temperature).exp())
        .collect();
    let mut keep = vec![true; logits.len()];
    if s.top_k > 0 && s.top_k < logits.len() {
        let mut sorted = logits.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[s.top_k - 1];
        keep.iter_mut()
            .zip(logits)
            .for_each(|(k, l)| *k &= *l >= kth);
    }
    if s.top_p < 1.0 {
        let mass: f32 = p
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(p, _)| p)
            .sum();
        let mut kept: Vec<f32> = p
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(p, _)| p / mass)
            .collect();
        kept.sort_by(|a, b| b.total_cmp(a));
        let mut acc = 0.0;
        let mut t = kept[kept.len() - 1];
        for q in kept {
            acc += q;
            if acc >= s.top_p {
                t = q;
                break;
            }
        }
        keep.iter_mut()
            .zip(&p)
            .for_each(|(k, p)| *k &= p / mass >= t);
    }
    if s.min_p > 0.0 {
        // max(p) is 1 by construction (exp(0)).
        keep.iter_mut()
            .zip(&p)
            .for_each(|(k, p)| *k &= *p >= s.min_p);
    }
    (keep, p)
}

/// The reference token choice (module docs). Never returns an id >= logits.len().
pub fn sample_logits(logits: &[f32], s: &SampleOp) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if s.temperature <= 0.0 || s.top_k == 1 {
        return argmax();
    }
    let (keep, p) = kept_set(logits, s);
    let mass: f32 = p
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|(p, _)| p)
        .sum();
    let target = s.uniform * mass;
    let mut acc = 0.0;
    let mut last = argmax();
    for (i, (p, k)) in p.iter().zip(&keep).enumerate() {
        if *k {
            acc += p;
            last = i as u32;
            if acc > target {
                return i as u32;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(temperature: f32, top_k: usize, top_p: f32, min_p: f32, uniform: f32) -> SampleOp {
        SampleOp {
            temperature,
            top_k,
            top_p,
            min_p,
            uniform,
        }
    }

    #[test]
    fn greedy_picks_first_maximum() {
        assert_eq!(
            sample_logits(&[1.0, 3.0, 3.0, -1.0], &op(0.0, 0, 1.0, 0.0, 0.5)),
            1
        );
    }

    #[test]
    fn filters_follow_the_documented_rules() {
        let l = [2.0f32.ln(), 4.0f32.ln(), 1.0f32.ln(), 3.0f32.ln()]; // p = .2 .4 .1 .3
                                                                      // top-k 2 keeps ids 1 and 3: u = 0 -> id 1, u just below 1 -> id 3.
        assert_eq!(sample_logits(&l, &op(1.0, 2, 1.0, 0.0, 0.0)), 1);
        assert_eq!(sample_logits(&l, &op(1.0, 2, 1.0, 0.0, 0.999)), 3);
        // top-p 0.65: sorted .4 .3 reach .7 >= .65 -> ids 1, 3 kept.
        assert_eq!(sample_logits(&l, &op(1.0, 0, 0.65, 0.0, 0.999)), 3);
        // min-p 0.6: p >= .6 * .4 = .24 keeps ids 1 and 3 again; id 0 (0.2) never drawn.
        for u in [0.0, 0.3, 0.6, 0.9] {
            let t = sample_logits(&l, &op(1.0, 0, 1.0, 0.6, u));
            assert!(t == 1 || t == 3, "{t}");
        }
        // No filter: u walks the ids in order 0 (.2) 1 (.4) 2 (.1) 3 (.3).
        assert_eq!(sample_logits(&l, &op(1.0, 0, 1.0, 0.0, 0.1)), 0);
        assert_eq!(sample_logits(&l, &op(1.0, 0, 1.0, 0.0, 0.65)), 2);
    }

    #[test]
    fn penalties_match_hf_and_openai_semantics() {
        let mut l = vec![2.0, -2.0, 1.0];
        let p = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            penalty_last_n: 0,
            ..SamplingParams::greedy()
        };
        apply_penalties(&mut l, &[0, 1, 1], &p);
        assert_eq!(l, vec![2.0 / 2.0 - 0.75, -2.0 * 2.0 - 1.0, 1.0]);
    }

    #[test]
    fn same_seed_same_stream() {
        let a: Vec<f32> = (0..4)
            .map({
                let mut s = Sampler::new(SamplingParams {
                    seed: 7,
                    ..Default::default()
                });
                move |_| s.next_op().uniform
            })
            .collect();
        let b: Vec<f32> = (0..4)
            .map({
                let mut s = Sampler::new(SamplingParams {
                    seed: 7,
                    ..Default::default()
                });
                move |_| s.next_op().uniform
            })
            .collect();
        assert_eq!(a, b);
    }
}
