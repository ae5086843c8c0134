//! `anyllama train`: the flags become a dataset, a model with fresh adapters (or every weight
//! trainable), a trainer and the run loop of anyllama::train::run; at the end --out holds the
//! PEFT adapter (or, with --full, an HF folder of the fine-tuned model) beside the tokenizer,
//! log.jsonl, loss.png and the last checkpoint.
//!
//! ```text
//! train.jsonl --tokenize (cached in OUT/cache)--> samples --epoch(seed, e)--> micro-batches
//! model (+ LoRA) --Trainer::step per grad_accum micro-batches--> checkpoints, log, plot
//! Ctrl-C: the step in flight finishes, a checkpoint is saved, `--resume OUT` continues
//! ```

use crate::args::{
    BackendArg, CheckpointingArg, FloatDtype, LossOnArg, ProgressArg, ScheduleArg, TrainArgs,
};
use anyllama::backend::select::{with_train_backend, WithTrainBackend};
use anyllama::backend::train::TrainBackend;
use anyllama::backend::Backend;
use anyllama::dtype::DType;
use anyllama::loader::ModelFiles;
use anyllama::model::Model;
use anyllama::train::checkpoint;
use anyllama::train::data::{CacheStatus, DataOptions, Dataset, LossOn};
use anyllama::train::lora::{Lora, LoraConfig, Proj};
use anyllama::train::optim::{OptimConfig, Schedule};
use anyllama::train::params::Trained;
use anyllama::train::plan::TrainPlan;
use anyllama::train::run::{Progress, RunConfig, Stop, TrainRun};
use anyllama::train::step::{Checkpointing, Trainer};
use anyllama::train::{export, peft};
use anyllama::{Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What a run is made of, checked before anything loads.
struct Job {
    a: TrainArgs,
    files: ModelFiles,
    data: Dataset,
    eval: Option<Dataset>,
    lora: Option<LoraConfig>,
    resume: Option<PathBuf>,
}

pub fn train(a: TrainArgs) -> Result<()> {
    check_flags(&a)?;
    let lora = (!a.full).then(|| lora_config(&a)).transpose()?;
    let resume = a.resume.as_deref().map(find_checkpoint).transpose()?;
    let path = anyllama::hub::resolve_model_path(&a.model)?;
    let files = ModelFiles::open(&path)?;
    files.cfg.check_context(a.seq)?; // a sample attends over at most --seq positions
    if let Some(ckpt) = &resume {
        check_same_run(ckpt, &settings(&a, &files))?;
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::load(&a.out, e.to_string()))?;
    let opts = DataOptions {
        seq: a.seq,
        loss_on: match a.loss_on {
            LossOnArg::Answers => LossOn::Answers,
            LossOnArg::All => LossOn::All,
        },
        skip_bad_lines: a.skip_bad_lines,
    };
    let data = load_data(&a.data, &files, &opts, &a.out)?;
    let eval = a
        .eval
        .as_deref()
        .map(|f| load_data(f, &files, &opts, &a.out))
        .transpose()?;
    let job = Job {
        a,
        files,
        data,
        eval,
        lora,
        resume,
    };
    with_train_backend(job.a.backend.into(), job.a.adapter, job)
}

impl WithTrainBackend for Job {
    type Output = ();
    fn run<B: TrainBackend>(self, b: B) -> Result<()> {
        let a = &self.a;
        let mut model = self.files.load(&b, true)?;
        let trained = match &self.lora {
            Some(cfg) => {
                model.lora = Some(Lora::new(&b, &model.cfg, cfg.clone(), a.seed)?);
                Trained::Lora
            }
            None => Trained::Full,
        };
        let rows = [Some(&self.data), self.eval.as_ref()]
            .into_iter()
            .flatten()
            .map(|d| max_rows(d, a.batch, a.packing))
            .max()
            .unwrap_or(1);
        let ckpt = checkpointing(&b, &model, trained, rows, a.checkpointing)?;
        let optim = OptimConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
            schedule: match a.schedule {
                ScheduleArg::Cosine => Schedule::Cosine,
                ScheduleArg::Linear => Schedule::Linear,
                ScheduleArg::Constant => Schedule::Constant,
            },
            warmup_steps: a.warmup,
            ..Default::default()
        };
        let mut t = Trainer::new(&b, &model, trained, ckpt, rows, optim)?;
        t.dropout_seed = a.seed as u32;
        eprintln!("{}", describe(&b, &model, ckpt, &self.data, a));

        let (seed, batch, packing) = (a.seed, a.batch, a.packing);
        let data = &self.data;
        let cfg = RunConfig {
            out_dir: a.out.clone(),
            epochs: a.epochs,
            max_steps: a.max_steps,
            grad_accum: a.grad_accum,
            log_every: a.log_every,
            eval_every: self.eval.as_ref().map(|_| a.eval_every),
            save_every: (a.save_every > 0).then_some(a.save_every),
            keep_checkpoints: a.keep_checkpoints,
            base_model: self.files.path.display().to_string(),
            plot: true,
            progress: match a.progress {
                ProgressArg::Auto => Progress::Auto,
                ProgressArg::Bar => Progress::Bar,
                ProgressArg::Lines => Progress::Lines,
                ProgressArg::Off => Progress::Off,
            },
            settings: settings(a, &self.files),
        };
        let mut run = TrainRun::new(cfg, |e| Ok(data.epoch(e, seed, batch, packing)));
        if let Some(eval) = &self.eval {
            run.eval = eval.epoch(0, seed, batch, packing);
        }
        stop_on_ctrl_c(run.stop.clone());
        let summary = run.run(&b, &mut model, &mut t, self.resume.as_deref())?;
        if summary.stop == Stop::Interrupted {
            let at = summary.checkpoint.map(|p| p.display().to_string());
            eprintln!(
                "stopped after step {}; continue with the same command and --resume {}",
                summary.step,
                at.unwrap_or_else(|| a.out.display().to_string())
            );
            return Ok(());
        }
        let last = summary.losses.last().copied().unwrap_or(f32::NAN);
        let eval = summary
            .eval_loss
            .map_or(String::new(), |e| format!(", eval loss {e:.4}"));
        eprintln!("done: {} steps, last loss {last:.4}{eval}", summary.step);
        save_result(&b, &model, &self.files, a)
    }
}

