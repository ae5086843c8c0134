//! One training step, llm.c's train_gpt2.c in shape: the forward is model.rs's own layer code
//! over a packed batch, keeping what backward needs; then the loss; then each layer's backward
//! in reverse as op calls with shape comments (gradients named d<x>); then the optimizer.
//!
//! Kept for backward, per layer: its input x_in, and (checkpointing off) the block's
//! activations `Acts` plus the residual between the blocks x_mid. With checkpointing only
//! x_in is kept (on the device, or in host memory with `Offload`) and the layer is recomputed
//! from it just before its backward.

use crate::backend::train::TrainBackend;
use crate::backend::Heads;
use crate::batch::Batch;
use crate::error::{Error, Result};
use crate::model::{Acts, Attend, LoraScratch, Model, ProjScratch};
use crate::pool::Buf;
use crate::train::lora::Proj;
use crate::train::optim::{OptimConfig, Optimizer, StepInfo};
use crate::train::params::{Grads, LayerGrads, Trained};
use crate::train::plan::TrainPlan;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpointing {
    /// Keep every layer's activations.
    Off,
    /// Keep each layer's input on the device; recompute the layer in backward.
    Layer,
    /// Keep each layer's input in host memory; bring it back for the recompute.
    Offload,
}

/// One micro-batch: packed sequences of tokens and, per row, the token it must predict
/// (negative: no loss on that row).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MicroBatch {
    pub tokens: Vec<u32>,
    pub labels: Vec<i32>,
    /// Rows of each packed sequence, in order (they sum to tokens.len()).
    pub lens: Vec<usize>,
}

impl MicroBatch {
    pub fn labelled(&self) -> usize {
        self.labels.iter().filter(|&&l| l >= 0).count()
    }
}

/// A layer's input as kept for backward.
enum Kept<B: crate::backend::Backend> {
    Device(Buf<B>),
    Host(Vec<u8>),
}

/// Gradients of activations, reused by every layer.
struct Back<B: crate::backend::Backend> {
    dx: Buf<B>,     // d residual [rows, dim]
    dtmp: Buf<B>,   // [rows, dim]
    dh: Buf<B>,     // d of a norm's output [rows, dim]
    datt: Buf<B>,   // [rows, q_dim]
    dq: Buf<B>,     // [rows, q_dim]
    dk: Buf<B>,     // [rows, kv_dim]
    dv: Buf<B>,     // [rows, kv_dim]
    dq_raw: Buf<B>, // qk_norm: d q before its per-head norm [rows, q_dim]
    dk_raw: Buf<B>, // qk_norm: [rows, kv_dim]
    dhb: Buf<B>,    // [rows, ffn]
    dgate: Buf<B>,  // [rows, ffn]
    dup: Buf<B>,    // [rows, ffn]
    p: ProjBack<B>,
}

/// The buffers a projection's backward needs besides its input and output gradients.
struct ProjBack<B: crate::backend::Backend> {
    du: Buf<B>,   // LoRA d(x A^T) [rows, r]
    ones: Buf<B>, // 1.0 [rows]: bias gradients are dy^T . ones
    /// LoRA's scratch still holds this layer's u = x A^T of every projection (the layer's
    /// forward was the last one run), so backward need not recompute them.
    u_kept: bool,
}

pub struct Trainer<B: TrainBackend> {
    pub ckpt: Checkpointing,
    pub trained: Trained,
    pub grads: Grads<B>,
    pub optim: Optimizer<B>,
    max_rows: usize,
    x: Buf<B>,  // residual stream [rows, dim]
    xf: Buf<B>, // final norm output [rows, dim]
    x_in: Vec<Kept<B>>,
    x_mid: Vec<Buf<B>>, // one per layer, or one recomputed
    acts: Vec<Acts<B>>, // one per layer, or one recomputed
    ps: ProjScratch<B>,
    d: Back<B>,
    tokens: Buf<B>,
    labels: Buf<B>,
    loss: Buf<B>,
    /// The base seed of LoRA dropout's masks, and micro-batches run so far (each draws its
    /// masks from both).
    pub dropout_seed: u32,
    pub micro: u32,
}

