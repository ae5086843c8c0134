//! A training step's device memory, worked out from the config before anything is allocated:
//! weights, adapters, gradients, optimizer state, the activations kept for backward (which
//! checkpointing decides) and the largest transient. `check` compares it with the device's
//! `memory_limits()` so a step that cannot fit is an error naming the numbers and what to lower,
//! never an out-of-memory crash halfway through a step. Mirrors `Trainer::new`, `Grads::new`
//! and `Optimizer`.

use crate::backend::MemoryLimits;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::loader::human_bytes;
use crate::model::Acts;
use crate::train::lora::LoraConfig;
use crate::train::params::Trained;
use crate::train::step::Checkpointing;

/// Most bytes of the logits of one chunk of rows in the fused loss, and of one slice of a
/// weight widened for a backward product (the backends' scratch caps).
const CHUNK_SCRATCH: u64 = 256 << 20;

#[derive(Clone, Debug, PartialEq)]
pub struct TrainPlan {
    /// Model weights as stored (0 when they are already on the device).
    pub weights: u64,
    pub adapters: u64,
    pub grads: u64,
    /// AdamW's m and v, and f32 master copies of half-precision weights.
    pub optimizer: u64,
    /// Activations kept from the forward for backward.
    pub kept: u64,
    /// Buffers live during one layer's backward, the loss's logits chunk and scratch.
    pub transient: u64,
    pub rows: usize,
    pub ckpt: Checkpointing,
}

fn trained_values(cfg: &ModelConfig, trained: Trained, lora: Option<&LoraConfig>) -> u64 {
    let d = cfg.dim as u64;
    match (trained, lora) {
        (Trained::Full, _) => {
            let qk_norms = if cfg.qk_norm {
                2 * cfg.head_dim as u64
            } else {
                0
            };
            let per_layer = 2 * d
                + qk_norms
                + d * (cfg.q_dim() + 2 * cfg.kv_dim()) as u64
                + cfg.q_dim() as u64 * d
                + 3 * d * cfg.ffn_dim as u64;
            let classifier = if cfg.tie_embeddings { 1 } else { 2 };
            cfg.n_layers as u64 * per_layer + classifier * cfg.vocab_size as u64 * d + d
        }
        (Trained::Lora, Some(l)) => {
            let per_layer: u64 = l
                .targets
                .iter()
                .map(|p| {
                    let (out, inp) = p.shape(cfg);
                    (l.r * (out + inp)) as u64
                })
                .sum();
            cfg.n_layers as u64 * per_layer
        }
        (Trained::Lora, None) => 0,
    }
}

impl TrainPlan {
    /// The plan of a step on a model already on the device (its weights counted as loaded; its
    /// adapters, when it has them, as the ones trained).
    pub fn for_model<B: crate::backend::Backend>(
        m: &crate::model::Model<B>,
        trained: Trained,
        ckpt: Checkpointing,
        rows: usize,
    ) -> TrainPlan {
        use crate::dtype::DType;
        let half = matches!(m.w.tok_embeddings.dtype, DType::F16 | DType::BF16);
        let lora = m.lora.as_ref().map(|l| &l.cfg);
        TrainPlan::new(&m.cfg, 0, half, trained, lora, ckpt, rows)
    }

    /// The plan for micro-batches of `rows` rows. `weights`: the stored weights' bytes (0 when
    /// loaded already); `half_weights`: whether they are f16 / bf16 (full fine-tuning then keeps
    /// f32 master copies).
    pub fn new(
        cfg: &ModelConfig,
        weights: u64,
        half_weights: bool,
        trained: Trained,
        lora: Option<&LoraConfig>,
        ckpt: Checkpointing,
        rows: usize,
    ) -> TrainPlan {
        let n = trained_values(cfg, trained, lora);
        let r = rows.max(1) as u64;
        let (d, q, kv, f) = (
            cfg.dim as u64,
            cfg.q_dim() as u64,
            cfg.kv_dim() as u64,
            cfg.ffn_dim as u64,
        );
        let acts = Acts::<crate::backend::cpu::Cpu>::bytes(cfg, rows.max(1)) as u64;
        let row = r * d * 4; // one [rows, dim] f32 buffer
        let layers = cfg.n_layers as u64;
        let kept = match ckpt {
            // every layer's input, its activations and the residual between its blocks
            Checkpointing::Off => layers * (row + acts + row),
            // every layer's input; one layer's activations recomputed at a time
            Checkpointing::Layer => layers * row + acts + row,
            Checkpointing::Offload => acts + row,
        };
        let rank = lora.map_or(1, |l| l.r.max(1) as u64);
        let raw = if cfg.qk_norm { q + kv } else { 0 }; // d q, d k before Qwen3's norms
        let backward = r * 4 * (3 * d + 2 * q + 2 * kv + raw + 3 * f + rank + 1);
        let proj = r * 4 * (d.max(q).max(kv).max(f) + 7 * rank + d.max(q).max(f));
        let residual = 2 * row; // the stream and the final norm's output
        let dropout = match lora {
            Some(l) if l.dropout > 0.0 => r * 4 * d.max(q).max(f), // the dropped-out input
            _ => 0,
        };
        // The f32 logits of a chunk, and (CUDA's tensor-core loss) their bf16 copy.
        let logits = (r * cfg.vocab_size as u64 * 4).min(CHUNK_SCRATCH) * 3 / 2;
        let widened = (d * cfg.vocab_size.max(cfg.ffn_dim) as u64 * 4).min(CHUNK_SCRATCH);
        let lora_bytes = if trained == Trained::Lora { n * 4 } else { 0 };
        let master = if trained == Trained::Full && half_weights {
            n * 4
        } else {
            0
        };
        TrainPlan {
            weights,
            adapters: lora_bytes,
            grads: n * 4,
            optimizer: 2 * n * 4 + master,
            kept,
            transient: backward + proj + residual + dropout + logits + widened,
            rows,
            ckpt,
        }
    }

