//! AdamW over every trained tensor (f32 moments; an f32 master copy for f16 / bf16 weights),
//! gradient-norm clipping and learning-rate schedules, as PyTorch and HF transformers define
//! them (`torch.optim.AdamW`, `clip_grad_norm_`, `get_{constant,linear,cosine}_schedule_with_warmup`).

use crate::backend::train::{AdamW, TrainBackend};
use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::Result;
use crate::model::Model;
use crate::pool::Buf;
use crate::train::params::{visit, Grads, Param};
use half::{bf16, f16};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (None: no clipping).
    pub max_grad_norm: Option<f32>,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            schedule: Schedule::Constant,
            warmup_steps: 0,
            total_steps: 1,
        }
    }
}

impl OptimConfig {
    /// The learning rate of the optimizer step that follows `done` completed steps (HF's
    /// LambdaLR: the first step runs at lambda(0), which is 0 under warmup).
    pub fn lr_at(&self, done: usize) -> f32 {
        let (w, total) = (self.warmup_steps, self.total_steps.max(1));
        if done < w {
            return self.lr * done as f32 / w.max(1) as f32;
        }
        let factor = match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Linear => {
                (total.saturating_sub(done)) as f32 / (total.saturating_sub(w)).max(1) as f32
            }
            Schedule::Cosine => {
                let progress = (done - w) as f64 / (total.saturating_sub(w)).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0) as f32
            }
        };
        self.lr * factor
    }
}

/// One tensor's optimizer state.
struct State<B: Backend> {
    m: Buf<B>,
    v: Buf<B>,
    /// f32 master copy of an f16 / bf16 weight.
    master: Option<Buf<B>>,
}

pub struct Optimizer<B: Backend> {
    pub cfg: OptimConfig,
    /// Optimizer steps taken.
    pub steps: usize,
    state: HashMap<String, State<B>>,
    norm: Buf<B>,
}

/// What an optimizer step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub lr: f32,
}

impl<B: TrainBackend> Optimizer<B> {
    pub fn new(b: &B, cfg: OptimConfig) -> Result<Self> {
        Ok(Optimizer {
            cfg,
            steps: 0,
            state: HashMap::new(),
            norm: Buf::exact(b, 4)?,
        })
    }

    /// Bytes of optimizer state for `n` trained values, `master` of them stored in f16 / bf16.
    pub fn bytes_for(n: usize, master: usize) -> usize {
        (2 * n + master) * 4
    }

    /// The global L2 norm of every gradient (reads one number back).
    pub fn grad_norm(&mut self, b: &B, g: &Grads<B>) -> Result<f32> {
        b.zero(&mut self.norm, 1)?;
        for gr in g.all() {
            b.sum_squares(&mut self.norm, gr, gr.len() / 4)?;
        }
        let mut out = [0u8; 4];
        b.read(&self.norm, 0, &mut out)?;
        Ok(f32::from_le_bytes(out).sqrt())
    }

    /// Clips the gradients to `max_grad_norm` and applies one AdamW update to every trained
    /// tensor of `m`.
    pub fn step(&mut self, b: &B, m: &mut Model<B>, g: &Grads<B>) -> Result<StepInfo> {
        let grad_norm = self.grad_norm(b, g)?;
        // torch.nn.utils.clip_grad_norm_: g *= min(1, max / (norm + 1e-6))
        let grad_scale = self
            .cfg
            .max_grad_norm
            .map_or(1.0, |max| (max / (grad_norm + 1e-6)).min(1.0));
        let lr = self.cfg.lr_at(self.steps);
        self.steps += 1;
        let h = AdamW {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            step: self.steps as u32,
            grad_scale,
        };
        let state = &mut self.state;
        visit(m, g, |name, p, grad| {
            let n = p.elements();
            if !state.contains_key(name) {
                state.insert(name.to_string(), new_state(b, &p, n)?);
            }
            let s = state.get_mut(name).expect("inserted above");
            match (p, s.master.as_mut()) {
                (Param::Weight(w), Some(master)) => {
                    b.adamw(master, grad, &mut s.m, &mut s.v, n, h)?;
                    b.write_weight(w, master)
                }
                (Param::Weight(w), None) => b.adamw(&mut w.buf, grad, &mut s.m, &mut s.v, n, h),
                (Param::Vector(v), _) => b.adamw(v, grad, &mut s.m, &mut s.v, n, h),
            }
        })?;
        Ok(StepInfo { grad_norm, lr })
    }
}

