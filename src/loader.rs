//! Opening a model from disk: an HF folder (config.json, safetensors, tokenizer files,
//! generation_config.json) or a GGUF file. `ModelFiles` holds everything read from the files;
//! `load` uploads the weights to a backend with a progress bar.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generation_config::GenerationConfig;
use crate::model::Model;
use crate::tokenizer::{SpecialToken, SpecialTokens, Tokenizer};
use crate::tokenizer_gguf::tokenizer_from_gguf;
use crate::weights::gguf::GgufFile;
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::{load_weights, TensorSource};
use std::path::{Path, PathBuf};

pub struct ModelFiles {
    pub path: PathBuf,
    pub cfg: ModelConfig,
    pub tokenizer: Tokenizer,
    pub generation: Option<GenerationConfig>,
    pub source: Box<dyn TensorSource>,
    /// GGUF tensor naming (else HF naming).
    pub gguf: bool,
}

impl ModelFiles {
    /// Opens an HF model folder or a `.gguf` file (memory-mapped; nothing is uploaded yet).
    pub fn open(path: &Path) -> Result<ModelFiles> {
        if path.is_dir() {
            let cfg = ModelConfig::from_hf_dir(path)?;
            let source = SafetensorsSource::open(path)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            let generation = GenerationConfig::from_hf_dir(path)?;
            check_vocab(&cfg, &tokenizer)?;
            return Ok(ModelFiles {
                path: path.into(),
                cfg,
                tokenizer,
                generation,
                source: Box::new(source),
                gguf: false,
            });
        }
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Self::open_gguf(path);
        }
        if !path.exists() {
            return Err(Error::load(path, "no such file or folder"));
        }
        Err(Error::load(
            path,
            "not a model folder (config.json + *.safetensors) or a .gguf file",
        ))
    }

    fn open_gguf(path: &Path) -> Result<ModelFiles> {
        let g = GgufFile::open(path)?;
        let cfg = g.model_config()?;
        let (inner, sp) = tokenizer_from_gguf(&g)?;
        let token = |id: Option<u32>, text: Option<String>| -> Option<SpecialToken> {
            let id = id?;
            let text = text.or_else(|| inner.id_to_token(id))?;
            Some(SpecialToken { id, text })
        };
        let specials = SpecialTokens {
            bos: token(sp.bos_id, sp.bos.clone()),
            eos: token(sp.eos_id, sp.eos.clone()),
            unk: token(sp.unk_id, None),
            pad: token(sp.pad_id, None),
            other: Vec::new(),
            add_bos: sp.add_bos,
            add_eos: sp.add_eos,
        };
        let tokenizer = Tokenizer::from_parts(inner, specials, sp.chat_template.clone());
        check_vocab(&cfg, &tokenizer)?;
        // A GGUF file has no generation_config.json: end on EOS and on the end-of-turn token.
        let mut eos = cfg.eos_token_ids.clone();
        eos.extend(sp.eot_id.filter(|id| !eos.contains(id)));
        let generation = Some(GenerationConfig {
            eos_token_ids: eos,
            ..Default::default()
        });
        Ok(ModelFiles {
            path: path.into(),
            cfg,
            tokenizer,
            generation,
            source: Box::new(g),
            gguf: true,
        })
    }

    /// A short name for messages: the folder or file name.
    pub fn name(&self) -> String {
        self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// Token ids that end generation: generation_config.json's, else the config's, else the
    /// tokenizer's.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self
            .generation
            .as_ref()
            .map(|g| g.eos_token_ids.clone())
            .unwrap_or_default();
        if ids.is_empty() {
            ids = self.cfg.eos_token_ids.clone();
        }
        if ids.is_empty() {
            ids = self.tokenizer.eos_ids();
        }
        ids
    }

    /// Uploads the weights to `b`, showing a progress bar on stderr when `progress` is set (and
    /// stderr is a terminal).
    pub fn load<B: Backend>(&self, b: &B, progress: bool) -> Result<Model<B>> {
        let total = self.source.total_bytes();
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total as u64),
            if progress {
                indicatif::ProgressDrawTarget::stderr()
            } else {
                indicatif::ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "loading {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("{} on {}", self.name(), b.name()));
        let weights = load_weights(b, self.source.as_ref(), &self.cfg, self.gguf, &|n| {
            bar.inc(n as u64)
        })?;
        b.sync()?;
        bar.finish_and_clear();
        Model::new(b, self.cfg.clone(), weights)
    }

    /// What `anyllama info` prints.
    pub fn describe(&self) -> String {
        let c = &self.cfg;
        let mut s = format!(
            "model: {}\nformat: {}\n",
            self.path.display(),
            if self.gguf { "gguf" } else { "hf safetensors" }
        );
        s += &format!(
            "layers {} | dim {} | ffn {} | heads {} (kv {}) | head_dim {} | vocab {} | context {}\n",
            c.n_layers, c.dim, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.max_seq_len
        );
        s += &format!(
            "rope: {} theta {} | rms eps {} | tied embeddings {} | bias attn {} mlp {}\n",
            c.rope_scaling.rope_type(),
            c.rope_theta,
            c.norm_eps,
            c.tie_embeddings,
            c.attention_bias,
            c.mlp_bias
        );
        let mut by_dtype = std::collections::BTreeMap::<String, (usize, usize)>::new();
        let mut names = self.source.names();
        names.sort();
        for n in &names {
            if let Ok(Some(t)) = self.source.get(n) {
                let e = by_dtype.entry(t.dtype.to_string()).or_default();
                e.0 += 1;
                e.1 += t.data.len();
            }
        }
        for (d, (n, bytes)) in by_dtype {
            s += &format!("tensors {d}: {n} ({:.1} MB)\n", bytes as f64 / 1e6);
        }
        s += &format!(
            "tokenizer: {} tokens | eos ids {:?}\n",
            self.tokenizer.vocab_size(),
            self.eos_ids()
        );
        s += &format!(
            "chat template: {}\n",
            if self.tokenizer.chat_template().is_some() {
                "yes"
            } else {
                "none"
            }
        );
        s
    }
}

/// Every id the tokenizer can produce must exist in the embedding table.
fn check_vocab(cfg: &ModelConfig, tok: &Tokenizer) -> Result<()> {
    let n = tok.vocab_size();
    if n > cfg.vocab_size {
        return Err(Error::Config(format!(
            "the tokenizer has {n} tokens but the model's embedding only {}: token ids past it cannot run",
            cfg.vocab_size
        )));
    }
    Ok(())
}
