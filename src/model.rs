//! The Llama forward pass: llama2.c's forward() as a list of backend ops with shape comments.

use crate::backend::{Backend, Heads, KvSlot, KvView, RmsNormed, RopeArgs};
use crate::batch::{BatchView, RowsBatch, RowsView};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kv_cache::{KvCache, Sequence};
use crate::pool::Buf;
use crate::rope::{rope_freqs, RopeFreqs};
use crate::train::lora::{Adapter, Lora, Proj};
use crate::weights::Weights;

pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub w: Weights<B>,
    /// RoPE inverse frequencies on the device, and the host copy they were uploaded from
    /// (dynamic / longrope scaling change them as the sequence grows, as HF does per call).
    inv_freq: Buf<B>,
    rope: RopeFreqs,
    /// LoRA adapters applied in every projection they target.
    pub lora: Option<Lora<B>>,
}

/// The activations of one layer's forward for up to `rows` rows. Inference reuses one set for
/// every layer; training keeps one per layer (or one, recomputed, with checkpointing).
pub struct Acts<B: Backend> {
    pub xb: Buf<B>,    // rms_norm(x), the q/k/v input [rows, dim]
    pub q: Buf<B>,     // [rows, n_heads * head_dim], rotated
    pub k: Buf<B>,     // [rows, n_kv_heads * head_dim], rotated
    pub q_raw: Buf<B>, // qk_norm: q before its per-head norm [rows, n_heads * head_dim]
    pub k_raw: Buf<B>, // qk_norm: k before its per-head norm [rows, n_kv_heads * head_dim]
    pub v: Buf<B>,     // [rows, n_kv_heads * head_dim]
    pub att: Buf<B>,   // attention output [rows, n_heads * head_dim]
    pub lse: Buf<B>,   // attention logsumexp [rows, n_heads] (packed batches only)
    pub h: Buf<B>,     // rms_norm(x) of the feed-forward [rows, dim]
    pub gate: Buf<B>,  // [rows, ffn]
    pub up: Buf<B>,    // [rows, ffn]
    pub hb: Buf<B>,    // silu(gate) * up [rows, ffn]
}

impl<B: Backend> Acts<B> {
    pub fn new(b: &B, cfg: &ModelConfig, rows: usize) -> Result<Self> {
        let f = |n: usize| b.alloc(rows * n * 4);
        Ok(Acts {
            xb: f(cfg.dim)?,
            q: f(cfg.q_dim())?,
            k: f(cfg.kv_dim())?,
            q_raw: f(if cfg.qk_norm { cfg.q_dim() } else { 1 })?,
            k_raw: f(if cfg.qk_norm { cfg.kv_dim() } else { 1 })?,
            v: f(cfg.kv_dim())?,
            att: f(cfg.q_dim())?,
            lse: f(cfg.n_heads)?,
            h: f(cfg.dim)?,
            gate: f(cfg.ffn_dim)?,
            up: f(cfg.ffn_dim)?,
            hb: f(cfg.ffn_dim)?,
        })
    }

    /// Bytes of one set for `rows` rows.
    pub fn bytes(cfg: &ModelConfig, rows: usize) -> usize {
        let raw = if cfg.qk_norm {
            cfg.q_dim() + cfg.kv_dim()
        } else {
            0
        };
        rows * 4
            * (2 * cfg.dim
                + 2 * cfg.q_dim()
                + 2 * cfg.kv_dim()
                + raw
                + cfg.n_heads
                + 3 * cfg.ffn_dim)
    }
}

/// Scratch of the projections: the result of one added into the residual stream, and LoRA's
/// intermediates.
pub struct ProjScratch<B: Backend> {
    pub out: Buf<B>, // [rows, dim]
    pub lora: LoraScratch<B>,
}

/// LoRA's x A^T [rows, r] of each of the seven projections (the last forward's, which a
/// training step's backward of the same layer reuses) and (x A^T) B^T [rows, widest
/// projection]; in training with dropout, the dropped-out input [rows, widest input].
pub struct LoraScratch<B: Backend> {
    pub u: Vec<Buf<B>>,
    pub y: Buf<B>,
    pub xd: Option<Buf<B>>,
}