/// What a training step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean loss over the step's labelled rows.
    pub loss: f32,
    pub labelled: usize,
    pub rows: usize,
    pub info: StepInfo,
}

impl<B: TrainBackend> Trainer<B> {
    /// A trainer for micro-batches of up to `max_rows` rows. `m.lora` must hold the adapters
    /// when `trained` is LoRA.
    pub fn new(
        b: &B,
        m: &Model<B>,
        trained: Trained,
        ckpt: Checkpointing,
        max_rows: usize,
        optim: OptimConfig,
    ) -> Result<Self> {
        if trained == Trained::Lora && m.lora.is_none() {
            return Err(Error::Usage(
                "LoRA training needs adapters on the model".into(),
            ));
        }
        let c = &m.cfg;
        let rows = max_rows.max(1);
        let r = m.lora.as_ref().map_or(0, |l| l.cfg.r);
        // The weights are on the device already; what the step adds must fit beside them.
        let plan = TrainPlan::for_model(m, trained, ckpt, rows);
        plan.check(&b.memory_limits(), &b.device_name())?;
        let f = |n: usize| b.alloc(rows * n * 4);
        let layers = c.n_layers;
        let per_layer = if ckpt == Checkpointing::Off {
            layers
        } else {
            1
        };
        let mut ones = f(1)?;
        b.upload(&mut ones, 0, bytemuck::cast_slice(&vec![1.0f32; rows]))?;
        let x_in = (0..layers)
            .map(|_| match ckpt {
                Checkpointing::Offload => Ok(Kept::Host(Vec::new())),
                _ => f(c.dim).map(Kept::Device),
            })
            .collect::<Result<_>>()?;
        let mut ps = ProjScratch::new(b, c, rows, r)?;
        if m.lora.as_ref().is_some_and(|l| l.cfg.dropout > 0.0) {
            ps.lora.xd = Some(f(c.dim.max(c.q_dim()).max(c.ffn_dim))?);
        }
        Ok(Trainer {
            dropout_seed: 0,
            micro: 0,
            ckpt,
            trained,
            grads: Grads::new(b, m, trained)?,
            optim: Optimizer::new(b, optim)?,
            max_rows: rows,
            x: f(c.dim)?,
            xf: f(c.dim)?,
            x_in,
            x_mid: (0..per_layer).map(|_| f(c.dim)).collect::<Result<_>>()?,
            acts: (0..per_layer)
                .map(|_| Acts::new(b, c, rows))
                .collect::<Result<_>>()?,
            ps,
            d: Back {
                dx: f(c.dim)?,
                dtmp: f(c.dim)?,
                dh: f(c.dim)?,
                datt: f(c.q_dim())?,
                dq: f(c.q_dim())?,
                dk: f(c.kv_dim())?,
                dv: f(c.kv_dim())?,
                dq_raw: f(if c.qk_norm { c.q_dim() } else { 1 })?,
                dk_raw: f(if c.qk_norm { c.kv_dim() } else { 1 })?,
                dhb: f(c.ffn_dim)?,
                dgate: f(c.ffn_dim)?,
                dup: f(c.ffn_dim)?,
                p: ProjBack {
                    du: f(r.max(1))?,
                    ones,
                    u_kept: false,
                },
            },
            tokens: f(1)?,
            labels: f(1)?,
            loss: b.alloc(4)?,
        })
    }

    /// One optimizer step over `mbs` (gradient accumulation): the loss is the mean over every
    /// labelled row of all micro-batches, as one batch of them all would give.
    pub fn step(&mut self, b: &B, m: &mut Model<B>, mbs: &[MicroBatch]) -> Result<StepStats> {
        let labelled: usize = mbs.iter().map(|mb| mb.labelled()).sum();
        if labelled == 0 {
            return Err(Error::Usage(
                "a training step has no labelled rows (every label is ignored)".into(),
            ));
        }
        self.grads.zero(b)?;
        let mut loss = 0.0f64;
        for mb in mbs {
            loss += self.forward_backward(b, m, mb, 1.0 / labelled as f32)? as f64;
        }
        let info = self.optim.step(b, m, &self.grads)?;
        Ok(StepStats {
            loss: (loss / labelled as f64) as f32,
            labelled,
            rows: mbs.iter().map(|mb| mb.tokens.len()).sum(),
            info,
        })
    }

