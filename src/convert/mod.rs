//! Converting models between the two formats anyllama reads: a GGUF file to an HF folder that
//! transformers loads, and an HF folder to a GGUF file that llama.cpp and anyllama load.
//!
//! Both directions go through the one name table of `weights::load`: the tensors converted are
//! exactly those the forward pass uses, found by role, checked against the config's shapes, and
//! decoded to f32 one at a time before being written in the target storage type. Outputs are
//! written under a temporary name and renamed into place only when complete.
//!
//! The writers (`to_gguf::write_gguf`, `to_hf::write_hf`) take any [`Input`]: an HF folder, a
//! GGUF file or a model on a device (train::export), and a per-tensor [`Transform`] applied to
//! each tensor's f32 values in HF row order before it is encoded (train::merge adds LoRA
//! products there).

mod gguf_vocab;
mod gguf_writer;
mod safetensors_writer;
mod to_gguf;
mod to_hf;

pub use to_gguf::hf_to_gguf;
pub(crate) use to_gguf::write_gguf;
pub use to_hf::gguf_to_hf;
#[cfg(test)]
pub(crate) use to_hf::shard_groups;
pub(crate) use to_hf::{write_hf, write_tokenizer_files, SHARD_LIMIT};

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::generation_config::GenerationConfig;
use crate::loader::ModelFiles;
use crate::quant::dequantize;
use crate::quant_blocks::quantize_blocks;
use crate::tokenizer::Tokenizer;
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::{load::tensor_roles, tensor_name, HostTensor, TensorSource};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// One tensor the model uses, found in the source.
pub(crate) struct Planned {
    /// Its role in `weights::load`'s table and its layer (0 for the global tensors).
    pub role: &'static str,
    pub layer: usize,
    /// Its name in the source and in the output naming.
    pub src: String,
    pub dst: String,
    /// HF order: `[rows, cols]` for a matrix.
    pub shape: Vec<usize>,
}

/// Called with each tensor's values (decoded to f32, HF row order, `Planned::shape`) before
/// they are encoded; it may change them in place.
pub(crate) type Transform<'a> = &'a dyn Fn(&Planned, &mut [f32]) -> Result<()>;

/// The transform that leaves every tensor as it is (plain conversion).
pub(crate) fn unchanged(_: &Planned, _: &mut [f32]) -> Result<()> {
    Ok(())
}

/// A model to write: its config, its tensors, and where its tokenizer and side files come from.
pub(crate) struct Input<'a> {
    /// The file or folder it was read from: named in messages, `general.name` of a GGUF output,
    /// and never overwritten.
    pub path: &'a Path,
    pub cfg: &'a ModelConfig,
    pub tensors: &'a dyn TensorSource,
    /// The tensors go by GGUF names (else HF names).
    pub gguf_names: bool,
    pub tokenizer: Option<&'a Tokenizer>,
    pub generation: Option<&'a GenerationConfig>,
    /// An HF folder whose tokenizer and generation files an HF output copies as they are (else
    /// they are written from `tokenizer` and `generation`).
    pub hf_dir: Option<&'a Path>,
}

impl<'a> Input<'a> {
    /// The model of opened files (an HF folder or a GGUF file).
    pub fn of_files(files: &'a ModelFiles) -> Input<'a> {
        Input {
            path: &files.path,
            cfg: &files.cfg,
            tensors: files.source.as_ref(),
            gguf_names: files.gguf,
            tokenizer: Some(&files.tokenizer),
            generation: files.generation.as_ref(),
            hf_dir: (!files.gguf).then_some(files.path.as_path()),
        }
    }

    /// Stop tokens: the generation config's, else the model config's.
    fn eos_ids(&self) -> Vec<u32> {
        match self.generation.map(|g| &g.eos_token_ids) {
            Some(ids) if !ids.is_empty() => ids.clone(),
            _ => self.cfg.eos_token_ids.clone(),
        }
    }
}

/// An HF model folder opened for conversion: unlike `ModelFiles::open`, a folder without a
/// tokenizer is accepted (its output then has none either).
pub(crate) struct HfFolder {
    pub path: PathBuf,
    pub cfg: ModelConfig,
    pub source: Box<dyn TensorSource>,
    pub tokenizer: Option<Tokenizer>,
    pub generation: Option<GenerationConfig>,
}

impl HfFolder {
    pub fn open(dir: &Path) -> Result<HfFolder> {
        if !dir.is_dir() {
            return Err(Error::load(dir, "not an HF model folder"));
        }
        let cfg = ModelConfig::from_hf_dir(dir)?;
        let source = crate::weights::model_source(SafetensorsSource::open(dir)?, &cfg);
        let tokenizer = if dir.join("tokenizer.json").is_file() {
            Some(Tokenizer::from_hf_dir(dir)?)
        } else {
            None
        };
        Ok(HfFolder {
            path: dir.into(),
            cfg,
            source,
            tokenizer,
            generation: GenerationConfig::from_hf_dir(dir)?,
        })
    }