/// One tensor's optimizer state on the host, as a checkpoint holds it: the moments and, for an
/// f16 / bf16 weight, its f32 master copy.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub master: Option<Vec<f32>>,
}

impl<B: TrainBackend> Optimizer<B> {
    /// Every tensor's state read back, by name, in name order (empty before the first step).
    pub fn save_state(&self, b: &B) -> Result<Vec<(String, SavedState)>> {
        let read = |buf: &Buf<B>| -> Result<Vec<f32>> {
            let mut raw = vec![0u8; buf.len()];
            b.read(buf, 0, &mut raw)?;
            Ok(bytemuck::pod_collect_to_vec(&raw))
        };
        let mut names: Vec<&String> = self.state.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let s = &self.state[name];
                let master = s.master.as_ref().map(read).transpose()?;
                Ok((
                    name.clone(),
                    SavedState {
                        m: read(&s.m)?,
                        v: read(&s.v)?,
                        master,
                    },
                ))
            })
            .collect()
    }

    /// Replaces the state with saved one (a resumed run); `steps` is set by the caller. The
    /// names and sizes are the checkpoint reader's to check against the model.
    pub fn load_state(&mut self, b: &B, saved: Vec<(String, SavedState)>) -> Result<()> {
        let upload = |v: &[f32]| -> Result<Buf<B>> {
            let mut buf = Buf::exact(b, v.len() * 4)?;
            b.upload(&mut buf, 0, bytemuck::cast_slice(v))?;
            Ok(buf)
        };
        self.state.clear();
        for (name, s) in saved {
            let master = s.master.as_deref().map(upload).transpose()?;
            let state = State {
                m: upload(&s.m)?,
                v: upload(&s.v)?,
                master,
            };
            self.state.insert(name, state);
        }
        Ok(())
    }
}

fn new_state<B: TrainBackend>(b: &B, p: &Param<'_, B>, n: usize) -> Result<State<B>> {
    let zero = |n: usize| -> Result<Buf<B>> {
        let mut z = Buf::exact(b, n * 4)?;
        b.zero(&mut z, n)?;
        Ok(z)
    };
    let master = match p {
        Param::Weight(w) if w.dtype != DType::F32 => {
            // The master copy starts as the stored values widened (done once, on the host).
            let mut raw = vec![0u8; w.buf.len()];
            b.read(&w.buf, 0, &mut raw)?;
            let halves = raw[..n * 2]
                .chunks_exact(2)
                .map(|h| u16::from_le_bytes([h[0], h[1]]));
            let wide: Vec<f32> = match w.dtype {
                DType::F16 => halves.map(|h| f16::from_bits(h).to_f32()).collect(),
                _ => halves.map(|h| bf16::from_bits(h).to_f32()).collect(),
            };
            let mut m = Buf::exact(b, n * 4)?;
            b.upload(&mut m, 0, bytemuck::cast_slice(&wide))?;
            Some(m)
        }
        _ => None,
    };
    Ok(State {
        m: zero(n)?,
        v: zero(n)?,
        master,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The learning rate of each of 12 optimizer steps, warmup 3 of 10 steps, as transformers'
    /// get_{cosine,linear,constant}_schedule_with_warmup (5.25) give them at lr 1.
    #[test]
    fn schedules_match_transformers() {
        let hf = [
            (
                Schedule::Cosine,
                [
                    0.0, 0.3333333, 0.6666667, 1.0, 0.9504844, 0.8117449, 0.6112605, 0.3887395,
                ]
                .iter()
                .chain(&[0.1882551, 0.0495156, 0.0, 0.0495156]),
            ),
            (
                Schedule::Linear,
                [
                    0.0, 0.3333333, 0.6666667, 1.0, 0.8571429, 0.7142857, 0.5714286, 0.4285714,
                ]
                .iter()
                .chain(&[0.2857143, 0.1428571, 0.0, 0.0]),
            ),
            (
                Schedule::Constant,
                [0.0, 0.3333333, 0.6666667, 1.0, 1.0, 1.0, 1.0, 1.0]
                    .iter()
                    .chain(&[1.0, 1.0, 1.0, 1.0]),
            ),
        ];
        for (schedule, want) in hf {
            let cfg = OptimConfig {
                lr: 1.0,
                schedule,
                warmup_steps: 3,
                total_steps: 10,
                ..Default::default()
            };
            for (step, w) in want.enumerate() {
                let got = cfg.lr_at(step);
                assert!(
                    (got - w).abs() < 1e-6,
                    "{schedule:?} step {step}: {got} vs {w}"
                );
            }
        }
    }
}
