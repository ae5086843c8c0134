//! GGUF file -> HF folder (transformers 5 form): config.json, model.safetensors (sharded past
//! 5 GB, with model.safetensors.index.json), tokenizer.json, tokenizer_config.json and
//! generation_config.json. An input that comes from an HF folder (train::merge, train::export)
//! gets that folder's tokenizer, chat-template and generation files copied as they are.
//!
//! The weights come from the GGUF reader, which already put llama.cpp's interleaved Q/K rows back
//! in HF order; they are decoded to f32 and stored in the chosen float type. The config is the
//! one the reader derived (RoPE scaling included, llama3 recovered from `rope_freqs.weight`), and
//! the tokenizer is the `tokenizers` pipeline rebuilt from the GGUF vocabulary, serialized as is.

use super::safetensors_writer::SafetensorsWriter;
use super::{
    check_dtype, check_output, encode, is_gguf_path, partial_path, plan, to_f32, total_bytes,
    unchanged, Input, Planned, Transform,
};
use crate::arch::Arch;
use crate::config::{ModelConfig, RopeScaling};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::loader::ModelFiles;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::BufWriter;
use std::ops::Range;
use std::path::Path;

/// transformers' default `max_shard_size` ("5GB"): weights past it are split into shards.
pub(crate) const SHARD_LIMIT: usize = 5_000_000_000;

/// The tokenizer files of an HF folder that an HF output copies as they are.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Writes the model in the GGUF file `src` as an HF folder `out_dir` (created; it must not exist
/// or be empty) with weights stored as `dtype` (F32, F16 or BF16). `progress(done, total)` is
/// told the bytes of tensor data written so far.
pub fn gguf_to_hf(
    src: &Path,
    out_dir: &Path,
    dtype: DType,
    progress: &dyn Fn(usize, usize),
) -> Result<()> {
    check_dtype(dtype, false)?;
    if !is_gguf_path(src) || !src.is_file() {
        return Err(Error::load(src, "not a .gguf file"));
    }
    check_output(src, out_dir)?;
    let files = ModelFiles::open(src)?;
    write_hf(
        &Input::of_files(&files),
        out_dir,
        dtype,
        &unchanged,
        progress,
        SHARD_LIMIT,
    )
}

