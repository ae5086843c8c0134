//! The training run loop (src/train/run.rs) on the cpu backend and the tiny fixtures of
//! tests/fixtures/train: a resumed run continues bit for bit (LoRA with dropout, and full
//! fine-tuning of bf16 weights with their f32 master copies), gradient accumulation through
//! the loop equals direct `Trainer::step` calls, the eval loss equals a direct computation,
//! a stop flag set mid-run leaves a checkpoint that resumes, a damaged or foreign checkpoint
//! is a clear error, and log.jsonl / loss.png are written.

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::config::ModelConfig;
use anyllama::model::Model;
use anyllama::train::checkpoint;
use anyllama::train::log::{self, LOG_FILE};
use anyllama::train::lora::{Lora, LoraConfig, Proj};
use anyllama::train::optim::{OptimConfig, Schedule};
use anyllama::train::params::Trained;
use anyllama::train::plot::PLOT_FILE;
use anyllama::train::run::{eval_loss, Progress, RunConfig, Stop, Summary, TrainRun};
use anyllama::train::step::{Checkpointing, MicroBatch, Trainer};
use anyllama::weights::load_weights;
use anyllama::weights::safetensors::SafetensorsSource;
use anyllama::Result;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const MAX_ROWS: usize = 32;

fn fixture(name: &str) -> PathBuf {
    common::fixtures().join("train").join(name)
}

/// A fresh output folder under the target dir.
fn out_dir(name: &str) -> PathBuf {
    let d = common::root()
        .join("target")
        .join("test-train-run")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load_model(b: &Cpu, dir: &Path) -> Model<Cpu> {
    let cfg = ModelConfig::from_hf_dir(dir).unwrap();
    let src = SafetensorsSource::open(dir).unwrap();
    let w = load_weights(b, &src, &cfg, false, &|_| {}).unwrap();
    Model::new(b, cfg, w).unwrap()
}

fn lora_cfg(r: usize) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 16.0,
        rslora: false,
        targets: Proj::ALL.to_vec(),
        dropout: 0.1,
    }
}

fn optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-2,
        weight_decay: 0.01,
        schedule: Schedule::Cosine,
        warmup_steps: 2,
        ..Default::default()
    }
}

/// The model of a fixture with fresh adapters (LoRA: rank r, dropout on) and its trainer.
fn setup(b: &Cpu, name: &str, trained: Trained, r: usize) -> (Model<Cpu>, Trainer<Cpu>) {
    let mut m = load_model(b, &fixture(name));
    if trained == Trained::Lora {
        m.lora = Some(Lora::new(b, &m.cfg, lora_cfg(r), 7).unwrap());
    }
    let mut t = Trainer::new(b, &m, trained, Checkpointing::Off, MAX_ROWS, optim()).unwrap();
    t.dropout_seed = 1234; // a non-default seed, which the checkpoint must carry
    (m, t)
}

/// Sequence j: fixed pseudo-random tokens below 96 (every fixture's vocabulary), 5 to 12 long;
/// labels are the next token, the last row ignored.
fn sequence(j: usize) -> (Vec<u32>, Vec<i32>) {
    let len = 5 + (j * 7) % 8;
    let mut x = (j as u32 + 1).wrapping_mul(2654435761);
    let tokens: Vec<u32> = (0..len)
        .map(|_| {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            (x >> 16) % 96
        })
        .collect();
    let mut labels: Vec<i32> = tokens[1..].iter().map(|&t| t as i32).collect();
    labels.push(-100);
    (tokens, labels)
}

/// Two sequences packed per micro-batch.
fn micro_batch(seqs: [usize; 2]) -> MicroBatch {
    let mut mb = MicroBatch::default();
    for j in seqs {
        let (t, l) = sequence(j);
        mb.lens.push(t.len());
        mb.tokens.extend(t);
        mb.labels.extend(l);
    }
    mb
}

/// Epoch e: 4 micro-batches of sequences 0..8, the order rotated by the epoch (as a seeded
/// shuffle would differ per epoch and repeat per call).
fn epoch(e: usize) -> Result<Vec<MicroBatch>> {
    Ok((0..4)
        .map(|i| {
            let k = (i + e) % 4;
            micro_batch([2 * k, 2 * k + 1])
        })
        .collect())
}

fn eval_set() -> Vec<MicroBatch> {
    vec![micro_batch([8, 9]), micro_batch([10, 11])]
}

