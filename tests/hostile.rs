//! The catalogue of hostile and broken inputs: every case is made here from a small valid model
//! (a GGUF file written byte by byte below, or a copy of the tiny-chat HF folder) by one change,
//! and must be refused with the expected error kind and a message naming the file and the
//! problem, quickly, without a panic and without a large allocation.
//!
//! The memory cap is real: this test binary's global allocator refuses any single allocation
//! over 64 MiB and any growth of live memory past 512 MiB, so a loader that trusted a claimed
//! size would abort the run ("memory allocation of N bytes failed") instead of passing. The
//! command-line cases run the binary under `ulimit -v`.

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::dtype::DType;
use anyllama::generate::{GenerateOptions, Generator};
use anyllama::loader::ModelFiles;
use anyllama::weights::safetensors::SafetensorsSource;
use anyllama::Error;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[path = "hostile/capped_alloc.rs"]
mod capped_alloc;
#[path = "hostile/cases_files.rs"]
mod cases_files;
#[path = "hostile/cases_gguf.rs"]
mod cases_gguf;
#[path = "hostile/gguf_writer.rs"]
mod gguf_writer;

use capped_alloc::{LIVE, PEAK};
use gguf_writer::{Gguf, V};

// ---------------------------------------------------------------------------------------------
// The cases

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Load,
    Config,
    Tokenizer,
    Template,
    Device,
    Generation,
    Usage,
}

fn kind(e: &Error) -> Kind {
    match e {
        Error::Load { .. } => Kind::Load,
        Error::Config(_) => Kind::Config,
        Error::Tokenizer(_) => Kind::Tokenizer,
        Error::Template(_) => Kind::Template,
        Error::Device(_) => Kind::Device,
        Error::Generation(_) => Kind::Generation,
        Error::Usage(_) => Kind::Usage,
        Error::Io(_) => panic!("an io error carries no file name: {e}"),
    }
}

