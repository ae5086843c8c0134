//! Training checkpoints: everything a run needs to continue bit for bit, in one folder.
//!
//! ```text
//! DIR/checkpoint-STEP/
//!   adapter_config.json, adapter_model.safetensors   LoRA: the adapter, PEFT's format (peft.rs)
//!   model.safetensors                                full fine-tuning: every trained tensor
//!                                                    under its HF name, in its stored dtype
//!   optimizer.safetensors                            AdamW per tensor: NAME.exp_avg,
//!                                                    NAME.exp_avg_sq, NAME.master (f16 / bf16)
//!   trainer_state.json                               step, epoch and position in it, the
//!                                                    dropout counters, the configs, the shape
//! ```
//! A checkpoint is written into `.checkpoint-STEP.tmp` and renamed into place when complete,
//! so an interrupted save never leaves a half checkpoint that `latest` would pick.

use crate::backend::train::TrainBackend;
use crate::config::ModelConfig;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::train::lora::LoraConfig;
use crate::train::optim::{OptimConfig, SavedState};
use crate::train::params::{visit, Param, Trained};
use crate::train::peft;
use crate::train::step::Trainer;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Bumped when the layout changes; an older or newer checkpoint is refused, not misread.
pub const FORMAT: u32 = 1;

/// Where a run stands: what `trainer_state.json` records besides the configs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Optimizer steps done.
    pub step: usize,
    pub epoch: usize,
    /// Micro-batches of `epoch` already trained on.
    pub index: usize,
    /// Rows trained on so far.
    pub tokens: u64,
    /// Seconds of training so far (informational: logs and ETA).
    pub elapsed_s: f64,
}

/// The model's shape as a checkpoint records it, to refuse another model's checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
}

impl Shape {
    pub fn of(c: &ModelConfig) -> Shape {
        Shape {
            vocab_size: c.vocab_size,
            hidden_size: c.dim,
            intermediate_size: c.ffn_dim,
            num_hidden_layers: c.n_layers,
            num_attention_heads: c.n_heads,
            num_key_value_heads: c.n_kv_heads,
            head_dim: c.head_dim,
        }
    }

    /// "hidden_size 32 (this model: 48), ..." for every field that differs.
    fn diff(&self, now: &Shape) -> Vec<String> {
        let (a, b) = (serde_json::json!(self), serde_json::json!(now));
        let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k} {v} (this model: {})", b[k]))
            .collect()
    }
}

/// The LoRA settings as a checkpoint records them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraState {
    pub r: usize,
    pub alpha: f32,
    pub rslora: bool,
    pub dropout: f32,
    pub targets: Vec<String>,
}

impl LoraState {
    pub fn of(c: &LoraConfig) -> LoraState {
        LoraState {
            r: c.r,
            alpha: c.alpha,
            rslora: c.rslora,
            dropout: c.dropout,
            targets: c.targets.iter().map(|p| p.module().to_string()).collect(),
        }
    }
}

/// `trainer_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub position: Position,
    /// The trainer's dropout base seed and micro-batch counter (its masks' RNG state).
    pub dropout_seed: u32,
    pub micro: u32,
    /// "lora" or "full".
    pub trained: String,
    pub model: Shape,
    pub lora: Option<LoraState>,
    pub optim: OptimConfig,
    /// The run's settings (run.rs's RunConfig), kept for the record.
    pub run: serde_json::Value,
}

fn trained_name(t: Trained) -> &'static str {
    match t {
        Trained::Lora => "lora",
        Trained::Full => "full",
    }
}

/// `DIR/checkpoint-STEP`.
pub fn path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("checkpoint-{step}"))
}

/// The checkpoint of the highest step in `dir` (only complete ones: the rename is the last
/// thing a save does), or None.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