fn config(dir: &Path) -> RunConfig {
    RunConfig {
        out_dir: dir.to_path_buf(),
        max_steps: Some(6),
        grad_accum: 2,
        log_every: 2,
        eval_every: Some(3),
        save_every: Some(3),
        base_model: "tests/fixtures/train/mha-f32".into(),
        progress: Progress::Off,
        ..Default::default()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Six steps in one go (LoRA on mha-f32), saving at 3 and 6.
fn unbroken(b: &Cpu, dir: &Path) -> Summary {
    let (mut m, mut t) = setup(b, "mha-f32", Trained::Lora, 8);
    let mut run = TrainRun::new(config(dir), epoch);
    run.eval = eval_set();
    let s = run.run(b, &mut m, &mut t, None).unwrap();
    assert_eq!((s.stop, s.step, s.losses.len()), (Stop::Finished, 6, 6));
    s
}

/// Copies a checkpoint folder into another run's folder.
fn copy_checkpoint(from: &Path, to_dir: &Path) -> PathBuf {
    let to = to_dir.join(from.file_name().unwrap());
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

#[test]
fn resume_is_bit_identical_and_logs() {
    let b = Cpu::new();
    let a = out_dir("unbroken");
    let whole = unbroken(&b, &a);

    // 3 steps (checkpoint-3 of the same run), then resume and 3 more in another folder.
    let d = out_dir("resumed");
    let ckpt = copy_checkpoint(&checkpoint::path(&a, 3), &d);
    let (mut m, mut t) = setup(&b, "mha-f32", Trained::Lora, 8);
    t.dropout_seed = 0; // overwritten by the checkpoint's
    let mut run = TrainRun::new(config(&d), epoch);
    run.eval = eval_set();
    let rest = run.run(&b, &mut m, &mut t, Some(&ckpt)).unwrap();
    assert_eq!((rest.stop, rest.step), (Stop::Finished, 6));
    assert_eq!(bits(&rest.losses), bits(&whole.losses[3..]));
    assert_eq!(
        rest.eval_loss.map(f32::to_bits),
        whole.eval_loss.map(f32::to_bits)
    );
    for f in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let (x, y) = (
            checkpoint::path(&a, 6).join(f),
            checkpoint::path(&d, 6).join(f),
        );
        assert!(read(&x) == read(&y), "{f} differs after resume");
    }

    // log.jsonl: lines at steps 2 (log), 3 (eval), 4 (log), 6 (log, eval, last).
    let lines = log::read(&a.join(LOG_FILE)).unwrap();
    let steps: Vec<usize> = lines.iter().map(|l| l.step).collect();
    assert_eq!(steps, [2, 3, 4, 6]);
    let evals: Vec<bool> = lines.iter().map(|l| l.eval_loss.is_some()).collect();
    assert_eq!(evals, [false, true, false, true]);
    // Each line's loss is the mean of the steps since the previous one.
    let l = &whole.losses;
    assert_eq!(lines[0].loss, ((l[0] as f64 + l[1] as f64) / 2.0) as f32);
    assert_eq!(lines[1].loss, l[2]);
    assert_eq!(lines[3].eval_loss, whole.eval_loss);
    assert_eq!(lines[3].epoch, 3.0); // 6 steps of 2 micro-batches, 4 per epoch
    for l in &lines {
        assert!(l.lr >= 0.0 && l.grad_norm > 0.0 && l.tokens > 0, "{l:?}");
    }
    // The resumed folder's log starts where its checkpoint was.
    let resumed: Vec<usize> = log::read(&d.join(LOG_FILE))
        .unwrap()
        .iter()
        .map(|l| l.step)
        .collect();
    assert_eq!(resumed, [4, 6]);

    // loss.png: a PNG of some substance.
    let png = read(&a.join(PLOT_FILE));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000, "loss.png is only {} bytes", png.len());
    assert_eq!(&png[12..16], b"IHDR");
}

#[test]
fn full_fine_tuning_resumes_bit_identical() {
    // bf16 weights: the checkpoint must carry the f32 master copies as well as the weights.
    let b = Cpu::new();
    let cfg = |dir: &Path| RunConfig {
        max_steps: Some(4),
        save_every: Some(2),
        eval_every: None,
        ..config(dir)
    };
    let a = out_dir("full-unbroken");
    let (mut m, mut t) = setup(&b, "gqa3-bf16", Trained::Full, 0);
    let whole = TrainRun::new(cfg(&a), epoch)
        .run(&b, &mut m, &mut t, None)
        .unwrap();
    let d = out_dir("full-resumed");
    let ckpt = copy_checkpoint(&checkpoint::path(&a, 2), &d);
    let (mut m, mut t) = setup(&b, "gqa3-bf16", Trained::Full, 0);
    let rest = TrainRun::new(cfg(&d), epoch)
        .run(&b, &mut m, &mut t, Some(&ckpt))
        .unwrap();
    assert_eq!(bits(&rest.losses), bits(&whole.losses[2..]));
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let (x, y) = (
            checkpoint::path(&a, 4).join(f),
            checkpoint::path(&d, 4).join(f),
        );
        assert!(read(&x) == read(&y), "{f} differs after resume");
    }
}

