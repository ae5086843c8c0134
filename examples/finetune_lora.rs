//! A LoRA fine-tuning run with the library API (what `anyllama train` does, minus the flags):
//!   cargo run --release --example finetune_lora -- MODEL DATA.jsonl OUT_DIR
//! MODEL is an HF folder or a .gguf file; DATA holds {"messages": [...]} (or prompt/completion,
//! Alpaca, text) lines. OUT_DIR gets the PEFT adapter, log.jsonl, loss.png and checkpoints.

use anyllama::backend::select::{with_train_backend, BackendChoice, WithTrainBackend};
use anyllama::backend::train::TrainBackend;
use anyllama::loader::ModelFiles;
use anyllama::train::data::{DataOptions, Dataset, LossOn};
use anyllama::train::lora::{Lora, LoraConfig, Proj};
use anyllama::train::optim::{OptimConfig, Schedule};
use anyllama::train::params::Trained;
use anyllama::train::peft;
use anyllama::train::run::{RunConfig, TrainRun};
use anyllama::train::step::{Checkpointing, Trainer};
use std::path::PathBuf;

const SEQ: usize = 1024; // tokens per sample at most
const BATCH: usize = 8; // packed micro-batches of BATCH * SEQ tokens

struct FineTune {
    files: ModelFiles,
    data: Dataset,
    out: PathBuf,
}

impl WithTrainBackend for FineTune {
    type Output = ();
    fn run<B: TrainBackend>(self, b: B) -> anyllama::Result<()> {
        let mut model = self.files.load(&b, true)?;
        let lora = LoraConfig {
            r: 16,
            alpha: 32.0,
            rslora: false,
            targets: Proj::ALL.to_vec(), // q, k, v, o, gate, up, down
            dropout: 0.0,
        };
        model.lora = Some(Lora::new(&b, &model.cfg, lora, 3407)?);
        let optim = OptimConfig {
            lr: 2e-4,
            schedule: Schedule::Cosine,
            warmup_steps: 10,
            ..Default::default()
        };
        let ckpt = Checkpointing::Layer; // keep each layer's input, recompute the rest
        let mut trainer = Trainer::new(&b, &model, Trained::Lora, ckpt, BATCH * SEQ, optim)?;

        let cfg = RunConfig {
            out_dir: self.out.clone(),
            epochs: 2,
            base_model: self.files.path.display().to_string(),
            ..Default::default()
        };
        let data = &self.data;
        let mut run = TrainRun::new(cfg, |epoch| Ok(data.epoch(epoch, 3407, BATCH, true)));
        let summary = run.run(&b, &mut model, &mut trainer, None)?;
        eprintln!("{} steps, losses {:?}", summary.step, summary.losses);

        let lora = model.lora.as_ref().expect("set above");
        peft::save(&b, lora, &run.cfg.base_model, &self.out)?;
        eprintln!("adapter in {} (anyllama chat --lora)", self.out.display());
        Ok(())
    }
}

fn main() -> anyllama::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, data, out] = &args[..] else {
        eprintln!("usage: finetune_lora MODEL DATA.jsonl OUT_DIR");
        std::process::exit(2);
    };
    let files = ModelFiles::open(model.as_ref())?;
    let opts = DataOptions {
        seq: SEQ,
        loss_on: LossOn::Answers, // assistant turns only
        skip_bad_lines: false,
    };
    let data = Dataset::load(data.as_ref(), &files.tokenizer, &opts)?;
    eprintln!("{}", data.report());
    let job = FineTune {
        files,
        data,
        out: out.into(),
    };
    with_train_backend(BackendChoice::Auto, None, job)
}
