//! The timed parts of `anyllama bench`. Every figure is wall time around whole steps that end
//! in a device wait (the sampled token read back, or `sync`), which is what a user of the
//! library sees; each measurement is repeated after a warm-up and summarised by its median.

use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, Generator, StopReason};
use crate::model::Model;
use crate::pool::Buf;
use crate::sample::SamplingParams;
use crate::weights::Weights;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

/// The median (mean of the middle two for an even count); None for no values.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// A soft time limit: repetitions stop once it is past (a measurement always gets one run).
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    end: Option<Instant>,
}

impl Budget {
    /// `seconds` from now; 0 means no limit.
    pub fn new(seconds: f64) -> Self {
        Budget {
            end: (seconds > 0.0).then(|| Instant::now() + Duration::from_secs_f64(seconds)),
        }
    }

    pub fn exhausted(&self) -> bool {
        self.end.is_some_and(|e| Instant::now() >= e)
    }

    /// Seconds left; None without a limit.
    pub fn remaining(&self) -> Option<f64> {
        self.end
            .map(|e| e.saturating_duration_since(Instant::now()).as_secs_f64())
    }
}

/// `n` random token ids below `vocab` (the same for a given seed).
pub fn random_prompt(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

/// Bytes of weights one decode step reads: every layer's matrices and norms, the final norm,
/// the output projection and one row of the embedding table.
pub fn weight_bytes_per_token<B: Backend>(w: &Weights<B>) -> usize {
    let layers: usize = w
        .layers
        .iter()
        .map(|l| {
            let opt = |b: &Option<Buf<B>>| b.as_ref().map_or(0, |b| b.len());
            [&l.wq, &l.wk, &l.wv, &l.wo, &l.w1, &l.w2, &l.w3]
                .iter()
                .map(|m| m.buf.len())
                .sum::<usize>()
                + l.attn_norm.len()
                + l.ffn_norm.len()
                + [&l.bq, &l.bk, &l.bv, &l.bo, &l.b1, &l.b2, &l.b3]
                    .into_iter()
                    .map(opt)
                    .sum::<usize>()
        })
        .sum();
    let emb = &w.tok_embeddings;
    let emb_row = emb.dtype.bytes_for(emb.cols).unwrap_or(0);
    layers + w.norm.len() + w.output().buf.len() + emb_row
}

/// Copy bandwidth of the device in GB/s, counting bytes read plus bytes written: the median of
/// `samples` timings of back-and-forth copies between two `bytes`-byte buffers, each timing
/// long enough (about 50 ms) that the wait at its end does not matter. Halves the size when
/// the device cannot allocate it.
pub fn copy_bandwidth<B: Backend>(b: &B, bytes: usize, samples: usize) -> Result<f64> {
    let mut bytes = bytes.max(1 << 20) & !15;
    let (mut x, mut y) = loop {
        match (Buf::exact(b, bytes), Buf::exact(b, bytes)) {
            (Ok(x), Ok(y)) => break (x, y),
            _ if bytes > 64 << 20 => bytes /= 2,
            (Err(e), _) | (_, Err(e)) => return Err(e),
        }
    };
    let mut run = |copies: usize| -> Result<f64> {
        let t = Instant::now();
        for i in 0..copies {
            if i % 2 == 0 {
                b.copy(&mut y, 0, &x, 0, bytes)?;
            } else {
                b.copy(&mut x, 0, &y, 0, bytes)?;
            }
        }
        b.sync()?;
        Ok(t.elapsed().as_secs_f64())
    };
    run(2)?; // warm-up: first touch of both buffers
    let one = run(1)?;
    let copies = ((0.05 / one.max(1e-6)).ceil() as usize).clamp(1, 64);
    let mut gbps = Vec::with_capacity(samples);
    for _ in 0..samples.max(1) {
        let s = run(copies)?;
        gbps.push(2.0 * (bytes * copies) as f64 / s / 1e9);
    }
    median(&gbps).ok_or_else(|| Error::Device("copy bandwidth: no finite timing".into()))
}

/// Shared settings of the generation-based measurements.
#[derive(Clone, Copy, Debug)]
pub struct RunSettings {
    pub kv_dtype: DType,
    /// Tokens per prefill forward call (as the CLI's generator uses).
    pub chunk: usize,
    /// Timed repetitions after the warm-up.
    pub runs: usize,
    pub seed: u64,
}

/// One decode measurement: tokens/s over the generated tokens after the first, and the time to
/// the first token (prefill of the prompt plus sampling one token).
#[derive(Clone, Copy, Debug)]
pub struct DecodeRun {
    pub tok_s: f64,
    pub ttft_s: f64,
    pub prefill_tok_s: f64,
}

fn greedy(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams::greedy(),
        eos_ids: Vec::new(),
        ignore_eos: true,
    }
}

/// Generates `gen` tokens greedily after `prompt` from an empty cache.
fn one_run<B: Backend>(g: &mut Generator<B>, prompt: &[u32], gen: usize) -> Result<DecodeRun> {
    g.reset();
    let out = g.generate(prompt, &greedy(gen), &mut |_| true)?;
    if out.reason != StopReason::MaxTokens || out.tokens.len() != gen {
        return Err(Error::Generation(format!(
            "benchmark run stopped after {} of {gen} tokens ({:?})",
            out.tokens.len(),
            out.reason
        )));
    }
    let s = &out.stats;
    Ok(DecodeRun {
        tok_s: if gen > 1 { s.decode_tok_s() } else { f64::NAN },
        ttft_s: s.prompt_time.as_secs_f64(),
        prefill_tok_s: s.prompt_tok_s(),
    })
}

/// Prompt of `prompt_len` random tokens, then `gen` generated: one short warm-up, then up to
/// `runs` timed runs (fewer once `budget` is spent, never none). The generator's context is
/// exactly what the run needs, so the KV cache is sized as for a real request of that length.
pub fn decode_runs<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    prompt_len: usize,
    gen: usize,
    warm_up: bool,
    s: RunSettings,
    budget: &Budget,
) -> Result<Vec<DecodeRun>> {
    let vocab = model.cfg.vocab_size;
    let prompt = random_prompt(prompt_len, vocab, s.seed);
    let mut g = Generator::new(b, model, prompt_len + gen + 1, s.kv_dtype, s.chunk)?;
    if warm_up {
        one_run(&mut g, &prompt, gen.min(32))?;
    }
    let mut runs = Vec::with_capacity(s.runs);
    while runs.len() < s.runs.max(1) && (runs.is_empty() || !budget.exhausted()) {
        runs.push(one_run(&mut g, &prompt, gen)?);
    }
    Ok(runs)
}

/// Prefill speed for a prompt of `n` tokens: tokens / (time to the first token), per run.
pub fn prefill_runs<B: Backend>(
    b: &B,
    model: &mut Model<B>,
    n: usize,
    s: RunSettings,
    budget: &Budget,
) -> Result<Vec<f64>> {
    Ok(decode_runs(b, model, n, 1, true, s, budget)?
        .iter()
        .map(|r| r.prefill_tok_s)
        .collect())
}
