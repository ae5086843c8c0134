//! Uploads a TensorSource's tensors to a backend as `Weights`, through the one table that maps
//! HF and GGUF tensor names to the roles of the forward pass. Every shape is checked against
//! the config first, and the error names the tensor.

use super::{HostTensor, TensorSource};
use crate::backend::{Backend, Weight};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::pool::Buf;
use crate::quant::dequantize;

/// Tensor roles and their names: (role, HF name, GGUF name); `{}` is the layer index.
const NAMES: &[(&str, &str, &str)] = &[
    (
        "tok_embeddings",
        "model.embed_tokens.weight",
        "token_embd.weight",
    ),
    ("norm", "model.norm.weight", "output_norm.weight"),
    ("output", "lm_head.weight", "output.weight"),
    (
        "attn_norm",
        "model.layers.{}.input_layernorm.weight",
        "blk.{}.attn_norm.weight",
    ),
    (
        "wq",
        "model.layers.{}.self_attn.q_proj.weight",
        "blk.{}.attn_q.weight",
    ),
    (
        "q_norm",
        "model.layers.{}.self_attn.q_norm.weight",
        "blk.{}.attn_q_norm.weight",
    ),
    (
        "k_norm",
        "model.layers.{}.self_attn.k_norm.weight",
        "blk.{}.attn_k_norm.weight",
    ),
    (
        "wk",
        "model.layers.{}.self_attn.k_proj.weight",
        "blk.{}.attn_k.weight",
    ),
    (
        "wv",
        "model.layers.{}.self_attn.v_proj.weight",
        "blk.{}.attn_v.weight",
    ),
    (
        "wo",
        "model.layers.{}.self_attn.o_proj.weight",
        "blk.{}.attn_output.weight",
    ),
    (
        "bq",
        "model.layers.{}.self_attn.q_proj.bias",
        "blk.{}.attn_q.bias",
    ),
    (
        "bk",
        "model.layers.{}.self_attn.k_proj.bias",
        "blk.{}.attn_k.bias",
    ),
    (
        "bv",
        "model.layers.{}.self_attn.v_proj.bias",
        "blk.{}.attn_v.bias",
    ),
    (
        "bo",
        "model.layers.{}.self_attn.o_proj.bias",
        "blk.{}.attn_output.bias",
    ),
    (
        "ffn_norm",
        "model.layers.{}.post_attention_layernorm.weight",
        "blk.{}.ffn_norm.weight",
    ),
    (
        "w1",
        "model.layers.{}.mlp.gate_proj.weight",
        "blk.{}.ffn_gate.weight",
    ),
    (
        "w2",
        "model.layers.{}.mlp.down_proj.weight",
        "blk.{}.ffn_down.weight",
    ),
    (
        "w3",
        "model.layers.{}.mlp.up_proj.weight",
        "blk.{}.ffn_up.weight",
    ),
    (
        "b1",
        "model.layers.{}.mlp.gate_proj.bias",
        "blk.{}.ffn_gate.bias",
    ),
    (
        "b2",
        "model.layers.{}.mlp.down_proj.bias",
        "blk.{}.ffn_down.bias",
    ),
    (
        "b3",
        "model.layers.{}.mlp.up_proj.bias",
        "blk.{}.ffn_up.bias",
    ),
];

/// The name of `role` (layer `layer`) in the HF (`gguf == false`) or GGUF naming.
pub fn tensor_name(role: &str, layer: usize, gguf: bool) -> String {
    let (_, hf, gg) = NAMES
        .iter()
        .find(|(r, _, _)| *r == role)
        .expect("known role");
    (if gguf { gg } else { hf }).replace("{}", &layer.to_string())
}

/// Every tensor role, with whether it repeats per layer (its names hold the layer index).
pub fn tensor_roles() -> impl Iterator<Item = (&'static str, bool)> {
    NAMES.iter().map(|(role, hf, _)| (*role, hf.contains("{}")))
}

/// What uploading a source's weights will take, found from tensor metadata alone.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsPlan {
    /// Device bytes of every weight (matrices as stored, vectors widened to f32).
    pub bytes: u64,
    /// The largest single tensor on the device and its bytes.
    pub largest: (String, u64),
}

