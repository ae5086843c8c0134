//! `anyllama train`, `merge` and `--lora` end to end on the tiny-chat fixture (an HF folder with
//! a real BPE tokenizer and a ChatML template), on the cpu backend: every dataset format
//! trains and is reported, packing gives the loss batching gives for the same samples, a
//! resumed run ends with the unbroken run's adapter bit for bit, Ctrl-C leaves a checkpoint,
//! the adapter drives chat (scale 0 is the base model, wgpu agrees with cpu), merge equals
//! the unmerged adapter, full fine-tuning writes a model chat loads, a quantized GGUF base
//! trains (QLoRA), and every bad input is a one-line error naming it.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> std::ffi::OsString {
    std::env::var_os("ANYLLAMA_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_anyllama").into())
}

fn anyllama(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run anyllama")
}

fn tiny_chat() -> String {
    common::fixtures()
        .join("hf/tiny-chat")
        .display()
        .to_string()
}

fn data(name: &str) -> String {
    common::fixtures().join(name).display().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "anyllama failed:\n{}", stderr(&o));
    o
}

/// A fresh folder for one test's outputs.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("train_cli")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `train` on tiny-chat with small settings; `extra` flags add to them or replace them.
fn train(out: &Path, data_file: &str, extra: &[&str]) -> Output {
    let (model, out) = (tiny_chat(), s(out));
    let mut args = vec!["train", "-m", &model, "--data", data_file, "--out", &out];
    let defaults = [
        ("--backend", "cpu"),
        ("--seq", "96"),
        ("--batch", "2"),
        ("--lora-r", "4"),
        ("--lr", "1e-2"),
        ("--log-every", "1"),
        ("--progress", "lines"),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    anyllama(&args)
}

fn log_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn chat(extra: &[&str]) -> String {
    let model = tiny_chat();
    let mut args = vec![
        "chat",
        "-m",
        &model,
        "-p",
        "Hello there",
        "--temp",
        "0",
        "-n",
        "12",
        "--backend",
        "cpu",
    ];
    args.extend_from_slice(extra);
    stdout(&ok(anyllama(&args)))
}

#[test]
fn every_format_trains_and_the_run_folder_is_complete() {
    let out = scratch("formats");
    let o = ok(train(
        &out,
        &data("train_data/formats.jsonl"),
        &["--max-steps", "3", "--save-every", "2"],
    ));
    let err = stderr(&o);
    assert!(
        err.contains("chat 2, prompt/completion 1, alpaca 2, text 1"),
        "{err}"
    );
    assert!(err.contains("step 3/3"), "{err}");
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "log.jsonl",
        "loss.png",
        "checkpoint-2/trainer_state.json",
        "checkpoint-3/trainer_state.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing in {}", out.display());
    }
    let losses = log_losses(&out);
    assert_eq!(losses.len(), 3);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["target_modules"].as_array().unwrap().len(), 7);
    // A second run of the same data reads the token cache.
    let again = scratch("formats-again");
    let o = ok(train(
        &again,
        &data("train_data/formats.jsonl"),
        &["--max-steps", "1"],
    ));
    assert!(
        !stderr(&o).contains("from the cache"),
        "a new folder has no cache"
    );
    std::fs::remove_dir_all(again.join("checkpoint-1")).unwrap();
    let o = ok(train(
        &again,
        &data("train_data/formats.jsonl"),
        &["--max-steps", "1"],
    ));
    assert!(stderr(&o).contains("from the cache"), "{}", stderr(&o));
}

#[test]
fn packing_gives_the_loss_of_batching_the_same_samples() {
    // Eight samples, all in one micro-batch either way: the first step's loss (before any
    // update) is the mean over the same labelled rows.
    let file = data("train_data/formats.jsonl");
    let (a, b) = (scratch("packed"), scratch("batched"));
    ok(train(
        &a,
        &file,
        &["--max-steps", "1", "--packing", "--batch", "8"],
    ));
    ok(train(&b, &file, &["--max-steps", "1", "--batch", "8"]));
    let (la, lb) = (log_losses(&a)[0], log_losses(&b)[0]);
    assert!(
        (la - lb).abs() <= 1e-5 * lb.abs(),
        "packed {la} vs batched {lb}"
    );
}