/// The flags' own consistency (what clap's types cannot say).
fn check_flags(a: &TrainArgs) -> Result<()> {
    let bad = |msg: String| Err(Error::Usage(msg));
    if a.batch == 0 || a.grad_accum == 0 || a.log_every == 0 {
        return bad("--batch, --grad-accum and --log-every must be at least 1".into());
    }
    if a.seq < 2 {
        return bad(format!(
            "--seq {} is too short: a sample needs 2 tokens",
            a.seq
        ));
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        return bad(format!("--lr {} must be a positive number", a.lr));
    }
    let non_negative = |x: f32| x.is_finite() && x >= 0.0;
    if !non_negative(a.weight_decay) || !non_negative(a.max_grad_norm) {
        return bad("--weight-decay and --max-grad-norm must be finite and >= 0".into());
    }
    if a.max_steps == Some(0) || (a.max_steps.is_none() && a.epochs == 0) {
        return bad("nothing to train: --epochs and --max-steps must be at least 1".into());
    }
    if matches!(a.backend, BackendArg::Wgpu) {
        return bad("the wgpu backend does not train yet: use --backend cuda or cpu".into());
    }
    if !a.data.is_file() {
        return Err(Error::load(&a.data, "no such data file"));
    }
    Ok(())
}

fn lora_config(a: &TrainArgs) -> Result<LoraConfig> {
    let mut targets = Vec::new();
    for t in &a.targets {
        let p = Proj::parse(t).ok_or_else(|| {
            Error::Usage(format!(
                "--targets: {t:?} is not a projection (q, k, v, o, gate, up, down)"
            ))
        })?;
        if !targets.contains(&p) {
            targets.push(p);
        }
    }
    targets.sort_by_key(|p| p.index());
    let cfg = LoraConfig {
        r: a.lora_r,
        alpha: a.lora_alpha,
        rslora: a.rslora,
        targets,
        dropout: a.lora_dropout,
    };
    cfg.check()?;
    Ok(cfg)
}

/// --resume names a checkpoint folder, or a run folder whose latest checkpoint is meant.
fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    if dir.join(checkpoint::STATE_FILE).is_file() {
        return Ok(dir.to_path_buf());
    }
    checkpoint::latest(dir)?.ok_or_else(|| {
        Error::load(
            dir,
            "neither a checkpoint nor a run folder holding one (checkpoint-N/)",
        )
    })
}

/// Everything that shapes the data and the step: a resumed run must have the same.
fn settings(a: &TrainArgs, files: &ModelFiles) -> Value {
    json!({
        "model": files.path.display().to_string(),
        "data": a.data.display().to_string(),
        "eval": a.eval.as_ref().map(|p| p.display().to_string()),
        "full": a.full,
        "lora_r": a.lora_r,
        "lora_alpha": a.lora_alpha,
        "lora_dropout": a.lora_dropout,
        "targets": a.targets,
        "rslora": a.rslora,
        "lr": a.lr,
        "schedule": a.schedule,
        "warmup": a.warmup,
        "epochs": a.epochs,
        "max_steps": a.max_steps,
        "batch": a.batch,
        "grad_accum": a.grad_accum,
        "seq": a.seq,
        "packing": a.packing,
        "loss_on": a.loss_on,
        "skip_bad_lines": a.skip_bad_lines,
        "weight_decay": a.weight_decay,
        "max_grad_norm": a.max_grad_norm,
        "seed": a.seed,
    })
}

