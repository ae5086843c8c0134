//! An epoch's micro-batches: a seeded shuffle, then greedy packing or length-grouped batches.
//! Only ChaCha8's output stream is used (its values are fixed by the algorithm, not by a crate
//! version), with our own shuffle and range reduction, so a data order can be recomputed by any
//! later build.

use super::Sample;
use crate::train::step::MicroBatch;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Micro-batches of one window of the shuffled order that are sorted by length together:
/// wide enough to group similar lengths, narrow enough to keep the epoch's order random.
const GROUP_WINDOW: usize = 32;

/// The generator of one epoch: the seed picks the key, the epoch one of its streams.
pub(super) fn rng(seed: u64, epoch: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch as u64);
    rng
}

/// A uniform index below `n` (Lemire's multiply-shift; the bias, n / 2^64, is negligible).
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    ((rng.next_u64() as u128 * n as u128) >> 64) as usize
}

/// Fisher-Yates over `v`.
fn shuffle<T>(v: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, below(rng, i + 1));
    }
}

/// 0..n in a random order.
pub(super) fn shuffled(n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    shuffle(&mut order, rng);
    order
}

/// Appends `sample` to `mb` as its own sequence.
fn push(mb: &mut MicroBatch, sample: &Sample) {
    mb.tokens.extend(&sample.tokens);
    mb.labels.extend(&sample.labels);
    mb.lens.push(sample.tokens.len());
}

/// Samples in `order`, appended to a micro-batch until the next would pass `max_rows`.
pub(super) fn packed(samples: &[Sample], order: &[usize], max_rows: usize) -> Vec<MicroBatch> {
    let mut out = Vec::new();
    let mut mb = MicroBatch::default();
    for &i in order {
        let sample = &samples[i];
        if !mb.tokens.is_empty() && mb.tokens.len() + sample.tokens.len() > max_rows {
            out.push(std::mem::take(&mut mb));
        }
        push(&mut mb, sample);
    }
    if !mb.tokens.is_empty() {
        out.push(mb);
    }
    out
}

/// `batch` samples per micro-batch. Within each window of the shuffled order the samples are
/// sorted by length, so a micro-batch holds similar lengths (its rows, hence its cost and
/// memory, are predictable); then the micro-batches are shuffled so lengths do not rise and
/// fall with the windows.
pub(super) fn grouped(
    samples: &[Sample],
    order: &[usize],
    batch: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<MicroBatch> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for window in order.chunks(batch * GROUP_WINDOW) {
        let mut window = window.to_vec();
        // Stable, so equal lengths keep their shuffled order and the result is deterministic.
        window.sort_by_key(|&i| samples[i].tokens.len());
        groups.extend(window.chunks(batch).map(|g| g.to_vec()));
    }
    shuffle(&mut groups, rng);
    groups
        .iter()
        .map(|group| {
            let mut mb = MicroBatch::default();
            for &i in group {
                push(&mut mb, &samples[i]);
            }
            mb
        })
        .collect()
}
