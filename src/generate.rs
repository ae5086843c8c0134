//! Prefill + decode with the paged KV cache, sampling, stop conditions and timing.
//!
//! A `Generator` holds one sequence in the cache and remembers which tokens it holds, so a
//! chat that re-sends the whole conversation each turn only prefills what is new.

use crate::backend::{Backend, PendingRead};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, Sequence};
use crate::loader::human_bytes;
use crate::model::{Model, Scratch};
use crate::sample::{apply_penalties, sample_logits, Sampler, SamplingParams};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (not emitted).
    pub eos_ids: Vec<u32>,
    /// Keep going past eos ids (benchmarks).
    pub ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    ContextFull,
    /// The token callback asked to stop (a stop string, Ctrl-C).
    Callback,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub prompt_tokens: usize,
    /// Tokens of the prompt found already in the cache.
    pub cached_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub decode_time: Duration,
}

impl Stats {
    pub fn prompt_tok_s(&self) -> f64 {
        (self.prompt_tokens - self.cached_tokens) as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }
    pub fn decode_tok_s(&self) -> f64 {
        // The first generated token comes from the prefill's logits.
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

pub struct Generation {
    pub tokens: Vec<u32>,
    pub reason: StopReason,
    pub stats: Stats,
}

/// A picked token: known on the host, or sampled on the device with its read in flight.
pub(crate) enum Picked {
    Host(u32),
    Device(PendingRead),
}

pub struct Generator<'a, B: Backend> {
    b: &'a B,
    model: &'a mut Model<B>,
    kv: KvCache<B>,
    seq: Sequence<B>,
    scratch: Scratch<B>,
    /// The tokens whose K/V the sequence holds, in order.
    cached: Vec<u32>,
}

impl<'a, B: Backend> Generator<'a, B> {
    /// A generator with room for `ctx_len` positions, prefilling up to `chunk` tokens per call.
    pub fn new(
        b: &'a B,
        model: &'a mut Model<B>,
        ctx_len: usize,
        kv_dtype: DType,
        chunk: usize,
    ) -> Result<Self> {
        if ctx_len == 0 {
            return Err(Error::Usage("context length must be positive".into()));
        }
        // The cache and scratch sizes are checked (overflow, device memory) before allocating.
        let (kv_buffer, kv_bytes, scratch_bytes) = crate::loader::runtime_bytes(
            &model.cfg, ctx_len, kv_dtype, chunk,
        )
        .ok_or_else(|| {
            Error::Usage(format!(
                "a context of {ctx_len} tokens is too large to address"
            ))
        })?;
        let limits = b.memory_limits();
        let need = kv_bytes.saturating_add(scratch_bytes);
        if limits.max_buffer.is_some_and(|m| kv_buffer > m)
            || limits.available.is_some_and(|a| need > a)
            || usize::try_from(kv_buffer).is_err()
        {
            return Err(Error::Device(format!(
                "a KV cache for {ctx_len} tokens ({}) plus scratch does not fit in the memory of \
                 {} ({} available, largest buffer {})",
                human_bytes(kv_bytes),
                b.device_name(),
                limits.available.map_or("unknown".into(), human_bytes),
                limits.max_buffer.map_or("unknown".into(), human_bytes),
            )));
        }
        let n_blocks = ctx_len.div_ceil(crate::backend::params::KV_BLOCK);
        let kv = KvCache::new(b, &model.cfg, n_blocks, kv_dtype)?;
        let seq = kv.new_sequence(b, ctx_len)?;
        let scratch = Scratch::new(b, model, chunk.clamp(1, ctx_len), false)?;
        Ok(Generator {
            b,
            model,
            kv,
            seq,
            scratch,
            cached: Vec::new(),
        })
    }

    pub fn context_len(&self) -> usize {
        self.seq.capacity()
    }

    pub fn model(&self) -> &Model<B> {
        self.model
    }

    /// Forgets the cached sequence.
    pub fn reset(&mut self) {
        self.kv.release(&mut self.seq);
        self.cached.clear();
    }

    /// Runs `tokens` at the end of the sequence; the last one's logits end in scratch.logits.
    fn feed(&mut self, tokens: &[u32], rope_len: usize) -> Result<()> {
        check_ids(tokens, self.model.cfg.vocab_size)?;
        self.model.prepare_rope(self.b, rope_len)?;
        for chunk in tokens.chunks(self.scratch.rows) {
            self.b
                .upload(&mut self.scratch.tokens, 0, bytemuck::cast_slice(chunk))?;
            self.run(chunk.len())?;
            self.cached.extend_from_slice(chunk);
        }
        Ok(())
    }

    /// Runs the `n` tokens in scratch.tokens at the end of the sequence.
    fn run(&mut self, n: usize) -> Result<()> {
        let end = self.seq.len + n;
        self.kv.reserve(self.b, &mut self.seq, end)?;
        let (model, b, scratch) = (&*self.model, self.b, &mut self.scratch);
        let (kv, seq) = (&mut self.kv, &self.seq);
        if n == 1 {
            // One decode step: a backend may record it once and replay it (CUDA graphs).
            b.decode_step(&mut || model.forward(b, scratch, kv, seq, 1, false))?;
        } else {
            model.forward(b, scratch, kv, seq, n, false)?;
        }
        self.seq.len = end;
        Ok(())
    }

    fn pick(&mut self, sampler: &mut Sampler, history: &[u32]) -> Result<Picked> {
        let vocab = self.model.cfg.vocab_size;
        pick_start(self.b, &mut self.scratch, vocab, sampler, history)
    }

    fn token(&self, picked: Picked) -> Result<u32> {
        pick_finish(self.b, picked, self.model.cfg.vocab_size)
    }