#[test]
fn a_resumed_run_ends_as_the_unbroken_run() {
    let file = data("train_data/many.jsonl");
    let flags = [
        "--max-steps",
        "6",
        "--save-every",
        "3",
        "--lora-dropout",
        "0.1",
        "--warmup",
        "2",
    ];
    let whole = scratch("whole");
    ok(train(&whole, &file, &flags));
    // The second run starts from the first one's step-3 checkpoint, in its own folder.
    let part = scratch("resumed");
    let ckpt = part.join("checkpoint-3");
    copy_dir(&whole.join("checkpoint-3"), &ckpt);
    let mut resume = flags.to_vec();
    let ckpt_arg = s(&ckpt);
    resume.extend(["--resume", &ckpt_arg]);
    let o = ok(train(&part, &file, &resume));
    assert!(stderr(&o).contains("step 6/6"), "{}", stderr(&o));
    let read = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(read(&whole) == read(&part), "the resumed adapter differs");
    assert_eq!(log_losses(&whole)[3..], log_losses(&part)[..]);

    // --resume with other flags is refused, naming them.
    let mut other = resume.clone();
    other.extend(["--seed", "9"]);
    let o = train(&part, &file, &other);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("seed: 9 (the run's: 3407)"),
        "{}",
        stderr(&o)
    );
    // A fresh run into a folder that holds checkpoints is refused too.
    let o = train(&part, &file, &flags);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already holds a run's checkpoints"),
        "{}",
        stderr(&o)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[cfg(unix)]
#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let out = scratch("interrupted");
    let (model, out_s, file) = (tiny_chat(), s(&out), data("train_data/many.jsonl"));
    let child = Command::new(bin())
        .args([
            "train",
            "-m",
            &model,
            "--data",
            &file,
            "--out",
            &out_s,
            "--backend",
            "cpu",
            "--seq",
            "96",
            "--lora-r",
            "4",
            "--max-steps",
            "1000000",
            "--log-every",
            "1",
            "--progress",
            "lines",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(out.join("log.jsonl")).map_or(0, |t| t.lines().count()) < 2 {
        assert!(t0.elapsed() < Duration::from_secs(120), "no training steps");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("stopped after step"), "{err}");
    let state: Value = {
        let ckpt = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with("checkpoint-")
            })
            .expect("a checkpoint");
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap()
    };
    let step = state["position"]["step"].as_u64().unwrap();
    assert!((2..1_000_000).contains(&step), "step {step}");
    assert_eq!(log_losses(&out).len() as u64, step);
}