    /// Forward and backward of one micro-batch: parameter gradients accumulate (scaled by
    /// `scale`, 1 / labelled rows of the step); returns the summed loss of its rows.
    pub fn forward_backward(
        &mut self,
        b: &B,
        m: &mut Model<B>,
        mb: &MicroBatch,
        scale: f32,
    ) -> Result<f32> {
        let rows = mb.tokens.len();
        let batch = self.load_micro_batch(b, m, mb)?;
        // Each micro-batch draws its own dropout masks; forward and backward draw the same.
        let seed = crate::backend::dropout_hash(self.dropout_seed, self.micro);
        self.micro = self.micro.wrapping_add(1);
        if let Some(l) = m.lora.as_mut() {
            l.dropout_seed = Some(seed);
        }
        let loss = self.run_micro_batch(b, m, &batch, rows, scale);
        if let Some(l) = m.lora.as_mut() {
            l.dropout_seed = None;
        }
        loss
    }

    /// Checks micro-batch `mb`, uploads its tokens and labels, and returns its Batch (every
    /// sequence from position 0) with the RoPE tables covering its longest sequence.
    fn load_micro_batch(&mut self, b: &B, m: &mut Model<B>, mb: &MicroBatch) -> Result<Batch<B>> {
        check_micro_batch(mb, self.max_rows, m.cfg.vocab_size)?;
        let pos0 = vec![0; mb.lens.len()];
        let batch = Batch::new(b, &mb.lens, &pos0)?;
        b.upload(&mut self.tokens, 0, bytemuck::cast_slice(&mb.tokens))?;
        b.upload(&mut self.labels, 0, bytemuck::cast_slice(&mb.labels))?;
        m.prepare_rope(b, batch.view().max_len)?;
        Ok(batch)
    }

    /// The summed loss of one micro-batch's labelled rows at the current weights, forward
    /// only (evaluation): no gradient, no dropout, and the dropout counter `micro` untouched,
    /// so evaluating between steps leaves training's masks (and a resumed run) unchanged. The
    /// layers run as in training (`keep`: the same kernels), so the loss is the one
    /// `forward_backward` would report; acts[0] serves every layer.
    pub fn loss(&mut self, b: &B, m: &mut Model<B>, mb: &MicroBatch) -> Result<f32> {
        let rows = mb.tokens.len();
        let batch = self.load_micro_batch(b, m, mb)?;
        let (dim, eps) = (m.cfg.dim, m.cfg.norm_eps);
        b.embedding(&mut self.x, &self.tokens, &m.w.tok_embeddings, rows)?; // x [rows, dim]
        for i in 0..m.cfg.n_layers {
            let (a, ps) = (&mut self.acts[0], &mut self.ps);
            m.attention_block(b, i, &mut self.x, a, ps, Attend::Packed(batch.view()), rows)?;
            m.ffn_block(b, i, &mut self.x, a, ps, rows, true)?;
        }
        b.rms_norm(&mut self.xf, &self.x, &m.w.norm, rows, dim, eps)?; // xf [rows, dim]

        // The loss only: dxf lands in d.dh unused, and no classifier gradient is taken.
        let (out, labels) = (m.w.output(), &self.labels);
        b.cross_entropy(
            &mut self.loss,
            &mut self.d.dh,
            None,
            &self.xf,
            out,
            labels,
            rows,
            1.0,
        )?;
        let mut loss = [0u8; 4];
        b.read(&self.loss, 0, &mut loss)?;
        Ok(f32::from_le_bytes(loss))
    }