/// Every complete checkpoint in `dir`, lowest step first.
pub fn list(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::load(dir, e.to_string())),
    };
    for e in entries {
        let e = e?;
        let name = e.file_name();
        let step = name.to_str().and_then(|n| n.strip_prefix("checkpoint-"));
        if let Some(step) = step.and_then(|s| s.parse::<usize>().ok()) {
            if e.path().join(STATE_FILE).is_file() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes all but the newest `keep` checkpoints in `dir`.
pub fn prune(dir: &Path, keep: usize) -> Result<()> {
    let all = list(dir)?;
    for (_, p) in &all[..all.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(p)?;
    }
    Ok(())
}

/// Writes `DIR/checkpoint-STEP` for the run at `pos` (atomically: temp folder, then rename).
/// `base_model` goes into the adapter's config for PEFT.
pub fn save<B: TrainBackend>(
    b: &B,
    m: &mut Model<B>,
    t: &Trainer<B>,
    pos: Position,
    run: serde_json::Value,
    base_model: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let done = path(dir, pos.step);
    let tmp = dir.join(format!(".checkpoint-{}.tmp", pos.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?; // left by a save that was interrupted
    }
    std::fs::create_dir_all(&tmp)?;
    match t.trained {
        Trained::Lora => {
            let lora = m.lora.as_ref().ok_or_else(|| {
                Error::Usage("LoRA checkpoint of a model without adapters".into())
            })?;
            peft::save(b, lora, base_model, &tmp)?;
        }
        Trained::Full => save_weights(b, m, t, &tmp.join(MODEL_FILE))?,
    }
    save_optimizer(b, t, &tmp.join(OPTIMIZER_FILE))?;
    let state = State {
        format: FORMAT,
        position: pos,
        dropout_seed: t.dropout_seed,
        micro: t.micro,
        trained: trained_name(t.trained).into(),
        model: Shape::of(&m.cfg),
        lora: m.lora.as_ref().map(|l| LoraState::of(&l.cfg)),
        optim: t.optim.cfg,
        run,
    };
    let text = serde_json::to_string_pretty(&state).expect("the state serializes");
    write_synced(&tmp.join(STATE_FILE), (text + "\n").as_bytes())?;
    if done.exists() {
        // The same step saved again (a resumed run re-reaching it): move the old one aside
        // first, so that some complete checkpoint-STEP exists at every moment.
        let old = dir.join(format!(".checkpoint-{}.old", pos.step));
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&done, &old)?;
        std::fs::rename(&tmp, &done)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&tmp, &done)?;
    }
    Ok(done)
}

/// Writes a file and flushes it to the disk, so the rename that follows never publishes a
/// checkpoint whose last file is still only in the page cache.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn st_dtype(d: DType) -> Option<Dtype> {
    match d {
        DType::F32 => Some(Dtype::F32),
        DType::F16 => Some(Dtype::F16),
        DType::BF16 => Some(Dtype::BF16),
        _ => None,
    }
}