/// Checks every tensor the model needs before anything is uploaded: present (or absent where
/// the config allows it), with the shape the config implies, in a dtype whose blocks tile its
/// rows. Errors name the tensor.
pub fn plan_weights(src: &dyn TensorSource, cfg: &ModelConfig, gguf: bool) -> Result<WeightsPlan> {
    cfg.validate()?;
    let (dim, ffn, q, kv, vocab) = (
        cfg.dim,
        cfg.ffn_dim,
        cfg.q_dim(),
        cfg.kv_dim(),
        cfg.vocab_size,
    );
    let (ab, ob, mb, qkn) = (cfg.attention_bias, cfg.o_bias, cfg.mlp_bias, cfg.qk_norm);
    let hd = cfg.head_dim;
    // (role, shape, required): matrices have two dimensions, vectors one.
    let global: [(&str, Vec<usize>, bool); 3] = [
        ("tok_embeddings", vec![vocab, dim], true),
        ("norm", vec![dim], true),
        ("output", vec![vocab, dim], !cfg.tie_embeddings && !gguf),
    ];
    let layer: [(&str, Vec<usize>, bool); 18] = [
        ("attn_norm", vec![dim], true),
        ("wq", vec![q, dim], true),
        ("wk", vec![kv, dim], true),
        ("wv", vec![kv, dim], true),
        ("wo", vec![dim, q], true),
        ("bq", vec![q], ab),
        ("bk", vec![kv], ab),
        ("bv", vec![kv], ab),
        ("bo", vec![dim], ob),
        ("q_norm", vec![hd], qkn),
        ("k_norm", vec![hd], qkn),
        ("ffn_norm", vec![dim], true),
        ("w1", vec![ffn, dim], true),
        ("w2", vec![dim, ffn], true),
        ("w3", vec![ffn, dim], true),
        ("b1", vec![ffn], mb),
        ("b2", vec![dim], mb),
        ("b3", vec![ffn], mb),
    ];
    let mut plan = WeightsPlan {
        bytes: 0,
        largest: (String::new(), 0),
    };
    let mut visit = |role: &str, i: usize, shape: &[usize], required: bool| -> Result<()> {
        let name = tensor_name(role, i, gguf);
        let optional_bias = (role.starts_with('b') || role.ends_with("_norm")) && !required;
        let Some(meta) = src.meta(&name)? else {
            if required {
                return Err(Error::Config(format!("tensor {name} is missing")));
            }
            return Ok(());
        };
        if optional_bias {
            return Ok(()); // as HF: a bias the config does not ask for is not used
        }
        if meta.shape != shape {
            return Err(Error::Config(format!(
                "tensor {name} has shape {:?}, the config implies {shape:?}",
                meta.shape
            )));
        }
        let n: usize = shape.iter().product();
        if meta.dtype.bytes_for(*shape.last().unwrap_or(&0)).is_none()
            || meta.dtype.bytes_for(n) != Some(meta.bytes)
        {
            return Err(Error::Config(format!(
                "tensor {name}: {} bytes of {} do not hold shape {shape:?} in whole blocks",
                meta.bytes, meta.dtype
            )));
        }
        let device = if shape.len() == 1 { n * 4 } else { meta.bytes } as u64;
        plan.bytes += device;
        if device > plan.largest.1 {
            plan.largest = (name, device);
        }
        Ok(())
    };
    for (role, shape, required) in &global {
        visit(role, 0, shape, *required)?;
    }
    for i in 0..cfg.n_layers {
        for (role, shape, required) in &layer {
            visit(role, i, shape, *required)?;
        }
    }
    Ok(plan)
}

