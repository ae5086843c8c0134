//! Llama 3.1-style RoPE scaling from llama.cpp's `rope_freqs.weight`.
//!
//! llama.cpp's converter does not write the llama3 scaling parameters into the metadata; it
//! stores their effect instead, one divisor per rotary frequency: 1 for high frequencies,
//! `factor` for low ones, and `1 / ((1 - s) / factor + s)` in between, where
//! `s = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)`.
//! The two boundaries and the ramp between them are recovered from those divisors. Only the
//! ratios `original / low_freq_factor` and `original / high_freq_factor` are identifiable, and
//! only they affect the frequencies, so `low_freq_factor` is taken as 1. The recovered
//! parameters are accepted only if they reproduce every stored divisor. When fewer than two
//! frequencies fall on the ramp its ends are not determined; any ends that reproduce the
//! divisors give the same frequencies, so one such choice is made.

use crate::config::RopeScaling;
use std::f64::consts::PI;

/// Relative tolerance when matching stored (f32) divisors.
const TOL: f64 = 1e-4;

/// The divisor llama.cpp's converter stores for a frequency of wavelength `wavelen`.
fn divisor(wavelen: f64, factor: f64, low: f64, high: f64, original: f64) -> f64 {
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    if wavelen < high_wavelen {
        1.0
    } else if wavelen > low_wavelen {
        factor
    } else {
        let s = (original / wavelen - low) / (high - low);
        1.0 / ((1.0 - s) / factor + s)
    }
}

/// The divisors llama.cpp's converter stores for a llama3 scaling: one per rotary frequency
/// `theta^(-2i/head_dim)`, i in 0..head_dim/2.
pub(crate) fn llama3_divisors(
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original: f64,
    theta: f64,
    head_dim: usize,
) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let wavelen = 2.0 * PI * theta.powf(2.0 * i as f64 / head_dim as f64);
            divisor(wavelen, factor, low_freq_factor, high_freq_factor, original) as f32
        })
        .collect()
}

/// The llama3 scaling that produced `divisors` (one per frequency `theta^(-2i/head_dim)`), or
/// `Default` if they are all 1; None if they do not follow the llama3 scheme.
pub(crate) fn llama3_from_divisors(
    divisors: &[f32],
    theta: f64,
    head_dim: usize,
) -> Option<RopeScaling> {
    if divisors.len() * 2 != head_dim || divisors.iter().any(|d| !d.is_finite() || *d <= 0.0) {
        return None;
    }
    let wavelens: Vec<f64> = (0..divisors.len())
        .map(|i| 2.0 * PI * theta.powf(2.0 * i as f64 / head_dim as f64))
        .collect();
    let f: Vec<f64> = divisors.iter().map(|&d| d as f64).collect();
    let factor = f.iter().cloned().fold(1.0, f64::max);
    if factor <= 1.0 + TOL {
        return f
            .iter()
            .all(|&d| (d - 1.0).abs() <= TOL)
            .then_some(RopeScaling::Default);
    }
    // On the ramp the divisor gives s, which is linear in 1 / wavelength: s = a / wavelen - b.
    let ramp: Vec<(f64, f64)> = wavelens
        .iter()
        .zip(&f)
        .filter(|(_, &d)| (d - 1.0).abs() > TOL && (d - factor).abs() > TOL * factor)
        .map(|(&w, &d)| (1.0 / w, (1.0 / d - 1.0 / factor) / (1.0 - 1.0 / factor)))
        .collect();
    // In terms of x = 1 / wavelength, s = (x - x_low) / (x_high - x_low): the ramp runs from
    // x_low (s = 0, divisor `factor`) up to x_high (s = 1, divisor 1).
    let (x_low, x_high) = if ramp.len() >= 2 {
        let n = ramp.len() as f64;
        let (mx, my) = (
            ramp.iter().map(|p| p.0).sum::<f64>() / n,
            ramp.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let sxx: f64 = ramp.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = ramp.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let a = sxy / sxx;
        let b = a * mx - my;
        if !(a > 0.0 && b > 0.0) {
            return None;
        }
        (b / a, (1.0 + b) / a)
    } else {
        // Undetermined ends: pick some inside the gaps the stored divisors leave open.
        let x: Vec<f64> = wavelens.iter().map(|w| 1.0 / w).collect();
        let is = |d: f64, v: f64| (d - v).abs() <= TOL * v;
        // Frequencies left unscaled lie above x_high; those divided by `factor` below x_low.
        let above = x
            .iter()
            .zip(&f)
            .filter(|(_, &d)| is(d, 1.0))
            .map(|(&x, _)| x)
            .fold(f64::INFINITY, f64::min);
        let below = x
            .iter()
            .zip(&f)
            .filter(|(_, &d)| is(d, factor))
            .map(|(&x, _)| x)
            .fold(0.0, f64::max);
        ends_between(below, above, ramp.first().copied())?
    };
    let (a, b) = (1.0 / (x_high - x_low), x_low / (x_high - x_low));
    // s = 0 at the low-frequency boundary, s = 1 at the high-frequency one.
    let (low_wavelen, high_wavelen) = (a / b, a / (1.0 + b));
    let original = low_wavelen.round();
    let snap = |x: f64| {
        if (x - x.round()).abs() < 1e-3 {
            x.round()
        } else {
            x
        }
    };
    let reproduces = |factor: f64, low: f64, high: f64| {
        wavelens
            .iter()
            .zip(&f)
            .all(|(&w, &d)| (divisor(w, factor, low, high, original) - d).abs() <= TOL * d)
    };
    // Round values that are nearly whole, unless that breaks the match.
    let raw = (factor, original / low_wavelen, original / high_wavelen);
    let snapped = (snap(raw.0), snap(raw.1), snap(raw.2));
    [snapped, raw]
        .into_iter()
        .find(|&(factor, low, high)| high > low && reproduces(factor, low, high))
        .map(|(factor, low, high)| RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: original as usize,
        })
}