/// (name, dtype, shape, bytes) of every trained tensor, read back from the device.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn write_safetensors(path: &Path, tensors: &Tensors) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, raw)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), raw)
                .map_err(|e| Error::Usage(format!("checkpoint tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(views, None).map_err(|e| Error::load(path, e.to_string()))?;
    write_synced(path, &bytes)
}

fn save_weights<B: TrainBackend>(
    b: &B,
    m: &mut Model<B>,
    t: &Trainer<B>,
    path: &Path,
) -> Result<()> {
    let mut tensors: Tensors = Vec::new();
    visit(m, &t.grads, |name, p, _| {
        let (dtype, shape, buf) = match p {
            Param::Weight(w) => (w.dtype, vec![w.rows, w.cols], &w.buf),
            Param::Vector(v) => (DType::F32, vec![v.len() / 4], &*v),
        };
        let n: usize = shape.iter().product();
        let st = st_dtype(dtype)
            .ok_or_else(|| Error::Usage(format!("{name} is {dtype}: not a trainable dtype")))?;
        let mut raw = vec![0u8; n * if st == Dtype::F32 { 4 } else { 2 }];
        b.read(buf, 0, &mut raw)?;
        tensors.push((name.to_string(), st, shape, raw));
        Ok(())
    })?;
    write_safetensors(path, &tensors)
}

fn save_optimizer<B: TrainBackend>(b: &B, t: &Trainer<B>, path: &Path) -> Result<()> {
    let f32s = |v: &[f32]| -> (Dtype, Vec<usize>, Vec<u8>) {
        (Dtype::F32, vec![v.len()], bytemuck::cast_slice(v).to_vec())
    };
    let mut tensors: Tensors = Vec::new();
    for (name, s) in t.optim.save_state(b)? {
        let parts = [("exp_avg", Some(&s.m)), ("exp_avg_sq", Some(&s.v))];
        for (which, v) in parts.into_iter().chain([("master", s.master.as_ref())]) {
            if let Some(v) = v {
                let (d, shape, raw) = f32s(v);
                tensors.push((format!("{name}.{which}"), d, shape, raw));
            }
        }
    }
    write_safetensors(path, &tensors)
}

/// Loads the checkpoint in `ckpt` into a model and trainer built as the run that saved it
/// (the same model, the same LoRA settings): the trained tensors, the optimizer state and the
/// dropout counters. Returns the saved state; its position says where to continue.
pub fn load<B: TrainBackend>(
    b: &B,
    m: &mut Model<B>,
    t: &mut Trainer<B>,
    ckpt: &Path,
) -> Result<State> {
    let state = read_state(ckpt)?;
    check_compatible(&state, m, t, &ckpt.join(STATE_FILE))?;
    match t.trained {
        Trained::Lora => {
            let lora = peft::load(b, &m.cfg, ckpt)?;
            let want = &m.lora.as_ref().expect("checked above").cfg;
            if &lora.cfg != want {
                return Err(Error::load(
                    ckpt.join(peft::CONFIG_FILE),
                    format!("LoRA settings {:?}, this run's are {:?}", lora.cfg, want),
                ));
            }
            m.lora = Some(lora);
        }
        Trained::Full => load_weights(b, m, t, &ckpt.join(MODEL_FILE))?,
    }
    let saved = load_optimizer(m, t, &ckpt.join(OPTIMIZER_FILE))?;
    t.optim.load_state(b, saved)?;
    t.optim.steps = state.position.step;
    t.dropout_seed = state.dropout_seed;
    t.micro = state.micro;
    Ok(state)
}

/// Reads and parses `trainer_state.json`.
pub fn read_state(ckpt: &Path) -> Result<State> {
    let path = ckpt.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::NotFound {
            "missing: not a training checkpoint (or one whose save did not finish)".to_string()
        } else {
            e.to_string()
        };
        Error::load(&path, why)
    })?;
    let state: State = serde_json::from_str(&text)
        .map_err(|e| Error::load(&path, format!("not a valid trainer state: {e}")))?;
    if state.format != FORMAT {
        return Err(Error::load(
            &path,
            format!(
                "checkpoint format {}, this build reads {FORMAT}",
                state.format
            ),
        ));
    }
    Ok(state)
}

/// The checkpoint must come from a run of this model shape, trained the same way.
fn check_compatible<B: TrainBackend>(
    s: &State,
    m: &Model<B>,
    t: &Trainer<B>,
    path: &Path,
) -> Result<()> {
    let err = |msg: String| Err(Error::load(path, msg));
    let diff = s.model.diff(&Shape::of(&m.cfg));
    if !diff.is_empty() {
        return err(format!("saved for another model: {}", diff.join(", ")));
    }
    if s.trained != trained_name(t.trained) {
        return err(format!(
            "a {} fine-tuning checkpoint, this run trains {}",
            s.trained,
            trained_name(t.trained)
        ));
    }
    let now = m.lora.as_ref().map(|l| LoraState::of(&l.cfg));
    match (&s.lora, &now) {
        (Some(a), Some(b)) if a.r != b.r => {
            err(format!("LoRA rank {}, this run's is {}", a.r, b.r))
        }
        (Some(a), Some(b)) if a != b => err(format!("LoRA settings {a:?}, this run's are {b:?}")),
        (None, Some(_)) if t.trained == Trained::Lora => {
            err("no LoRA adapter, this run trains one".into())
        }
        (_, None) if t.trained == Trained::Lora => {
            err("a LoRA checkpoint, the model has no adapters to load it into".into())
        }
        _ => Ok(()),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::load(path, e.to_string()))
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::load(path, format!("corrupt: {e}")))
}