pub struct LayerWeights<B: Backend> {
    pub attn_norm: Buf<B>,
    pub wq: Weight<B>,
    pub wk: Weight<B>,
    pub wv: Weight<B>,
    pub wo: Weight<B>,
    /// q, k, v, o projection biases (attention_bias / o bias), f32.
    pub bq: Option<Buf<B>>,
    pub bk: Option<Buf<B>>,
    pub bv: Option<Buf<B>>,
    pub bo: Option<Buf<B>>,
    /// Qwen3's per-head RMSNorm weights of q and k [head_dim] (qk_norm).
    pub q_norm: Option<Buf<B>>,
    pub k_norm: Option<Buf<B>>,
    pub ffn_norm: Buf<B>,
    /// gate, down, up projections and their biases (mlp_bias).
    pub w1: Weight<B>,
    pub w2: Weight<B>,
    pub w3: Weight<B>,
    pub b1: Option<Buf<B>>,
    pub b2: Option<Buf<B>>,
    pub b3: Option<Buf<B>>,
}

pub struct Weights<B: Backend> {
    pub tok_embeddings: Weight<B>,
    pub layers: Vec<LayerWeights<B>>,
    pub norm: Buf<B>,
    /// None when the output projection is tied to the embedding table.
    pub(crate) output: Option<Weight<B>>,
}

impl<B: Backend> Weights<B> {
    /// The output projection (the embedding table when tied).
    pub fn output(&self) -> &Weight<B> {
        self.output.as_ref().unwrap_or(&self.tok_embeddings)
    }

    /// Bytes of all weights on the device.
    pub fn bytes(&self) -> usize {
        let w = |w: &Weight<B>| w.buf.len();
        let o = |b: &Option<Buf<B>>| b.as_ref().map_or(0, |b| b.len());
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attn_norm.len()
                    + l.ffn_norm.len()
                    + w(&l.wq)
                    + w(&l.wk)
                    + w(&l.wv)
                    + w(&l.wo)
                    + w(&l.w1)
                    + w(&l.w2)
                    + w(&l.w3)
                    + o(&l.bq)
                    + o(&l.bk)
                    + o(&l.bv)
                    + o(&l.bo)
                    + o(&l.q_norm)
                    + o(&l.k_norm)
                    + o(&l.b1)
                    + o(&l.b2)
                    + o(&l.b3)
            })
            .sum();
        w(&self.tok_embeddings) + self.norm.len() + self.output.as_ref().map_or(0, w) + layers
    }
}

/// Reads tensors from a source by role, checking names and shapes.
struct Loader<'a, B: Backend> {
    b: &'a B,
    src: &'a dyn TensorSource,
    gguf: bool,
    progress: &'a dyn Fn(usize),
}

impl<B: Backend> Loader<'_, B> {
    fn find(&self, role: &str, layer: usize) -> Result<Option<(String, HostTensor<'_>)>> {
        let name = tensor_name(role, layer, self.gguf);
        Ok(self.src.get(&name)?.map(|t| (name, t)))
    }

    fn check_shape(name: &str, t: &HostTensor, want: &[usize]) -> Result<()> {
        if t.shape != want {
            return Err(Error::Config(format!(
                "tensor {name} has shape {:?}, the config implies {want:?}",
                t.shape
            )));
        }
        Ok(())
    }

    fn upload_bytes(&self, data: &[u8]) -> Result<Buf<B>> {
        let mut buf = Buf::exact(self.b, data.len())?;
        self.b.upload(&mut buf, 0, data)?;
        (self.progress)(data.len());
        Ok(buf)
    }

    /// A matrix `[rows, cols]` in its stored dtype.
    fn matrix(&self, role: &str, layer: usize, rows: usize, cols: usize) -> Result<Weight<B>> {
        let name = tensor_name(role, layer, self.gguf);
        let (name, t) = self
            .find(role, layer)?
            .ok_or_else(|| Error::Config(format!("tensor {name} is missing")))?;
        Self::check_shape(&name, &t, &[rows, cols])?;
        if t.dtype.bytes_for(cols).is_none() {
            return Err(Error::Config(format!(
                "tensor {name}: {} columns are not whole {} blocks",
                cols, t.dtype
            )));
        }
        let buf = self.upload_bytes(&t.data)?;
        Ok(Weight {
            buf,
            dtype: t.dtype,
            rows,
            cols,
        })
    }

    /// A vector of `n` values, widened to f32 (norm weights, biases).
    fn vector(&self, role: &str, layer: usize, n: usize) -> Result<Option<Buf<B>>> {
        let Some((name, t)) = self.find(role, layer)? else {
            return Ok(None);
        };
        Self::check_shape(&name, &t, &[n])?;
        let mut v = vec![0f32; n];
        if t.dtype.bytes_for(n) != Some(t.data.len()) {
            return Err(Error::Config(format!(
                "tensor {name}: {} bytes for {n} {} values",
                t.data.len(),
                t.dtype
            )));
        }
        dequantize(t.dtype, &t.data, &mut v);
        self.upload_bytes(bytemuck::cast_slice(&v)).map(Some)
    }

    fn required_vector(&self, role: &str, layer: usize, n: usize) -> Result<Buf<B>> {
        self.vector(role, layer, n)?.ok_or_else(|| {
            Error::Config(format!(
                "tensor {} is missing",
                tensor_name(role, layer, self.gguf)
            ))
        })
    }

    /// A bias (or q/k norm weight): present exactly when the config's flag (attention_bias,
    /// o_bias, mlp_bias, qk_norm) is set.
    fn bias(&self, role: &str, layer: usize, n: usize, expected: bool) -> Result<Option<Buf<B>>> {
        if !expected {
            return Ok(None); // as HF: a bias the config does not ask for is not used
        }
        let b = self.vector(role, layer, n)?;
        if b.is_none() {
            let name = tensor_name(role, layer, self.gguf);
            return Err(Error::Config(format!(
                "tensor {name} is missing but the config sets a bias flag"
            )));
        }
        Ok(b)
    }
}

