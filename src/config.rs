//! ModelConfig: the shape of a Llama-family model, from an HF config.json (transformers 4 and 5
//! forms) or from GGUF metadata, plus the dimensions derived from it.
//!
//! Reading config.json follows transformers' `LlamaConfig` exactly: the same defaults for absent
//! keys, the same precedence between the v4 keys (`rope_theta`, `rope_scaling`, `torch_dtype`) and
//! the v5 keys (`rope_parameters`, `dtype`), and the same fallbacks inside the RoPE parameters.

pub use crate::arch::Arch;
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// Upper bounds on the sizes a config may name: several times the largest released Llama-family
/// models (vocab 256k, width 16k, 126 layers, 128 heads, 10M context), far below overflow.
pub const MAX_VOCAB: usize = 1 << 22;
pub const MAX_WIDTH: usize = 1 << 17;
pub const MAX_FFN: usize = 1 << 20;
pub const MAX_LAYERS: usize = 1 << 12;
pub const MAX_HEADS: usize = 1 << 12;
pub const MAX_HEAD_DIM: usize = 1 << 12;
pub const MAX_CONTEXT: usize = 1 << 26;

/// RoPE frequency scheme, as transformers' `ROPE_INIT_FUNCTIONS` names them.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    Default,
    Linear {
        factor: f64,
    },
    /// NTK-aware scaling recomputed from the current sequence length once it passes the original.
    /// transformers takes the original length from `max_position_embeddings` for this variant.
    Dynamic {
        factor: f64,
        original_max_position_embeddings: usize,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        /// Explicit attention scaling; derived from `factor` when absent.
        attention_factor: Option<f64>,
        factor: Option<f64>,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        truncate: bool,
    },
}

impl RopeScaling {
    /// The `rope_type` string transformers uses for this variant.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Default => "default",
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Llama3 { .. } => "llama3",
            RopeScaling::LongRope { .. } => "longrope",
            RopeScaling::Yarn { .. } => "yarn",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    /// hidden_size
    pub dim: usize,
    /// intermediate_size
    pub ffn_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub norm_eps: f32,
    /// max_position_embeddings: the context length the model was trained for.
    pub max_seq_len: usize,
    pub tie_embeddings: bool,
    /// The architecture (file-format names and layouts; the differences below are data).
    pub arch: Arch,
    /// q, k and v projections have biases (Llama's `attention_bias`, always on Qwen2).
    pub attention_bias: bool,
    /// o_proj has a bias (Llama's and Qwen3's `attention_bias`; Qwen2 has none).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3: an RMSNorm (weights [head_dim]) over each head of q and of k before RoPE.
    pub qk_norm: bool,
    /// Attention limited to the last `n` positions in some layers (Mistral, Phi-3, Qwen2 with
    /// `use_sliding_window`). Our kernels attend to the whole context, which is the same
    /// computation while the context is at most `n` long: longer contexts are refused.
    pub sliding_window: Option<usize>,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The stored dtype named by the config (`torch_dtype` / `dtype`), informational.
    pub torch_dtype: Option<String>,
}

impl ModelConfig {
    /// Width of the query projection: n_heads * head_dim.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of the key / value projections: n_kv_heads * head_dim.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The longest context this model runs exactly: its sliding window, where it has one (the
    /// kernels attend to every position, which is the window's computation up to its length).
    pub fn max_exact_context(&self) -> Option<usize> {
        self.sliding_window
    }

    /// Refuses a context the model cannot run exactly (see `max_exact_context`).
    pub fn check_context(&self, ctx: usize) -> Result<()> {
        match self.max_exact_context() {
            Some(w) if ctx > w => Err(Error::Usage(format!(
                "{} attends within a sliding window of {w} positions, which is only implemented \
                 as full attention: a context of {ctx} is too long (use {w} or less)",
                self.arch.class_name()
            ))),
            _ => Ok(()),
        }
    }