#[test]
fn the_adapter_drives_chat_and_merges_into_the_base() {
    let out = scratch("adapter");
    ok(train(
        &out,
        &data("train_data/many.jsonl"),
        &["--max-steps", "8", "--lr", "5e-2"],
    ));
    let lora = s(&out);
    let base = chat(&[]);
    let zero = chat(&["--lora", &format!("{lora}:0")]);
    assert_eq!(zero, base, "an adapter at scale 0 is the base model");
    let adapted = chat(&["--lora", &lora]);
    assert_ne!(adapted, base, "8 steps at lr 5e-2 change the greedy reply");
    #[cfg(feature = "wgpu")]
    if common::wgpu_backend().is_some() {
        let o = ok(anyllama(&[
            "chat",
            "-m",
            &tiny_chat(),
            "-p",
            "Hello there",
            "--temp",
            "0",
            "-n",
            "12",
            "--backend",
            "wgpu",
            "--kv-dtype",
            "f32",
            "--lora",
            &lora,
        ]));
        assert_eq!(stdout(&o), adapted, "wgpu with the adapter");
    }
    // Merged (f32) into an HF folder, then as GGUF: the same greedy reply as unmerged.
    let merged = scratch("merged").join("model");
    ok(anyllama(&[
        "merge",
        "-m",
        &tiny_chat(),
        "--lora",
        &lora,
        "--out",
        &s(&merged),
        "--dtype",
        "f32",
    ]));
    let o = ok(anyllama(&[
        "chat",
        "-m",
        &s(&merged),
        "-p",
        "Hello there",
        "--temp",
        "0",
        "-n",
        "12",
        "--backend",
        "cpu",
    ]));
    assert_eq!(stdout(&o), adapted, "the merged model");
    let gguf = merged.with_file_name("merged.gguf");
    ok(anyllama(&[
        "merge",
        "-m",
        &tiny_chat(),
        "--lora",
        &lora,
        "--out",
        &s(&gguf),
        "--dtype",
        "f32",
    ]));
    let o = ok(anyllama(&[
        "chat",
        "-m",
        &s(&gguf),
        "-p",
        "Hello there",
        "--temp",
        "0",
        "-n",
        "12",
        "--backend",
        "cpu",
    ]));
    assert_eq!(stdout(&o), adapted, "the merged GGUF");
}

#[test]
fn full_fine_tuning_writes_a_model_chat_loads() {
    let out = scratch("full");
    let o = ok(train(
        &out,
        &data("train_data/many.jsonl"),
        &["--full", "--max-steps", "3", "--lr", "1e-3"],
    ));
    assert!(stderr(&o).contains("every weight"), "{}", stderr(&o));
    let model = out.join("model");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(model.join(f).is_file(), "{f}");
    }
    let o = ok(anyllama(&[
        "chat",
        "-m",
        &s(&model),
        "-p",
        "Hello there",
        "--temp",
        "0",
        "-n",
        "4",
        "--backend",
        "cpu",
    ]));
    assert!(!stdout(&o).trim().is_empty());
}

#[test]
fn a_quantized_gguf_base_trains() {
    let dir = scratch("qlora");
    let gguf = dir.join("tiny-q8_0.gguf");
    ok(anyllama(&[
        "convert",
        &tiny_chat(),
        &s(&gguf),
        "--dtype",
        "q8_0",
    ]));
    let out = dir.join("run");
    let (g, o_s, file) = (s(&gguf), s(&out), data("train_data/many.jsonl"));
    let o = ok(anyllama(&[
        "train",
        "-m",
        &g,
        "--data",
        &file,
        "--out",
        &o_s,
        "--backend",
        "cpu",
        "--seq",
        "96",
        "--lora-r",
        "4",
        "--max-steps",
        "4",
        "--lr",
        "1e-2",
        "--log-every",
        "1",
        "--progress",
        "lines",
    ]));
    let losses = log_losses(&out);
    assert!(losses.iter().all(|l| l.is_finite()), "{}", stderr(&o));
    assert!(
        out.join("tokenizer.json").is_file(),
        "tokenizer beside the adapter"
    );
    let o = ok(anyllama(&[
        "chat",
        "-m",
        &g,
        "--lora",
        &o_s,
        "-p",
        "Hello",
        "--temp",
        "0",
        "-n",
        "4",
        "--backend",
        "cpu",
    ]));
    assert!(stderr(&o).contains("adapter:"), "{}", stderr(&o));
}