    fn run_micro_batch(
        &mut self,
        b: &B,
        m: &Model<B>,
        batch: &Batch<B>,
        rows: usize,
        scale: f32,
    ) -> Result<f32> {
        let (dim, eps, layers) = (m.cfg.dim, m.cfg.norm_eps, m.cfg.n_layers);

        // ---- forward ----
        b.embedding(&mut self.x, &self.tokens, &m.w.tok_embeddings, rows)?; // x [rows, dim]
        for i in 0..layers {
            self.keep_input(b, i, rows * dim)?; // x_in[i] = x
            let j = i.min(self.acts.len() - 1);
            let (a, ps) = (&mut self.acts[j], &mut self.ps);
            m.attention_block(b, i, &mut self.x, a, ps, Attend::Packed(batch.view()), rows)?;
            b.copy(&mut self.x_mid[j], 0, &self.x, 0, rows * dim * 4)?; // x_mid = x
            m.ffn_block(b, i, &mut self.x, a, ps, rows, true)?;
        }
        b.rms_norm(&mut self.xf, &self.x, &m.w.norm, rows, dim, eps)?; // xf [rows, dim]

        // ---- loss: logits = xf . output^T, softmax, cross-entropy; dxf into d.dh ----
        let g = &mut self.grads;
        let doutput = if m.w.output.is_some() {
            g.output.as_mut()
        } else {
            g.embedding.as_mut()
        };
        let (d, labels) = (&mut self.d, &self.labels);
        b.cross_entropy(
            &mut self.loss,
            &mut d.dh,
            doutput,
            &self.xf,
            m.w.output(),
            labels,
            rows,
            scale,
        )?;
        // xf = rms_norm(x)
        b.rms_norm_backward(
            &mut d.dx,
            g.norm.as_mut(),
            &d.dh,
            &self.x,
            &m.w.norm,
            rows,
            dim,
            eps,
        )?;

        // ---- backward, last layer first; dx is d(residual) ----
        for i in (0..layers).rev() {
            let j = i.min(self.acts.len() - 1);
            // The last layer's activations are still those its forward left (nothing has run
            // a layer since), so only the layers before it are recomputed.
            let last = i + 1 == layers;
            if self.ckpt != Checkpointing::Off {
                self.recompute(b, m, i, batch, rows, last)?;
            }
            self.d.p.u_kept = self.ckpt != Checkpointing::Off || last;
            let x_in = match &self.x_in[i] {
                Kept::Device(x) => x,
                Kept::Host(_) => &self.x, // restored into x by recompute
            };
            let (a, lg) = (&self.acts[j], &mut self.grads.layers[i]);
            let ls = &mut self.ps.lora;
            ffn_backward(b, m, i, &mut self.d, a, &self.x_mid[j], lg, ls, rows)?;
            attention_backward(b, m, i, &mut self.d, a, x_in, lg, ls, batch, rows)?;
        }
        if let Some(demb) = self.grads.embedding.as_mut() {
            b.embedding_backward(demb, &self.d.dx, &self.tokens, rows, dim)?; // dtable += scatter(dx)
        }
        let mut loss = [0u8; 4];
        b.read(&self.loss, 0, &mut loss)?;
        let loss = f32::from_le_bytes(loss);
        if !loss.is_finite() {
            return Err(Error::Device(format!(
                "the training loss is {loss}: the step diverged (lower the learning rate)"
            )));
        }
        Ok(loss)
    }

    /// Keeps layer i's input (the residual stream as it is now).
    fn keep_input(&mut self, b: &B, i: usize, n: usize) -> Result<()> {
        match &mut self.x_in[i] {
            Kept::Device(k) => b.copy(k, 0, &self.x, 0, n * 4),
            Kept::Host(h) => {
                h.resize(n * 4, 0);
                b.read(&self.x, 0, h)
            }
        }
    }