/// Writes `input` as an HF folder `out_dir` (see `gguf_to_hf`), each tensor passed through
/// `transform` before it is encoded; weights over `shard_limit` bytes are split into shards
/// `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`, as transformers'
/// `save_pretrained` does.
pub(crate) fn write_hf(
    input: &Input,
    out_dir: &Path,
    dtype: DType,
    transform: Transform,
    progress: &dyn Fn(usize, usize),
    shard_limit: usize,
) -> Result<()> {
    check_dtype(dtype, false)?;
    check_output(input.path, out_dir)?;
    let planned = plan(
        input.tensors,
        input.cfg,
        input.gguf_names,
        false,
        input.path,
    )?;

    let tmp = partial_path(out_dir);
    if tmp.exists() {
        return Err(Error::Usage(format!(
            "{} exists (left by an interrupted conversion?); remove it first",
            tmp.display()
        )));
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::load(&tmp, e.to_string()))?;
    let written = write_folder(
        input,
        &planned,
        dtype,
        &tmp,
        transform,
        progress,
        shard_limit,
    )
    .and_then(|()| {
        if out_dir.is_dir() {
            std::fs::remove_dir(out_dir)?; // checked empty above
        }
        std::fs::rename(&tmp, out_dir).map_err(|e| Error::load(out_dir, e.to_string()))
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

fn write_json(dir: &Path, name: &str, v: &Value) -> Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    std::fs::write(&path, text + "\n").map_err(|e| Error::load(&path, e.to_string()))
}

fn write_folder(
    input: &Input,
    planned: &[Planned],
    dtype: DType,
    dir: &Path,
    transform: Transform,
    progress: &dyn Fn(usize, usize),
    shard_limit: usize,
) -> Result<()> {
    let pad_id = input
        .tokenizer
        .and_then(|t| t.specials().pad.as_ref().map(|t| t.id));
    write_json(dir, "config.json", &hf_config(input.cfg, dtype, pad_id))?;
    write_generation_config(input, dir, pad_id)?;
    write_tokenizer_files(input, dir)?;
    write_weights(input, planned, dtype, dir, transform, progress, shard_limit)
}

/// Copies `name` from the folder `src` into `dir` byte for byte; false when `src` has none.
fn copy_side_file(src: &Path, name: &str, dir: &Path) -> Result<bool> {
    let from = src.join(name);
    if !from.is_file() {
        return Ok(false);
    }
    let text =
        crate::weights::read_text_file(&from).map_err(|e| Error::load(&from, e.to_string()))?;
    let to = dir.join(name);
    std::fs::write(&to, text).map_err(|e| Error::load(&to, e.to_string()))?;
    Ok(true)
}

/// generation_config.json: the source folder's as it is, else one with the stop tokens.
fn write_generation_config(input: &Input, dir: &Path, pad_id: Option<u32>) -> Result<()> {
    if let Some(src) = input.hf_dir {
        copy_side_file(src, "generation_config.json", dir)?;
        return Ok(());
    }
    let mut eos = input.eos_ids();
    if eos.is_empty() {
        eos = input.tokenizer.map(|t| t.eos_ids()).unwrap_or_default();
    }
    let mut generation = Map::new();
    generation.insert("bos_token_id".into(), json!(input.cfg.bos_token_id));
    generation.insert("eos_token_id".into(), id_or_list(&eos));
    if let Some(pad) = pad_id {
        generation.insert("pad_token_id".into(), json!(pad));
    }
    write_json(dir, "generation_config.json", &Value::Object(generation))
}

/// The tokenizer files into `dir` (which must exist; files of the same names are replaced):
/// from an HF folder, its tokenizer.json, tokenizer_config.json, special_tokens_map.json and
/// chat_template.jinja as they are; otherwise tokenizer.json serialized from the loaded
/// pipeline (a GGUF vocabulary rebuilt for `tokenizers`) and a tokenizer_config.json with the
/// special tokens and the chat template.
pub(crate) fn write_tokenizer_files(input: &Input, dir: &Path) -> Result<()> {
    if let Some(src) = input.hf_dir {
        for name in TOKENIZER_FILES {
            if !copy_side_file(src, name, dir)? && name == "tokenizer.json" {
                tracing::warn!(
                    "{} has no tokenizer.json: the output gets no tokenizer either",
                    src.display()
                );
            }
        }
        return Ok(());
    }
    let Some(tok) = input.tokenizer else {
        tracing::warn!(
            "{} has no tokenizer: the output gets none either",
            input.path.display()
        );
        return Ok(());
    };
    let sp = tok.specials();
    let tokenizer_json = dir.join("tokenizer.json");
    let text = tok
        .inner()
        .to_string(false)
        .map_err(|e| Error::Tokenizer(format!("serializing the tokenizer: {e}")))?;
    std::fs::write(&tokenizer_json, text)
        .map_err(|e| Error::load(&tokenizer_json, e.to_string()))?;
    let text_of = |t: &Option<crate::tokenizer::SpecialToken>| json!(t.as_ref().map(|t| &t.text));
    let mut config = Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("bos_token".into(), text_of(&sp.bos));
    config.insert("eos_token".into(), text_of(&sp.eos));
    config.insert("unk_token".into(), text_of(&sp.unk));
    config.insert("pad_token".into(), text_of(&sp.pad));
    config.insert("add_bos_token".into(), json!(sp.add_bos));
    config.insert("add_eos_token".into(), json!(sp.add_eos));
    // Our decoder keeps text as the vocabulary spells it; so must transformers'.
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    config.insert("model_max_length".into(), json!(input.cfg.max_seq_len));
    if let Some(t) = tok.chat_template() {
        config.insert("chat_template".into(), json!(t));
    }
    write_json(dir, "tokenizer_config.json", &Value::Object(config))
}

/// Groups consecutive tensors of `sizes` bytes into shards of at most `limit` bytes each (a
/// tensor larger than the limit gets a shard of its own), as huggingface_hub splits a state
/// dict; always at least one group.
pub(crate) fn shard_groups(sizes: &[usize], limit: usize) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, &s) in sizes.iter().enumerate() {
        if i > start && bytes.saturating_add(s) > limit {
            groups.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(s);
    }
    groups.push(start..sizes.len());
    groups
}

/// The weights, one tensor at a time, in one file or in shards with an index.
fn write_weights(
    input: &Input,
    planned: &[Planned],
    dtype: DType,
    dir: &Path,
    transform: Transform,
    progress: &dyn Fn(usize, usize),
    shard_limit: usize,
) -> Result<()> {
    let entries: Vec<(String, Vec<usize>, DType)> = planned
        .iter()
        .map(|p| (p.dst.clone(), p.shape.clone(), dtype))
        .collect();
    let sizes = entries
        .iter()
        .map(|(name, s, d)| {
            s.iter()
                .try_fold(1usize, |a, &n| a.checked_mul(n))
                .and_then(|n| d.bytes_for(n))
                .ok_or_else(|| Error::Config(format!("tensor {name}: size overflows")))
        })
        .collect::<Result<Vec<usize>>>()?;
    let total = total_bytes(sizes.iter().map(|&s| Some(s)), "the weights")?;
    let groups = shard_groups(&sizes, shard_limit);
    let n = groups.len();
    let file_name = |i: usize| {
        if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        }
    };
    let mut done = 0;
    progress(0, total);
    let mut weight_map = BTreeMap::new();
    for (i, group) in groups.into_iter().enumerate() {
        let path = dir.join(file_name(i));
        let file = std::fs::File::create(&path).map_err(|e| Error::load(&path, e.to_string()))?;
        let mut w = SafetensorsWriter::begin(
            BufWriter::with_capacity(1 << 20, file),
            &entries[group.clone()],
        )?;
        for p in &planned[group] {
            let t = input
                .tensors
                .get(&p.src)?
                .ok_or_else(|| Error::load(input.path, format!("tensor {} vanished", p.src)))?;
            let mut values = to_f32(&t, &p.src, input.path)?;
            drop(t);
            transform(p, &mut values)?;
            let bytes = encode(&values, dtype, &p.dst)?;
            w.write_tensor(&bytes)?;
            done += bytes.len();
            progress(done, total);
            weight_map.insert(p.dst.clone(), file_name(i));
        }
        w.finish()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(dir, "model.safetensors.index.json", &index)?;
    }
    Ok(())
}

