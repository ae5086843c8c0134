//! The serving engine: one thread owns the backend, the model and one paged KV cache shared by
//! every running request, and steps them all forward together.
//!
//! Each step of the loop: take new requests from the inbox, admit waiting ones while the cache
//! has room for their whole context (prompt + max_tokens), then advance every running sequence
//! by one prefill chunk or one decode token, sample its next token with its own parameters and
//! seed, and send the text out. A sequence ends on EOS, a stop string, max_tokens, a full
//! context, or when its client is gone (a send on a closed channel), and its blocks go back to
//! the free list at once.
//!
//! One step is one forward call (`Model::forward_rows`): the decode rows of every running
//! sequence and chunks of waiting prompts, each row at its own position over its own blocks
//! (DESIGN.md "Serving"). A row's result does not depend on what else is in the batch, so a
//! request gets the tokens it gets alone.

use super::grammar::Constraint;
use super::logprobs::token_logprobs;
pub use super::logprobs::TokenLogprob;
use super::metrics::{Ended, Metrics};
use crate::backend::params::KV_BLOCK;
use crate::backend::Backend;
use crate::batch::{RowsBatch, SeqRows};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::generate::check_ids;
use crate::kv_cache::{KvCache, Sequence};
use crate::model::{Model, Scratch};
use crate::pool::Buf;
use crate::sample::{apply_penalties, sample_logits, Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// One completion request, already tokenized and validated by the HTTP layer.
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Tokens to generate at most; prompt + max_tokens fits the context.
    pub max_tokens: usize,
    pub stops: Vec<String>,
    /// Generate max_tokens tokens even past EOS (load tests).
    pub ignore_eos: bool,
    /// When the HTTP side received it (time to first token counts from here).
    pub arrived: Instant,
    /// Send each token's log-probability and this many alternatives (0 to 20).
    pub logprobs: Option<usize>,
    /// The response format's grammar, when the reply is constrained.
    pub constraint: Option<Box<Constraint>>,
    /// Where the text goes; dropping the receiver cancels the request.
    pub events: UnboundedSender<Event>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// EOS or a stop string.
    Stop,
    /// max_tokens or the context.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Debug)]
pub enum Event {
    /// The log-probabilities of the next token (sent before its text, when asked for).
    Logprob(TokenLogprob),
    Text(String),
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed inside the engine (a device error) or the server is shutting down.
    Error(String),
}

/// What the engine is doing, read by /health.
#[derive(Default)]
pub struct Status {
    pub total_blocks: AtomicUsize,
    pub free_blocks: AtomicUsize,
    pub running: AtomicUsize,
    /// Requests submitted and not yet admitted (the inbox plus the engine's waiting queue).
    pub waiting: AtomicUsize,
    pub ready: AtomicBool,
    pub metrics: Metrics,
}

enum Msg {
    Request(Request),
    Shutdown,
}

/// The HTTP side's end: submits requests, bounded by `max_queue` waiting ones.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Msg>,
    pub status: Arc<Status>,
    max_queue: usize,
}

/// The engine's end of the channel.
pub struct Inbox {
    rx: mpsc::Receiver<Msg>,
    status: Arc<Status>,
}

pub fn channel(max_queue: usize) -> (Handle, Inbox) {
    let (tx, rx) = mpsc::channel();
    let status = Arc::new(Status::default());
    let handle = Handle {
        tx,
        status: status.clone(),
        max_queue,
    };
    (handle, Inbox { rx, status })
}

/// Why a request was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    QueueFull(usize),
    Stopped,
}

impl Handle {
    pub fn submit(&self, r: Request) -> std::result::Result<(), Refused> {
        let waiting = &self.status.waiting;
        // Count first, so that concurrent submits cannot both take the last place.
        if waiting.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            waiting.fetch_sub(1, Ordering::SeqCst);
            self.status.metrics.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::QueueFull(self.max_queue));
        }
        self.tx.send(Msg::Request(r)).map_err(|_| {
            waiting.fetch_sub(1, Ordering::SeqCst);
            Refused::Stopped
        })
    }

    /// Asks the engine to cancel everything and return.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
    }
}