    /// Checks the invariants every kernel relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.dim == 0 || self.n_layers == 0 || self.n_heads == 0 || self.n_kv_heads == 0 {
            return bad("hidden_size, num_hidden_layers and head counts must be positive".into());
        }
        if self.vocab_size == 0 || self.ffn_dim == 0 || self.head_dim == 0 {
            return bad("vocab_size, intermediate_size and head_dim must be positive".into());
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        if self.dim % self.n_heads != 0 {
            return bad(format!(
                "hidden_size ({}) is not a multiple of num_attention_heads ({})",
                self.dim, self.n_heads
            ));
        }
        if self.max_seq_len == 0 {
            return bad("max_position_embeddings (context length) must be positive".into());
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return bad(format!("rms_norm_eps ({}) must be >= 0", self.norm_eps));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta ({}) must be positive", self.rope_theta));
        }
        // Sizes far past any real model are a broken or hostile file; refusing them keeps every
        // product of two sizes (q_dim, vocab x dim, ...) far from overflow.
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.dim, MAX_WIDTH),
            ("intermediate_size", self.ffn_dim, MAX_FFN),
            ("num_hidden_layers", self.n_layers, MAX_LAYERS),
            ("num_attention_heads", self.n_heads, MAX_HEADS),
            ("num_key_value_heads", self.n_kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("max_position_embeddings", self.max_seq_len, MAX_CONTEXT),
        ] {
            if v > max {
                return bad(format!(
                    "{name} ({v}) is larger than any supported model (at most {max})"
                ));
            }
        }
        Ok(())
    }

    /// Reads `config.json` from an HF model folder.
    pub fn from_hf_dir(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let text =
            crate::weights::read_text_file(&path).map_err(|e| Error::load(&path, e.to_string()))?;
        Self::from_hf_json(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses the text of an HF `config.json` (transformers 4 or 5 form) of a Llama model.
    pub fn from_hf_json(text: &str) -> Result<ModelConfig> {
        let root: Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("config.json is not valid JSON: {e}")))?;
        let obj = root
            .as_object()
            .ok_or_else(|| Error::Config("config.json must hold a JSON object".into()))?;
        let j = Json(obj);

        let class = match j.0.get("architectures") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_str),
            _ => None,
        };
        let arch = Arch::from_hf(j.str("model_type")?, class)?;
        let d = arch.defaults();
        if let Some(act) = j.str("hidden_act")? {
            if act != "silu" {
                return Err(Error::Config(format!(
                    "hidden_act `{act}` is not supported ({} uses `silu`)",
                    arch.class_name()
                )));
            }
        }

        // Defaults are the config class's defaults (LlamaConfig, Qwen2Config, ...), so a config
        // that leaves a key out means what it means to transformers.
        let dim = j.usize("hidden_size")?.unwrap_or(d.hidden_size);
        let n_heads = j.usize("num_attention_heads")?.unwrap_or(32);
        if n_heads == 0 || dim % n_heads != 0 {
            // LlamaConfig.validate_architecture rejects this even when head_dim is explicit.
            return Err(Error::Config(format!(
                "hidden_size ({dim}) is not a multiple of num_attention_heads ({n_heads})"
            )));
        }
        let max_seq_len = j
            .usize("max_position_embeddings")?
            .unwrap_or(d.max_position_embeddings);
        let head_dim = match j.usize("head_dim")? {
            Some(h) => h,
            None => d.head_dim.unwrap_or(dim / n_heads),
        };
        let attention_bias = j.bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Llama | Arch::Qwen3 => (attention_bias, attention_bias),
            Arch::Qwen2 => (true, false),
            Arch::Mistral | Arch::Phi3 => (false, false),
        };
        let (rope_theta, rope_scaling) = parse_rope(&j, head_dim, max_seq_len)?;

        let cfg = ModelConfig {
            vocab_size: j.usize("vocab_size")?.unwrap_or(d.vocab_size),
            dim,
            ffn_dim: j.usize("intermediate_size")?.unwrap_or(d.intermediate_size),
            n_layers: j.usize("num_hidden_layers")?.unwrap_or(32),
            n_heads,
            n_kv_heads: j
                .usize("num_key_value_heads")?
                .or(d.num_key_value_heads)
                .unwrap_or(n_heads),
            head_dim,
            norm_eps: j.f64("rms_norm_eps")?.unwrap_or(d.rms_norm_eps) as f32,
            max_seq_len,
            tie_embeddings: j.bool("tie_word_embeddings")?.unwrap_or(false),
            arch,
            attention_bias: qkv_bias,
            o_bias,
            mlp_bias: arch == Arch::Llama && j.bool("mlp_bias")?.unwrap_or(false),
            qk_norm: arch == Arch::Qwen3,
            sliding_window: sliding_window(&j, arch)?,
            rope_theta,
            rope_scaling,
            bos_token_id: if j.has("bos_token_id") {
                j.token_id("bos_token_id")?
            } else {
                d.bos_token_id
            },
            eos_token_ids: if j.has("eos_token_id") {
                j.token_ids("eos_token_id")?
            } else {
                d.eos_token_id.into_iter().collect()
            },
            torch_dtype: match j.str("dtype")? {
                Some(d) => Some(d.to_string()),
                None => j.str("torch_dtype")?.map(str::to_string),
            },
        };
        if !(cfg.norm_eps.is_finite() && cfg.norm_eps >= 0.0) {
            return Err(Error::Config(format!(
                "rms_norm_eps ({}) must be >= 0",
                cfg.norm_eps
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The window of the layers that attend within one, as transformers resolves it: Mistral's and
/// Phi-3's `sliding_window` (null: none); Qwen2's and Qwen3's only with `use_sliding_window`,
/// on the layers `layer_types` (or `max_window_layers`) marks.
fn sliding_window(j: &Json, arch: Arch) -> Result<Option<usize>> {
    let window = |default: Option<usize>| -> Result<Option<usize>> {
        match j.0.get("sliding_window") {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(_) => j.usize("sliding_window"),
        }
    };
    let w = match arch {
        Arch::Llama => None,
        Arch::Mistral => window(Some(4096))?,
        Arch::Phi3 => window(None)?,
        Arch::Qwen2 | Arch::Qwen3 => {
            let w = match j.bool("use_sliding_window")?.unwrap_or(false) {
                true => window(Some(4096))?,
                false => None,
            };
            let layers = j.usize("num_hidden_layers")?.unwrap_or(32);
            let sliding_layers = match j.0.get("layer_types") {
                Some(Value::Array(types)) => types
                    .iter()
                    .filter(|t| t.as_str() == Some("sliding_attention"))
                    .count(),
                _ => layers.saturating_sub(j.usize("max_window_layers")?.unwrap_or(28)),
            };
            w.filter(|_| sliding_layers > 0)
        }
    };
    if w == Some(0) {
        return Err(Error::Config("sliding_window must be positive".into()));
    }
    Ok(w)
}

/// Resolves rope_theta and the scaling variant the way `RotaryEmbeddingConfigMixin` standardizes
/// them: `rope_scaling` (v4) wins over `rope_parameters` (v5) when both are non-empty; a theta
/// inside the dict wins over the top-level `rope_theta`; the default theta is 10000.
fn parse_rope(j: &Json, head_dim: usize, max_pos: usize) -> Result<(f64, RopeScaling)> {
    let dict_of = |key: &str| -> Result<Option<&Map<String, Value>>> {
        match j.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) if m.is_empty() => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(other) => Err(Error::Config(format!(
                "`{key}` must be an object, got {other}"
            ))),
        }
    };
    let empty = Map::new();
    let params = match dict_of("rope_scaling")? {
        Some(m) => m,
        None => dict_of("rope_parameters")?.unwrap_or(&empty),
    };
    let p = Json(params);

    let theta = match p.f64("rope_theta")? {
        Some(t) => t,
        None => j.f64("rope_theta")?.unwrap_or(10_000.0),
    };
    if !(theta.is_finite() && theta > 1.0) {
        return Err(Error::Config(format!(
            "rope_theta ({theta}) must be a finite number > 1"
        )));
    }
    // Llama rotates the whole head; a partial rotary dimension would not fit its kernels.
    for partial in [
        p.f64("partial_rotary_factor")?,
        j.f64("partial_rotary_factor")?,
    ] {
        if partial.is_some_and(|f| f != 1.0) {
            return Err(Error::Config(
                "partial_rotary_factor other than 1.0 is not supported for Llama".into(),
            ));
        }
    }

    // `rope_type`, or the legacy `type` key of older configs.
    let rope_type = match p.str("rope_type")? {
        Some(t) => t.to_string(),
        None => p.str("type")?.unwrap_or("default").to_string(),
    };
    // llama3 / yarn / longrope read the pretraining length from a top-level key when a config has
    // one (Phi-3 style), else from the dict, else max_position_embeddings.
    let original_max = || -> Result<usize> {
        let n = match j.usize("original_max_position_embeddings")? {
            Some(n) => n,
            None => p
                .usize("original_max_position_embeddings")?
                .unwrap_or(max_pos),
        };
        if n == 0 {
            return Err(Error::Config(
                "original_max_position_embeddings must be positive".into(),
            ));
        }
        Ok(n)
    };
    let need = |key: &str| -> Result<f64> {
        p.f64(key)?.ok_or_else(|| {
            Error::Config(format!(
                "rope type `{rope_type}` needs `{key}` in the RoPE parameters"
            ))
        })
    };
    let positive = |key: &str, v: f64| -> Result<f64> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(Error::Config(format!(
                "RoPE parameter `{key}` ({v}) must be a positive number"
            )))
        }
    };

    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: positive("factor", need("factor")?)? },
        "dynamic" => {
            let factor = positive("factor", need("factor")?)?;
            if max_pos == 0 || head_dim <= 2 {
                // Its base grows as (..)^(head_dim / (head_dim - 2)), relative to max_pos.
                return Err(Error::Config(
                    "dynamic RoPE needs max_position_embeddings > 0 and head_dim > 2".into(),
                ));
            }
            RopeScaling::Dynamic { factor, original_max_position_embeddings: max_pos }
        }
        "llama3" => {
            let low = positive("low_freq_factor", need("low_freq_factor")?)?;
            let high = positive("high_freq_factor", need("high_freq_factor")?)?;
            if high <= low {
                return Err(Error::Config(format!(
                    "llama3 RoPE needs high_freq_factor ({high}) > low_freq_factor ({low})"
                )));
            }
            RopeScaling::Llama3 {
                factor: positive("factor", need("factor")?)?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original_max()?,
            }
        }
        "longrope" => {
            let list = |key: &str| -> Result<Vec<f64>> {
                let v = p.f64_list(key)?.ok_or_else(|| {
                    Error::Config(format!("rope type `longrope` needs `{key}`"))
                })?;
                if v.len() != head_dim / 2 {
                    return Err(Error::Config(format!(
                        "longrope `{key}` has {} entries, head_dim {head_dim} needs {}",
                        v.len(),
                        head_dim / 2
                    )));
                }
                for &x in &v {
                    positive(key, x)?;
                }
                Ok(v)
            };
            RopeScaling::LongRope {
                short_factor: list("short_factor")?,
                long_factor: list("long_factor")?,
                original_max_position_embeddings: original_max()?,
                attention_factor: p.f64("attention_factor")?,
                factor: p.f64("factor")?,
            }
        }
        "yarn" => {
            let original = original_max()?;
            // transformers requires the key but reads an explicit null as "the ratio of the
            // two context lengths".
            if !p.has("factor") {
                return Err(Error::Config("rope type `yarn` needs `factor`".into()));
            }
            let factor = match p.f64("factor")? {
                Some(f) => f,
                None => max_pos as f64 / original as f64,
            };
            // transformers writes `get(...) or 32`: a 0 counts as unset too.
            let or_default = |v: Option<f64>, d: f64| v.filter(|&x| x != 0.0).unwrap_or(d);
            RopeScaling::Yarn {
                factor: positive("factor", factor)?,
                original_max_position_embeddings: original,
                beta_fast: or_default(p.f64("beta_fast")?, 32.0),
                beta_slow: or_default(p.f64("beta_slow")?, 1.0),
                attention_factor: p.f64("attention_factor")?,
                mscale: p.f64("mscale")?,
                mscale_all_dim: p.f64("mscale_all_dim")?,
                truncate: p.bool("truncate")?.unwrap_or(true),
            }
        }
        other => {
            return Err(Error::Config(format!(
                "unknown rope type `{other}` (supported: default, linear, dynamic, llama3, longrope, yarn)"
            )))
        }
    };
    Ok((theta, scaling))
}