/// One id as a number, several as a list, none as null (the forms transformers writes).
fn id_or_list(ids: &[u32]) -> Value {
    match ids {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    }
}

fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// config.json for `LlamaForCausalLM` in transformers 5's form (`rope_parameters`, `dtype`).
pub(crate) fn hf_config(c: &ModelConfig, dtype: DType, pad_token_id: Option<u32>) -> Value {
    let mut rope = Map::new();
    rope.insert("rope_type".into(), json!(c.rope_scaling.rope_type()));
    rope.insert("rope_theta".into(), json!(c.rope_theta));
    let mut put = |k: &str, v: Value| {
        rope.insert(k.into(), v);
    };
    match &c.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor, .. } => {
            put("factor", json!(factor))
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            put("factor", json!(factor));
            put("low_freq_factor", json!(low_freq_factor));
            put("high_freq_factor", json!(high_freq_factor));
            put(
                "original_max_position_embeddings",
                json!(original_max_position_embeddings),
            );
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
            factor,
        } => {
            put("short_factor", json!(short_factor));
            put("long_factor", json!(long_factor));
            put(
                "original_max_position_embeddings",
                json!(original_max_position_embeddings),
            );
            if let Some(a) = attention_factor {
                put("attention_factor", json!(a));
            }
            if let Some(f) = factor {
                put("factor", json!(f));
            }
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
            put("factor", json!(factor));
            put(
                "original_max_position_embeddings",
                json!(original_max_position_embeddings),
            );
            put("beta_fast", json!(beta_fast));
            put("beta_slow", json!(beta_slow));
            put("truncate", json!(truncate));
            for (k, v) in [
                ("attention_factor", attention_factor),
                ("mscale", mscale),
                ("mscale_all_dim", mscale_all_dim),
            ] {
                if let Some(v) = v {
                    put(k, json!(v));
                }
            }
        }
    }
    // Tensors are written under Llama's names (Phi-3's fused projections split), so a Phi-3
    // folder is written as the Llama it is (its sliding window, if any, is dropped).
    let arch = match c.arch {
        Arch::Phi3 => Arch::Llama,
        a => a,
    };
    let mut config = json!({
        "architectures": [arch.class_name()],
        "model_type": arch.model_type(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps as f64,
        "rope_parameters": rope,
        "attention_dropout": 0.0,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": id_or_list(&c.eos_token_ids),
        "pad_token_id": pad_token_id,
        "dtype": torch_dtype(dtype),
        "initializer_range": 0.02,
        "use_cache": true,
    });
    let o = config.as_object_mut().expect("an object");
    let window = c.sliding_window;
    match arch {
        Arch::Llama => {
            o.insert("attention_bias".into(), json!(c.attention_bias));
            o.insert("mlp_bias".into(), json!(c.mlp_bias));
            o.insert("pretraining_tp".into(), json!(1));
        }
        Arch::Mistral => {
            o.insert("sliding_window".into(), json!(window));
        }
        Arch::Qwen2 | Arch::Qwen3 => {
            if arch == Arch::Qwen3 {
                o.insert("attention_bias".into(), json!(c.o_bias));
            }
            // Where layers slide, every layer is written as sliding: the same computation for
            // the contexts the window allows, the only ones the model runs.
            o.insert("use_sliding_window".into(), json!(window.is_some()));
            o.insert("sliding_window".into(), json!(window));
            o.insert("max_window_layers".into(), json!(0));
        }
        Arch::Phi3 => unreachable!("written as llama"),
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_reads_back_as_the_same_config() {
        let scalings = [
            RopeScaling::Default,
            RopeScaling::Linear { factor: 2.0 },
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 16,
            },
            RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 16,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: Some(1.5),
                mscale: None,
                mscale_all_dim: None,
                truncate: false,
            },
            RopeScaling::LongRope {
                short_factor: vec![1.0; 8],
                long_factor: vec![2.0; 8],
                original_max_position_embeddings: 16,
                attention_factor: None,
                factor: Some(4.0),
            },
        ];
        for rope_scaling in scalings {
            let c = ModelConfig {
                vocab_size: 300,
                dim: 64,
                ffn_dim: 96,
                n_layers: 3,
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 16,
                norm_eps: 1e-5,
                max_seq_len: 64,
                tie_embeddings: true,
                arch: crate::arch::Arch::Llama,
                attention_bias: true,
                o_bias: true,
                mlp_bias: false,
                qk_norm: false,
                sliding_window: None,
                rope_theta: 5e5,
                rope_scaling,
                bos_token_id: Some(1),
                eos_token_ids: vec![2, 3],
                torch_dtype: Some("bfloat16".into()),
            };
            let text = hf_config(&c, DType::BF16, Some(0)).to_string();
            assert_eq!(ModelConfig::from_hf_json(&text).unwrap(), c, "{text}");
        }
    }
}