#[test]
fn grad_accumulation_matches_direct_steps() {
    let b = Cpu::new();
    // 3 micro-batches per step over epochs of 4: steps take [0..3], [3..4], then epoch 1.
    let d = out_dir("accum");
    let (mut m, mut t) = setup(&b, "mha-f32", Trained::Lora, 8);
    let cfg = RunConfig {
        grad_accum: 3,
        max_steps: None,
        epochs: 2,
        eval_every: None,
        save_every: None,
        ..config(&d)
    };
    let looped = TrainRun::new(cfg, epoch)
        .run(&b, &mut m, &mut t, None)
        .unwrap();
    assert_eq!(looped.step, 4);

    let (mut m, mut t) = setup(&b, "mha-f32", Trained::Lora, 8);
    t.optim.cfg.total_steps = 4; // the loop sets the schedule's length to its step count
    let mut direct = Vec::new();
    for e in 0..2 {
        let mbs = epoch(e).unwrap();
        for chunk in mbs.chunks(3) {
            direct.push(t.step(&b, &mut m, chunk).unwrap().loss);
        }
    }
    assert_eq!(bits(&looped.losses), bits(&direct));
}

#[test]
fn eval_loss_equals_direct_computation() {
    let b = Cpu::new();
    let d = out_dir("eval");
    let (mut m, mut t) = setup(&b, "mha-f32", Trained::Lora, 8);
    let mut run = TrainRun::new(config(&d), epoch);
    run.eval = eval_set();
    let s = run.run(&b, &mut m, &mut t, None).unwrap();
    let micro = t.micro;
    // forward_backward's summed losses at the final weights, as Trainer::step sums them.
    let eval = eval_set();
    let labelled: usize = eval.iter().map(|mb| mb.labelled()).sum();
    let mut sum = 0.0f64;
    for mb in &eval {
        sum += t.forward_backward(&b, &mut m, mb, 1.0).unwrap() as f64;
    }
    let direct = (sum / labelled as f64) as f32;
    // The dropout of training is off in eval: with dropout the direct computation would
    // differ, so compare against a model whose adapters have no dropout.
    assert!(s.eval_loss.is_some());
    assert_eq!(micro, 12, "eval must not advance the dropout counter");
    if let Some(l) = m.lora.as_mut() {
        l.cfg.dropout = 0.0;
    }
    let mut sum = 0.0f64;
    for mb in &eval {
        sum += t.forward_backward(&b, &mut m, mb, 1.0).unwrap() as f64;
    }
    let no_dropout = (sum / labelled as f64) as f32;
    assert_ne!(
        direct.to_bits(),
        no_dropout.to_bits(),
        "dropout had no effect"
    );
    assert_eq!(s.eval_loss.unwrap().to_bits(), no_dropout.to_bits());
    let again = eval_loss(&b, &mut m, &mut t, &eval).unwrap();
    assert_eq!(again.to_bits(), no_dropout.to_bits());
}

#[test]
fn stop_flag_saves_a_checkpoint_that_resumes() {
    let b = Cpu::new();
    let whole = unbroken(&b, &out_dir("ctrlc-unbroken"));
    let d = out_dir("ctrlc");
    let (mut m, mut t) = setup(&b, "mha-f32", Trained::Lora, 8);
    let stop = Arc::new(AtomicBool::new(false));
    // "Ctrl-C" arrives when epoch 1 is asked for: after step 2, before step 3.
    let flag = stop.clone();
    let data = move |e: usize| {
        if e == 1 {
            flag.store(true, Ordering::SeqCst);
        }
        epoch(e)
    };
    let mut run = TrainRun::new(config(&d), data);
    run.eval = eval_set();
    run.stop = stop.clone();
    let s = run.run(&b, &mut m, &mut t, None).unwrap();
    assert_eq!((s.stop, s.step), (Stop::Interrupted, 2));
    let ckpt = checkpoint::latest(&d).unwrap().unwrap();
    assert_eq!(ckpt, checkpoint::path(&d, 2));
    assert_eq!(s.checkpoint.as_deref(), Some(ckpt.as_path()));
    assert!(!d.join(".checkpoint-2.tmp").exists());
    assert!(d.join(PLOT_FILE).is_file());

    stop.store(false, Ordering::SeqCst);
    let (mut m, mut t) = setup(&b, "mha-f32", Trained::Lora, 8);
    let mut run = TrainRun::new(config(&d), epoch);
    run.eval = eval_set();
    let rest = run.run(&b, &mut m, &mut t, Some(&ckpt)).unwrap();
    assert_eq!(rest.stop, Stop::Finished);
    assert_eq!(
        bits(&[&s.losses[..], &rest.losses[..]].concat()),
        bits(&whole.losses)
    );
}