/// Ramp ends (x_low, x_high) with every unscaled frequency above x_high and every fully scaled
/// one below x_low, passing through the one ramp point `(x, s)` if there is one.
fn ends_between(below: f64, above: f64, point: Option<(f64, f64)>) -> Option<(f64, f64)> {
    if below <= 0.0 || below >= above {
        return None; // no frequency is fully scaled, or the two kinds interleave
    }
    match point {
        None if above.is_finite() => {
            // Split the gap in three, evenly on a log scale.
            Some((
                below.powf(2.0 / 3.0) * above.powf(1.0 / 3.0),
                below.powf(1.0 / 3.0) * above.powf(2.0 / 3.0),
            ))
        }
        None => Some((below * 2.0, below * 3.0)),
        Some((x, s)) => {
            // x = s * x_high + (1 - s) * x_low, with x_high in [x, above) and x_low > below.
            if !(below < x && x < above && s > 0.0 && s < 1.0) {
                return None;
            }
            let limit = above.min((x - (1.0 - s) * below) / s);
            let x_high = (x + limit) / 2.0;
            Some(((x - s * x_high) / (1.0 - s), x_high))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn divisors(
        factor: f64,
        low: f64,
        high: f64,
        original: f64,
        theta: f64,
        head_dim: usize,
    ) -> Vec<f32> {
        llama3_divisors(factor, low, high, original, theta, head_dim)
    }

    #[test]
    fn recovers_llama_3_1_and_equivalent_parameters() {
        let d = divisors(8.0, 1.0, 4.0, 8192.0, 500000.0, 128);
        let want = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        assert_eq!(llama3_from_divisors(&d, 500000.0, 128), Some(want));
        // low_freq_factor 2 with original 8192 is the same scaling as 1 with 4096.
        let d = divisors(32.0, 2.0, 8.0, 8192.0, 500000.0, 128);
        let got = llama3_from_divisors(&d, 500000.0, 128);
        assert!(
            matches!(
                got,
                Some(RopeScaling::Llama3 {
                    original_max_position_embeddings: 4096,
                    ..
                })
            ),
            "{got:?}"
        );
        assert_eq!(
            llama3_from_divisors(&[1.0; 64], 500000.0, 128),
            Some(RopeScaling::Default)
        );
        let mut bad = divisors(8.0, 1.0, 4.0, 8192.0, 500000.0, 128);
        bad[3] = 2.0;
        assert_eq!(llama3_from_divisors(&bad, 500000.0, 128), None);
        assert_eq!(llama3_from_divisors(&[1.0; 10], 500000.0, 128), None);
    }

    #[test]
    fn equivalent_scaling_when_the_ramp_holds_fewer_than_two_frequencies() {
        // head_dim 16, theta 1e4, original 16: one frequency on the ramp, the rest scaled.
        // (factor, low, high, original, theta, head_dim)
        let cases = [
            (4.0, 1.0, 4.0, 16.0, 1e4, 16),
            (8.0, 1.0, 1.5, 64.0, 1e4, 16), // a narrow ramp between two frequencies
            (2.0, 1.0, 4.0, 1.0, 1e4, 16),  // every frequency fully scaled
        ];
        for (factor, low, high, original, theta, head_dim) in cases {
            let d = divisors(factor, low, high, original, theta, head_dim);
            let got = llama3_from_divisors(&d, theta, head_dim);
            let Some(RopeScaling::Llama3 {
                factor: f,
                low_freq_factor: l,
                high_freq_factor: h,
                original_max_position_embeddings: o,
            }) = got
            else {
                panic!("{d:?}: {got:?}");
            };
            let again = divisors(f, l, h, o as f64, theta, head_dim);
            for (a, b) in again.iter().zip(&d) {
                assert!((a - b).abs() <= 1e-4 * b, "{d:?} -> {again:?}");
            }
        }
    }
}