    pub fn input(&self) -> Input<'_> {
        Input {
            path: &self.path,
            cfg: &self.cfg,
            tensors: self.source.as_ref(),
            gguf_names: false,
            tokenizer: self.tokenizer.as_ref(),
            generation: self.generation.as_ref(),
            hf_dir: Some(&self.path),
        }
    }
}

/// The shape the config implies for a role.
fn expected_shape(role: &str, c: &ModelConfig) -> Vec<usize> {
    let (dim, ffn, q, kv, vocab) = (c.dim, c.ffn_dim, c.q_dim(), c.kv_dim(), c.vocab_size);
    match role {
        "tok_embeddings" | "output" => vec![vocab, dim],
        "wq" => vec![q, dim],
        "wk" | "wv" => vec![kv, dim],
        "wo" => vec![dim, q],
        "w1" | "w3" => vec![ffn, dim],
        "w2" => vec![dim, ffn],
        "bq" => vec![q],
        "bk" | "bv" => vec![kv],
        "b1" | "b3" => vec![ffn],
        "q_norm" | "k_norm" => vec![c.head_dim],
        // norm, attn_norm, ffn_norm, bo, b2
        _ => vec![dim],
    }
}

/// Whether the model uses a tensor of this role, and whether it must be there. The output
/// projection is optional when tied (a GGUF file marks tying by leaving it out); biases are used
/// exactly when the config's flag is set, as by transformers and the loader.
fn role_use(role: &str, c: &ModelConfig, src_gguf: bool) -> (bool, bool) {
    match role {
        "output" if c.tie_embeddings || src_gguf => (!c.tie_embeddings, false),
        "bq" | "bk" | "bv" => (c.attention_bias, c.attention_bias),
        "bo" => (c.o_bias, c.o_bias),
        "q_norm" | "k_norm" => (c.qk_norm, c.qk_norm),
        "b1" | "b2" | "b3" => (c.mlp_bias, c.mlp_bias),
        _ => (true, true),
    }
}

