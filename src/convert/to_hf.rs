//! GGUF file -> HF folder (transformers 5 form): config.json, model.safetensors, tokenizer.json,
//! tokenizer_config.json and generation_config.json.
//!
//! The weights come from the GGUF reader, which already put llama.cpp's interleaved Q/K rows back
//! in HF order; they are decoded to f32 and stored in the chosen float type. The config is the
//! one the reader derived (RoPE scaling included, llama3 recovered from `rope_freqs.weight`), and
//! the tokenizer is the `tokenizers` pipeline rebuilt from the GGUF vocabulary, serialized as is.

use super::safetensors_writer::SafetensorsWriter;
use super::{check_output, encode, partial_path, plan, to_f32, total_bytes, Planned};
use crate::config::{ModelConfig, RopeScaling};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::loader::ModelFiles;
use serde_json::{json, Map, Value};
use std::io::BufWriter;
use std::path::Path;

/// Writes the model in the GGUF file `src` as an HF folder `out_dir` (created; it must not exist
/// or be empty) with weights stored as `dtype` (F32, F16 or BF16). `progress(done, total)` is
/// told the bytes of tensor data written so far.
pub fn gguf_to_hf(
    src: &Path,
    out_dir: &Path,
    dtype: DType,
    progress: &dyn Fn(usize, usize),
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Usage(format!(
            "an HF folder stores weights as f32, f16 or bf16, not {dtype}"
        )));
    }
    let is_gguf = src
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if !is_gguf || !src.is_file() {
        return Err(Error::load(src, "not a .gguf file"));
    }
    check_output(src, out_dir)?;
    let files = ModelFiles::open(src)?;
    let planned = plan(files.source.as_ref(), &files.cfg, true, src)?;

    let tmp = partial_path(out_dir);
    if tmp.exists() {
        return Err(Error::Usage(format!(
            "{} exists (left by an interrupted conversion?); remove it first",
            tmp.display()
        )));
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::load(&tmp, e.to_string()))?;
    let written = write_folder(&files, &planned, dtype, &tmp, progress).and_then(|()| {
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

fn write_folder(
    files: &ModelFiles,
    planned: &[Planned],
    dtype: DType,
    dir: &Path,
    progress: &dyn Fn(usize, usize),
) -> Result<()> {
    let tok = &files.tokenizer;
    let sp = tok.specials();
    let write_json = |name: &str, v: &Value| -> Result<()> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
        std::fs::write(&path, text + "\n").map_err(|e| Error::load(&path, e.to_string()))
    };
    let pad_id = sp.pad.as_ref().map(|t| t.id);
    write_json("config.json", &hf_config(&files.cfg, dtype, pad_id))?;

    let mut generation = Map::new();
    generation.insert("bos_token_id".into(), json!(files.cfg.bos_token_id));
    generation.insert("eos_token_id".into(), id_or_list(&files.eos_ids()));
    if let Some(pad) = pad_id {
        generation.insert("pad_token_id".into(), json!(pad));
    }
    write_json("generation_config.json", &Value::Object(generation))?;

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
    config.insert("model_max_length".into(), json!(files.cfg.max_seq_len));
    if let Some(t) = tok.chat_template() {
        config.insert("chat_template".into(), json!(t));
    }
    write_json("tokenizer_config.json", &Value::Object(config))?;

    // Weights, one tensor at a time.
    let entries: Vec<(String, Vec<usize>, DType)> = planned
        .iter()
        .map(|p| (p.dst.clone(), p.shape.clone(), dtype))
        .collect();
    let total = total_bytes(
        entries
            .iter()
            .map(|(_, s, d)| d.bytes_for(s.iter().product())),
        "model.safetensors",
    )?;
    let path = dir.join("model.safetensors");
    let file = std::fs::File::create(&path).map_err(|e| Error::load(&path, e.to_string()))?;
    let mut w = SafetensorsWriter::begin(BufWriter::with_capacity(1 << 20, file), &entries)?;
    let mut done = 0;
    progress(0, total);
    for p in planned {
        let t = files
            .source
            .get(&p.src)?
            .ok_or_else(|| Error::load(&files.path, format!("tensor {} vanished", p.src)))?;
        let bytes = encode(&to_f32(&t, &p.src, &files.path)?, dtype, &p.dst)?;
        w.write_tensor(&bytes)?;
        done += bytes.len();
        progress(done, total);
    }
    w.finish()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
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
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "attention_bias": c.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": c.mlp_bias,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": id_or_list(&c.eos_token_ids),
        "pad_token_id": pad_token_id,
        "dtype": torch_dtype(dtype),
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
    })
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
                attention_bias: true,
                mlp_bias: false,
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
