//! LoRA adapters with PEFT's semantics: a projection y = x W^T (+ b) becomes
//! y = x W^T (+ b) + scale * (x A^T) B^T with W frozen in its stored form, A [r, in] and
//! B [out, r] trained in f32, scale = alpha / r (alpha / sqrt(r) for rsLoRA). A starts
//! kaiming-uniform (a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B at zero, so training starts
//! from the base model exactly.

use crate::backend::{Backend, Weight};
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pool::Buf;
use crate::weights::LayerWeights;
use rand::{Rng, SeedableRng};

/// The seven projections of a Llama layer, in PEFT's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// PEFT's target-module name.
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The HF module path of the projection in layer `layer` (without `.weight`).
    pub fn hf_path(self, layer: usize) -> String {
        let block = match self {
            Proj::Q | Proj::K | Proj::V | Proj::O => "self_attn",
            _ => "mlp",
        };
        format!("model.layers.{layer}.{block}.{}", self.module())
    }

    /// Parses "q", "q_proj", "gate", "gate_proj", ...
    pub fn parse(s: &str) -> Option<Proj> {
        let s = s.trim().trim_end_matches("_proj");
        Proj::ALL
            .into_iter()
            .find(|p| p.module().trim_end_matches("_proj") == s)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The frozen weight and bias of this projection in a layer.
    pub fn of<B: Backend>(self, l: &LayerWeights<B>) -> (&Weight<B>, Option<&Buf<B>>) {
        match self {
            Proj::Q => (&l.wq, l.bq.as_ref()),
            Proj::K => (&l.wk, l.bk.as_ref()),
            Proj::V => (&l.wv, l.bv.as_ref()),
            Proj::O => (&l.wo, l.bo.as_ref()),
            Proj::Gate => (&l.w1, l.b1.as_ref()),
            Proj::Up => (&l.w3, l.b3.as_ref()),
            Proj::Down => (&l.w2, l.b2.as_ref()),
        }
    }

    pub fn of_mut<B: Backend>(
        self,
        l: &mut LayerWeights<B>,
    ) -> (&mut Weight<B>, Option<&mut Buf<B>>) {
        match self {
            Proj::Q => (&mut l.wq, l.bq.as_mut()),
            Proj::K => (&mut l.wk, l.bk.as_mut()),
            Proj::V => (&mut l.wv, l.bv.as_mut()),
            Proj::O => (&mut l.wo, l.bo.as_mut()),
            Proj::Gate => (&mut l.w1, l.b1.as_mut()),
            Proj::Up => (&mut l.w3, l.b3.as_mut()),
            Proj::Down => (&mut l.w2, l.b2.as_mut()),
        }
    }

    /// (out, in) features of the projection.
    pub fn shape(self, c: &ModelConfig) -> (usize, usize) {
        match self {
            Proj::Q => (c.q_dim(), c.dim),
            Proj::K | Proj::V => (c.kv_dim(), c.dim),
            Proj::O => (c.dim, c.q_dim()),
            Proj::Gate | Proj::Up => (c.ffn_dim, c.dim),
            Proj::Down => (c.dim, c.ffn_dim),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub rslora: bool,
    pub targets: Vec<Proj>,
    /// Dropout on each adapter's input in training (PEFT's lora_dropout), 0 <= p < 1.
    pub dropout: f32,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 16,
            alpha: 16.0,
            rslora: false,
            targets: Proj::ALL.to_vec(),
            dropout: 0.0,
        }
    }
}

