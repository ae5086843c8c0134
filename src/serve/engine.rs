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
//! Phase 1 runs one forward call per sequence per step. Putting every decode row into one
//! forward (a `Batch`, DESIGN.md "Serving") is phase 2; the scheduler's shape stays the same.

use crate::backend::params::KV_BLOCK;
use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::generate::{check_ids, pick_finish, pick_start};
use crate::kv_cache::{KvCache, Sequence};
use crate::model::{Model, Scratch};
use crate::sample::{Sampler, SamplingParams};
use crate::stop::StopMatcher;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::UnboundedSender;

/// One completion request, already tokenized and validated by the HTTP layer.
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Tokens to generate at most; prompt + max_tokens fits the context.
    pub max_tokens: usize,
    pub stops: Vec<String>,
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
}

pub struct Engine<'a, B: Backend> {
    b: &'a B,
    model: &'a mut Model<B>,
    kv: KvCache<B>,
    scratch: Scratch<B>,
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
        let kv = KvCache::new(b, &model.cfg, cfg.kv_blocks, cfg.kv_dtype)?;
        let scratch = Scratch::new(b, model, cfg.prefill_chunk.clamp(1, cfg.ctx_len), false)?;
        Ok(Engine {
            b,
            model,
            kv,
            scratch,
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
            self.step()?;
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
            let seq = self.kv.new_sequence(self.b, self.cfg.ctx_len)?;
            self.committed += blocks;
            self.running.push(Running {
                sampler: Sampler::new(req.sampling.clone()),
                history: req.prompt.clone(),
                decoder: self.cfg.tokenizer.stream_decoder(true),
                stop: StopMatcher::new(&req.stops),
                req,
                seq,
                fed: 0,
                next: 0,
                generated: 0,
                blocks,
            });
        }
        Ok(())
    }

    /// Advances every running sequence once and retires those that ended.
    fn step(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.running.len() {
            let outcome = match self.advance(i) {
                Ok(o) => o,
                Err(e) => {
                    // A device error fails this request; the engine keeps serving the others.
                    let _ = self.running[i].req.events.send(Event::Error(e.to_string()));
                    Outcome::Dropped
                }
            };
            match outcome {
                Outcome::Continue => i += 1,
                Outcome::Finished(finish) => {
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
                    self.retire(i);
                }
                Outcome::Dropped => self.retire(i),
            }
        }
        Ok(())
    }

    fn retire(&mut self, i: usize) {
        let mut r = self.running.swap_remove(i);
        self.kv.release(&mut r.seq);
        self.committed -= r.blocks;
    }

    /// One prefill chunk or one decode token of running sequence `i`.
    fn advance(&mut self, i: usize) -> Result<Outcome> {
        let vocab = self.model.cfg.vocab_size;
        let r = &mut self.running[i];
        if r.req.events.is_closed() {
            return Ok(Outcome::Dropped);
        }
        // The positions and RoPE length are the ones `Generator` uses, so a request gives the
        // tokens `anyllama generate` / `chat` give.
        let (tokens, rope_len): (&[u32], usize) = if r.fed < r.req.prompt.len() {
            let end = (r.fed + self.scratch.rows).min(r.req.prompt.len());
            (&r.req.prompt[r.fed..end], r.req.prompt.len())
        } else {
            (std::slice::from_ref(&r.next), r.seq.len + 1)
        };
        check_ids(tokens, vocab)?;
        let n = tokens.len();
        self.model.prepare_rope(self.b, rope_len)?;
        self.b
            .upload(&mut self.scratch.tokens, 0, bytemuck::cast_slice(tokens))?;
        let end = r.seq.len + n;
        self.kv.reserve(self.b, &mut r.seq, end)?;
        // A plain forward, not `decode_step`: a captured graph would be bound to one
        // sequence's block table and replayed for another.
        self.model
            .forward(self.b, &mut self.scratch, &mut self.kv, &r.seq, n, false)?;
        r.seq.len = end;
        if r.fed < r.req.prompt.len() {
            r.fed += n;
            if r.fed < r.req.prompt.len() {
                return Ok(Outcome::Continue);
            }
        } else {
            r.history.push(r.next);
        }

        let picked = pick_start(self.b, &mut self.scratch, vocab, &mut r.sampler, &r.history)?;
        let id = pick_finish(self.b, picked, vocab)?;
        if self.cfg.eos_ids.contains(&id) {
            return Ok(Outcome::Finished(Finish::Stop));
        }
        r.generated += 1;
        r.next = id;
        let piece = r.decoder.push(id)?;
        let text = r.stop.push(&piece);
        if !text.is_empty() && r.req.events.send(Event::Text(text)).is_err() {
            return Ok(Outcome::Dropped);
        }
        Ok(if r.stop.stopped() {
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