fn load_weights<B: TrainBackend>(
    b: &B,
    m: &mut Model<B>,
    t: &Trainer<B>,
    path: &Path,
) -> Result<()> {
    let bytes = read_file(path)?;
    let st = parse(path, &bytes)?;
    visit(m, &t.grads, |name, p, _| {
        let tensor = st
            .tensor(name)
            .map_err(|_| Error::load(path, format!("{name} is missing")))?;
        let (dtype, shape, buf) = match p {
            Param::Weight(w) => (w.dtype, vec![w.rows, w.cols], &mut w.buf),
            Param::Vector(v) => (DType::F32, vec![v.len() / 4], v),
        };
        if st_dtype(dtype) != Some(tensor.dtype()) || tensor.shape() != shape.as_slice() {
            return Err(Error::load(
                path,
                format!(
                    "{name} is {:?} {:?}, this model's is {dtype} {shape:?}",
                    tensor.dtype(),
                    tensor.shape()
                ),
            ));
        }
        b.upload(buf, 0, tensor.data())
    })
}

/// The optimizer state of every trained tensor, checked against the tensor's size (and, for
/// an f16 / bf16 weight, the presence of its master copy).
fn load_optimizer<B: TrainBackend>(
    m: &mut Model<B>,
    t: &Trainer<B>,
    path: &Path,
) -> Result<Vec<(String, SavedState)>> {
    let bytes = read_file(path)?;
    let st = parse(path, &bytes)?;
    let mut by_name: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    let get = |key: String, n: usize| -> Result<Option<Vec<f32>>> {
        let Ok(tensor) = st.tensor(&key) else {
            return Ok(None);
        };
        if tensor.dtype() != Dtype::F32 || tensor.shape() != [n] {
            return Err(Error::load(
                path,
                format!(
                    "{key} is {:?} {:?}, expected F32 [{n}]",
                    tensor.dtype(),
                    tensor.shape()
                ),
            ));
        }
        Ok(Some(bytemuck::pod_collect_to_vec(tensor.data())))
    };
    // Before the first step there is no state at all; afterwards every tensor has some.
    let empty = st.is_empty();
    visit(m, &t.grads, |name, p, _| {
        if empty {
            return Ok(());
        }
        let n = p.elements();
        let missing = |what: &str| Error::load(path, format!("{name}.{what} is missing"));
        let m1 = get(format!("{name}.exp_avg"), n)?.ok_or_else(|| missing("exp_avg"))?;
        let v = get(format!("{name}.exp_avg_sq"), n)?.ok_or_else(|| missing("exp_avg_sq"))?;
        let half = matches!(&p, Param::Weight(w) if w.dtype != DType::F32);
        let master = get(format!("{name}.master"), n)?;
        if half && master.is_none() {
            return Err(missing("master"));
        }
        by_name.insert(name.to_string());
        out.push((name.to_string(), SavedState { m: m1, v, master }));
        Ok(())
    })?;
    if let Some(extra) = st
        .names()
        .into_iter()
        .map(|k| k.rsplit_once('.').map_or(k, |(n, _)| n))
        .find(|n| !empty && !by_name.contains(*n))
    {
        return Err(Error::load(
            path,
            format!("state for {extra}, which this run does not train"),
        ));
    }
    Ok(out)
}