impl LoraConfig {
    pub fn check(&self) -> Result<()> {
        if self.r == 0 || self.targets.is_empty() {
            return Err(Error::Usage(
                "LoRA needs a rank of at least 1 and at least one target projection".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Usage(format!(
                "LoRA dropout {} is outside [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }

    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }
}

/// One projection's adapter: A [r, in] and B [out, r], f32.
pub struct Adapter<B: Backend> {
    pub a: Weight<B>,
    pub b: Weight<B>,
}

pub struct Lora<B: Backend> {
    pub cfg: LoraConfig,
    pub scale: f32,
    /// Per layer, per projection (Proj::index), the adapter where the projection is a target.
    pub layers: Vec<[Option<Adapter<B>>; 7]>,
    /// Set by the trainer for one micro-batch's forward and backward: the seed of its dropout
    /// masks. None (inference): no dropout.
    pub dropout_seed: Option<u32>,
}

fn f32_weight<B: Backend>(b: &B, rows: usize, cols: usize, data: &[f32]) -> Result<Weight<B>> {
    let mut buf = Buf::exact(b, rows * cols * 4)?;
    b.upload(&mut buf, 0, bytemuck::cast_slice(data))?;
    Ok(Weight {
        buf,
        dtype: DType::F32,
        rows,
        cols,
    })
}

impl<B: Backend> Lora<B> {
    /// Fresh adapters with PEFT's initialization, from a seeded RNG.
    pub fn new(b: &B, model: &ModelConfig, cfg: LoraConfig, seed: u64) -> Result<Self> {
        cfg.check()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut layers = Vec::with_capacity(model.n_layers);
        for _ in 0..model.n_layers {
            let mut l: [Option<Adapter<B>>; 7] = Default::default();
            for &p in &cfg.targets {
                let (out, inp) = p.shape(model);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..cfg.r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                l[p.index()] = Some(Adapter {
                    a: f32_weight(b, cfg.r, inp, &a)?,
                    b: f32_weight(b, out, cfg.r, &vec![0.0; out * cfg.r])?,
                });
            }
            layers.push(l);
        }
        Ok(Lora {
            scale: cfg.scale(),
            cfg,
            layers,
            dropout_seed: None,
        })
    }

    /// Adapters from given A and B values (a loaded adapter file, a test fixture):
    /// `get(layer, proj)` returns (A [r * in], B [out * r]) for each target.
    pub fn from_values(
        b: &B,
        model: &ModelConfig,
        cfg: LoraConfig,
        mut get: impl FnMut(usize, Proj) -> Result<(Vec<f32>, Vec<f32>)>,
    ) -> Result<Self> {
        cfg.check()?;
        let mut layers = Vec::with_capacity(model.n_layers);
        for i in 0..model.n_layers {
            let mut l: [Option<Adapter<B>>; 7] = Default::default();
            for &p in &cfg.targets {
                let (out, inp) = p.shape(model);
                let (a, bv) = get(i, p)?;
                if a.len() != cfg.r * inp || bv.len() != out * cfg.r {
                    return Err(Error::Usage(format!(
                        "LoRA adapter of {} has {} / {} values, rank {} needs {} / {}",
                        p.hf_path(i),
                        a.len(),
                        bv.len(),
                        cfg.r,
                        cfg.r * inp,
                        out * cfg.r
                    )));
                }
                l[p.index()] = Some(Adapter {
                    a: f32_weight(b, cfg.r, inp, &a)?,
                    b: f32_weight(b, out, cfg.r, &bv)?,
                });
            }
            layers.push(l);
        }
        Ok(Lora {
            scale: cfg.scale(),
            cfg,
            layers,
            dropout_seed: None,
        })
    }

    pub fn adapter(&self, layer: usize, p: Proj) -> Option<&Adapter<B>> {
        self.layers[layer][p.index()].as_ref()
    }

    /// (p, seed) of the dropout mask on the input of layer i's projection p, when training
    /// with dropout.
    pub fn dropout(&self, layer: usize, p: Proj) -> Option<(f32, u32)> {
        let seed = self.dropout_seed.filter(|_| self.cfg.dropout > 0.0)?;
        let site = (layer * 7 + p.index()) as u32;
        Some((self.cfg.dropout, crate::backend::dropout_hash(seed, site)))
    }

    /// Values of trained parameters.
    pub fn n_params(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|a| a.a.rows * a.a.cols + a.b.rows * a.b.cols)
            .sum()
    }
}

/// PEFT's key of an adapter matrix: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(layer: usize, p: Proj, which: char) -> String {
    format!("base_model.model.{}.lora_{which}.weight", p.hf_path(layer))
}
