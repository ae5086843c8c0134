//! ModelConfig: the shape of a Llama-family model, from an HF config.json (transformers 4 and 5
//! forms) or from GGUF metadata, plus the dimensions derived from it.

use crate::error::{Error, Result};

/// RoPE frequency scheme, as transformers' `ROPE_INIT_FUNCTIONS` names them.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RopeScaling {
    #[default]
    Default,
    Linear {
        factor: f64,
    },
    /// NTK-aware scaling recomputed from the current sequence length once it passes the original.
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
    pub attention_bias: bool,
    pub mlp_bias: bool,
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
        Ok(())
    }
}