pub struct EngineConfig {
    pub max_seqs: usize,
    /// Positions one sequence may hold.
    pub ctx_len: usize,
    /// Blocks of the shared cache; at least one context's worth.
    pub kv_blocks: usize,
    pub kv_dtype: DType,
    /// Prompt tokens per forward call: a long prompt advances this much per step, so running
    /// streams keep getting tokens while it prefills.
    pub prefill_chunk: usize,
    pub eos_ids: Vec<u32>,
    pub tokenizer: Tokenizer,
    /// Share the KV blocks of common prompt prefixes between requests.
    pub prefix_cache: bool,
}

/// One running request: its place in the cache and its generation state.
struct Running<B: Backend> {
    req: Request,
    seq: Sequence<B>,
    /// Prompt tokens fed so far.
    fed: usize,
    /// The token to feed next once the prompt is in (the last one sampled).
    next: u32,
    sampler: Sampler,
    /// Prompt and generated tokens (the penalties look at them).
    history: Vec<u32>,
    generated: usize,
    decoder: StreamDecoder,
    stop: StopMatcher,
    /// Blocks set aside for its whole context at admission.
    blocks: usize,
}

/// What one step did to a sequence.
enum Outcome {
    Continue,
    Finished(Finish),
    /// The client is gone.
    Dropped,
    /// The engine failed it (a device error); the client was told.
    Failed,
}

pub struct Engine<'a, B: Backend> {
    b: &'a B,
    model: &'a mut Model<B>,
    kv: KvCache<B>,
    scratch: Scratch<B>,
    /// The layout of each step's rows.
    batch: RowsBatch<B>,
    /// One sequence's logits, copied out for the `sample` op; the tokens it picks [max_seqs].
    row_logits: Buf<B>,
    picked: Buf<B>,
    cfg: EngineConfig,
    waiting: VecDeque<Request>,
    running: Vec<Running<B>>,
    /// Blocks promised to running sequences (their whole context, taken or not yet).
    committed: usize,
}

/// The blocks a request may come to hold.
pub fn blocks_for(prompt: usize, max_tokens: usize) -> usize {
    (prompt + max_tokens).div_ceil(KV_BLOCK).max(1)
}

impl<'a, B: Backend> Engine<'a, B> {
    pub fn new(b: &'a B, model: &'a mut Model<B>, cfg: EngineConfig) -> Result<Self> {
        if cfg.max_seqs == 0 || cfg.ctx_len == 0 {
            return Err(Error::Usage("--max-seqs and --ctx must be positive".into()));
        }
        let need = cfg.ctx_len.div_ceil(KV_BLOCK);
        if cfg.kv_blocks < need {
            return Err(Error::Usage(format!(
                "--kv-blocks {} holds fewer positions than one context of {} ({need} blocks of \
                 {KV_BLOCK})",
                cfg.kv_blocks, cfg.ctx_len
            )));
        }
        let mut kv = KvCache::new(b, &model.cfg, cfg.kv_blocks, cfg.kv_dtype)?;
        if cfg.prefix_cache {
            kv.enable_prefix_cache();
        }
        // A step runs every running sequence's decode row plus up to prefill_chunk prompt rows.
        let prefill_chunk = cfg.prefill_chunk.clamp(1, cfg.ctx_len);
        let rows = prefill_chunk + cfg.max_seqs;
        let scratch = Scratch::with_logit_rows(b, model, rows, cfg.max_seqs)?;
        let batch = RowsBatch::new(b, rows, cfg.max_seqs * need)?;
        let row_logits = b.alloc(model.cfg.vocab_size * 4)?;
        let picked = b.alloc(cfg.max_seqs * 4)?;
        let cfg = EngineConfig {
            prefill_chunk,
            ..cfg
        };
        Ok(Engine {
            b,
            model,
            kv,
            scratch,
            batch,
            row_logits,
            picked,
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            committed: 0,
        })
    }