/// Uploads every tensor of the model. `gguf` selects the GGUF naming; `progress` is told how
/// many bytes each upload moved.
pub fn load_weights<B: Backend>(
    b: &B,
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    gguf: bool,
    progress: &dyn Fn(usize),
) -> Result<Weights<B>> {
    plan_weights(src, cfg, gguf)?;
    let l = Loader {
        b,
        src,
        gguf,
        progress,
    };
    let (dim, ffn, q, kv) = (cfg.dim, cfg.ffn_dim, cfg.q_dim(), cfg.kv_dim());
    let tok_embeddings = l.matrix("tok_embeddings", 0, cfg.vocab_size, dim)?;
    let mut layers = Vec::with_capacity(cfg.n_layers);
    for i in 0..cfg.n_layers {
        let (ab, ob, mb) = (cfg.attention_bias, cfg.o_bias, cfg.mlp_bias);
        let (qkn, hd) = (cfg.qk_norm, cfg.head_dim);
        layers.push(LayerWeights {
            attn_norm: l.required_vector("attn_norm", i, dim)?,
            wq: l.matrix("wq", i, q, dim)?,
            wk: l.matrix("wk", i, kv, dim)?,
            wv: l.matrix("wv", i, kv, dim)?,
            wo: l.matrix("wo", i, dim, q)?,
            bq: l.bias("bq", i, q, ab)?,
            bk: l.bias("bk", i, kv, ab)?,
            bv: l.bias("bv", i, kv, ab)?,
            bo: l.bias("bo", i, dim, ob)?,
            q_norm: l.bias("q_norm", i, hd, qkn)?,
            k_norm: l.bias("k_norm", i, hd, qkn)?,
            ffn_norm: l.required_vector("ffn_norm", i, dim)?,
            w1: l.matrix("w1", i, ffn, dim)?,
            w2: l.matrix("w2", i, dim, ffn)?,
            w3: l.matrix("w3", i, ffn, dim)?,
            b1: l.bias("b1", i, ffn, mb)?,
            b2: l.bias("b2", i, dim, mb)?,
            b3: l.bias("b3", i, ffn, mb)?,
        });
    }
    let norm = l.required_vector("norm", 0, dim)?;
    let has_output = src.get(&tensor_name("output", 0, gguf))?.is_some();
    let output = if has_output {
        Some(l.matrix("output", 0, cfg.vocab_size, dim)?)
    } else if cfg.tie_embeddings || gguf {
        None
    } else {
        return Err(Error::Config(format!(
            "tensor {} is missing and tie_word_embeddings is false",
            tensor_name("output", 0, gguf)
        )));
    };
    Ok(Weights {
        tok_embeddings,
        layers,
        norm,
        output,
    })
}
