//! The Llama family's architectures: each is Llama plus a few differences, and every difference
//! is data in `ModelConfig` (biases, per-head q/k norms, a sliding window, fused tensors split at
//! load), not another forward pass. `Arch` names the architecture where a file format needs the
//! name (config.json's `model_type`, GGUF's `general.architecture` and key prefix) and carries
//! the defaults transformers' config classes give keys a config.json leaves out.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// LlamaForCausalLM.
    Llama,
    /// MistralForCausalLM: Llama with a sliding attention window.
    Mistral,
    /// Qwen2ForCausalLM (Qwen2, Qwen2.5): biases on q, k and v (not o).
    Qwen2,
    /// Qwen3ForCausalLM: an RMSNorm over each head of q and of k before RoPE.
    Qwen3,
    /// Phi3ForCausalLM (Phi-3, Phi-3.5): q, k, v stored as one `qkv_proj`, gate and up as one
    /// `gate_up_proj` (split at load).
    Phi3,
}

/// transformers' class defaults of the keys whose defaults differ between the architectures.
pub struct Defaults {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

impl Arch {
    pub const ALL: [Arch; 5] = [
        Arch::Llama,
        Arch::Mistral,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
    ];

    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
        }
    }

    /// config.json's `architectures` entry.
    pub fn class_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
            Arch::Phi3 => "Phi3ForCausalLM",
        }
    }

    /// GGUF's `general.architecture` (llama.cpp's converter writes Mistral files as `llama`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama | Arch::Mistral => "llama",
            other => other.model_type(),
        }
    }

    /// The architecture of a config.json: `model_type`, else the first of `architectures`.
    pub fn from_hf(model_type: Option<&str>, class: Option<&str>) -> Result<Arch> {
        let found = match (model_type, class) {
            (Some(t), _) => Arch::ALL.into_iter().find(|a| a.model_type() == t),
            (None, Some(c)) => Arch::ALL.into_iter().find(|a| a.class_name() == c),
            (None, None) => Some(Arch::Llama),
        };
        found.ok_or_else(|| {
            let what = match (model_type, class) {
                (Some(t), _) => format!("model_type `{t}`"),
                (None, c) => format!("architectures `{}`", c.unwrap_or_default()),
            };
            Error::Config(format!(
                "{what} is not supported (supported: {})",
                Arch::ALL.map(|a| a.model_type()).join(", ")
            ))
        })
    }

    /// The architecture of a GGUF file's `general.architecture`.
    pub fn from_gguf(name: &str) -> Result<Arch> {
        [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Phi3]
            .into_iter()
            .find(|a| a.gguf_name() == name)
            .ok_or_else(|| {
                Error::Config(format!(
                    "architecture {name:?} is not supported (supported: llama, qwen2, qwen3, phi3)"
                ))
            })
    }

    /// Whether llama.cpp stored this architecture's q/k rows interleaved per head (it rotates
    /// adjacent pairs for `llama`; the others use the NeoX rotation of the two halves, as HF).
    pub fn gguf_permutes_qk(self) -> bool {
        self.gguf_name() == "llama"
    }

    pub fn defaults(self) -> Defaults {
        let llama = Defaults {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_key_value_heads: None,
            head_dim: None,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        };
        match self {
            Arch::Llama => llama,
            Arch::Mistral => Defaults {
                intermediate_size: 14336,
                num_key_value_heads: Some(8),
                max_position_embeddings: 4096 * 32,
                ..llama
            },
            Arch::Qwen2 | Arch::Qwen3 => Defaults {
                vocab_size: 151936,
                intermediate_size: 22016,
                num_key_value_heads: Some(32),
                head_dim: (self == Arch::Qwen3).then_some(128),
                max_position_embeddings: 32768,
                bos_token_id: None,
                eos_token_id: None,
                ..llama
            },
            Arch::Phi3 => Defaults {
                vocab_size: 32064,
                hidden_size: 3072,
                intermediate_size: 8192,
                max_position_embeddings: 4096,
                rms_norm_eps: 1e-5,
                eos_token_id: Some(32000),
                ..llama
            },
        }
    }
}