/// Refuses a resume whose flags differ from the run that wrote the checkpoint, naming them.
fn check_same_run(ckpt: &Path, now: &Value) -> Result<()> {
    let state = checkpoint::read_state(ckpt)?;
    let saved = &state.run["settings"];
    let (Some(saved), Some(now)) = (saved.as_object(), now.as_object()) else {
        return Err(Error::load(
            ckpt.join(checkpoint::STATE_FILE),
            "this checkpoint was not written by `anyllama train` (no recorded flags)",
        ));
    };
    let diffs: Vec<String> = now
        .iter()
        .filter(|(k, v)| saved.get(*k) != Some(*v))
        .map(|(k, v)| {
            let was = saved.get(k).map_or("unset".into(), |x| x.to_string());
            format!("{k}: {v} (the run's: {was})")
        })
        .collect();
    if diffs.is_empty() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "--resume {}: the flags differ from the run that saved it: {}",
        ckpt.display(),
        diffs.join("; ")
    )))
}

fn load_data(file: &Path, files: &ModelFiles, opts: &DataOptions, out: &Path) -> Result<Dataset> {
    let (data, status) =
        Dataset::load_cached(file, &files.tokenizer, opts, &out.join("token-cache"))?;
    eprintln!("{}", data.report());
    match status {
        CacheStatus::Hit(p) => eprintln!("data: tokens from the cache {}", p.display()),
        CacheStatus::Built {
            write_error: Some(e),
            ..
        } => eprintln!("data: warning: the token cache was not written: {e}"),
        CacheStatus::Built { .. } => {}
    }
    Ok(data)
}

/// The most rows a micro-batch of `data` can have: packed, batch * seq tokens (or all of
/// them); batched, `batch` samples of the longest length. The step's buffers are sized by it.
fn max_rows(data: &Dataset, batch: usize, packing: bool) -> usize {
    let lens = data.samples().iter().map(|s| s.tokens.len());
    match packing {
        true => (batch * data.seq()).min(lens.sum()),
        false => batch * lens.max().unwrap_or(1),
    }
}

/// --checkpointing, else the least recomputation whose memory plan fits the device.
fn checkpointing<B: TrainBackend>(
    b: &B,
    m: &Model<B>,
    trained: Trained,
    rows: usize,
    flag: Option<CheckpointingArg>,
) -> Result<Checkpointing> {
    if let Some(f) = flag {
        return Ok(match f {
            CheckpointingArg::Off => Checkpointing::Off,
            CheckpointingArg::Layer => Checkpointing::Layer,
            CheckpointingArg::Offload => Checkpointing::Offload,
        });
    }
    let limits = b.memory_limits();
    let all = [
        Checkpointing::Off,
        Checkpointing::Layer,
        Checkpointing::Offload,
    ];
    for ckpt in all {
        let plan = TrainPlan::for_model(m, trained, ckpt, rows);
        if plan.check(&limits, &b.device_name()).is_ok() {
            return Ok(ckpt);
        }
    }
    Ok(Checkpointing::Offload) // Trainer::new reports why it does not fit
}

fn describe<B: TrainBackend>(
    b: &B,
    m: &Model<B>,
    ckpt: Checkpointing,
    data: &Dataset,
    a: &TrainArgs,
) -> String {
    let what = match &m.lora {
        Some(l) => format!(
            "LoRA r {} alpha {} on {} ({} parameters, scale {:.4})",
            l.cfg.r,
            l.cfg.alpha,
            l.cfg
                .targets
                .iter()
                .map(|p| p.module())
                .collect::<Vec<_>>()
                .join(","),
            l.n_params(),
            l.scale
        ),
        None => "every weight".to_string(),
    };
    let tokens_per_step = a.batch * a.seq * a.grad_accum;
    format!(
        "train: {what} on {}; {} samples, batch {} x seq {}{} x grad-accum {} (<= {tokens_per_step} \
         tokens a step), checkpointing {}",
        b.device_name(),
        data.samples().len(),
        a.batch,
        a.seq,
        if a.packing { " packed" } else { "" },
        a.grad_accum,
        format!("{ckpt:?}").to_lowercase(),
    )
}

/// Ctrl-C asks the run to stop after the step in flight (it then saves a checkpoint); a
/// second Ctrl-C exits at once.
fn stop_on_ctrl_c(stop: Arc<AtomicBool>) {
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step (Ctrl-C again to exit at once)");
    });
}

/// The run's result in --out: the PEFT adapter, or the fine-tuned model as an HF folder.
fn save_result<B: Backend>(b: &B, m: &Model<B>, files: &ModelFiles, a: &TrainArgs) -> Result<()> {
    match &m.lora {
        Some(lora) => {
            peft::save(b, lora, &files.path.display().to_string(), &a.out)?;
            export::write_tokenizer_files(files, &a.out)?;
            eprintln!(
                "adapter: {} (load it with --lora {0}, or PeftModel.from_pretrained)",
                a.out.display()
            );
        }
        None => {
            let dir = a.out.join("model");
            let dtype = match a.save_dtype {
                FloatDtype::F32 => DType::F32,
                FloatDtype::F16 => DType::F16,
                FloatDtype::Bf16 => DType::BF16,
            };
            export::save_hf(b, m, files, &dir, dtype)?;
            eprintln!("model: {}", dir.display());
        }
    }
    Ok(())
}
