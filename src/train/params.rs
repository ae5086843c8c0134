//! What trains, and its gradients: `Grads` mirrors the model (one f32 buffer per trained
//! tensor, None where it is frozen), and `visit` walks every trained tensor with its gradient
//! under its HF / PEFT name, for the optimizer, clipping and checkpoints.

use crate::backend::train::TrainBackend;
use crate::backend::{Backend, Weight};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::pool::Buf;
use crate::train::lora::{peft_key, Proj};

/// Full fine-tuning (every weight, embeddings and norms included) or LoRA adapters only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trained {
    Full,
    Lora,
}

pub struct LayerGrads<B: Backend> {
    pub attn_norm: Option<Buf<B>>,
    pub ffn_norm: Option<Buf<B>>,
    /// Qwen3's per-head q and k norm weights.
    pub q_norm: Option<Buf<B>>,
    pub k_norm: Option<Buf<B>>,
    /// Per projection (Proj::index): the weight's and the bias's gradients (full fine-tuning).
    pub w: [Option<Buf<B>>; 7],
    pub bias: [Option<Buf<B>>; 7],
    /// Per projection: LoRA's (dA, dB).
    pub lora: [Option<(Buf<B>, Buf<B>)>; 7],
}

pub struct Grads<B: Backend> {
    pub layers: Vec<LayerGrads<B>>,
    /// The embedding table's (also the classifier's when tied).
    pub embedding: Option<Buf<B>>,
    /// The untied classifier's.
    pub output: Option<Buf<B>>,
    pub norm: Option<Buf<B>>,
}

/// A trained tensor as the optimizer updates it.
pub enum Param<'a, B: Backend> {
    /// A matrix in its stored dtype (f32 is its own master copy).
    Weight(&'a mut Weight<B>),
    /// An f32 vector (norm weights and biases are widened to f32 at load).
    Vector(&'a mut Buf<B>),
}

impl<B: Backend> Param<'_, B> {
    pub fn elements(&self) -> usize {
        match self {
            Param::Weight(w) => w.rows * w.cols,
            Param::Vector(v) => v.len() / 4,
        }
    }
}

fn zeroed<B: TrainBackend>(b: &B, n: usize) -> Result<Buf<B>> {
    let mut g = Buf::exact(b, n * 4)?;
    b.zero(&mut g, n)?;
    Ok(g)
}

impl<B: TrainBackend> Grads<B> {
    /// Zeroed gradients for what `trained` trains (LoRA: the model's adapters).
    pub fn new(b: &B, m: &Model<B>, trained: Trained) -> Result<Self> {
        let c = &m.cfg;
        let full = trained == Trained::Full;
        if full {
            if let Some(w) = all_weights(m).find(|w| w.dtype.is_quantized()) {
                return Err(Error::Usage(format!(
                    "full fine-tuning needs f32, f16 or bf16 weights, this model has {} \
                     blocks; train LoRA adapters on it instead",
                    w.dtype
                )));
            }
        }
        let vec = |on: bool, n: usize| on.then(|| zeroed(b, n)).transpose();
        let mut layers = Vec::with_capacity(c.n_layers);
        for (i, l) in m.w.layers.iter().enumerate() {
            let mut g = LayerGrads {
                attn_norm: vec(full, c.dim)?,
                ffn_norm: vec(full, c.dim)?,
                q_norm: vec(full && l.q_norm.is_some(), c.head_dim)?,
                k_norm: vec(full && l.k_norm.is_some(), c.head_dim)?,
                w: Default::default(),
                bias: Default::default(),
                lora: Default::default(),
            };
            for p in Proj::ALL {
                let (w, bias) = p.of(l);
                g.w[p.index()] = vec(full, w.rows * w.cols)?;
                g.bias[p.index()] = vec(full && bias.is_some(), w.rows)?;
                if let Some((ad, _)) = m.adapter(i, p).filter(|_| trained == Trained::Lora) {
                    let (na, nb) = (ad.a.rows * ad.a.cols, ad.b.rows * ad.b.cols);
                    g.lora[p.index()] = Some((zeroed(b, na)?, zeroed(b, nb)?));
                }
            }
            layers.push(g);
        }
        let emb = &m.w.tok_embeddings;
        Ok(Grads {
            layers,
            embedding: vec(full, emb.rows * emb.cols)?,
            output: vec(full && m.w.output.is_some(), emb.rows * emb.cols)?,
            norm: vec(full, c.dim)?,
        })
    }

