//! ModelConfig from GGUF metadata (`llama.*`, `qwen2.*`, `qwen3.*`, `phi3.*` keys, as llama.cpp's
//! converter writes them), giving
//! the same values transformers derives when it loads the file with `gguf_file=`.

use super::GgufFile;
use crate::arch::Arch;
use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};

impl GgufFile {
    /// The model's shape, from the `llama.*` and `tokenizer.ggml.*` metadata.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let name = self.architecture()?;
        let arch = Arch::from_gguf(name).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", self.path().display())),
            other => other,
        })?;
        let pre = arch.gguf_name();
        let need = |key: &str| -> Result<usize> {
            self.get_usize(&format!("{pre}.{key}"))?
                .ok_or_else(|| self.error(format!("metadata has no {pre}.{key}")))
        };
        let opt = |key: &str| self.get_usize(&format!("{pre}.{key}"));

        let dim = need("embedding_length")?;
        let n_heads = need("attention.head_count")?;
        let n_kv_heads = opt("attention.head_count_kv")?.unwrap_or(n_heads);

        // The width of one head: `attention.key_length` when present, else dim / heads (as
        // llama.cpp). transformers reads it from `rope.dimension_count` instead; for Llama the
        // rotary width must be the whole head (llama.cpp refuses other files), so they agree.
        let key_length = opt("attention.key_length")?;
        let rope_dims = opt("rope.dimension_count")?;
        let head_dim = key_length.unwrap_or(dim.checked_div(n_heads).unwrap_or(0));
        if let Some(r) = rope_dims.filter(|&r| r != head_dim) {
            return Err(Error::Config(format!(
                "{}: {pre}.rope.dimension_count ({r}) differs from the head width ({head_dim}); \
                 partial rotary embeddings are not supported",
                self.path().display()
            )));
        }
        if let Some(v) = opt("attention.value_length")?.filter(|&v| v != head_dim) {
            return Err(Error::Config(format!(
                "{}: {pre}.attention.value_length ({v}) differs from key_length ({head_dim})",
                self.path().display()
            )));
        }

        // transformers: `llama.vocab_size` when written, else the length of the token list.
        let vocab_size = match opt("vocab_size")? {
            Some(v) => v,
            None => self
                .get_array("tokenizer.ggml.tokens")?
                .map(|a| a.len())
                .ok_or_else(|| {
                    self.error(format!(
                        "metadata has neither {pre}.vocab_size nor tokenizer.ggml.tokens"
                    ))
                })?,
        };

        let eps_key = format!("{pre}.attention.layer_norm_rms_epsilon");
        let norm_eps = self
            .get_f64(&eps_key)?
            .ok_or_else(|| self.error(format!("metadata has no {eps_key}")))?;

        let has_tensor = |name: &str| self.tensor_info(name).is_some();
        let token_id = |key: &str| -> Result<Option<u32>> {
            match self.get_u64(key)? {
                None => Ok(None),
                Some(v) => u32::try_from(v)
                    .map(Some)
                    .map_err(|_| self.error(format!("metadata {key} = {v} is not a token id"))),
            }
        };

        let rope_theta = self
            .get_f64(&format!("{pre}.rope.freq_base"))?
            .unwrap_or(10000.0);
        let config = ModelConfig {
            vocab_size,
            dim,
            ffn_dim: need("feed_forward_length")?,
            n_layers: need("block_count")?,
            n_heads,
            n_kv_heads,
            head_dim,
            norm_eps: norm_eps as f32,
            max_seq_len: need("context_length")?,
            // llama.cpp writes the output projection only when it is not the embedding matrix.
            tie_embeddings: !has_tensor("output.weight"),
            arch,
            attention_bias: has_tensor("blk.0.attn_q.bias") || has_tensor("blk.0.attn_qkv.bias"),
            o_bias: has_tensor("blk.0.attn_output.bias"),
            mlp_bias: has_tensor("blk.0.ffn_up.bias"),
            qk_norm: has_tensor("blk.0.attn_q_norm.weight"),
            sliding_window: opt("attention.sliding_window")?,
            rope_theta,
            rope_scaling: self.rope_scaling(pre, rope_theta, head_dim)?,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
            torch_dtype: None,
        };
        config.validate().map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", self.path().display())),
            other => other,
        })?;
        Ok(config)
    }

    /// RoPE scaling as llama.cpp records it: `rope.scaling.type` with `factor` and
    /// `original_context_length`, the older `rope.scale_linear`, or (llama3 scaling) a
    /// `rope_freqs.weight` tensor of per-frequency divisors. transformers ignores that tensor
    /// and runs such files with unscaled RoPE; we recover the scaling it encodes.
    fn rope_scaling(&self, pre: &str, theta: f64, head_dim: usize) -> Result<RopeScaling> {
        let from_metadata = self.rope_scaling_metadata(pre)?;
        let Some(info) = self.tensor_info("rope_freqs.weight") else {
            return Ok(from_metadata);
        };
        let bad = |m: &str| {
            Err(Error::Config(format!(
                "{}: rope_freqs.weight {m}",
                self.path().display()
            )))
        };
        if from_metadata != RopeScaling::Default {
            return bad("and llama.rope.scaling.* both scale RoPE; only one is supported");
        }
        if info.ggml_type != super::GgmlType::F32 {
            return bad(&format!("is stored as {}, expected F32", info.ggml_type));
        }
        let divisors: Vec<f32> = self
            .tensor_bytes(info)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        match super::rope_freqs::llama3_from_divisors(&divisors, theta, head_dim) {
            Some(s) => Ok(s),
            None => bad(&format!(
                "({} values for head width {head_dim}) does not follow the llama3 scaling scheme",
                divisors.len()
            )),
        }
    }

    fn rope_scaling_metadata(&self, pre: &str) -> Result<RopeScaling> {
        let key = |k: &str| format!("{pre}.rope.scaling.{k}");
        let factor = self.get_f64(&key("factor"))?;
        let original = self.get_usize(&key("original_context_length"))?;
        let bad = |m: String| Err(Error::Config(format!("{}: {m}", self.path().display())));
        let need_factor = |kind: &str| -> Result<f64> {
            match factor {
                Some(f) if f > 0.0 => Ok(f),
                _ => Err(Error::Config(format!(
                    "{}: rope scaling {kind} needs a positive {}",
                    self.path().display(),
                    key("factor")
                ))),
            }
        };
        let Some(kind) = self.get_str(&key("type"))? else {
            return Ok(match self.get_f64(&format!("{pre}.rope.scale_linear"))? {
                Some(f) if f != 1.0 && f > 0.0 => RopeScaling::Linear { factor: f },
                _ => RopeScaling::Default,
            });
        };
        Ok(match kind {
            "none" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: need_factor(kind)?,
            },
            "yarn" => {
                let Some(original) = original else {
                    return bad(format!(
                        "rope scaling yarn needs {}",
                        key("original_context_length")
                    ));
                };
                // llama.cpp's defaults for the ramp, the same as transformers'.
                let beta_fast = self.get_f64(&key("yarn_beta_fast"))?.unwrap_or(32.0);
                let beta_slow = self.get_f64(&key("yarn_beta_slow"))?.unwrap_or(1.0);
                RopeScaling::Yarn {
                    factor: need_factor(kind)?,
                    original_max_position_embeddings: original,
                    beta_fast,
                    beta_slow,
                    attention_factor: None,
                    mscale: None,
                    mscale_all_dim: None,
                    truncate: true,
                }
            }
            other => return bad(format!("rope scaling type {other:?} is not supported")),
        })
    }
}
