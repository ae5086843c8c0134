//! Llama 3.1-style RoPE scaling from llama.cpp's `rope_freqs.weight`.
//!
//! llama.cpp's converter does not write the llama3 scaling parameters into the metadata; it
//! stores their effect instead, one divisor per rotary frequency: 1 for high frequencies,
//! `factor` for low ones, and `1 / ((1 - s) / factor + s)` in between, where
//! `s = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)`.
//! The two boundaries and the ramp between them are recovered from those divisors. Only the
//! ratios `original / low_freq_factor` and `original / high_freq_factor` are identifiable, and
//! only they affect the frequencies, so `low_freq_factor` is taken as 1. The recovered
//! parameters are accepted only if they reproduce every stored divisor.

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
    if ramp.len() < 2 {
        return None;
    }
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
    let (low, high) = (snap(original / low_wavelen), snap(original / high_wavelen));
    let factor = snap(factor);
    let reproduces = wavelens
        .iter()
        .zip(&f)
        .all(|(&w, &d)| (divisor(w, factor, low, high, original) - d).abs() <= TOL * d);
    reproduces.then_some(RopeScaling::Llama3 {
        factor,
        low_freq_factor: low,
        high_freq_factor: high,
        original_max_position_embeddings: original as usize,
    })
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
        (0..head_dim / 2)
            .map(|i| {
                divisor(
                    2.0 * PI * theta.powf(2.0 * i as f64 / head_dim as f64),
                    factor,
                    low,
                    high,
                    original,
                ) as f32
            })
            .collect()
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
}
