//! Opening a model from disk: an HF folder (config.json, safetensors, tokenizer files,
//! generation_config.json) or a GGUF file. `ModelFiles` holds everything read from the files;
//! `load` uploads the weights to a backend with a progress bar.

use crate::backend::{Backend, MemoryLimits};
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::generation_config::GenerationConfig;
use crate::model::Model;
use crate::tokenizer::{SpecialToken, SpecialTokens, Tokenizer};
use crate::tokenizer_gguf::tokenizer_from_gguf;
use crate::weights::gguf::GgufFile;
use crate::weights::safetensors::SafetensorsSource;
use crate::weights::{load_weights, plan_weights, TensorSource, WeightsPlan};
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
    /// Every error names the file or folder it is about.
    pub fn open(path: &Path) -> Result<ModelFiles> {
        Self::open_unnamed(path).map_err(|e| naming(path, e))
    }

    fn open_unnamed(path: &Path) -> Result<ModelFiles> {
        if path.is_dir() {
            let cfg = ModelConfig::from_hf_dir(path)?;
            let source = SafetensorsSource::open(path)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            let generation = GenerationConfig::from_hf_dir(path)?;
            check_vocab(&cfg, &tokenizer)?;
            return Ok(ModelFiles {
                path: path.into(),
                source: crate::weights::model_source(source, &cfg),
                cfg,
                tokenizer,
                generation,
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
        let tokenizer = Error::contain_panics(
            |m| {
                Error::Tokenizer(format!(
                    "{}: the tokenizer library panicked: {m}",
                    path.display()
                ))
            },
            || {
                Ok(Tokenizer::from_parts(
                    inner,
                    specials,
                    sp.chat_template.clone(),
                ))
            },
        )?;
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
            source: crate::weights::model_source(g, &cfg),
            cfg,
            tokenizer,
            generation,
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

    /// Checks every tensor against the config and works out what running with a context of
    /// `ctx_len` tokens (KV cache in `kv_dtype`, prefill chunks of `chunk` rows) takes.
    pub fn memory_plan(&self, ctx_len: usize, kv_dtype: DType, chunk: usize) -> Result<MemoryPlan> {
        let weights = plan_weights(self.source.as_ref(), &self.cfg, self.gguf)
            .map_err(|e| naming(&self.path, e))?;
        MemoryPlan::new(&self.cfg, weights, ctx_len, kv_dtype, chunk)
    }

    /// Fails with a clear error, before anything is uploaded, when the model with that context
    /// does not fit in `b`'s memory or one of its tensors is larger than `b`'s largest buffer.
    pub fn check_fits<B: Backend>(
        &self,
        b: &B,
        ctx_len: usize,
        kv_dtype: DType,
        chunk: usize,
    ) -> Result<MemoryPlan> {
        let plan = self.memory_plan(ctx_len, kv_dtype, chunk)?;
        plan.check(&b.memory_limits(), &self.name(), &b.device_name())?;
        Ok(plan)
    }

    /// Uploads the weights to `b`, showing a progress bar on stderr when `progress` is set (and
    /// stderr is a terminal). The weights alone are checked against `b`'s memory first; see
    /// `check_fits` for the check that includes the KV cache.
    pub fn load<B: Backend>(&self, b: &B, progress: bool) -> Result<Model<B>> {
        let weights = plan_weights(self.source.as_ref(), &self.cfg, self.gguf)
            .map_err(|e| naming(&self.path, e))?;
        let plan = MemoryPlan {
            weights: weights.bytes,
            largest: weights.largest,
            kv_cache: 0,
            kv_buffer: 0,
            scratch: 0,
            ctx_len: 0,
        };
        plan.check(&b.memory_limits(), &self.name(), &b.device_name())?;
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
        })
        .map_err(|e| naming(&self.path, e))?;
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
            "arch: {} | rope: {} theta {} | rms eps {} | tied embeddings {} | bias qkv {} o {} mlp {}\n",
            c.arch.class_name(),
            c.rope_scaling.rope_type(),
            c.rope_theta,
            c.norm_eps,
            c.tie_embeddings,
            c.attention_bias,
            c.o_bias,
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

/// Device memory a model takes, worked out from the config and tensor metadata alone.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub weights: u64,
    /// The largest weight tensor and its bytes.
    pub largest: (String, u64),
    /// Every layer's K and V buffers together, and one of them.
    pub kv_cache: u64,
    pub kv_buffer: u64,
    /// Activations and logits.
    pub scratch: u64,
    pub ctx_len: usize,
}

impl MemoryPlan {
    /// The plan for `weights` with a context of `ctx_len` tokens. Arithmetic is checked: a size
    /// that overflows is an error, never a wrapped small allocation.
    pub fn new(
        cfg: &ModelConfig,
        weights: WeightsPlan,
        ctx_len: usize,
        kv_dtype: DType,
        chunk: usize,
    ) -> Result<MemoryPlan> {
        let (kv_buffer, kv_cache, scratch) = runtime_bytes(cfg, ctx_len, kv_dtype, chunk)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "a context of {ctx_len} tokens is too large to address for this model"
                ))
            })?;
        Ok(MemoryPlan {
            weights: weights.bytes,
            largest: weights.largest,
            kv_cache,
            kv_buffer,
            scratch,
            ctx_len,
        })
    }

    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.kv_cache)
            .saturating_add(self.scratch)
    }

    /// Compares the plan with what the device reports; unknown limits pass.
    pub fn check(&self, limits: &MemoryLimits, model: &str, device: &str) -> Result<()> {
        let gib = human_bytes;
        if let Some(max) = limits.max_buffer {
            let (name, bytes) = &self.largest;
            if *bytes > max {
                return Err(Error::Device(format!(
                    "{model}: tensor {name} ({}) is larger than the largest buffer {device} can \
                     allocate ({}); it does not fit",
                    gib(*bytes),
                    gib(max)
                )));
            }
            if self.kv_buffer > max {
                return Err(Error::Device(format!(
                    "{model}: one layer's KV cache for {} tokens ({}) is larger than the largest \
                     buffer {device} can allocate ({}); it does not fit",
                    self.ctx_len,
                    gib(self.kv_buffer),
                    gib(max)
                )));
            }
        }
        let room = limits.available.or(limits.total);
        if let Some(room) = room.filter(|&r| self.total() > r) {
            let what = if limits.available.is_some() {
                "available"
            } else {
                "in total"
            };
            let kv = if self.ctx_len > 0 {
                format!(
                    " + KV cache for {} tokens {} + scratch {}",
                    self.ctx_len,
                    gib(self.kv_cache),
                    gib(self.scratch)
                )
            } else {
                String::new()
            };
            return Err(Error::Device(format!(
                "{model} does not fit: it needs {} (weights {}{kv}) but {device} has {} {what}",
                gib(self.total()),
                gib(self.weights),
                gib(room)
            )));
        }
        Ok(())
    }
}

