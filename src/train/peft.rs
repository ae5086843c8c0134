//! LoRA adapters in HF PEFT's on-disk format: `adapter_config.json` (r, lora_alpha, use_rslora,
//! target_modules) and `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (A [r, in], B [out, r]).
//! Read (`read` into host memory, checked against the model's shapes; `load` then uploads it):
//! f32, f16 or bf16 tensors, widened to f32. Written: f32, the way PEFT saves an adapter
//! trained in f32, so `PeftModel.from_pretrained` loads it unchanged.

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::train::lora::{peft_key, Lora, LoraConfig, Proj};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn load_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Load {
        path: path.display().to_string(),
        msg: msg.into(),
    }
}

/// The LoRA settings of a PEFT `adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| load_err(&path, e.to_string()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| load_err(&path, e.to_string()))?;
    let peft_type = v["peft_type"].as_str().unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(load_err(
            &path,
            format!("peft_type {peft_type}: only LORA adapters load"),
        ));
    }
    if v["use_dora"].as_bool() == Some(true) {
        return Err(load_err(
            &path,
            "a DoRA adapter (use_dora): only plain LoRA loads",
        ));
    }
    // Per-module ranks and alphas, or adapters on some layers only, are not read: refuse them
    // rather than apply the wrong scale.
    for key in ["rank_pattern", "alpha_pattern"] {
        if v[key].as_object().is_some_and(|m| !m.is_empty()) {
            return Err(load_err(
                &path,
                format!("`{key}` (per-module ranks or alphas) is not supported"),
            ));
        }
    }
    if !v["layers_to_transform"].is_null() {
        return Err(load_err(
            &path,
            "`layers_to_transform` (adapters on some layers only) is not supported",
        ));
    }
    let r = v["r"]
        .as_u64()
        .filter(|&r| r > 0)
        .ok_or_else(|| load_err(&path, "`r` is missing or not a positive integer"))?;
    let alpha = v["lora_alpha"]
        .as_f64()
        .ok_or_else(|| load_err(&path, "`lora_alpha` is missing or not a number"))?;
    let targets = match &v["target_modules"] {
        Value::String(s) if s == "all-linear" => Proj::ALL.to_vec(),
        Value::Array(names) => names
            .iter()
            .map(|n| {
                let n = n.as_str().unwrap_or_default();
                Proj::parse(n).ok_or_else(|| {
                    load_err(
                        &path,
                        format!("target module {n:?} is not a Llama projection"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?,
        other => {
            return Err(load_err(
                &path,
                format!("target_modules {other}: expected a list of module names"),
            ))
        }
    };
    let mut targets: Vec<Proj> = Proj::ALL
        .into_iter()
        .filter(|p| targets.contains(p))
        .collect();
    targets.dedup();
    Ok(LoraConfig {
        r: r as usize,
        alpha: alpha as f32,
        rslora: v["use_rslora"].as_bool().unwrap_or(false),
        targets,
        dropout: v["lora_dropout"].as_f64().unwrap_or(0.0) as f32,
    })
}

/// Widens a safetensors tensor of f32 / f16 / bf16 values to f32.
fn f32_values(
    path: &Path,
    name: &str,
    t: &safetensors::tensor::TensorView<'_>,
) -> Result<Vec<f32>> {
    let d = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(load_err(
                path,
                format!("{name} is {other:?}, not f32, f16 or bf16"),
            ))
        }
    })
}

/// One projection's adapter on the host: (A [r * in], B [out * r]) as f32.
pub type HostMatrices = (Vec<f32>, Vec<f32>);

/// A PEFT LoRA adapter read into host memory and checked against a model's shapes.
pub struct HostAdapter {
    pub cfg: LoraConfig,
    /// Per layer, per projection (`Proj::index`), the adapter where the projection is a target.
    pub layers: Vec<[Option<HostMatrices>; 7]>,
}

impl HostAdapter {
    /// A and B of layer `layer`'s projection `p`, if it is a target.
    pub fn get(&self, layer: usize, p: Proj) -> Option<(&[f32], &[f32])> {
        self.layers
            .get(layer)?
            .get(p.index())?
            .as_ref()
            .map(|(a, b)| (a.as_slice(), b.as_slice()))
    }
}

/// Reads a PEFT LoRA adapter folder for a model of config `model` into host memory: every
/// tensor must be the `lora_A` / `lora_B` matrix of a target projection of one of the model's
/// layers, with the shape the model and the rank imply. Errors name the file and the tensor.
pub fn read(dir: &Path, model: &ModelConfig) -> Result<HostAdapter> {
    let cfg = read_config(dir)?;
    cfg.check()
        .map_err(|e| load_err(&dir.join(CONFIG_FILE), e.to_string()))?;
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| load_err(&path, e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| load_err(&path, e.to_string()))?;
    let expected: std::collections::HashSet<String> = (0..model.n_layers)
        .flat_map(|i| {
            cfg.targets
                .iter()
                .flat_map(move |&p| [peft_key(i, p, 'A'), peft_key(i, p, 'B')])
        })
        .collect();
    let mut unknown: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !expected.contains(*n))
        .map(str::to_string)
        .collect();
    if !unknown.is_empty() {
        unknown.sort();
        let targets: Vec<&str> = cfg.targets.iter().map(|p| p.module()).collect();
        return Err(load_err(
            &path,
            format!(
                "{} tensor(s) are not LoRA matrices of this model (lora_A / lora_B of the \
                 config's target modules {} in layers 0..{}): {}",
                unknown.len(),
                targets.join(", "),
                model.n_layers,
                unknown.join(", ")
            ),
        ));
    }
    let get = |name: String, shape: [usize; 2], base: String| -> Result<Vec<f32>> {
        let t = st
            .tensor(&name)
            .map_err(|_| load_err(&path, format!("{name} is missing")))?;
        if t.shape() != shape {
            return Err(load_err(
                &path,
                format!(
                    "{name} is {:?}, this model needs {shape:?} (rank {}, base weight {base})",
                    t.shape(),
                    cfg.r
                ),
            ));
        }
        f32_values(&path, &name, &t)
    };
    let r = cfg.r;
    let mut layers = Vec::with_capacity(model.n_layers);
    for i in 0..model.n_layers {
        let mut l: [Option<HostMatrices>; 7] = Default::default();
        for &p in &cfg.targets {
            let (out, inp) = p.shape(model);
            let base = format!("{}.weight [{out}, {inp}]", p.hf_path(i));
            l[p.index()] = Some((
                get(peft_key(i, p, 'A'), [r, inp], base.clone())?,
                get(peft_key(i, p, 'B'), [out, r], base)?,
            ));
        }
        layers.push(l);
    }
    Ok(HostAdapter { cfg, layers })
}

/// Reads a PEFT LoRA adapter folder for a model of config `model` (see [`read`]) and uploads it.
pub fn load<B: Backend>(b: &B, model: &ModelConfig, dir: &Path) -> Result<Lora<B>> {
    let mut host = read(dir, model)?;
    let cfg = host.cfg.clone();
    Lora::from_values(b, model, cfg, |i, p| {
        host.layers[i][p.index()]
            .take()
            .ok_or_else(|| Error::Usage(format!("no adapter for {}", p.hf_path(i))))
    })
}

/// Writes `lora` as a PEFT adapter folder: f32 tensors and a config naming `base_model`.
pub fn save<B: Backend>(b: &B, lora: &Lora<B>, base_model: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (i, layer) in lora.layers.iter().enumerate() {
        for p in Proj::ALL {
            if let Some(ad) = &layer[p.index()] {
                for (which, w) in [('A', &ad.a), ('B', &ad.b)] {
                    let mut raw = vec![0u8; w.rows * w.cols * 4];
                    b.read(&w.buf, 0, &mut raw)?;
                    tensors.push((peft_key(i, p, which), vec![w.rows, w.cols], raw));
                }
            }
        }
    }
    let views = tensors
        .iter()
        .map(|(name, shape, raw)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), raw)
                .map_err(|e| Error::Usage(format!("adapter tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let path = dir.join(WEIGHTS_FILE);
    let meta = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    safetensors::serialize_to_file(views, meta, &path)
        .map_err(|e| load_err(&path, e.to_string()))?;
    let c = &lora.cfg;
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.r,
        "lora_alpha": c.alpha,
        "use_rslora": c.rslora,
        "lora_dropout": c.dropout,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "target_modules": c.targets.iter().map(|p| p.module()).collect::<Vec<_>>(),
        "modules_to_save": null,
        "use_dora": false,
    });
    let text = serde_json::to_string_pretty(&config).expect("a json value serializes");
    std::fs::write(dir.join(CONFIG_FILE), text + "\n")?;
    Ok(())
}