    /// Every gradient buffer with its element count.
    pub fn all(&self) -> Vec<&Buf<B>> {
        let mut v: Vec<&Buf<B>> = Vec::new();
        for l in &self.layers {
            v.extend(l.attn_norm.iter().chain(&l.ffn_norm));
            v.extend(l.q_norm.iter().chain(&l.k_norm));
            v.extend(l.w.iter().flatten().chain(l.bias.iter().flatten()));
            for (a, bb) in l.lora.iter().flatten() {
                v.extend([a, bb]);
            }
        }
        v.extend(self.embedding.iter().chain(&self.output).chain(&self.norm));
        v
    }

    /// Zeroes every gradient (the start of an optimizer step).
    pub fn zero(&mut self, b: &B) -> Result<()> {
        for g in self.all_mut() {
            let n = g.len() / 4;
            b.zero(g, n)?;
        }
        Ok(())
    }

    fn all_mut(&mut self) -> Vec<&mut Buf<B>> {
        let mut v: Vec<&mut Buf<B>> = Vec::new();
        for l in &mut self.layers {
            v.extend(l.attn_norm.iter_mut().chain(l.ffn_norm.iter_mut()));
            v.extend(l.q_norm.iter_mut().chain(l.k_norm.iter_mut()));
            v.extend(l.w.iter_mut().flatten());
            v.extend(l.bias.iter_mut().flatten());
            for (a, bb) in l.lora.iter_mut().flatten() {
                v.extend([a, bb]);
            }
        }
        v.extend(self.embedding.iter_mut());
        v.extend(self.output.iter_mut());
        v.extend(self.norm.iter_mut());
        v
    }

    /// Bytes of every gradient.
    pub fn bytes(&self) -> usize {
        self.all().iter().map(|g| g.len()).sum()
    }
}

fn all_weights<B: Backend>(m: &Model<B>) -> impl Iterator<Item = &Weight<B>> {
    let layers = m.w.layers.iter().flat_map(|l| Proj::ALL.map(|p| p.of(l).0));
    std::iter::once(&m.w.tok_embeddings)
        .chain(m.w.output.as_ref())
        .chain(layers)
}

/// Calls `f(name, tensor, gradient)` for every trained tensor, under its HF name (full
/// fine-tuning) or PEFT key (LoRA).
pub fn visit<B: Backend>(
    m: &mut Model<B>,
    g: &Grads<B>,
    mut f: impl FnMut(&str, Param<'_, B>, &Buf<B>) -> Result<()>,
) -> Result<()> {
    if let Some(gr) = &g.embedding {
        f(
            "model.embed_tokens.weight",
            Param::Weight(&mut m.w.tok_embeddings),
            gr,
        )?;
    }
    if let (Some(gr), Some(w)) = (&g.output, m.w.output.as_mut()) {
        f("lm_head.weight", Param::Weight(w), gr)?;
    }
    if let Some(gr) = &g.norm {
        f("model.norm.weight", Param::Vector(&mut m.w.norm), gr)?;
    }
    let mut lora = m.lora.as_mut();
    for (i, (l, lg)) in m.w.layers.iter_mut().zip(&g.layers).enumerate() {
        if let Some(gr) = &lg.attn_norm {
            let name = format!("model.layers.{i}.input_layernorm.weight");
            f(&name, Param::Vector(&mut l.attn_norm), gr)?;
        }
        if let Some(gr) = &lg.ffn_norm {
            let name = format!("model.layers.{i}.post_attention_layernorm.weight");
            f(&name, Param::Vector(&mut l.ffn_norm), gr)?;
        }
        for (gr, w, which) in [
            (&lg.q_norm, &mut l.q_norm, 'q'),
            (&lg.k_norm, &mut l.k_norm, 'k'),
        ] {
            if let (Some(gr), Some(w)) = (gr, w.as_mut()) {
                let name = format!("model.layers.{i}.self_attn.{which}_norm.weight");
                f(&name, Param::Vector(w), gr)?;
            }
        }
        for p in Proj::ALL {
            let (w, bias) = p.of_mut(l);
            if let Some(gr) = &lg.w[p.index()] {
                f(&format!("{}.weight", p.hf_path(i)), Param::Weight(w), gr)?;
            }
            if let (Some(gr), Some(bias)) = (&lg.bias[p.index()], bias) {
                f(&format!("{}.bias", p.hf_path(i)), Param::Vector(bias), gr)?;
            }
            if let (Some((ga, gb)), Some(lora)) = (&lg.lora[p.index()], lora.as_deref_mut()) {
                if let Some(ad) = lora.layers[i][p.index()].as_mut() {
                    f(&peft_key(i, p, 'A'), Param::Weight(&mut ad.a), ga)?;
                    f(&peft_key(i, p, 'B'), Param::Weight(&mut ad.b), gb)?;
                }
            }
        }
    }
    Ok(())
}