    /// Generates after `prompt` (the whole conversation so far: the part already in the cache is
    /// reused). `on_token` sees each new token and returns false to stop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32) -> bool,
    ) -> Result<Generation> {
        opts.sampling.validate()?;
        if prompt.is_empty() {
            return Err(Error::Generation("the prompt is empty".into()));
        }
        let ctx = self.context_len();
        if prompt.len() >= ctx {
            return Err(Error::Generation(format!(
                "the prompt has {} tokens but the context holds {ctx}; raise -c or shorten the prompt",
                prompt.len()
            )));
        }
        // Reuse the longest cached prefix, but always run at least the last prompt token.
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        self.cached.truncate(common);
        self.seq.truncate(common);
        let mut stats = Stats {
            prompt_tokens: prompt.len(),
            cached_tokens: common,
            ..Default::default()
        };

        let t0 = Instant::now();
        self.feed(&prompt[common..], prompt.len())?;
        let mut sampler = Sampler::new(opts.sampling.clone());
        let mut history = prompt.to_vec();
        let mut picked = self.pick(&mut sampler, &history)?;
        let mut t1 = None;
        let mut out = Vec::new();
        let reason = loop {
            // While the device computes this token, enqueue the step that feeds it (the token
            // is already where the embedding reads it), unless a stop other than EOS or the
            // callback is certain. If the token ends generation, that step is taken back.
            let ahead = matches!(picked, Picked::Device(_))
                && out.len() + 1 < opts.max_new_tokens
                && self.seq.len + 1 < ctx;
            let after = if ahead {
                self.model.prepare_rope(self.b, self.seq.len + 1)?;
                self.run(1)?;
                Some(self.pick(&mut sampler, &history)?)
            } else {
                None
            };
            let next = self.token(picked)?;
            if t1.is_none() {
                stats.prompt_time = t0.elapsed();
                t1 = Some(Instant::now());
            }
            let stop = if !opts.ignore_eos && opts.eos_ids.contains(&next) {
                Some(StopReason::Eos)
            } else {
                out.push(next);
                history.push(next);
                if !on_token(next) {
                    Some(StopReason::Callback)
                } else if out.len() >= opts.max_new_tokens {
                    Some(StopReason::MaxTokens)
                } else if after.is_none() && self.seq.len + 1 >= ctx {
                    Some(StopReason::ContextFull)
                } else {
                    None
                }
            };
            if let Some(reason) = stop {
                if let Some(p) = after {
                    // Take the step ahead back: finish its read, forget its position.
                    self.token(p)?;
                    self.seq.truncate(self.seq.len - 1);
                }
                break reason;
            }
            picked = match after {
                Some(p) => {
                    self.cached.push(next);
                    p
                }
                None => {
                    let len = self.seq.len + 1;
                    self.feed(&[next], len)?;
                    self.pick(&mut sampler, &history)?
                }
            };
        };
        stats.decode_time = t1.map_or(Duration::ZERO, |t| t.elapsed());
        stats.generated_tokens = out.len();
        Ok(Generation {
            tokens: out,
            reason,
            stats,
        })
    }

    /// Logits of every position of `tokens` run from an empty cache (for parity tests).
    pub fn all_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.reset();
        let mut s = Scratch::new(self.b, self.model, tokens.len(), true)?;
        self.kv.reserve(self.b, &mut self.seq, tokens.len())?;
        self.model.prepare_rope(self.b, tokens.len())?;
        self.b
            .upload(&mut s.tokens, 0, bytemuck::cast_slice(tokens))?;
        self.model
            .forward(self.b, &mut s, &mut self.kv, &self.seq, tokens.len(), true)?;
        self.seq.len = tokens.len();
        self.cached = tokens.to_vec();
        let mut out = vec![0f32; tokens.len() * self.model.cfg.vocab_size];
        self.b
            .read(&s.logits, 0, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// Picks the next token from the last logits in `s.logits`. Sampled on the device, the token is
/// written where the next step's embedding reads it (s.tokens[0]) and its read is only started,
/// so that the next step can be enqueued before it is known; with repetition penalties the host
/// samples. One uniform number is drawn either way. (The serving engine picks the same way.)
pub(crate) fn pick_start<B: Backend>(
    b: &B,
    s: &mut Scratch<B>,
    vocab: usize,
    sampler: &mut Sampler,
    history: &[u32],
) -> Result<Picked> {
    let op = sampler.next_op();
    if sampler.params.has_penalties() {
        let mut logits = vec![0f32; vocab];
        b.read(&s.logits, 0, bytemuck::cast_slice_mut(&mut logits))?;
        apply_penalties(&mut logits, history, &sampler.params);
        return Ok(Picked::Host(sample_logits(&logits, &op)));
    }
    b.sample(&mut s.tokens, 0, &s.logits, vocab, op)?;
    Ok(Picked::Device(b.read_start(&s.tokens, 0, 4)?))
}

/// The token of a pick, waiting for the device if it sampled it; an id outside the vocabulary
/// is an error.
pub(crate) fn pick_finish<B: Backend>(b: &B, picked: Picked, vocab: usize) -> Result<u32> {
    let id = match picked {
        Picked::Host(id) => id,
        Picked::Device(read) => {
            let mut id = [0u32];
            b.read_finish(read, bytemuck::cast_slice_mut(&mut id))?;
            id[0]
        }
    };
    if id as usize >= vocab {
        return Err(Error::Generation(format!(
            "the device sampled token id {id}, outside the vocabulary of {vocab}"
        )));
    }
    Ok(id)
}

/// Every id of `tokens` is inside the vocabulary (an embedding lookup past it reads garbage).
pub(crate) fn check_ids(tokens: &[u32], vocab: usize) -> Result<()> {
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(Error::Generation(format!(
            "token id {t} is outside the model's vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}