    /// Runs layer i's forward again from its kept input, into acts[0] and x_mid[0]; with
    /// offloading, the input is brought back into `x` first (the residual stream is not
    /// needed any more once backward has started).
    fn recompute(
        &mut self,
        b: &B,
        m: &Model<B>,
        i: usize,
        batch: &Batch<B>,
        rows: usize,
        last: bool,
    ) -> Result<()> {
        let n = rows * m.cfg.dim;
        if last {
            // Its forward just ran: acts[0] and x_mid[0] hold it; with offloading its input
            // still has to come back into x, where backward reads it.
            if let Kept::Host(h) = &self.x_in[i] {
                b.upload(&mut self.x, 0, h)?;
            }
            return Ok(());
        }
        let (a, ps, mid) = (&mut self.acts[0], &mut self.ps, &mut self.x_mid[0]);
        // The layer's forward writes its output into the buffer it reads; run it on dtmp (free
        // until this layer's backward) so the kept input stays as it is.
        let x = &mut self.d.dtmp;
        match &self.x_in[i] {
            Kept::Device(k) => b.copy(x, 0, k, 0, n * 4)?,
            Kept::Host(h) => {
                b.upload(x, 0, h)?;
                b.upload(&mut self.x, 0, h)?;
            }
        }
        m.attention_block(b, i, x, a, ps, Attend::Packed(batch.view()), rows)?;
        b.copy(mid, 0, x, 0, n * 4)?;
        m.ffn_block(b, i, x, a, ps, rows, true)
    }
}

/// Backward of the feed-forward block x_out = x_mid + swiglu(h . w1^T, h . w3^T) . w2^T,
/// h = rms_norm(x_mid): dx (d x_out on entry) becomes d x_mid.
#[allow(clippy::too_many_arguments)]
fn ffn_backward<B: TrainBackend>(
    b: &B,
    m: &Model<B>,
    i: usize,
    d: &mut Back<B>,
    a: &Acts<B>,
    x_mid: &Buf<B>,
    g: &mut LayerGrads<B>,
    ls: &mut LoraScratch<B>,
    rows: usize,
) -> Result<()> {
    let (c, l) = (&m.cfg, &m.w.layers[i]);
    // x_out = x_mid + hb . w2^T
    proj_backward(
        b,
        m,
        i,
        Proj::Down,
        DxIn::Set(&mut d.dhb),
        &d.dx,
        &a.hb,
        g,
        ls,
        &mut d.p,
        rows,
    )?; // dhb [rows, ffn]
        // hb = silu(gate) * up
    b.swiglu_backward(
        &mut d.dgate,
        &mut d.dup,
        &d.dhb,
        &a.gate,
        &a.up,
        rows * c.ffn_dim,
    )?;
    // gate = h . w1^T, up = h . w3^T
    proj_backward(
        b,
        m,
        i,
        Proj::Gate,
        DxIn::Set(&mut d.dh),
        &d.dgate,
        &a.h,
        g,
        ls,
        &mut d.p,
        rows,
    )?; // dh [rows, dim]
    proj_backward(
        b,
        m,
        i,
        Proj::Up,
        DxIn::Add(&mut d.dh, &mut d.dtmp),
        &d.dup,
        &a.h,
        g,
        ls,
        &mut d.p,
        rows,
    )?; // dh += dup . W_up (and its LoRA)

    // h = rms_norm(x_mid)
    let dw = g.ffn_norm.as_mut();
    b.rms_norm_backward(
        &mut d.dtmp,
        dw,
        &d.dh,
        x_mid,
        &l.ffn_norm,
        rows,
        c.dim,
        c.norm_eps,
    )?;
    b.add(&mut d.dx, &d.dtmp, rows * c.dim) // the residual path adds its own gradient
}