/// The tensors of the model in `src`, in a stable order, with their names in the output naming
/// (GGUF when `dst_gguf`). Tensors of the source the model does not use are reported and left
/// out.
fn plan(
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    src_gguf: bool,
    dst_gguf: bool,
    src_path: &Path,
) -> Result<Vec<Planned>> {
    let mut out = Vec::new();
    let roles: Vec<(&'static str, bool)> = tensor_roles().collect();
    let mut wanted: Vec<(&'static str, usize)> =
        roles.iter().filter(|r| !r.1).map(|r| (r.0, 0)).collect();
    for layer in 0..cfg.n_layers {
        wanted.extend(roles.iter().filter(|r| r.1).map(|r| (r.0, layer)));
    }
    for (role, layer) in wanted {
        let name = tensor_name(role, layer, src_gguf);
        let (used, required) = role_use(role, cfg, src_gguf);
        let t = if used { src.meta(&name)? } else { None };
        let Some(t) = t else {
            if required {
                return Err(Error::load(src_path, format!("tensor {name} is missing")));
            }
            continue;
        };
        let want = expected_shape(role, cfg);
        if t.shape != want {
            return Err(Error::load(
                src_path,
                format!(
                    "tensor {name} has shape {:?}, the config implies {want:?}",
                    t.shape
                ),
            ));
        }
        out.push(Planned {
            role,
            layer,
            src: name,
            dst: tensor_name(role, layer, dst_gguf),
            shape: want,
        });
    }
    let used: HashSet<&str> = out.iter().map(|p| p.src.as_str()).collect();
    // Tensors whose content the output carries another way (config keys), or never needed.
    let implied = |n: &str| n == "rope_freqs.weight" || n.ends_with(".rotary_emb.inv_freq");
    let mut unused: Vec<String> = src
        .names()
        .into_iter()
        .filter(|n| !used.contains(n.as_str()) && !implied(n))
        .collect();
    unused.sort();
    if !unused.is_empty() {
        tracing::warn!(
            "{}: {} tensor(s) the model does not use are not converted: {}",
            src_path.display(),
            unused.len(),
            unused.join(", ")
        );
    }
    Ok(out)
}

/// The values of a tensor, decoded to f32.
fn to_f32(t: &HostTensor, name: &str, path: &Path) -> Result<Vec<f32>> {
    let n = t.numel();
    if t.dtype.bytes_for(n) != Some(t.data.len()) {
        return Err(Error::load(
            path,
            format!(
                "tensor {name}: {} bytes do not hold {n} {} values",
                t.data.len(),
                t.dtype
            ),
        ));
    }
    let mut v = vec![0f32; n];
    dequantize(t.dtype, &t.data, &mut v);
    Ok(v)
}

/// `values` stored as `dtype` (rows of `cols` values for the block formats). Values a 16-bit
/// type cannot hold are an error rather than a silent infinity.
fn encode(values: &[f32], dtype: DType, name: &str) -> Result<Vec<u8>> {
    use half::{bf16, f16};
    let overflow = |ty: &str| {
        Error::Config(format!(
            "tensor {name} holds values beyond the range of {ty}; convert to f32 or bf16 instead"
        ))
    };
    let finite_in = values.iter().all(|v| v.is_finite());
    let out: Vec<u8> = match dtype {
        DType::F32 => bytemuck::cast_slice(values).to_vec(),
        DType::F16 => {
            let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
            if finite_in && h.iter().any(|v| !v.is_finite()) {
                return Err(overflow("f16"));
            }
            bytemuck::cast_slice(&h).to_vec()
        }
        DType::BF16 => {
            let h: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
            if finite_in && h.iter().any(|v| !v.is_finite()) {
                return Err(overflow("bf16"));
            }
            bytemuck::cast_slice(&h).to_vec()
        }
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
            if values.iter().any(|v| !v.is_finite()) {
                return Err(Error::Config(format!(
                    "tensor {name} holds NaN or infinite values, which {dtype} blocks cannot store"
                )));
            }
            let q = quantize_blocks(dtype, values).ok_or_else(|| {
                Error::Config(format!(
                    "tensor {name}: {} values are not whole {dtype} blocks",
                    values.len()
                ))
            })?;
            // A block's scale is an f16: blocks of huge values overflow it.
            let mut check = vec![0f32; values.len()];
            dequantize(dtype, &q, &mut check);
            if check.iter().any(|v| !v.is_finite()) {
                return Err(overflow(dtype.name()));
            }
            q
        }
        DType::Q4K | DType::Q6K => {
            return Err(Error::Usage(format!("writing {dtype} is not supported")))
        }
    };
    Ok(out)
}

/// Refuses a storage type the output format (GGUF when `gguf`, else an HF folder) cannot hold
/// or that we cannot write.
pub(crate) fn check_dtype(dtype: DType, gguf: bool) -> Result<()> {
    use DType::*;
    if gguf && !matches!(dtype, F32 | F16 | BF16 | Q8_0 | Q4_0 | Q4_1) {
        return Err(Error::Usage(format!(
            "cannot write {dtype} weights; choose f32, f16, bf16, q8_0, q4_0 or q4_1"
        )));
    }
    if !gguf && !matches!(dtype, F32 | F16 | BF16) {
        return Err(Error::Usage(format!(
            "an HF folder stores weights as f32, f16 or bf16, not {dtype}"
        )));
    }
    Ok(())
}

/// Whether `path` names a GGUF file (ends in `.gguf`, any case).
pub(crate) fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Sum of `sizes`, refusing overflow.
fn total_bytes(mut sizes: impl Iterator<Item = Option<usize>>, what: &str) -> Result<usize> {
    sizes
        .try_fold(0usize, |acc, s| s.and_then(|s| acc.checked_add(s)))
        .ok_or_else(|| Error::Config(format!("{what}: the total size overflows")))
}

/// Where an output is built before it is renamed into place: `<out>.partial`.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Refuses to write over something that exists, or into the source itself.
pub(crate) fn check_output(src: &Path, out: &Path) -> Result<()> {
    if out.file_name().is_none() {
        return Err(Error::Usage(format!(
            "output path {} has no file or folder name",
            out.display()
        )));
    }
    if let (Ok(a), Ok(b)) = (src.canonicalize(), out.canonicalize()) {
        if a == b {
            return Err(Error::Usage(format!(
                "output {} is the source itself",
                out.display()
            )));
        }
    }
    let empty_dir = out.is_dir() && std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_none());
    if out.exists() && !empty_dir {
        return Err(Error::Usage(format!(
            "output {} already exists; remove it or choose another path",
            out.display()
        )));
    }
    Ok(())
}