#[test]
fn bad_input_is_one_error_line_naming_it() {
    let out = scratch("bad");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "bad_lines.jsonl:2: "),
        (
            vec!["--targets".into(), "q,attn".into()],
            "--targets: \"attn\" is not a projection",
        ),
        (vec!["--lora-r".into(), "0".into()], "rank of at least 1"),
        (
            vec!["--lora-dropout".into(), "1.5".into()],
            "outside [0, 1)",
        ),
        (
            vec!["--lr".into(), "0".into()],
            "--lr 0 must be a positive number",
        ),
        (vec!["--seq".into(), "1".into()], "--seq 1 is too short"),
        (vec!["--max-steps".into(), "0".into()], "nothing to train"),
        (
            vec!["--backend".into(), "wgpu".into()],
            "does not train yet",
        ),
        (vec!["--resume".into(), s(&out.join("nowhere"))], "nowhere"),
    ];
    for (extra, want) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let o = train(&out, &data("train_data/bad_lines.jsonl"), &extra);
        let err = stderr(&o);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(err.contains(want), "{extra:?}: want {want:?} in:\n{err}");
        assert!(
            err.starts_with("error: ") || err.contains("\nerror: "),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // --skip-bad-lines trains on the good lines and says how many were skipped.
    let o = ok(train(
        &out,
        &data("train_data/bad_lines.jsonl"),
        &["--skip-bad-lines", "--max-steps", "1"],
    ));
    assert!(stderr(&o).contains("bad lines skipped"), "{}", stderr(&o));
    // A missing data file and a missing model.
    let o = train(&scratch("bad2"), &data("train_data/absent.jsonl"), &[]);
    assert!(stderr(&o).contains("absent.jsonl"), "{}", stderr(&o));
    let o = anyllama(&[
        "train",
        "-m",
        "/nonexistent/model",
        "--data",
        &data("train_data/many.jsonl"),
        "--backend",
        "cpu",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("/nonexistent/model"));
    // An adapter that does not exist, or does not fit the model.
    let o = anyllama(&[
        "chat",
        "-m",
        &tiny_chat(),
        "--lora",
        "/nonexistent/adapter",
        "-p",
        "x",
        "--backend",
        "cpu",
    ]);
    assert!(
        stderr(&o).contains("/nonexistent/adapter"),
        "{}",
        stderr(&o)
    );
    let other = common::fixtures().join("train/mha-f32/adapter_init");
    let o = anyllama(&[
        "chat",
        "-m",
        &tiny_chat(),
        "--lora",
        &s(&other),
        "-p",
        "x",
        "--backend",
        "cpu",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("adapter_model.safetensors"),
        "{}",
        stderr(&o)
    );
}

/// `--backend cuda` trains to the cpu run's losses: within f32 noise with ANYLLAMA_CUDA_EXACT=1,
/// within bf16 rounding on the default tensor-core path (tiny-chat's weights are bf16).
#[cfg(feature = "cuda")]
#[test]
fn cuda_training_follows_the_cpu_run() {
    if let Some(why) = anyllama::backend::cuda::unavailable_reason() {
        return common::skip_or_fail_cuda("train --backend cuda", &why);
    }
    let file = data("train_data/many.jsonl");
    let flags = ["--max-steps", "6", "--packing", "--batch", "4"];
    let cpu = scratch("cuda-ref-cpu");
    ok(train(&cpu, &file, &flags));
    let want = log_losses(&cpu);
    for (exact, bound) in [("1", 1e-4), ("0", 3e-2)] {
        let out = scratch(&format!("cuda-exact-{exact}"));
        let mut args = flags.to_vec();
        args.extend(["--backend", "cuda"]);
        let (model, out_s) = (tiny_chat(), s(&out));
        let mut cmd = vec!["train", "-m", &model, "--data", &file, "--out", &out_s];
        cmd.extend([
            "--seq",
            "96",
            "--lora-r",
            "4",
            "--lr",
            "1e-2",
            "--log-every",
            "1",
        ]);
        cmd.extend(args);
        let o = Command::new(bin())
            .args(&cmd)
            .env("ANYLLAMA_CUDA_EXACT", exact)
            .output()
            .unwrap();
        let o = ok(o);
        let got = log_losses(&out);
        assert_eq!(got.len(), want.len(), "{}", stderr(&o));
        for (g, w) in got.iter().zip(&want) {
            let rel = (g - w).abs() / w.abs();
            assert!(rel <= bound, "exact={exact}: cuda {got:?} vs cpu {want:?}");
        }
    }
}