impl<B: Backend> ProjScratch<B> {
    pub fn new(b: &B, cfg: &ModelConfig, rows: usize, lora_rank: usize) -> Result<Self> {
        let widest = cfg.q_dim().max(cfg.ffn_dim).max(cfg.dim);
        Ok(ProjScratch {
            out: b.alloc(rows * cfg.dim * 4)?,
            lora: LoraScratch {
                u: (0..Proj::ALL.len())
                    .map(|_| b.alloc(rows * lora_rank.max(1) * 4))
                    .collect::<Result<_>>()?,
                y: b.alloc(rows * if lora_rank > 0 { widest } else { 1 } * 4)?,
                xd: None,
            },
        })
    }
}

/// Activation buffers for up to `rows` tokens per forward call, reused for every call.
pub struct Scratch<B: Backend> {
    pub rows: usize,
    pub tokens: Buf<B>, // u32 [rows]
    x: Buf<B>,          // residual stream [rows, dim]
    acts: Acts<B>,
    proj: ProjScratch<B>,
    pub logits: Buf<B>, // [rows or 1, vocab]
}

impl<B: Backend> Scratch<B> {
    /// `all_logits`: keep the logits of every row (tests), not just of the last. Sized for the
    /// model's adapters, if it has any.
    pub fn new(b: &B, m: &Model<B>, rows: usize, all_logits: bool) -> Result<Self> {
        Self::with_logit_rows(b, m, rows, if all_logits { rows } else { 1 })
    }

    /// Scratch for `rows` rows per call whose logits hold `logit_rows` rows (a batch of many
    /// sequences keeps one row of logits per sequence).
    pub fn with_logit_rows(b: &B, m: &Model<B>, rows: usize, logit_rows: usize) -> Result<Self> {
        let cfg = &m.cfg;
        let lora_rank = m.lora.as_ref().map_or(0, |l| l.cfg.r);
        Ok(Scratch {
            rows,
            tokens: b.alloc(rows * 4)?,
            x: b.alloc(rows * cfg.dim * 4)?,
            acts: Acts::new(b, cfg, rows)?,
            proj: ProjScratch::new(b, cfg, rows, lora_rank)?,
            logits: b.alloc(logit_rows.max(1) * cfg.vocab_size * 4)?,
        })
    }
}

