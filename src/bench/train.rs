//! `anyllama bench --train`: training speed on a synthetic model of a real shape. Each step is
//! one micro-batch of `batch` random sequences of `seq` tokens, packed (forward, fused loss,
//! backward, AdamW); two warm-up steps, then the median step time of up to `steps` steps
//! within the time budget. A step ends when its loss is read back, so wall time around it is
//! the device's time. Reported: tokens/s (batch x seq / median step), peak device memory
//! over the measured steps, and MFU: model FLOPs per step / step time / a bf16 GEMM rate
//! measured on the same backend in the same run.
//!
//! Model FLOPs (bench/peers/hf_peft_train.py uses the same formula): P = values of the seven
//! projection matrices of every layer plus the classifier (counted even when tied),
//! attention = layers x batch x 2 x 2 x seq^2 / 2 x heads x head_dim (causal QK^T and PV);
//! full fine-tuning 6 P tokens + 3 attention, LoRA 4 P tokens + 3 attention (a frozen base
//! has no weight gradients; the adapters' own small products are not counted).

use super::measure::{median, Budget};
use super::synthetic::{random_weight, synthetic_model, Shape};
use crate::backend::select::WithTrainBackend;
use crate::backend::train::TrainBackend;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::train::lora::{Lora, LoraConfig};
use crate::train::optim::OptimConfig;
use crate::train::params::Trained;
use crate::train::step::{Checkpointing, MicroBatch, Trainer};
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainBenchOptions {
    pub shape: &'static Shape,
    pub dtype: DType,
    pub trained: Trained,
    pub lora_r: usize,
    pub batch: usize,
    pub seq: usize,
    pub ckpt: Checkpointing,
    /// Most measured steps (after two warm-up steps).
    pub steps: usize,
    pub max_seconds: f64,
    pub seed: u64,
}

/// One training measurement; the JSON fields the peer writes too.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainRow {
    pub kind: String,
    pub shape: String,
    pub dtype: String,
    pub backend: String,
    pub mode: String,
    pub lora_r: Option<usize>,
    pub batch: usize,
    pub seq: usize,
    /// "on" (per layer), "offload" or "off".
    pub checkpointing: String,
    pub steps: usize,
    pub step_ms: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub peak_mem_bytes: Option<u64>,
    pub model_flops_per_step: f64,
    pub gemm_tflops: Option<f64>,
    pub mfu: Option<f64>,
    pub loss_first: Option<f64>,
    pub loss_last: Option<f64>,
    pub error: Option<String>,
}

/// The model FLOPs of one step (see the file's comment).
pub fn model_flops_per_step(shape: &Shape, trained: Trained, batch: usize, seq: usize) -> f64 {
    let c = shape.config();
    let (d, q, kv, f) = (c.dim, c.q_dim(), c.kv_dim(), c.ffn_dim);
    let per_layer = (d * q + 2 * d * kv + q * d + 3 * d * f) as f64;
    let p = c.n_layers as f64 * per_layer + (c.vocab_size * d) as f64;
    let tokens = (batch * seq) as f64;
    let t = seq as f64;
    let attention = c.n_layers as f64
        * batch as f64
        * 2.0
        * 2.0
        * (t * t / 2.0)
        * (c.n_heads * c.head_dim) as f64;
    let matmuls = if trained == Trained::Full { 6.0 } else { 4.0 };
    matmuls * p * tokens + 3.0 * attention
}

fn checkpointing_name(c: Checkpointing) -> &'static str {
    match c {
        Checkpointing::Off => "off",
        Checkpointing::Layer => "on",
        Checkpointing::Offload => "offload",
    }
}

impl TrainRow {
    pub fn new(backend: &str, o: &TrainBenchOptions) -> TrainRow {
        TrainRow {
            kind: "train".into(),
            shape: o.shape.name.into(),
            dtype: o.dtype.to_string(),
            backend: backend.into(),
            mode: match o.trained {
                Trained::Full => "full".into(),
                Trained::Lora => "lora".into(),
            },
            lora_r: (o.trained == Trained::Lora).then_some(o.lora_r),
            batch: o.batch,
            seq: o.seq,
            checkpointing: checkpointing_name(o.ckpt).into(),
            model_flops_per_step: model_flops_per_step(o.shape, o.trained, o.batch, o.seq),
            ..Default::default()
        }
    }
}