/// Backward of the attention block x_mid = x_in + attention(rope(xb . (wq, wk, wv)^T)) . wo^T,
/// xb = rms_norm(x_in): dx (d x_mid on entry) becomes d x_in.
#[allow(clippy::too_many_arguments)]
fn attention_backward<B: TrainBackend>(
    b: &B,
    m: &Model<B>,
    i: usize,
    d: &mut Back<B>,
    a: &Acts<B>,
    x_in: &Buf<B>,
    g: &mut LayerGrads<B>,
    ls: &mut LoraScratch<B>,
    batch: &Batch<B>,
    rows: usize,
) -> Result<()> {
    let (c, l) = (&m.cfg, &m.w.layers[i]);
    let heads = Heads {
        n_heads: c.n_heads,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
    };
    // x_mid = x_in + att . wo^T
    proj_backward(
        b,
        m,
        i,
        Proj::O,
        DxIn::Set(&mut d.datt),
        &d.dx,
        &a.att,
        g,
        ls,
        &mut d.p,
        rows,
    )?; // datt [rows, q_dim]
        // att = softmax(q k^T / sqrt(hd)) v within each sequence
    let (dq, dk, dv) = (&mut d.dq, &mut d.dk, &mut d.dv);
    let (q, k, v, att, lse) = (&a.q, &a.k, &a.v, &a.att, &a.lse);
    b.attention_backward(dq, dk, dv, &d.datt, q, k, v, att, lse, batch.view(), heads)?;
    // q, k rotated at the rows' positions
    let (inv_freq, scale) = m.rope_args();
    let (hd, pos) = (c.head_dim, &batch.pos);
    b.rope_backward(&mut d.dq, inv_freq, pos, rows, c.n_heads, hd, scale)?;
    b.rope_backward(&mut d.dk, inv_freq, pos, rows, c.n_kv_heads, hd, scale)?;
    if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
        // q, k = rms_norm(q_raw, k_raw) per head
        let (eps, nq, nk) = (c.norm_eps, rows * c.n_heads, rows * c.n_kv_heads);
        b.rms_norm_backward(
            &mut d.dq_raw,
            g.q_norm.as_mut(),
            &d.dq,
            &a.q_raw,
            qn,
            nq,
            hd,
            eps,
        )?;
        b.rms_norm_backward(
            &mut d.dk_raw,
            g.k_norm.as_mut(),
            &d.dk,
            &a.k_raw,
            kn,
            nk,
            hd,
            eps,
        )?;
        std::mem::swap(&mut d.dq, &mut d.dq_raw);
        std::mem::swap(&mut d.dk, &mut d.dk_raw);
    }
    // q, k, v = xb . (wq, wk, wv)^T (+ biases)
    proj_backward(
        b,
        m,
        i,
        Proj::Q,
        DxIn::Set(&mut d.dh),
        &d.dq,
        &a.xb,
        g,
        ls,
        &mut d.p,
        rows,
    )?; // dxb [rows, dim]
    proj_backward(
        b,
        m,
        i,
        Proj::K,
        DxIn::Add(&mut d.dh, &mut d.dtmp),
        &d.dk,
        &a.xb,
        g,
        ls,
        &mut d.p,
        rows,
    )?; // dh += dk . W_k (and its LoRA)
    proj_backward(
        b,
        m,
        i,
        Proj::V,
        DxIn::Add(&mut d.dh, &mut d.dtmp),
        &d.dv,
        &a.xb,
        g,
        ls,
        &mut d.p,
        rows,
    )?; // dh += dv . W_v (and its LoRA)

    // xb = rms_norm(x_in)
    let dw = g.attn_norm.as_mut();
    b.rms_norm_backward(
        &mut d.dtmp,
        dw,
        &d.dh,
        x_in,
        &l.attn_norm,
        rows,
        c.dim,
        c.norm_eps,
    )?;
    b.add(&mut d.dx, &d.dtmp, rows * c.dim)
}

/// Where a projection's backward puts its input gradient.
enum DxIn<'a, B: crate::backend::Backend> {
    /// dx_in = ...
    Set(&'a mut Buf<B>),
    /// dx_in += ..., with scratch of dx_in's size for backends that cannot add in the GEMM.
    Add(&'a mut Buf<B>, &'a mut Buf<B>),
}