/// A scratch folder for one case.
fn case_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir()
        .join(format!("anyllama-hostile-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_gguf(name: &str, g: &Gguf) -> PathBuf {
    write_gguf_bytes(name, &g.bytes())
}

fn write_gguf_bytes(name: &str, bytes: &[u8]) -> PathBuf {
    let path = case_dir(name).join(format!("{name}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Opens the model and uploads it to the CPU backend: the whole loading path.
fn open_and_load(path: &Path) -> anyllama::Result<()> {
    let files = ModelFiles::open(path)?;
    files.check_fits(&Cpu::new(), 16, DType::F16, 8)?;
    files.load(&Cpu::new(), false)?;
    Ok(())
}

/// A copy of the tiny-chat HF folder, changed by `edit`.
fn hf_copy(name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let src = common::fixtures().join("hf/tiny-chat");
    let dir = case_dir(name).join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    edit(&dir);
    dir
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Splits a safetensors file into its JSON header and data, lets `f` change both, writes it.
fn edit_safetensors(path: &Path, f: impl FnOnce(&mut Value, &mut Vec<u8>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    f(&mut header, &mut data);
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

/// A copy of the sharded fixture (three shards and an index), changed by `edit`.
fn sharded_copy(name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let src = common::fixtures().join("hf/yarn-gqa2-f16-sharded-v4");
    let dir = case_dir(name).join("model");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.extension()
            .is_some_and(|x| x == "safetensors" || x == "json")
        {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    edit(&dir);
    dir
}

fn index_path(dir: &Path) -> PathBuf {
    dir.join("model.safetensors.index.json")
}

/// Greedy generation on the tiny-chat model with a context of `ctx` tokens.
fn generate_with(ctx: usize, prompt: &[u32]) -> anyllama::Result<()> {
    let files = ModelFiles::open(&common::fixtures().join("hf/tiny-chat"))?;
    let b = Cpu::new();
    let mut model = files.load(&b, false)?;
    let mut g = Generator::new(&b, &mut model, ctx, DType::F32, 8)?;
    let opts = GenerateOptions {
        max_new_tokens: 4,
        sampling: Default::default(),
        eos_ids: vec![],
        ignore_eos: false,
    };
    g.generate(prompt, &opts, &mut |_| true).map(|_| ())
}

fn render(template: &str) -> anyllama::Result<()> {
    anyllama::chat_template::render_chat_template(
        template,
        &[anyllama::chat_template::Message::new("user", "hi")],
        true,
        &[],
    )
    .map(|_| ())
}

/// The file or folder a case wrote (if any) and what loading it gave.
type CaseResult = (Option<PathBuf>, anyllama::Result<()>);

struct Case {
    name: &'static str,
    kind: Kind,
    /// Fragments the message must contain (the problem; the file is checked separately).
    says: &'static [&'static str],
    /// Whether the message must name the file or folder the case wrote.
    names_file: bool,
    run: Box<dyn Fn(&'static str) -> CaseResult>,
}

fn gguf_case(
    name: &'static str,
    kind: Kind,
    says: &'static [&'static str],
    make: fn() -> Vec<u8>,
) -> Case {
    Case {
        name,
        kind,
        says,
        names_file: true,
        run: Box::new(move |n| {
            let p = write_gguf_bytes(n, &make());
            let r = open_and_load(&p);
            (Some(p), r)
        }),
    }
}

fn hf_case(name: &'static str, kind: Kind, says: &'static [&'static str], edit: fn(&Path)) -> Case {
    Case {
        name,
        kind,
        says,
        names_file: true,
        run: Box::new(move |n| {
            let d = hf_copy(n, edit);
            let r = open_and_load(&d);
            (Some(d), r)
        }),
    }
}

fn sharded_case(
    name: &'static str,
    kind: Kind,
    says: &'static [&'static str],
    edit: fn(&Path),
) -> Case {
    Case {
        name,
        kind,
        says,
        names_file: true,
        run: Box::new(move |n| {
            let d = sharded_copy(n, edit);
            let r = SafetensorsSource::open(&d).map(|_| ());
            (Some(d), r)
        }),
    }
}

fn other_case(
    name: &'static str,
    kind: Kind,
    says: &'static [&'static str],
    run: fn() -> anyllama::Result<()>,
) -> Case {
    Case {
        name,
        kind,
        says,
        names_file: false,
        run: Box::new(move |_| (None, run())),
    }
}

fn tiny() -> Gguf {
    Gguf::tiny()
}

/// Every case: at least 30, across every kind of input.
fn catalogue() -> Vec<Case> {
    let mut cases = cases_gguf::cases();
    cases.extend(cases_files::cases());
    cases
}

#[test]
fn the_base_inputs_are_valid() {
    // Every case changes one thing in these; they must load, or the cases prove nothing.
    open_and_load(&write_gguf("valid_tiny", &Gguf::tiny())).expect("tiny GGUF loads");
    open_and_load(&hf_copy("valid_hf", |_| {})).expect("tiny-chat copy loads");
    SafetensorsSource::open(&sharded_copy("valid_sharded", |_| {})).expect("sharded copy opens");
    render("{{ messages[0].content }}").expect("a template renders");
    generate_with(16, &[1, 2, 3]).expect("generation runs");
}

#[test]
fn every_hostile_input_is_refused_clearly() {
    let cases = catalogue();
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        PEAK.store(LIVE.load(Ordering::SeqCst), Ordering::SeqCst);
        let before = LIVE.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let (path, result) = (case.run)(case.name);
        let took = t0.elapsed();
        let peak = PEAK.load(Ordering::SeqCst).saturating_sub(before);
        let err = match result {
            Ok(()) => {
                failures.push(format!("{}: accepted", case.name));
                continue;
            }
            Err(e) => e,
        };
        let msg = err.to_string();
        if kind(&err) != case.kind {
            failures.push(format!(
                "{}: {:?} error, expected {:?}: {msg}",
                case.name,
                kind(&err),
                case.kind
            ));
        }
        if msg.contains("panicked") {
            failures.push(format!("{}: a library panicked: {msg}", case.name));
        }
        for s in case.says {
            if !msg.contains(s) {
                failures.push(format!("{}: message lacks {s:?}: {msg}", case.name));
            }
        }
        if case.names_file {
            // The message names the file, or the model folder it belongs to.
            let p = path.expect("file cases return their path");
            let named = msg.contains(&p.display().to_string())
                || p.parent()
                    .is_some_and(|d| msg.contains(&d.display().to_string()));
            if !named {
                failures.push(format!(
                    "{}: message does not name {}: {msg}",
                    case.name,
                    p.display()
                ));
            }
        }
        if took > Duration::from_secs(5) {
            failures.push(format!("{}: took {took:?}", case.name));
        }
        if peak > 64 << 20 {
            failures.push(format!("{}: allocated {peak} bytes", case.name));
        }
        eprintln!(
            "{:<28} {:?} {:>6.0?} peak {:>5} KiB  {msg}",
            case.name,
            kind(&err),
            took,
            peak >> 10
        );
    }
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("anyllama-hostile-{}", std::process::id())),
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The command line: one `error: <what>: <why>` line, a non-zero exit, no panic, no hang, under
// an address-space limit.

fn anyllama_limited(args: &[&str]) -> (Option<i32>, String, String) {
    let bin =
        std::env::var_os("ANYLLAMA_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_anyllama").into());
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 4194304; exec \"$0\" \"$@\"")
        .arg(bin)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run anyllama");
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("anyllama {args:?} hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_reports_hostile_files_in_one_error_line() {
    let huge = write_gguf(
        "cli_huge",
        &tiny().tensor("blk.0.attn_q.weight", |t| t.dims = vec![1 << 20, 1 << 20]),
    );
    let mut counts = tiny();
    counts.kv_count = Some(u64::MAX);
    let counts = write_gguf("cli_counts", &counts);
    let vocab = write_gguf(
        "cli_vocab",
        &tiny().set("tokenizer.ggml.bos_token_id", V::U32(999)),
    );
    let traversal = sharded_copy("cli_traversal", |d| {
        edit_json(&index_path(d), |v| {
            let map = v["weight_map"].as_object_mut().unwrap();
            let k = map.keys().next().unwrap().clone();
            map[&k] = json!("../../x.safetensors");
        })
    });
    // The sharded fixture has no tokenizer: copy tiny-chat's, so the index is what fails.
    let tiny_chat = common::fixtures().join("hf/tiny-chat");
    std::fs::copy(
        tiny_chat.join("tokenizer.json"),
        traversal.join("tokenizer.json"),
    )
    .unwrap();
    let long = "hello ".repeat(100);
    let model = tiny_chat.display().to_string();
    let cases: Vec<(Vec<String>, &str, Option<&str>)> = vec![
        (
            vec!["info".into(), "-m".into(), huge.display().to_string()],
            "error: loading ",
            Some("hint:"),
        ),
        (
            vec!["info".into(), "-m".into(), counts.display().to_string()],
            "metadata count",
            Some("hint:"),
        ),
        (
            vec!["info".into(), "-m".into(), vocab.display().to_string()],
            "error: tokenizer: ",
            None,
        ),
        (
            vec!["info".into(), "-m".into(), traversal.display().to_string()],
            "not a plain file name",
            None,
        ),
        (
            [
                "generate",
                "-m",
                &model,
                "-p",
                &long,
                "-c",
                "16",
                "--backend",
                "cpu",
            ]
            .map(String::from)
            .to_vec(),
            "error: generation: ",
            Some("--truncate"),
        ),
    ];
    for (args, want, hint) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = anyllama_limited(&args);
        assert_eq!(code, Some(1), "{args:?}: exit {code:?}, stderr: {stderr}");
        assert!(stdout.is_empty(), "{args:?} wrote to stdout: {stdout}");
        let first = stderr.lines().find(|l| l.starts_with("error: "));
        let first = first.unwrap_or_else(|| panic!("{args:?}: no error line in {stderr}"));
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            first.matches(": ").count() >= 2,
            "not `error: what: why`: {first}"
        );
        if let Some(h) = hint {
            assert!(stderr.contains(h), "{args:?}: no hint {h:?}: {stderr}");
        }
    }
    // With --truncate the same prompt runs, keeping its end.
    let (code, _, stderr) = anyllama_limited(&[
        "generate",
        "-m",
        &model,
        "-p",
        &long,
        "-c",
        "16",
        "-n",
        "2",
        "--backend",
        "cpu",
        "--truncate",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("--truncate kept the last"), "{stderr}");
}
