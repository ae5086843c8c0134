//! HF folder (or any `Input`: a GGUF file being merged) -> GGUF v3 file, as llama.cpp's
//! converter lays it out: `llama.*` hyperparameters (`qwen2.*`, `qwen3.*`, `phi3.*` for those
//! architectures, whose q/k rows keep HF's order; Phi-3's projections are written split), RoPE scaling as metadata (linear, yarn) or
//! as a `rope_freqs.weight` tensor (llama3), the byte-level vocabulary, and the tensors under
//! GGUF names with the rows of every query/key projection interleaved per head (llama.cpp
//! rotates adjacent pairs, transformers the two halves of a head; the GGUF reader undoes this).
//! Vectors are stored as f32, matrices in the chosen type; a matrix whose rows are not whole
//! blocks of a block type is stored as f16.

use super::gguf_vocab::vocab_metadata;
use super::gguf_writer::{GgufWriter, Metadata};
use super::{
    check_dtype, check_output, encode, is_gguf_path, partial_path, plan, to_f32, total_bytes,
    unchanged, HfFolder, Input, Planned, Transform,
};
use crate::config::{ModelConfig, RopeScaling};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::weights::gguf::rope_freqs::{llama3_divisors, llama3_from_divisors};
use crate::weights::gguf::Value;
use crate::weights::TensorSource;
use std::io::BufWriter;
use std::path::Path;

/// Writes the model in the HF folder `src` as the GGUF file `out` (which must not exist and must
/// end in `.gguf`), matrices stored as `dtype` (F32, F16, BF16, Q8_0, Q4_0 or Q4_1).
/// `progress(done, total)` is told the bytes of tensor data written so far.
pub fn hf_to_gguf(
    src: &Path,
    out: &Path,
    dtype: DType,
    progress: &dyn Fn(usize, usize),
) -> Result<()> {
    check_dtype(dtype, true)?;
    if !src.is_dir() {
        return Err(Error::load(src, "not an HF model folder"));
    }
    check_gguf_output(src, out)?;
    let hf = HfFolder::open(src)?;
    write_gguf(&hf.input(), out, dtype, &unchanged, progress)
}

/// Refuses an output that does not end in `.gguf`, exists, or is the source itself.
fn check_gguf_output(src: &Path, out: &Path) -> Result<()> {
    if !is_gguf_path(out) {
        return Err(Error::Usage(format!(
            "output {} must end in .gguf",
            out.display()
        )));
    }
    check_output(src, out)
}