/// Backward of `Model::project` (y = x . W^T + bias + s (x . A^T) . B^T) for gradient dy:
/// dx_in (=, or += with DxIn::Add) dy . W + s (dy . B) . A; dW, dbias (full) or dA, dB (LoRA)
/// accumulate.
#[allow(clippy::too_many_arguments)]
fn proj_backward<B: TrainBackend>(
    b: &B,
    m: &Model<B>,
    i: usize,
    p: Proj,
    dx_in: DxIn<'_, B>,
    dy: &Buf<B>,
    x: &Buf<B>,
    g: &mut LayerGrads<B>,
    ls: &mut LoraScratch<B>,
    dl: &mut ProjBack<B>,
    rows: usize,
) -> Result<()> {
    let (w, _) = p.of(&m.w.layers[i]);
    let (n, k) = (w.rows, w.cols);
    let dx_in = match dx_in {
        DxIn::Set(dx) => {
            b.matmul_dx(dx, dy, w, rows, 1.0)?; // dx_in = dy . W   [rows, k]
            dx
        }
        DxIn::Add(dx, tmp) => {
            b.matmul_dx_add(dx, tmp, dy, w, rows, 1.0)?; // dx_in += dy . W   [rows, k]
            dx
        }
    };
    if let Some(dw) = g.w[p.index()].as_mut() {
        b.matmul_dw(dw, dy, x, rows, n, k, 1.0)?; // dW += dy^T . x   [n, k]
    }
    if let Some(db) = g.bias[p.index()].as_mut() {
        b.matmul_dw(db, dy, &dl.ones, rows, n, 1, 1.0)?; // dbias += dy^T . 1   [n]
    }
    if let (Some((ad, s)), Some((da, dbb))) = (m.adapter(i, p), g.lora[p.index()].as_mut()) {
        let r = ad.a.rows;
        let xl = m.lora_input(b, i, p, x, &mut ls.xd, rows)?; // x, or dropout(x) redrawn
        let u = &mut ls.u[p.index()];
        if !dl.u_kept {
            b.lora_down(u, xl, &ad.a, rows)?; // u = xl . A^T   [rows, r] (recomputed)
        }
        b.matmul_dw(dbb, dy, u, rows, n, r, s)?; // dB += s dy^T . u   [n, r]
        b.matmul_dx(&mut dl.du, dy, &ad.b, rows, s)?; // du = s dy . B   [rows, r]
        b.matmul_dw(da, &dl.du, xl, rows, r, k, 1.0)?; // dA += du^T . xl   [r, k]
        match (
            m.lora.as_ref().and_then(|l| l.dropout(i, p)),
            ls.xd.as_mut(),
        ) {
            (Some((pr, seed)), Some(xd)) => {
                b.matmul_dx(&mut ls.y, &dl.du, &ad.a, rows, 1.0)?; // dxl = du . A   [rows, k]
                b.dropout(xd, &ls.y, pr, seed, rows * k)?; // the same mask, the same scale
                b.add(dx_in, xd, rows * k)?;
            }
            _ => b.matmul_dx_add(dx_in, &mut ls.y, &dl.du, &ad.a, rows, 1.0)?, // dx_in += du . A
        }
    }
    Ok(())
}

fn check_micro_batch(mb: &MicroBatch, max_rows: usize, vocab: usize) -> Result<()> {
    let rows = mb.tokens.len();
    let bad = if rows == 0 || rows > max_rows {
        Some(format!("{rows} rows (this trainer takes 1 to {max_rows})"))
    } else if mb.labels.len() != rows {
        Some(format!("{} labels for {rows} tokens", mb.labels.len()))
    } else if mb.lens.iter().sum::<usize>() != rows || mb.lens.contains(&0) {
        Some(format!(
            "sequence lengths {:?} that do not add up to {rows} rows",
            mb.lens
        ))
    } else if let Some(t) = mb.tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(format!("token id {t} past the vocabulary of {vocab}"))
    } else {
        mb.labels
            .iter()
            .find(|&&l| l >= vocab as i32)
            .map(|l| format!("label {l} past the vocabulary of {vocab}"))
    };
    match bad {
        Some(why) => Err(Error::Usage(format!("a micro-batch has {why}"))),
        None => Ok(()),
    }
}
