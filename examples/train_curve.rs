//! LoRA training over prepared batches with the library API, for the loss-curve comparison with
//! HF transformers + PEFT (bench/train_curve.py prepares DIR and runs the peer):
//!   cargo run --release [--features cuda] --example train_curve -- \
//!       --model <HF folder or .gguf> --dir DIR [--backend cuda|cpu] [--checkpointing layer]
//! DIR holds batches.json ({"steps": [[{"tokens", "labels"}, ...], ...]}: each step one packed
//! micro-batch of those sequences, labels already shifted, -100 ignored), hparams.json (lr,
//! betas, eps, weight_decay, max_grad_norm, schedule, warmup_steps, total_steps) and
//! adapter_init/ (a PEFT adapter, the common starting point). Writes DIR/ours.json (losses,
//! grad_norms, lrs, step_seconds, backend) and the trained adapter as DIR/ours_adapter/.

use anyllama::backend::select::{with_train_backend, BackendChoice, WithTrainBackend};
use anyllama::backend::train::TrainBackend;
use anyllama::loader::ModelFiles;
use anyllama::train::optim::{OptimConfig, Schedule};
use anyllama::train::params::Trained;
use anyllama::train::peft;
use anyllama::train::step::{Checkpointing, MicroBatch, Trainer};
use anyllama::{Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Job {
    model: PathBuf,
    dir: PathBuf,
    ckpt: Checkpointing,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::Usage(format!("{}: {e}", path.display())))
}

fn optim(h: &Value) -> Result<OptimConfig> {
    let f = |k: &str| {
        h[k].as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| Error::Usage(format!("hparams.json: `{k}` is missing")))
    };
    let schedule = match h["schedule"].as_str().unwrap_or("constant") {
        "cosine" => Schedule::Cosine,
        "linear" => Schedule::Linear,
        "constant" => Schedule::Constant,
        s => {
            return Err(Error::Usage(format!(
                "hparams.json: unknown schedule {s:?}"
            )))
        }
    };
    Ok(OptimConfig {
        lr: f("lr")?,
        beta1: h["betas"][0].as_f64().unwrap_or(0.9) as f32,
        beta2: h["betas"][1].as_f64().unwrap_or(0.999) as f32,
        eps: f("eps")?,
        weight_decay: f("weight_decay")?,
        max_grad_norm: h["max_grad_norm"].as_f64().map(|v| v as f32),
        schedule,
        warmup_steps: h["warmup_steps"].as_u64().unwrap_or(0) as usize,
        total_steps: h["total_steps"].as_u64().unwrap_or(1) as usize,
    })
}

fn batches(v: &Value) -> Result<Vec<MicroBatch>> {
    let bad = || Error::Usage("batches.json: expected {\"steps\": [[{tokens, labels}]]}".into());
    let steps = v["steps"].as_array().ok_or_else(bad)?;
    steps
        .iter()
        .map(|step| {
            let mut mb = MicroBatch::default();
            for seq in step.as_array().ok_or_else(bad)? {
                let tokens: Vec<u32> =
                    serde_json::from_value(seq["tokens"].clone()).map_err(|_| bad())?;
                let labels: Vec<i32> =
                    serde_json::from_value(seq["labels"].clone()).map_err(|_| bad())?;
                mb.lens.push(tokens.len());
                mb.tokens.extend(tokens);
                mb.labels.extend(labels);
            }
            Ok(mb)
        })
        .collect()
}

impl WithTrainBackend for Job {
    type Output = ();
    fn run<B: TrainBackend>(self, b: B) -> Result<()> {
        let files = ModelFiles::open(&self.model)?;
        let mut m = files.load(&b, true)?;
        m.lora = Some(peft::load(&b, &m.cfg, &self.dir.join("adapter_init"))?);
        let cfg = optim(&read_json(&self.dir.join("hparams.json"))?)?;
        let mbs = batches(&read_json(&self.dir.join("batches.json"))?)?;
        let rows = mbs.iter().map(|mb| mb.tokens.len()).max().unwrap_or(1);
        let mut t = Trainer::new(&b, &m, Trained::Lora, self.ckpt, rows, cfg)?;
        let (mut losses, mut norms, mut lrs, mut secs) = (vec![], vec![], vec![], vec![]);
        for (i, mb) in mbs.iter().enumerate() {
            let start = Instant::now();
            let s = t.step(&b, &mut m, std::slice::from_ref(mb))?;
            secs.push(start.elapsed().as_secs_f64());
            losses.push(s.loss);
            norms.push(s.info.grad_norm);
            lrs.push(s.info.lr);
            if i % 25 == 0 || i + 1 == mbs.len() {
                eprintln!(
                    "step {:>4}/{}: loss {:.4}, grad norm {:.3}, lr {:.2e}, {:.0} tok/s",
                    i + 1,
                    mbs.len(),
                    s.loss,
                    s.info.grad_norm,
                    s.info.lr,
                    mb.tokens.len() as f64 / secs[i]
                );
            }
        }
        let out = json!({
            "losses": losses,
            "grad_norms": norms,
            "lrs": lrs,
            "step_seconds": secs,
            "backend": format!("anyllama {} ({})", b.name(), b.device_name()),
        });
        std::fs::write(self.dir.join("ours.json"), out.to_string())?;
        let lora = m.lora.as_ref().expect("set above");
        let base = self.model.display().to_string();
        peft::save(&b, lora, &base, &self.dir.join("ours_adapter"))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let (Some(model), Some(dir)) = (value("--model"), value("--dir")) else {
        eprintln!("usage: train_curve --model MODEL --dir DIR [--backend cuda|cpu] [--checkpointing off|layer|offload]");
        std::process::exit(2);
    };
    let choice = match value("--backend").as_deref() {
        Some("cpu") => BackendChoice::Cpu,
        Some("cuda") => BackendChoice::Cuda,
        _ => BackendChoice::Auto,
    };
    let ckpt = match value("--checkpointing").as_deref() {
        Some("off") => Checkpointing::Off,
        Some("offload") => Checkpointing::Offload,
        _ => Checkpointing::Layer,
    };
    let job = Job {
        model: model.into(),
        dir: dir.into(),
        ckpt,
    };
    if let Err(e) = with_train_backend(choice, None, job) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
