//! The Llama forward pass: llama2.c's forward() as a list of backend ops with shape comments.

use crate::backend::{Backend, Heads, KvSlot, RmsNormed, RopeArgs};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::kv_cache::{KvCache, Sequence};
use crate::pool::Buf;
use crate::rope::{rope_freqs, RopeFreqs};
use crate::weights::Weights;

pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub w: Weights<B>,
    /// RoPE inverse frequencies on the device, and the host copy they were uploaded from
    /// (dynamic / longrope scaling change them as the sequence grows, as HF does per call).
    inv_freq: Buf<B>,
    rope: RopeFreqs,
}

/// Activation buffers for up to `rows` tokens per forward call, reused for every call.
pub struct Scratch<B: Backend> {
    pub rows: usize,
    pub tokens: Buf<B>, // u32 [rows]
    x: Buf<B>,          // residual stream [rows, dim]
    xb: Buf<B>,         // normed input [rows, dim]
    xb2: Buf<B>,        // projection output [rows, dim]
    q: Buf<B>,          // [rows, n_heads * head_dim]
    k: Buf<B>,          // [rows, n_kv_heads * head_dim]
    v: Buf<B>,          // [rows, n_kv_heads * head_dim]
    att: Buf<B>,        // attention output [rows, n_heads * head_dim]
    gate: Buf<B>,       // [rows, ffn]
    up: Buf<B>,         // [rows, ffn]
    hb: Buf<B>,         // silu(gate) * up [rows, ffn]
    pub logits: Buf<B>, // [rows or 1, vocab]
}

impl<B: Backend> Scratch<B> {
    /// `all_logits`: keep the logits of every row (tests), not just of the last.
    pub fn new(b: &B, cfg: &ModelConfig, rows: usize, all_logits: bool) -> Result<Self> {
        let f = |n: usize| b.alloc(rows * n * 4);
        Ok(Scratch {
            rows,
            tokens: f(1)?,
            x: f(cfg.dim)?,
            xb: f(cfg.dim)?,
            xb2: f(cfg.dim)?,
            q: f(cfg.q_dim())?,
            k: f(cfg.kv_dim())?,
            v: f(cfg.kv_dim())?,
            att: f(cfg.q_dim())?,
            gate: f(cfg.ffn_dim)?,
            up: f(cfg.ffn_dim)?,
            hb: f(cfg.ffn_dim)?,
            logits: b.alloc(if all_logits { rows } else { 1 } * cfg.vocab_size * 4)?,
        })
    }
}

impl<B: Backend> Model<B> {
    pub fn new(b: &B, cfg: ModelConfig, w: Weights<B>) -> Result<Self> {
        let mut inv_freq = b.alloc(cfg.head_dim / 2 * 4)?;
        let rope = rope_freqs(&cfg, 1);
        b.upload(&mut inv_freq, 0, bytemuck::cast_slice(&rope.inv_freq))?;
        Ok(Model {
            cfg,
            w,
            inv_freq,
            rope,
        })
    }

    /// Uploads the RoPE frequencies for a forward call whose last position is `seq_len - 1`
    /// (uploaded only when they depend on the length and changed).
    pub fn prepare_rope(&mut self, b: &B, seq_len: usize) -> Result<()> {
        if !crate::rope::varies_with_len(&self.cfg) {
            return Ok(());
        }
        let f = rope_freqs(&self.cfg, seq_len);
        if f != self.rope {
            b.upload(&mut self.inv_freq, 0, bytemuck::cast_slice(&f.inv_freq))?;
            self.rope = f;
        }
        Ok(())
    }

    /// Runs `rows` tokens (already in `s.tokens`) at positions seq.len.. through the model,
    /// appending their K/V to the cache. Writes the last row's logits to `s.logits` (every
    /// row's when `all_logits`). Call `prepare_rope` first.
    pub fn forward(
        &self,
        b: &B,
        s: &mut Scratch<B>,
        kv: &mut KvCache<B>,
        seq: &Sequence<B>,
        rows: usize,
        all_logits: bool,
    ) -> Result<()> {
        let c = &self.cfg;
        let (dim, pos0) = (c.dim, seq.len);
        let heads = Heads {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        b.embedding(&mut s.x, &s.tokens, &self.w.tok_embeddings, rows)?; // x [rows, dim]
        for (i, l) in self.w.layers.iter().enumerate() {
            // attention block: q, k, v = rms_norm(x) . (wq, wk, wv)^T
            let normed = RmsNormed {
                x: &s.x,
                weight: &l.attn_norm,
                eps: c.norm_eps,
            };
            let (qkv, w) = ([&mut s.q, &mut s.k, &mut s.v], [&l.wq, &l.wk, &l.wv]);
            b.norm_qkv(qkv, &mut s.xb, normed, w, rows)?; // q [rows, n_heads*hd], k/v [rows, n_kv*hd]
            bias(b, &mut s.q, &l.bq, rows, c.q_dim())?;
            bias(b, &mut s.k, &l.bk, rows, c.kv_dim())?;
            bias(b, &mut s.v, &l.bv, rows, c.kv_dim())?;
            // rotate q and k at positions pos0..; store k and v in the cache
            let dtype = kv.dtype;
            let (k, v, table) = kv.layer_mut(i, seq);
            let cache = KvSlot { k, v, table, dtype };
            let rope = RopeArgs {
                inv_freq: &self.inv_freq,
                attn_scale: self.rope.attention_scaling,
            };
            b.rope_kv_append(&mut s.q, &mut s.k, &s.v, cache, rope, rows, pos0, heads)?;
            b.attention(&mut s.att, &s.q, kv.view(i, seq), rows, pos0, heads)?; // att [rows, n_heads*hd]

            // x += att . wo^T (+ bo)
            b.matmul_residual(&mut s.x, &mut s.xb2, &s.att, &l.wo, l.bo.as_ref(), rows)?;

            // feed-forward block: hb = swiglu(rms_norm(x) . w1^T, rms_norm(x) . w3^T)
            let normed = RmsNormed {
                x: &s.x,
                weight: &l.ffn_norm,
                eps: c.norm_eps,
            };
            let (w13, b13) = ((&l.w1, &l.w3), (l.b1.as_ref(), l.b3.as_ref()));
            let scratch = [&mut s.gate, &mut s.up, &mut s.xb];
            b.ffn_gate_up(&mut s.hb, scratch, normed, w13, b13, rows)?; // hb [rows, ffn]

            // x += hb . w2^T (+ b2)
            b.matmul_residual(&mut s.x, &mut s.xb2, &s.hb, &l.w2, l.b2.as_ref(), rows)?;
        }
        // final norm and classifier, on the last row only unless every row's logits are wanted
        let out_rows = if all_logits { rows } else { 1 };
        if !all_logits && rows > 1 {
            b.copy(&mut s.xb2, 0, &s.x, (rows - 1) * dim * 4, dim * 4)?;
            b.rms_norm(&mut s.xb, &s.xb2, &self.w.norm, 1, dim, c.norm_eps)?;
        } else {
            b.rms_norm(&mut s.xb, &s.x, &self.w.norm, out_rows, dim, c.norm_eps)?;
        }
        b.matmul(&mut s.logits, &s.xb, self.w.output(), out_rows) // logits [out_rows, vocab]
    }
}

fn bias<B: Backend>(
    b: &B,
    x: &mut Buf<B>,
    bias: &Option<Buf<B>>,
    rows: usize,
    n: usize,
) -> Result<()> {
    match bias {
        Some(v) => b.add_bias(x, v, rows, n),
        None => Ok(()),
    }
}