    pub fn total(&self) -> u64 {
        self.weights + self.adapters + self.grads + self.optimizer + self.kept + self.transient
    }

    /// One line: "3.2 GiB (weights 2.3 GiB + adapters ... )".
    pub fn describe(&self) -> String {
        let h = human_bytes;
        format!(
            "{} (weights {} + adapters {} + gradients {} + optimizer {} + kept activations {} \
             + transient {})",
            h(self.total()),
            h(self.weights),
            h(self.adapters),
            h(self.grads),
            h(self.optimizer),
            h(self.kept),
            h(self.transient)
        )
    }

    /// Fails, naming the numbers and what to lower, when the plan exceeds what `limits` says
    /// is free (unknown limits pass).
    pub fn check(&self, limits: &MemoryLimits, device: &str) -> Result<()> {
        let Some(room) = limits.available.or(limits.total) else {
            return Ok(());
        };
        if self.total() <= room {
            return Ok(());
        }
        let advice = match self.ckpt {
            Checkpointing::Off => {
                "lower the batch or the sequence length, or turn on checkpointing (layer or offload)"
            }
            Checkpointing::Layer => {
                "lower the batch or the sequence length, or keep the layer inputs in host memory \
                 (checkpointing offload)"
            }
            Checkpointing::Offload => {
                "lower the batch or the sequence length (micro-batches with gradient \
                 accumulation keep the effective batch), the LoRA rank, or train a smaller model"
            }
        };
        Err(Error::Device(format!(
            "a training step of {} rows with checkpointing {:?} needs {} but {device} has {} \
             free: {advice}",
            self.rows,
            self.ckpt,
            self.describe(),
            human_bytes(room)
        )))
    }

    /// The least checkpointing under which the step fits (Off, then Layer, then Offload), or
    /// the Offload plan's error.
    pub fn least_checkpointing(
        mut plan: impl FnMut(Checkpointing) -> TrainPlan,
        limits: &MemoryLimits,
        device: &str,
    ) -> Result<Checkpointing> {
        for ckpt in [Checkpointing::Off, Checkpointing::Layer] {
            if plan(ckpt).check(limits, device).is_ok() {
                return Ok(ckpt);
            }
        }
        plan(Checkpointing::Offload).check(limits, device)?;
        Ok(Checkpointing::Offload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        crate::bench::synthetic::shape("llama-3.2-1b")
            .unwrap()
            .config()
    }

    #[test]
    fn checkpointing_lowers_kept_memory_and_the_error_says_what_to_lower() {
        let c = cfg();
        let lora = LoraConfig::default();
        let plan = |ckpt| TrainPlan::new(&c, 2 << 30, true, Trained::Lora, Some(&lora), ckpt, 8192);
        let (off, layer, offload) = (
            plan(Checkpointing::Off),
            plan(Checkpointing::Layer),
            plan(Checkpointing::Offload),
        );
        assert!(off.kept > layer.kept && layer.kept > offload.kept);
        assert_eq!(off.grads, off.adapters); // f32 gradients of f32 adapters
        let limits = |gib: u64| MemoryLimits {
            available: Some(gib << 30),
            ..Default::default()
        };
        // Room for the Layer plan but not for Off: the least checkpointing that fits is Layer.
        let room = (layer.total() + off.total()) / 2;
        let between = MemoryLimits {
            available: Some(room),
            ..Default::default()
        };
        let pick = TrainPlan::least_checkpointing(plan, &between, "gpu").unwrap();
        assert_eq!(pick, Checkpointing::Layer);
        let err = off.check(&limits(1), "gpu").unwrap_err().to_string();
        assert!(
            err.contains("8192 rows") && err.contains("turn on checkpointing"),
            "{err}"
        );
        let err = TrainPlan::least_checkpointing(plan, &limits(1), "gpu")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Offload") && err.contains("lower the batch"),
            "{err}"
        );
        assert!(off.check(&MemoryLimits::default(), "gpu").is_ok());
    }

    #[test]
    fn full_fine_tuning_counts_master_copies_of_half_weights() {
        let c = cfg();
        let f32w = TrainPlan::new(&c, 0, false, Trained::Full, None, Checkpointing::Layer, 1);
        let bf16 = TrainPlan::new(&c, 0, true, Trained::Full, None, Checkpointing::Layer, 1);
        // 1.24 B values (tied classifier counted once): gradients 4 bytes each.
        let n = f32w.grads / 4;
        assert!((1_200_000_000..1_300_000_000).contains(&n), "{n}");
        assert_eq!(bf16.optimizer, f32w.optimizer + n * 4);
    }
}