/// Typed, error-reporting reads from a JSON object. Absent keys and `null` both read as None,
/// as `dict.get` does in transformers; a value of the wrong type is an error naming the key.
pub(crate) struct Json<'a>(pub(crate) &'a Map<String, Value>);

impl Json<'_> {
    fn value(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    fn wrong(key: &str, what: &str, v: &Value) -> Error {
        Error::Config(format!("`{key}` must be {what}, got {v}"))
    }

    pub(crate) fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.value(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| Self::wrong(key, "a non-negative integer", v))
            })
            .transpose()
    }

    pub(crate) fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.value(key)
            .map(|v| v.as_f64().ok_or_else(|| Self::wrong(key, "a number", v)))
            .transpose()
    }

    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.value(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| Self::wrong(key, "true or false", v))
            })
            .transpose()
    }

    pub(crate) fn str(&self, key: &str) -> Result<Option<&str>> {
        self.value(key)
            .map(|v| v.as_str().ok_or_else(|| Self::wrong(key, "a string", v)))
            .transpose()
    }

    fn f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| Self::wrong(key, "a list of numbers", v))?;
        items
            .iter()
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| Self::wrong(key, "a list of numbers", v))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub(crate) fn token_id(&self, key: &str) -> Result<Option<u32>> {
        self.value(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| Self::wrong(key, "a token id", v))
            })
            .transpose()
    }

    /// A token id or a list of them (`eos_token_id` takes both forms); null reads as empty.
    pub(crate) fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.value(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| Self::wrong(key, "a token id or a list of token ids", x))
                })
                .collect(),
            Some(_) => Ok(self.token_id(key)?.into_iter().collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<ModelConfig> {
        ModelConfig::from_hf_json(&format!(
            r#"{{"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
                "num_hidden_layers": 2, "vocab_size": 512, "max_position_embeddings": 64 {extra}}}"#
        ))
    }

    #[test]
    fn defaults_follow_llama_config() {
        let c = parse("").unwrap();
        assert_eq!((c.n_kv_heads, c.head_dim), (4, 16));
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(1), vec![2])
        );
        assert_eq!(
            (c.rope_theta, c.rope_scaling),
            (10_000.0, RopeScaling::Default)
        );
        assert!(!c.tie_embeddings && !c.attention_bias && !c.mlp_bias);
        assert_eq!(c.norm_eps, 1e-6);
        let c = ModelConfig::from_hf_json("{}").unwrap();
        assert_eq!(
            (c.dim, c.n_layers, c.vocab_size, c.max_seq_len),
            (4096, 32, 32000, 2048)
        );
    }

    #[test]
    fn v4_and_v5_forms_agree() {
        let v4 = parse(
            r#","rope_theta": 5e5, "torch_dtype": "bfloat16",
               "rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
                                "high_freq_factor": 4, "original_max_position_embeddings": 16}"#,
        )
        .unwrap();
        let v5 = parse(
            r#","dtype": "bfloat16", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
               "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}"#,
        )
        .unwrap();
        assert_eq!(v4, v5);
        assert_eq!(v4.torch_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn precedence_between_rope_keys() {
        // rope_scaling wins over rope_parameters; a theta in the dict wins over the top level.
        let c = parse(
            r#","rope_theta": 5.0, "rope_scaling": {"type": "linear", "factor": 2},
               "rope_parameters": {"rope_type": "yarn", "factor": 4, "rope_theta": 7.0}"#,
        )
        .unwrap();
        assert_eq!(
            (c.rope_theta, c.rope_scaling),
            (5.0, RopeScaling::Linear { factor: 2.0 })
        );
        let c = parse(
            r#","rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}"#,
        )
        .unwrap();
        assert_eq!(c.rope_theta, 7.0);
    }

    #[test]
    fn yarn_fallbacks() {
        let c = parse(
            r#","rope_parameters": {"rope_type": "yarn", "factor": null, "beta_fast": 0,
               "original_max_position_embeddings": 16}"#,
        )
        .unwrap();
        let RopeScaling::Yarn {
            factor,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } = c.rope_scaling
        else {
            panic!("expected yarn, got {:?}", c.rope_scaling)
        };
        assert_eq!(
            (factor, beta_fast, beta_slow, truncate),
            (4.0, 32.0, 1.0, true)
        );
        // A top-level original length (Phi-3 style) overrides the one in the dict.
        let c = parse(
            r#","original_max_position_embeddings": 8,
               "rope_parameters": {"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": 16}"#,
        )
        .unwrap();
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::Yarn {
                original_max_position_embeddings: 8,
                ..
            }
        ));
    }

    #[test]
    fn eos_forms() {
        assert_eq!(
            parse(r#","eos_token_id": [3, 7]"#).unwrap().eos_token_ids,
            vec![3, 7]
        );
        assert_eq!(
            parse(r#","eos_token_id": 5"#).unwrap().eos_token_ids,
            vec![5]
        );
        assert!(parse(r#","eos_token_id": null, "bos_token_id": null"#)
            .unwrap()
            .eos_token_ids
            .is_empty());
        assert!(parse(r#","eos_token_id": [-1]"#).is_err());
    }

    #[test]
    fn bad_configs_are_named() {
        let err = |extra: &str| parse(extra).unwrap_err().to_string();
        assert!(err(r#","rope_parameters": {"rope_type": "su", "factor": 2}"#).contains("`su`"));
        assert!(err(r#","rope_scaling": {"type": "linear"}"#).contains("factor"));
        assert!(err(r#","num_key_value_heads": 3"#).contains("num_key_value_heads"));
        assert!(err(r#","hidden_size": "64""#).contains("hidden_size"));
        assert!(err(r#","model_type": "gpt2""#).contains("gpt2"));
        assert!(err(r#","head_dim": 7"#).contains("even"));
        assert!(err(
            r#","rope_parameters": {"rope_type": "longrope", "short_factor": [1], "long_factor": [1]}"#
        )
        .contains("short_factor"));
        assert!(ModelConfig::from_hf_json("[1]").is_err());
        assert!(ModelConfig::from_hf_json("{").is_err());
    }
}
