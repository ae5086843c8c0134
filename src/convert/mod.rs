//! Converting models between the two formats anyllama reads: a GGUF file to an HF folder that
//! transformers loads, and an HF folder to a GGUF file that llama.cpp and anyllama load.
//!
//! Both directions go through the one name table of `weights::load`: the tensors converted are
//! exactly those the forward pass uses, found by role, checked against the config's shapes, and
//! decoded to f32 one at a time before being written in the target storage type. Outputs are
//! written under a temporary name and renamed into place only when complete.

mod gguf_vocab;
mod gguf_writer;
mod safetensors_writer;
mod to_gguf;
mod to_hf;

pub use to_gguf::hf_to_gguf;
pub use to_hf::gguf_to_hf;

use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::quant::dequantize;
use crate::quant_blocks::quantize_blocks;
use crate::weights::{load::tensor_roles, tensor_name, HostTensor, TensorSource};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// One tensor the model uses, found in the source.
struct Planned {
    role: &'static str,
    layer: usize,
    /// Its name in the source and in the output naming.
    src: String,
    dst: String,
    /// HF order: `[rows, cols]` for a matrix.
    shape: Vec<usize>,
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
        "bq" | "bk" | "bv" | "bo" => (c.attention_bias, c.attention_bias),
        "b1" | "b2" | "b3" => (c.mlp_bias, c.mlp_bias),
        _ => (true, true),
    }
}

/// The tensors of the model in `src`, in a stable order, with their output names. Tensors of the
/// source the model does not use are reported and left out.
fn plan(
    src: &dyn TensorSource,
    cfg: &ModelConfig,
    src_gguf: bool,
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
        let t = if used { src.get(&name)? } else { None };
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
            dst: tensor_name(role, layer, !src_gguf),
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
fn check_output(src: &Path, out: &Path) -> Result<()> {
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
