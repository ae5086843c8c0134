//! RoPE inverse frequencies for every variant transformers supports on Llama, computed on the
//! host once (or once per forward call for the length-dependent variants) and uploaded.
//!
//! The arithmetic mirrors transformers' `ROPE_INIT_FUNCTIONS` operation by operation: where it
//! works on float32 tensors we round to f32 at the same points, where it works on Python floats we
//! use f64. That keeps our frequencies within an ulp or so of HF's, which matters because an
//! error in a frequency grows linearly with the position it is multiplied by.

use crate::config::{ModelConfig, RopeScaling};
use std::f64::consts::PI;

/// Frequencies for one forward call: `inv_freq[i]` rotates the pair (i, i + head_dim/2) of every
/// query/key head by `position * inv_freq[i]`; cos and sin are then multiplied by
/// `attention_scaling` (yarn and longrope scale attention that way; 1.0 for the others).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFreqs {
    pub inv_freq: Vec<f32>,
    pub attention_scaling: f32,
}

/// True when the frequencies depend on `seq_len`, so they must be recomputed per forward call.
pub fn varies_with_len(cfg: &ModelConfig) -> bool {
    matches!(
        cfg.rope_scaling,
        RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }
    )
}

/// The frequencies transformers' `LlamaRotaryEmbedding` uses in a forward call whose largest
/// position is `seq_len - 1`.
///
/// For dynamic NTK and longrope this is what `dynamic_rope_update` computes for a fresh model
/// whose sequence only grows (one prompt, then decoding): dynamic rescales from `seq_len` once it
/// passes max_position_embeddings; longrope switches to its long factors once `seq_len` passes
/// original_max_position_embeddings. (HF keeps that state across calls; after a longer sequence it
/// resets only when a call is strictly shorter than the original length, a corner we do not copy.)
pub fn rope_freqs(cfg: &ModelConfig, seq_len: usize) -> RopeFreqs {
    let dim = cfg.head_dim;
    let base = cfg.rope_theta;
    let unscaled = |base: f32| -> Vec<f32> { base_powers(base, dim).map(|p| 1.0 / p).collect() };
    let plain = |inv_freq| RopeFreqs {
        inv_freq,
        attention_scaling: 1.0,
    };

    match &cfg.rope_scaling {
        RopeScaling::Default => plain(unscaled(base as f32)),
        RopeScaling::Linear { factor } => plain(
            unscaled(base as f32)
                .into_iter()
                .map(|f| f / *factor as f32)
                .collect(),
        ),
        RopeScaling::Dynamic {
            factor,
            original_max_position_embeddings: orig,
        } => plain(unscaled(dynamic_base(base, *factor, *orig, dim, seq_len))),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => plain(llama3(
            unscaled(base as f32),
            *factor,
            *low_freq_factor,
            *high_freq_factor,
            *original_max_position_embeddings as f64,
        )),
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings: orig,
            attention_factor,
            factor,
        } => {
            let ext = if seq_len > *orig {
                long_factor
            } else {
                short_factor
            };
            let inv_freq = base_powers(base as f32, dim)
                .zip(ext)
                .map(|(p, &e)| 1.0 / (e as f32 * p))
                .collect();
            let factor = factor.unwrap_or(cfg.max_seq_len as f64 / *orig as f64);
            let scaling = attention_factor.unwrap_or_else(|| {
                if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (*orig as f64).ln()).sqrt()
                }
            });
            RopeFreqs {
                inv_freq,
                attention_scaling: scaling as f32,
            }
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            let inv_freq = yarn(
                base,
                dim,
                *factor,
                *original_max_position_embeddings as f64,
                (*beta_fast, *beta_slow),
                *truncate,
            );
            // Python truthiness: a 0 mscale counts as absent.
            let scaling = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => {
                    yarn_mscale(*factor, *m) / yarn_mscale(*factor, *a)
                }
                _ => yarn_mscale(*factor, 1.0),
            });
            RopeFreqs {
                inv_freq,
                attention_scaling: scaling as f32,
            }
        }
    }
}

/// `base ** (arange(0, dim, 2) / dim)` in float32, one value per rotated pair.
fn base_powers(base: f32, dim: usize) -> impl Iterator<Item = f32> {
    // The exponent is rounded to f32 first, as torch divides a float32 arange; the power itself
    // is taken in f64 and rounded once, which is what torch's float32 pow returns within an ulp.
    (0..dim / 2).map(move |i| {
        let exponent = (2 * i) as f32 / dim as f32;
        (base as f64).powf(exponent as f64) as f32
    })
}

/// Dynamic NTK: the base grows with the sequence once it passes the original length.
fn dynamic_base(base: f64, factor: f64, orig: usize, dim: usize, seq_len: usize) -> f32 {
    if seq_len <= orig {
        // The frequencies built at load time (seq_len = max_position_embeddings), in Python floats.
        let n = orig as f64;
        return (base * ((factor * n / n) - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0)))
            as f32;
    }
    // Per-call update: seq_len is an int64 tensor there, so the whole expression runs in float32.
    let grown = (factor as f32 * seq_len as f32) / orig as f32 - (factor - 1.0) as f32;
    let exponent = (dim as f64 / (dim as f64 - 2.0)) as f32;
    base as f32 * (grown as f64).powf(exponent as f64) as f32
}

/// Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
fn llama3(inv: Vec<f32>, factor: f64, low: f64, high: f64, old_context_len: f64) -> Vec<f32> {
    let low_freq_wavelen = (old_context_len / low) as f32;
    let high_freq_wavelen = (old_context_len / high) as f32;
    let factor = factor as f32;
    let two_pi = (2.0 * PI) as f32;
    inv.into_iter()
        .map(|f| {
            // torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar.
            let wavelen = (1.0 / f) * two_pi;
            let scaled = if wavelen > low_freq_wavelen {
                f / factor
            } else {
                f
            };
            let smooth =
                ((1.0 / wavelen) * old_context_len as f32 - low as f32) / (high - low) as f32;
            let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
            let is_medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
            if is_medium {
                smoothed
            } else {
                scaled
            }
        })
        .collect()
}

/// YaRN: interpolate (divide by `factor`) the low frequencies, extrapolate (keep) the high ones,
/// with a linear ramp over the dimensions between the two correction bounds.
fn yarn(
    base: f64,
    dim: usize,
    factor: f64,
    orig: f64,
    betas: (f64, f64),
    truncate: bool,
) -> Vec<f32> {
    // The dimension whose wavelength makes `num_rotations` turns over the original context.
    let correction_dim = |num_rotations: f64| {
        (dim as f64 * (orig / (num_rotations * 2.0 * PI)).ln()) / (2.0 * base.ln())
    };
    let (mut low, mut high) = (correction_dim(betas.0), correction_dim(betas.1));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let mut high = high.min(dim as f64 - 1.0);
    if low == high {
        high += 0.001; // as transformers does, to avoid dividing by zero
    }
    let (low32, span32) = (low as f32, (high - low) as f32);
    let factor = factor as f32;
    base_powers(base as f32, dim)
        .enumerate()
        .map(|(i, pos_freq)| {
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (factor * pos_freq);
            let ramp = ((i as f32 - low32) / span32).clamp(0.0, 1.0);
            let extrapolation_weight = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight
        })
        .collect()
}

/// YaRN's attention temperature: 0.1 * m * ln(scale) + 1 for scale > 1.
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}