fn resume_err(b: &Cpu, name: &str, trained: Trained, r: usize, ckpt: &Path) -> String {
    let (mut m, mut t) = setup(b, name, trained, r);
    let dir = out_dir(&format!("err-{name}-{r}"));
    let mut run = TrainRun::new(config(&dir), epoch);
    let e = run.run(b, &mut m, &mut t, Some(ckpt)).unwrap_err();
    e.to_string()
}

#[test]
fn bad_checkpoints_are_clear_errors() {
    let b = Cpu::new();
    let d = out_dir("bad-src");
    let (mut m, mut t) = setup(&b, "mha-f32", Trained::Lora, 8);
    let cfg = RunConfig {
        max_steps: Some(1),
        ..config(&d)
    };
    TrainRun::new(cfg.clone(), epoch)
        .run(&b, &mut m, &mut t, None)
        .unwrap();
    let good = checkpoint::path(&d, 1);

    // A fresh run into a folder with checkpoints is refused, not mixed in.
    let (mut m, mut t) = setup(&b, "mha-f32", Trained::Lora, 8);
    let e = TrainRun::new(cfg, epoch)
        .run(&b, &mut m, &mut t, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds"), "{e}");

    // Another LoRA rank.
    let e = resume_err(&b, "mha-f32", Trained::Lora, 4, &good);
    assert!(
        e.contains("trainer_state.json") && e.contains("LoRA rank 8, this run's is 4"),
        "{e}"
    );
    // Another model.
    let e = resume_err(&b, "gqa3-bf16", Trained::Lora, 8, &good);
    assert!(
        e.contains("saved for another model") && e.contains("hidden_size 32 (this model: 48)"),
        "{e}"
    );
    // Full fine-tuning from a LoRA checkpoint.
    let e = resume_err(&b, "mha-f32", Trained::Full, 8, &good);
    assert!(e.contains("a lora fine-tuning checkpoint"), "{e}");

    let broken = |name: &str, damage: &dyn Fn(&Path)| -> PathBuf {
        let dir = out_dir(name);
        let c = copy_checkpoint(&good, &dir);
        damage(&c);
        c
    };
    // No state file (not a checkpoint, or an unfinished one).
    let c = broken("bad-nostate", &|c| {
        std::fs::remove_file(c.join("trainer_state.json")).unwrap()
    });
    let e = resume_err(&b, "mha-f32", Trained::Lora, 8, &c);
    assert!(
        e.contains("trainer_state.json") && e.contains("missing"),
        "{e}"
    );
    // A truncated adapter.
    let c = broken("bad-adapter", &|c| {
        let p = c.join("adapter_model.safetensors");
        let bytes = read(&p);
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    let e = resume_err(&b, "mha-f32", Trained::Lora, 8, &c);
    assert!(e.contains("adapter_model.safetensors"), "{e}");
    // Garbage optimizer state.
    let c = broken("bad-optim", &|c| {
        std::fs::write(c.join("optimizer.safetensors"), b"not a tensor file").unwrap()
    });
    let e = resume_err(&b, "mha-f32", Trained::Lora, 8, &c);
    assert!(
        e.contains("optimizer.safetensors") && e.contains("corrupt"),
        "{e}"
    );
    // A state file that is not JSON.
    let c = broken("bad-json", &|c| {
        std::fs::write(c.join("trainer_state.json"), "{\"format\": 1,").unwrap()
    });
    let e = resume_err(&b, "mha-f32", Trained::Lora, 8, &c);
    assert!(
        e.contains("trainer_state.json") && e.contains("not a valid trainer state"),
        "{e}"
    );
}