/// "1.5 GiB", "320.0 KiB", "12 bytes".
pub fn human_bytes(b: u64) -> String {
    let units = [
        (1u64 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    match units.iter().find(|(size, _)| b >= *size) {
        Some((size, unit)) => format!("{:.1} {unit}", b as f64 / *size as f64),
        None => format!("{b} bytes"),
    }
}

/// (one KV buffer, the whole KV cache, scratch) in bytes, or None on overflow. Mirrors
/// `KvCache::new` and `Scratch::new`.
pub fn runtime_bytes(
    cfg: &ModelConfig,
    ctx_len: usize,
    kv_dtype: DType,
    chunk: usize,
) -> Option<(u64, u64, u64)> {
    let block = crate::backend::params::KV_BLOCK as u64;
    let elem = if kv_dtype == DType::F16 { 2 } else { 4 };
    let positions = (ctx_len as u64).div_ceil(block).checked_mul(block)?;
    let kv_buffer = positions
        .checked_mul(cfg.kv_dim() as u64)?
        .checked_mul(elem)?;
    let kv_cache = kv_buffer.checked_mul(2 * cfg.n_layers as u64)?;
    let rows = chunk.clamp(1, ctx_len.max(1)) as u64;
    let per_row = 1
        + 3 * cfg.dim as u64
        + 2 * cfg.q_dim() as u64
        + 2 * cfg.kv_dim() as u64
        + 3 * cfg.ffn_dim as u64;
    let scratch = rows
        .checked_mul(per_row)?
        .checked_add(cfg.vocab_size as u64)?
        .checked_mul(4)?;
    Some((kv_buffer, kv_cache, scratch))
}

/// Puts the model's path in front of a config / tokenizer / template message that lacks it
/// (load errors carry their own file).
fn naming(path: &Path, e: Error) -> Error {
    let shown = path.display().to_string();
    let prefix = |m: String| {
        if m.contains(&shown) {
            m
        } else {
            format!("{shown}: {m}")
        }
    };
    match e {
        Error::Config(m) => Error::Config(prefix(m)),
        Error::Tokenizer(m) => Error::Tokenizer(prefix(m)),
        Error::Template(m) => Error::Template(prefix(m)),
        other => other,
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