/// Where a layer's attention finds its keys and values.
pub enum Attend<'a, B: Backend> {
    /// Generation: one sequence at positions pos0..; k and v are stored in its paged cache
    /// and attention reads every position of the cache up to each row.
    Cache {
        kv: &'a mut KvCache<B>,
        seq: &'a Sequence<B>,
    },
    /// A packed batch (training): rows at the batch's positions, attention within each
    /// sequence over the rows themselves, the logsumexp kept in `Acts::lse`.
    Packed(BatchView<'a, B>),
    /// Rows of many sequences over the paged cache (serving): each row at its own position,
    /// k and v stored in its sequence's blocks, attention over its sequence's cache.
    Rows {
        kv: &'a mut KvCache<B>,
        rows: RowsView<'a, B>,
    },
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
            lora: None,
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

    /// The device's RoPE inverse frequencies and the scale of cos and sin.
    pub fn rope_args(&self) -> (&Buf<B>, f32) {
        (&self.inv_freq, self.rope.attention_scaling)
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
        let (dim, eps) = (self.cfg.dim, self.cfg.norm_eps);
        b.embedding(&mut s.x, &s.tokens, &self.w.tok_embeddings, rows)?; // x [rows, dim]
        for i in 0..self.cfg.n_layers {
            let attend = Attend::Cache { kv, seq };
            self.attention_block(b, i, &mut s.x, &mut s.acts, &mut s.proj, attend, rows)?;
            self.ffn_block(b, i, &mut s.x, &mut s.acts, &mut s.proj, rows, false)?;
        }
        // final norm and classifier, on the last row only unless every row's logits are wanted
        let out_rows = if all_logits { rows } else { 1 };
        let (xb, tmp) = (&mut s.acts.xb, &mut s.proj.out);
        if !all_logits && rows > 1 {
            b.copy(tmp, 0, &s.x, (rows - 1) * dim * 4, dim * 4)?;
            b.rms_norm(xb, tmp, &self.w.norm, 1, dim, eps)?;
        } else {
            b.rms_norm(xb, &s.x, &self.w.norm, out_rows, dim, eps)?;
        }
        b.matmul(&mut s.logits, xb, self.w.output(), out_rows) // logits [out_rows, vocab]
    }

    /// Runs the rows of `batch` (tokens already in `s.tokens`; the sequences' blocks reserved)
    /// through the model, appending their K/V to the cache, and writes the logits of each
    /// sequence's last row to `s.logits` [n_seqs, vocab], in the batch's order. Call
    /// `prepare_rope` first (a RoPE that varies with the length needs one batch per length).
    pub fn forward_rows(
        &self,
        b: &B,
        s: &mut Scratch<B>,
        kv: &mut KvCache<B>,
        batch: &RowsBatch<B>,
    ) -> Result<()> {
        let (dim, eps, rows) = (self.cfg.dim, self.cfg.norm_eps, batch.rows);
        let n_seqs = batch.spans.len();
        b.embedding(&mut s.x, &s.tokens, &self.w.tok_embeddings, rows)?; // x [rows, dim]
        for i in 0..self.cfg.n_layers {
            let attend = Attend::Rows {
                kv,
                rows: batch.view(),
            };
            self.attention_block(b, i, &mut s.x, &mut s.acts, &mut s.proj, attend, rows)?;
            self.ffn_block(b, i, &mut s.x, &mut s.acts, &mut s.proj, rows, false)?;
        }
        // final norm and classifier on each sequence's last row
        let (xb, last) = (&mut s.acts.xb, &mut s.proj.out);
        if batch.one_row_each() {
            b.rms_norm(xb, &s.x, &self.w.norm, n_seqs, dim, eps)?;
        } else {
            for (j, &(first, n)) in batch.spans.iter().enumerate() {
                b.copy(last, j * dim * 4, &s.x, (first + n - 1) * dim * 4, dim * 4)?;
            }
            b.rms_norm(xb, last, &self.w.norm, n_seqs, dim, eps)?; // xb [n_seqs, dim]
        }
        b.matmul(&mut s.logits, xb, self.w.output(), n_seqs) // logits [n_seqs, vocab]
    }

    /// Layer i's attention block: x += attention(rope(rms_norm(x) . (wq, wk, wv)^T)) . wo^T.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_block(
        &self,
        b: &B,
        i: usize,
        x: &mut Buf<B>,
        a: &mut Acts<B>,
        ps: &mut ProjScratch<B>,
        attend: Attend<'_, B>,
        rows: usize,
    ) -> Result<()> {
        let (c, l) = (&self.cfg, &self.w.layers[i]);
        let heads = Heads {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        };
        // Training and adapters need rms_norm(x) itself (backward and LoRA read it), so they
        // run the plain ops; generation may fold the norm into the projections.
        let plain = self.lora.is_some() || matches!(attend, Attend::Packed(_));
        if plain {
            b.rms_norm(&mut a.xb, x, &l.attn_norm, rows, c.dim, c.norm_eps)?; // xb [rows, dim]
            self.project(b, i, Proj::Q, &mut a.q, &a.xb, &mut ps.lora, rows)?; // q [rows, n_heads*hd]
            self.project(b, i, Proj::K, &mut a.k, &a.xb, &mut ps.lora, rows)?; // k [rows, n_kv*hd]
            self.project(b, i, Proj::V, &mut a.v, &a.xb, &mut ps.lora, rows)?; // v [rows, n_kv*hd]
        } else {
            let normed = RmsNormed {
                x,
                weight: &l.attn_norm,
                eps: c.norm_eps,
            };
            let (qkv, w) = ([&mut a.q, &mut a.k, &mut a.v], [&l.wq, &l.wk, &l.wv]);
            b.norm_qkv(qkv, &mut a.xb, normed, w, rows)?; // q [rows, n_heads*hd], k/v [rows, n_kv*hd]
            bias(b, &mut a.q, &l.bq, rows, c.q_dim())?;
            bias(b, &mut a.k, &l.bk, rows, c.kv_dim())?;
            bias(b, &mut a.v, &l.bv, rows, c.kv_dim())?;
        }
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            // Qwen3: each head of q and k through its RMSNorm; q_raw, k_raw keep the inputs.
            let (hd, eps) = (c.head_dim, c.norm_eps);
            std::mem::swap(&mut a.q, &mut a.q_raw);
            std::mem::swap(&mut a.k, &mut a.k_raw);
            b.rms_norm(&mut a.q, &a.q_raw, qn, rows * c.n_heads, hd, eps)?; // q [rows, n_heads*hd]
            b.rms_norm(&mut a.k, &a.k_raw, kn, rows * c.n_kv_heads, hd, eps)?; // k [rows, n_kv*hd]
        }
        let (inv_freq, scale) = (&self.inv_freq, self.rope.attention_scaling);
        match attend {
            Attend::Cache { kv, seq } => {
                // rotate q and k at positions seq.len..; store k and v in the cache
                let (pos0, dtype) = (seq.len, kv.dtype);
                let (k, v, table) = kv.layer_mut(i, seq);
                let cache = KvSlot { k, v, table, dtype };
                let rope = RopeArgs {
                    inv_freq,
                    attn_scale: scale,
                };
                b.rope_kv_append(&mut a.q, &mut a.k, &a.v, cache, rope, rows, pos0, heads)?;
                b.attention(&mut a.att, &a.q, kv.view(i, seq), rows, pos0, heads)?;
                // att [rows, n_heads*hd]
            }
            Attend::Packed(batch) => {
                let hd = c.head_dim;
                b.rope_rows(&mut a.q, inv_freq, batch.pos, rows, c.n_heads, hd, scale)?;
                b.rope_rows(&mut a.k, inv_freq, batch.pos, rows, c.n_kv_heads, hd, scale)?;
                let lse = Some(&mut a.lse); // lse [rows, n_heads]
                b.attention_packed(&mut a.att, lse, &a.q, &a.k, &a.v, batch, heads)?;
            }
            Attend::Rows { kv, rows: batch } => {
                // rotate q and k at each row's position; store k and v in its sequence's blocks
                let (hd, dtype, n, meta) = (c.head_dim, kv.dtype, rows, batch.meta);
                b.rope_rows(&mut a.q, inv_freq, meta, n, c.n_heads, hd, scale)?;
                b.rope_rows(&mut a.k, inv_freq, meta, n, c.n_kv_heads, hd, scale)?;
                let (k, v) = kv.pools_mut(i);
                let cache = KvSlot {
                    k,
                    v,
                    table: meta,
                    dtype,
                };
                b.kv_append_rows(cache, &a.k, &a.v, batch, heads)?;
                let (k, v) = kv.pools(i);
                let view = KvView {
                    k,
                    v,
                    table: meta,
                    dtype,
                };
                b.attention_rows(&mut a.att, &a.q, view, batch, heads)?; // att [rows, n_heads*hd]
            }
        }
        // x += att . wo^T (+ bo) (+ the adapter's product)
        self.project_residual(b, i, Proj::O, x, ps, &a.att, rows)
    }

    /// Layer i's feed-forward block: x += swiglu(h . w1^T, h . w3^T) . w2^T, h = rms_norm(x).
    /// `keep`: every activation of `a` must be written (training's backward reads them).
    #[allow(clippy::too_many_arguments)]
    pub fn ffn_block(
        &self,
        b: &B,
        i: usize,
        x: &mut Buf<B>,
        a: &mut Acts<B>,
        ps: &mut ProjScratch<B>,
        rows: usize,
        keep: bool,
    ) -> Result<()> {
        let (c, l) = (&self.cfg, &self.w.layers[i]);
        if self.lora.is_some() || keep {
            b.rms_norm(&mut a.h, x, &l.ffn_norm, rows, c.dim, c.norm_eps)?; // h [rows, dim]
            self.project(b, i, Proj::Gate, &mut a.gate, &a.h, &mut ps.lora, rows)?; // gate [rows, ffn]
            self.project(b, i, Proj::Up, &mut a.up, &a.h, &mut ps.lora, rows)?; // up [rows, ffn]
            b.swiglu(&mut a.hb, &a.gate, &a.up, rows * c.ffn_dim)?; // hb [rows, ffn]
                                                                    // x += hb . w2^T (+ b2) (+ the adapter's product)
            return self.project_residual(b, i, Proj::Down, x, ps, &a.hb, rows);
        }
        let normed = RmsNormed {
            x,
            weight: &l.ffn_norm,
            eps: c.norm_eps,
        };
        let (w13, b13) = ((&l.w1, &l.w3), (l.b1.as_ref(), l.b3.as_ref()));
        let scratch = [&mut a.gate, &mut a.up, &mut a.h];
        b.ffn_gate_up(&mut a.hb, scratch, normed, w13, b13, rows)?; // hb [rows, ffn]
                                                                    // x += hb . w2^T (+ b2)
        b.matmul_residual(x, &mut ps.out, &a.hb, &l.w2, l.b2.as_ref(), rows)
    }

    /// out = x . W^T (+ bias) (+ scale * (x . A^T) . B^T where the projection has an adapter).
    #[allow(clippy::too_many_arguments)]
    pub fn project(
        &self,
        b: &B,
        i: usize,
        p: Proj,
        out: &mut Buf<B>,
        x: &Buf<B>,
        ls: &mut LoraScratch<B>,
        rows: usize,
    ) -> Result<()> {
        let (w, bias) = p.of(&self.w.layers[i]);
        b.matmul(out, x, w, rows)?; // out [rows, n]
        if let Some(bias) = bias {
            b.add_bias(out, bias, rows, w.rows)?;
        }
        self.add_adapter(b, i, p, out, x, ls, rows)
    }

    /// resid += x . W^T (+ bias) (+ the adapter's product): a projection into the residual
    /// stream, added by the matmul itself where the backend can (a GEMM's beta = 1), with no
    /// temporary output and no separate add pass.
    #[allow(clippy::too_many_arguments)]
    fn project_residual(
        &self,
        b: &B,
        i: usize,
        p: Proj,
        resid: &mut Buf<B>,
        ps: &mut ProjScratch<B>,
        x: &Buf<B>,
        rows: usize,
    ) -> Result<()> {
        let (w, bias) = p.of(&self.w.layers[i]);
        b.matmul_residual(resid, &mut ps.out, x, w, bias, rows)?; // resid [rows, dim]
        self.add_adapter(b, i, p, resid, x, &mut ps.lora, rows)
    }

    /// out += s (x . A^T) . B^T where projection p of layer i has an adapter.
    #[allow(clippy::too_many_arguments)]
    fn add_adapter(
        &self,
        b: &B,
        i: usize,
        p: Proj,
        out: &mut Buf<B>,
        x: &Buf<B>,
        ls: &mut LoraScratch<B>,
        rows: usize,
    ) -> Result<()> {
        if let Some((ad, scale)) = self.adapter(i, p) {
            let x = self.lora_input(b, i, p, x, &mut ls.xd, rows)?;
            let u = &mut ls.u[p.index()];
            b.lora_down(u, x, &ad.a, rows)?; // u = x . A^T [rows, r]
            b.matmul_add_scaled(out, &mut ls.y, u, &ad.b, rows, scale)?; // out += s u . B^T
        }
        Ok(())
    }

    /// The input of projection p's adapter: x, or in training with dropout, dropout(x) (in
    /// xd; the mask depends on the seed and the site only, so backward redraws it).
    pub fn lora_input<'a>(
        &self,
        b: &B,
        i: usize,
        p: Proj,
        x: &'a Buf<B>,
        xd: &'a mut Option<Buf<B>>,
        rows: usize,
    ) -> Result<&'a Buf<B>> {
        let drop = self.lora.as_ref().and_then(|l| l.dropout(i, p));
        match (drop, xd.as_mut()) {
            (Some((pr, seed)), Some(xd)) => {
                let k = p.of(&self.w.layers[i]).0.cols;
                b.dropout(xd, x, pr, seed, rows * k)?; // xd = dropout(x) [rows, k]
                Ok(xd)
            }
            (Some(_), None) => Err(Error::Usage(
                "LoRA dropout needs its scratch (a trainer allocates it)".into(),
            )),
            (None, _) => Ok(x),
        }
    }

    /// The adapter of projection p in layer i and its scale, when LoRA is on.
    pub fn adapter(&self, i: usize, p: Proj) -> Option<(&Adapter<B>, f32)> {
        let lora = self.lora.as_ref()?;
        Some((lora.adapter(i, p)?, lora.scale))
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