/// Writes `input` as the GGUF file `out` (see `hf_to_gguf`), each tensor passed through
/// `transform` before it is encoded.
pub(crate) fn write_gguf(
    input: &Input,
    out: &Path,
    dtype: DType,
    transform: Transform,
    progress: &dyn Fn(usize, usize),
) -> Result<()> {
    use DType::*;
    check_dtype(dtype, true)?;
    check_gguf_output(input.path, out)?;
    let (src, cfg) = (input.path, input.cfg);
    if input.tokenizer.is_none() {
        tracing::warn!(
            "{} has no tokenizer.json: the GGUF file gets no vocabulary, which llama.cpp and \
             `anyllama run` need",
            src.display()
        );
    }
    let planned = plan(input.tensors, cfg, input.gguf_names, true, src)?;

    // The folder's name, or a GGUF file's without `.gguf` (a folder name may hold dots).
    let name = if is_gguf_path(src) {
        src.file_stem()
    } else {
        src.file_name()
    };
    let name = name.map(|n| n.to_string_lossy().into_owned());
    let (mut metadata, rope_freqs) = model_metadata(cfg, dtype, name, src)?;
    if let Some(tok) = input.tokenizer {
        metadata.extend(vocab_metadata(tok, cfg.vocab_size, &input.eos_ids(), src)?);
    }

    let mut entries: Vec<(String, Vec<usize>, DType)> = Vec::new();
    if let Some(f) = &rope_freqs {
        entries.push(("rope_freqs.weight".into(), vec![f.len()], F32));
    }
    for p in &planned {
        entries.push((p.dst.clone(), p.shape.clone(), stored_dtype(p, dtype)));
    }

    let tmp = partial_path(out);
    if tmp.exists() {
        return Err(Error::Usage(format!(
            "{} exists (left by an interrupted conversion?); remove it first",
            tmp.display()
        )));
    }
    let written = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::load(&tmp, e.to_string()))?;
        let mut w =
            GgufWriter::begin(BufWriter::with_capacity(1 << 20, file), &metadata, &entries)?;
        let total = total_bytes(
            entries
                .iter()
                .map(|(_, s, d)| d.bytes_for(s.iter().product())),
            "the GGUF file",
        )?;
        let mut done = 0;
        progress(0, total);
        if let Some(f) = &rope_freqs {
            w.write_tensor(bytemuck::cast_slice(f))?;
            done += f.len() * 4;
        }
        for (p, (_, _, stored)) in planned
            .iter()
            .zip(&entries[rope_freqs.is_some() as usize..])
        {
            let bytes = tensor_bytes(input.tensors, p, cfg, *stored, src, transform)?;
            w.write_tensor(&bytes)?;
            done += bytes.len();
            progress(done, total);
        }
        w.finish()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
        std::fs::rename(&tmp, out).map_err(|e| Error::load(out, e.to_string()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Vectors in f32 (llama.cpp's kernels want them so); matrices in `dtype`, or f16 when their
/// rows are not whole blocks of it.
fn stored_dtype(p: &Planned, dtype: DType) -> DType {
    if p.shape.len() < 2 {
        return DType::F32;
    }
    let cols = p.shape[1];
    if cols % dtype.block_elems() != 0 {
        tracing::warn!(
            "{}: rows of {cols} values are not whole {dtype} blocks of {}; stored as f16",
            p.dst,
            dtype.block_elems()
        );
        return DType::F16;
    }
    dtype
}

/// One tensor's bytes in GGUF form: decoded, transformed, Q/K rows interleaved, encoded as
/// `stored`.
fn tensor_bytes(
    src: &dyn TensorSource,
    p: &Planned,
    cfg: &ModelConfig,
    stored: DType,
    path: &Path,
    transform: Transform,
) -> Result<Vec<u8>> {
    let t = src
        .get(&p.src)?
        .ok_or_else(|| Error::load(path, format!("tensor {} vanished", p.src)))?;
    let mut values = to_f32(&t, &p.src, path)?;
    drop(t);
    transform(p, &mut values)?;
    let heads = match p.role {
        _ if !cfg.arch.gguf_permutes_qk() => None,
        "wq" | "bq" => Some(cfg.n_heads),
        "wk" | "bk" => Some(cfg.n_kv_heads),
        _ => None,
    };
    if let Some(n_heads) = heads {
        values = permute_rows(&values, p.shape[0], n_heads).ok_or_else(|| {
            Error::Config(format!(
                "tensor {} (layer {}): {} rows are not {n_heads} heads of two equal halves",
                p.src, p.layer, p.shape[0]
            ))
        })?;
    }
    encode(&values, stored, &p.dst)
}

/// llama.cpp's Q/K row order: per head, HF row `t * half + d` goes to row `2 * d + t` (the
/// inverse of `weights::gguf::unpermute_rows`). `values` holds `rows` rows of equal length.
pub(crate) fn permute_rows(values: &[f32], rows: usize, n_heads: usize) -> Option<Vec<f32>> {
    if rows == 0 || n_heads == 0 || rows % (2 * n_heads) != 0 || values.len() % rows != 0 {
        return None;
    }
    let row = values.len() / rows;
    let half = rows / n_heads / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..n_heads {
        let base = h * 2 * half;
        for t in 0..2 {
            for d in 0..half {
                let (from, to) = (base + t * half + d, base + 2 * d + t);
                out[to * row..(to + 1) * row]
                    .copy_from_slice(&values[from * row..(from + 1) * row]);
            }
        }
    }
    Some(out)
}

/// llama.cpp's `general.file_type` for a model stored mostly as `dtype`.
fn file_type(dtype: DType) -> u32 {
    match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::Q4_0 => 2,
        DType::Q4_1 => 3,
        DType::Q8_0 => 7,
        DType::BF16 => 32,
        DType::Q4K => 15,
        DType::Q6K => 18,
    }
}

/// The `general.*` and `llama.*` metadata, and the llama3 `rope_freqs.weight` values if any.
fn model_metadata(
    c: &ModelConfig,
    dtype: DType,
    name: Option<String>,
    src: &Path,
) -> Result<(Metadata, Option<Vec<f32>>)> {
    let bad = |m: String| Error::Config(format!("{}: {m}", src.display()));
    let u32v = |key: &str, v: usize| -> Result<Value> {
        u32::try_from(v)
            .map(Value::U32)
            .map_err(|_| bad(format!("{key} = {v} does not fit GGUF's u32")))
    };
    let mut m: Vec<(String, Value)> = vec![(
        "general.architecture".into(),
        Value::String(c.arch.gguf_name().into()),
    )];
    if let Some(n) = name {
        m.push(("general.name".into(), Value::String(n)));
    }
    m.push(("general.file_type".into(), Value::U32(file_type(dtype))));
    if dtype.is_quantized() {
        m.push(("general.quantization_version".into(), Value::U32(2)));
    }
    for (key, v) in [
        ("vocab_size", c.vocab_size),
        ("context_length", c.max_seq_len),
        ("embedding_length", c.dim),
        ("block_count", c.n_layers),
        ("feed_forward_length", c.ffn_dim),
        ("rope.dimension_count", c.head_dim),
        ("attention.head_count", c.n_heads),
        ("attention.head_count_kv", c.n_kv_heads),
        ("attention.key_length", c.head_dim),
        ("attention.value_length", c.head_dim),
    ] {
        m.push((format!("llama.{key}"), u32v(key, v)?));
    }
    m.push((
        "llama.attention.layer_norm_rms_epsilon".into(),
        Value::F32(c.norm_eps),
    ));
    // GGUF keeps theta as f32; the llama3 divisors are computed from what a reader will see.
    let theta = c.rope_theta as f32;
    m.push(("llama.rope.freq_base".into(), Value::F32(theta)));

    let scaling = |kind: &str| {
        (
            "llama.rope.scaling.type".to_string(),
            Value::String(kind.into()),
        )
    };
    let mut rope_freqs = None;
    match &c.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            m.push(scaling("linear"));
            m.push((
                "llama.rope.scaling.factor".into(),
                Value::F32(*factor as f32),
            ));
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            if attention_factor.is_some()
                || mscale.is_some()
                || mscale_all_dim.is_some()
                || !truncate
            {
                return Err(bad(
                    "yarn RoPE with attention_factor, mscale, mscale_all_dim or truncate: false \
                     has no GGUF form that readers understand"
                        .into(),
                ));
            }
            m.push(scaling("yarn"));
            m.push((
                "llama.rope.scaling.factor".into(),
                Value::F32(*factor as f32),
            ));
            m.push((
                "llama.rope.scaling.original_context_length".into(),
                u32v(
                    "original_max_position_embeddings",
                    *original_max_position_embeddings,
                )?,
            ));
            m.push((
                "llama.rope.scaling.yarn_beta_fast".into(),
                Value::F32(*beta_fast as f32),
            ));
            m.push((
                "llama.rope.scaling.yarn_beta_slow".into(),
                Value::F32(*beta_slow as f32),
            ));
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let theta = theta as f64;
            let d = llama3_divisors(
                *factor,
                *low_freq_factor,
                *high_freq_factor,
                *original_max_position_embeddings as f64,
                theta,
                c.head_dim,
            );
            // The reader recovers the parameters from the divisors; make sure it can.
            if !matches!(
                llama3_from_divisors(&d, theta, c.head_dim),
                Some(RopeScaling::Llama3 { .. })
            ) {
                return Err(bad(format!(
                    "llama3 RoPE scaling {:?} cannot be stored as rope_freqs.weight in a form \
                     that can be read back",
                    c.rope_scaling
                )));
            }
            rope_freqs = Some(d);
        }
        RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. } => {
            return Err(bad(format!(
                "RoPE scaling `{}` has no GGUF form for Llama models (llama.cpp does not \
                 implement it)",
                c.rope_scaling.rope_type()
            )))
        }
    }
    // Every architecture keeps llama's keys under its own prefix.
    let pre = c.arch.gguf_name();
    if let Some(w) = c.sliding_window.filter(|_| pre != "llama") {
        m.push((
            "llama.attention.sliding_window".into(),
            u32v("sliding_window", w)?,
        ));
    }
    for (key, _) in m.iter_mut() {
        if let Some(rest) = key.strip_prefix("llama.") {
            *key = format!("{pre}.{rest}");
        }
    }
    Ok((m, rope_freqs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::gguf::unpermute_rows;

    #[test]
    fn permute_rows_is_the_inverse_of_the_readers_unpermute() {
        for (rows, heads, cols) in [(8, 1, 3), (12, 3, 2), (16, 2, 1)] {
            let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let p = permute_rows(&v, rows, heads).unwrap();
            assert_ne!(p, v);
            let back = unpermute_rows(bytemuck::cast_slice(&p), rows, heads).unwrap();
            let back: Vec<f32> = back
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(back, v);
        }
        assert_eq!(permute_rows(&[0.0; 6], 6, 2), None);
        assert_eq!(permute_rows(&[0.0; 4], 4, 0), None);
    }
}