/// A bf16 GEMM's rate on `b` in TFLOP/s: the median of five products [n, n] x [n, n]^T through
/// the backend's own matmul (the path the forward takes).
pub fn gemm_tflops<B: TrainBackend>(b: &B, n: usize) -> Result<f64> {
    let w = random_weight(b, n, n, DType::BF16, 7)?;
    let mut x = b.alloc(n * n * 4)?;
    b.upload(&mut x, 0, bytemuck::cast_slice(&vec![0.01f32; n * n]))?;
    let mut out = b.alloc(n * n * 4)?;
    let mut times = Vec::new();
    let mut probe = [0u8; 4];
    for i in 0..6 {
        let t = Instant::now();
        b.matmul(&mut out, &x, &w, n)?;
        b.read(&out, 0, &mut probe)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let s = median(&times).unwrap_or(f64::NAN);
    Ok(2.0 * (n as f64).powi(3) / s / 1e12)
}

/// Random packed sequences with next-token labels (each sequence's last row unlabelled).
fn random_batch(vocab: usize, batch: usize, seq: usize, seed: u64) -> MicroBatch {
    let tokens = super::measure::random_prompt(batch * seq, vocab, seed);
    let labels = (0..batch * seq)
        .map(|i| {
            if i % seq == seq - 1 {
                -100
            } else {
                tokens[i + 1] as i32
            }
        })
        .collect();
    MicroBatch {
        tokens,
        labels,
        lens: vec![seq; batch],
    }
}

pub fn bench_train<B: TrainBackend>(b: &B, o: &TrainBenchOptions) -> Result<TrainRow> {
    if o.batch == 0 || o.seq < 2 {
        return Err(Error::Usage(
            "--batch must be at least 1 and --seq at least 2".into(),
        ));
    }
    let mut row = TrainRow::new(b.name(), o);
    let budget = Budget::new(o.max_seconds);
    let gemm_n = if b.name() == "cpu" { 512 } else { 8192 };
    row.gemm_tflops = Some(gemm_tflops(b, gemm_n)?);
    let mut m = synthetic_model(b, o.shape, o.dtype, o.seed)?;
    if o.trained == Trained::Lora {
        let cfg = LoraConfig {
            r: o.lora_r,
            alpha: o.lora_r as f32,
            ..Default::default()
        };
        m.lora = Some(Lora::new(b, &m.cfg, cfg, o.seed)?);
    }
    let optim = OptimConfig {
        lr: 1e-4,
        ..Default::default()
    };
    let rows = o.batch * o.seq;
    let mut t = Trainer::new(b, &m, o.trained, o.ckpt, rows, optim)?;
    let mb = [random_batch(m.cfg.vocab_size, o.batch, o.seq, o.seed)];
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for i in 0..o.steps + 2 {
        if i == 2 {
            b.pool().reset_peak();
        }
        let start = Instant::now();
        let s = t.step(b, &mut m, &mb)?;
        let dt = start.elapsed().as_secs_f64();
        losses.push(s.loss as f64);
        if i >= 2 {
            times.push(dt);
            eprintln!(
                "bench train: step {} of {}: {:.1} ms, loss {:.4}",
                i - 1,
                o.steps,
                dt * 1e3,
                s.loss
            );
            if budget.exhausted() {
                break;
            }
        }
    }
    row.steps = times.len();
    if let Some(s) = median(&times) {
        row.step_ms = Some(s * 1e3);
        row.tokens_per_s = Some(rows as f64 / s);
        row.mfu = row
            .gemm_tflops
            .map(|g| row.model_flops_per_step / s / (g * 1e12));
    }
    row.peak_mem_bytes = Some(b.pool().peak_bytes() as u64);
    row.loss_first = losses.first().copied();
    row.loss_last = losses.last().copied();
    Ok(row)
}

/// `bench_train` as work for `with_train_backend`.
pub struct TrainBenchJob<'a>(pub &'a TrainBenchOptions);

impl WithTrainBackend for TrainBenchJob<'_> {
    type Output = TrainRow;
    fn run<B: TrainBackend>(self, b: B) -> Result<TrainRow> {
        bench_train(&b, self.0)
    }
}

/// One line of the table `--train` prints on stderr.
pub fn describe(r: &TrainRow) -> String {
    let f = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    match &r.error {
        Some(e) => format!("{} {} {}: error: {e}", r.backend, r.shape, r.mode),
        None => format!(
            "{} {} {} {} batch {} seq {} checkpointing {}: {} tok/s, {} ms/step, peak {} MiB, \
             MFU {}% of a {} TFLOP/s GEMM, loss {} -> {}",
            r.backend,
            r.shape,
            r.dtype,
            r.mode,
            r.batch,
            r.seq,
            r.checkpointing,
            f(r.tokens_per_s, 0),
            f(r.step_ms, 1),
            f(r.peak_mem_bytes.map(|b| b as f64 / (1 << 20) as f64), 0),
            f(r.mfu.map(|m| m * 100.0), 1),
            f(r.gemm_tflops, 0),
            f(r.loss_first, 3),
            f(r.loss_last, 3),
        ),
    }
}