    /// Serves requests from `inbox` until a shutdown message or until every handle is gone;
    /// `ready` runs once /health tells the cache's state.
    pub fn run(mut self, inbox: Inbox, ready: impl FnOnce()) -> Result<()> {
        let status = inbox.status.clone();
        status
            .total_blocks
            .store(self.cfg.kv_blocks, Ordering::SeqCst);
        self.publish(&status);
        status.ready.store(true, Ordering::SeqCst);
        ready();
        loop {
            // Idle: block until something arrives; busy: only look.
            let mut stop = false;
            if self.running.is_empty() && self.waiting.is_empty() {
                match inbox.rx.recv() {
                    Ok(Msg::Request(r)) => self.waiting.push_back(r),
                    Ok(Msg::Shutdown) | Err(_) => stop = true,
                }
            }
            while !stop {
                match inbox.rx.try_recv() {
                    Ok(Msg::Request(r)) => self.waiting.push_back(r),
                    Ok(Msg::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => stop = true,
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            if stop {
                self.cancel_all(&status);
                return Ok(());
            }
            self.admit(&status)?;
            self.step(&status.metrics)?;
            self.publish(&status);
        }
    }

    /// Moves waiting requests (in arrival order) into the running set while there is a
    /// sequence slot and the cache can promise their whole context.
    fn admit(&mut self, status: &Status) -> Result<()> {
        while self.running.len() < self.cfg.max_seqs {
            let Some(front) = self.waiting.front() else {
                break;
            };
            if front.events.is_closed() {
                self.waiting.pop_front();
                status.waiting.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            let blocks = blocks_for(front.prompt.len(), front.max_tokens);
            if self.committed + blocks > self.cfg.kv_blocks {
                break;
            }
            let req = self.waiting.pop_front().expect("front exists");
            status.waiting.fetch_sub(1, Ordering::SeqCst);
            let mut seq = self.kv.new_sequence(self.b, self.cfg.ctx_len)?;
            // Whole blocks of the prompt that another sequence already computed are shared.
            let shared = self.kv.share_prefix(self.b, &mut seq, &req.prompt)?;
            self.committed += blocks;
            let m = &status.metrics;
            m.admitted.fetch_add(1, Ordering::Relaxed);
            m.prefix_hit_tokens
                .fetch_add(shared as u64, Ordering::Relaxed);
            self.running.push(Running {
                sampler: Sampler::new(req.sampling.clone()),
                history: req.prompt.clone(),
                decoder: self.cfg.tokenizer.stream_decoder(true),
                stop: StopMatcher::new(&req.stops),
                req,
                seq,
                fed: shared,
                next: 0,
                generated: 0,
                blocks,
            });
        }
        Ok(())
    }

    /// Advances every running sequence once, all in one forward call, and retires those that
    /// ended: the decode row of every sequence whose prompt is in, then chunks of prompts
    /// (in admission order) under the prefill budget, so a long prompt never stalls the
    /// running streams.
    fn step(&mut self, m: &Metrics) -> Result<()> {
        let mut ended: Vec<(usize, Outcome)> = Vec::new();
        let mut decode = Vec::new();
        let mut prefill = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if r.req.events.is_closed() {
                ended.push((i, Outcome::Dropped));
            } else if r.fed < r.req.prompt.len() {
                prefill.push(i);
            } else {
                decode.push((i, 1));
            }
        }
        let mut budget = self.cfg.prefill_chunk;
        for i in prefill {
            if budget == 0 {
                break;
            }
            let r = &self.running[i];
            let n = (r.req.prompt.len() - r.fed).min(budget);
            budget -= n;
            decode.push((i, n));
        }
        let plan = decode;
        // A RoPE that varies with the length runs one sequence per call (each at its own).
        let groups: Vec<&[(usize, usize)]> = if crate::rope::varies_with_len(&self.model.cfg) {
            plan.chunks(1).collect()
        } else if plan.is_empty() {
            Vec::new()
        } else {
            vec![&plan[..]]
        };
        for group in groups {
            match self.run_batch(group, m) {
                Ok(outcomes) => ended.extend(outcomes),
                Err(e) => {
                    // A device error fails these requests; the engine keeps serving the others.
                    for &(i, _) in group {
                        let _ = self.running[i].req.events.send(Event::Error(e.to_string()));
                        ended.push((i, Outcome::Failed));
                    }
                }
            }
        }
        // Retire from the highest index down, so that swap_remove keeps the others' indices.
        ended.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, outcome) in ended {
            m.ended(match outcome {
                Outcome::Finished(Finish::Stop) => Ended::Stop,
                Outcome::Finished(Finish::Length) => Ended::Length,
                Outcome::Dropped => Ended::Cancelled,
                Outcome::Failed | Outcome::Continue => Ended::Error,
            });
            if let Outcome::Finished(finish) = outcome {
                let r = &mut self.running[i];
                let tail = if r.stop.stopped() {
                    String::new()
                } else {
                    let rest = r.decoder.finish().unwrap_or_default();
                    r.stop.push(&rest) + &r.stop.finish()
                };
                if !tail.is_empty() {
                    let _ = r.req.events.send(Event::Text(tail));
                }
                let _ = r.req.events.send(Event::Done {
                    finish,
                    prompt_tokens: r.req.prompt.len(),
                    completion_tokens: r.generated,
                });
            }
            self.retire(i);
        }
        Ok(())
    }

    fn retire(&mut self, i: usize) {
        let mut r = self.running.swap_remove(i);
        self.kv.release(&mut r.seq);
        self.committed -= r.blocks;
    }

    /// One forward call over `group` ((running index, rows) pairs: a prompt chunk or the one
    /// token to decode), then a token for every sequence whose prompt is now in. Returns the
    /// sequences that ended.
    fn run_batch(
        &mut self,
        group: &[(usize, usize)],
        m: &Metrics,
    ) -> Result<Vec<(usize, Outcome)>> {
        let (b, vocab) = (self.b, self.model.cfg.vocab_size);
        let mut tokens = Vec::new();
        let mut rope_len = 0;
        for &(i, n) in group {
            let r = &mut self.running[i];
            // The positions and RoPE length are the ones `Generator` uses, so a request gives
            // the tokens `anyllama generate` / `chat` give.
            if r.fed < r.req.prompt.len() {
                tokens.extend_from_slice(&r.req.prompt[r.fed..r.fed + n]);
                m.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
                rope_len = rope_len.max(r.req.prompt.len());
            } else {
                tokens.push(r.next);
                rope_len = rope_len.max(r.seq.len + 1);
            }
            let end = r.seq.len + n;
            self.kv.reserve(b, &mut r.seq, end)?;
        }
        check_ids(&tokens, vocab)?;
        let seqs: Vec<SeqRows> = group
            .iter()
            .map(|&(i, n)| {
                let seq = &self.running[i].seq;
                SeqRows {
                    table: seq.block_table(),
                    pos0: seq.len,
                    rows: n,
                }
            })
            .collect();
        self.batch.set(b, &seqs)?;
        self.model.prepare_rope(b, rope_len)?;
        b.upload(&mut self.scratch.tokens, 0, bytemuck::cast_slice(&tokens))?;
        // One decode step: CUDA records it as a graph and replays it for later steps of the same
        // shape (every position and block table is read from the batch layout on the device).
        let (model, scratch, kv, batch) =
            (&*self.model, &mut self.scratch, &mut self.kv, &self.batch);
        b.decode_step(&mut || model.forward_rows(b, scratch, kv, batch))?;

        // Sequences whose prompt is in pick a token from their row of the logits: on the
        // device, or with penalties on the host, as `Generator` picks.
        let mut sampling = Vec::new();
        for (j, &(i, n)) in group.iter().enumerate() {
            let r = &mut self.running[i];
            r.seq.len += n;
            let prefilling = r.fed < r.req.prompt.len();
            if prefilling {
                r.fed += n;
            } else {
                r.history.push(r.next);
            }
            // history[..seq.len] are the tokens of the stored positions.
            self.kv.cache_full_blocks(&mut r.seq, &r.history);
            if prefilling && r.fed < r.req.prompt.len() {
                continue;
            }
            sampling.push((j, i));
        }
        // Penalties and response formats change the logits: those requests sample on the host.
        let host_pick =
            |r: &Running<B>| r.sampler.params.has_penalties() || r.req.constraint.is_some();
        let on_host = |r: &Running<B>| host_pick(r) || r.req.logprobs.is_some();
        let host_logits = if sampling.iter().any(|&(_, i)| on_host(&self.running[i])) {
            let mut l = vec![0f32; group.len() * vocab];
            b.read(&self.scratch.logits, 0, bytemuck::cast_slice_mut(&mut l))?;
            Some(l)
        } else {
            None
        };
        let mut ids = vec![0u32; group.len()];
        let mut failed: Vec<(usize, Error)> = Vec::new();
        let mut on_device = false;
        for &(j, i) in &sampling {
            let r = &mut self.running[i];
            let op = r.sampler.next_op();
            if host_pick(r) {
                let logits = host_logits.as_ref().expect("read above");
                let mut row = logits[j * vocab..(j + 1) * vocab].to_vec();
                apply_penalties(&mut row, &r.history, &r.sampler.params);
                if let Some(c) = r.req.constraint.as_mut() {
                    if let Err(e) = c.mask(&mut row) {
                        failed.push((i, e));
                        continue;
                    }
                }
                ids[j] = sample_logits(&row, &op);
            } else {
                b.copy(
                    &mut self.row_logits,
                    0,
                    &self.scratch.logits,
                    j * vocab * 4,
                    vocab * 4,
                )?;
                b.sample(&mut self.picked, j, &self.row_logits, vocab, op)?;
                on_device = true;
            }
        }
        if on_device {
            let mut device_ids = vec![0u32; group.len()];
            b.read(&self.picked, 0, bytemuck::cast_slice_mut(&mut device_ids))?;
            for &(j, i) in &sampling {
                if !host_pick(&self.running[i]) {
                    ids[j] = device_ids[j];
                }
            }
        }
        m.step(sampling.len() as u64, Instant::now());
        let mut ended = Vec::new();
        for (i, e) in failed {
            let _ = self.running[i].req.events.send(Event::Error(e.to_string()));
            ended.push((i, Outcome::Failed));
        }
        for &(j, i) in &sampling {
            if ended.iter().any(|&(k, _)| k == i) {
                continue;
            }
            let (r, id) = (&mut self.running[i], ids[j]);
            let eos = self.cfg.eos_ids.contains(&id) && !r.req.ignore_eos;
            // The log-probabilities of the picked token, for the requests that asked.
            if let (Some(top), Some(l)) = (r.req.logprobs, host_logits.as_ref()) {
                if !eos && (id as usize) < vocab {
                    let lp = token_logprobs(&l[j * vocab..(j + 1) * vocab], id, top);
                    let _ = r.req.events.send(Event::Logprob(lp));
                }
            }
            if r.generated == 0 {
                m.first_token(r.req.arrived.elapsed());
            }
            // The grammar takes the token; once it allows nothing more the reply is complete.
            let complete = match r.req.constraint.as_mut() {
                Some(c) if !eos => c.advance(id),
                _ => Ok(false),
            };
            match complete.and_then(|complete| self.deliver(i, id, vocab, complete)) {
                Ok(Outcome::Continue) => {}
                Ok(outcome) => ended.push((i, outcome)),
                Err(e) => {
                    let _ = self.running[i].req.events.send(Event::Error(e.to_string()));
                    ended.push((i, Outcome::Failed));
                }
            }
        }
        Ok(ended)
    }

    /// Hands sequence i's new token to its request: EOS, text (held back while it may be the
    /// start of a stop string), or the end of its budget; `complete`: its response format
    /// allows nothing more.
    fn deliver(&mut self, i: usize, id: u32, vocab: usize, complete: bool) -> Result<Outcome> {
        if id as usize >= vocab {
            return Err(Error::Generation(format!(
                "the device sampled token id {id}, outside the vocabulary of {vocab}"
            )));
        }
        let r = &mut self.running[i];
        if self.cfg.eos_ids.contains(&id) && !r.req.ignore_eos {
            return Ok(Outcome::Finished(Finish::Stop));
        }
        r.generated += 1;
        r.next = id;
        let piece = r.decoder.push(id)?;
        let text = r.stop.push(&piece);
        if !text.is_empty() && r.req.events.send(Event::Text(text)).is_err() {
            return Ok(Outcome::Dropped);
        }
        Ok(if r.stop.stopped() || complete {
            Outcome::Finished(Finish::Stop)
        } else if r.generated >= r.req.max_tokens || r.seq.len + 1 >= self.cfg.ctx_len {
            Outcome::Finished(Finish::Length)
        } else {
            Outcome::Continue
        })
    }

    /// Ends every request: the server is going away.
    fn cancel_all(&mut self, status: &Status) {
        for r in self.waiting.drain(..) {
            let _ = r
                .events
                .send(Event::Error("the server is shutting down".into()));
            status.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        while !self.running.is_empty() {
            let _ = self.running[0]
                .req
                .events
                .send(Event::Error("the server is shutting down".into()));
            self.retire(0);
        }
        self.publish(status);
    }

    fn publish(&self, status: &Status) {
        status
            .free_blocks
            .store(self.kv.free_blocks(), Ordering::SeqCst);
        status.running.store(self.running.len(), Ordering::SeqCst);
    }
}
