//! The `anyllama` binary end to end on the tiny-chat fixture (an HF folder with a real BPE
//! tokenizer, a ChatML template and generation_config.json), and its refusals of bad input.

mod common;

use serde_json::Value;
use std::process::{Command, Output};

fn anyllama(args: &[&str]) -> Output {
    // ANYLLAMA_BIN: the binary when the tests run away from the build tree (the GPU machine).
    let bin =
        std::env::var_os("ANYLLAMA_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_anyllama").into());
    Command::new(bin).args(args).output().expect("run anyllama")
}

fn tiny_chat() -> String {
    common::fixtures()
        .join("hf/tiny-chat")
        .display()
        .to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn chat_reply_equals_transformers_with_generation_config_defaults() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("hf/tiny-chat/expected.json")).unwrap(),
    )
    .unwrap();
    let want = expected["chat_generation"]["text"].as_str().unwrap();
    let user = expected["chat_generation"]["messages"][0]["content"]
        .as_str()
        .unwrap();
    // No sampling flags: generation_config.json says greedy, 32 tokens, eos [2, 0].
    let mut backends = vec!["cpu"];
    if cfg!(feature = "wgpu") {
        backends.push("wgpu");
    }
    for backend in backends {
        let o = anyllama(&[
            "chat",
            "-m",
            &tiny_chat(),
            "-p",
            user,
            "--backend",
            backend,
            "--kv-dtype",
            "f32",
        ]);
        if backend == "wgpu" && !o.status.success() && stderr(&o).contains("adapter") {
            common::skip_or_fail(&format!("wgpu: {}", stderr(&o)));
            continue;
        }
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        assert_eq!(
            stdout(&o),
            format!("{want}\n"),
            "{backend}: only the reply goes to stdout"
        );
    }
}

#[test]
fn generate_prints_only_the_completion_and_verbose_timings_go_to_stderr() {
    let o = anyllama(&[
        "generate",
        "-m",
        &tiny_chat(),
        "-p",
        "Hello world",
        "-n",
        "6",
        "--temp",
        "0",
        "--backend",
        "cpu",
        "--verbose",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.trim().is_empty(), "no completion");
    assert!(
        !out.contains("tok/s") && !out.contains("loaded"),
        "logs leaked to stdout: {out:?}"
    );
    assert!(
        stderr(&o).contains("decode:") && stderr(&o).contains("tok/s"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn same_seed_same_sampled_output() {
    let run = || {
        let args = [
            "generate",
            "-m",
            &tiny_chat(),
            "-p",
            "The",
            "-n",
            "12",
            "--temp",
            "1.0",
            "--seed",
            "42",
            "--backend",
            "cpu",
        ];
        let o = anyllama(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    assert_eq!(run(), run());
}

#[test]
fn stop_strings_cut_the_output() {
    let full = anyllama(&[
        "generate",
        "-m",
        &tiny_chat(),
        "-p",
        "Hello",
        "-n",
        "12",
        "--temp",
        "0",
        "--backend",
        "cpu",
    ]);
    let text = stdout(&full);
    let text = text.trim_end_matches('\n');
    let stop: String = text.chars().skip(4).take(3).collect();
    assert!(
        stop.chars().count() == 3,
        "completion too short to test stops: {text:?}"
    );
    let cut = anyllama(&[
        "generate",
        "-m",
        &tiny_chat(),
        "-p",
        "Hello",
        "-n",
        "12",
        "--temp",
        "0",
        "--backend",
        "cpu",
        "--stop",
        &stop,
    ]);
    let prefix = &text[..text.find(&stop).unwrap()];
    assert_eq!(stdout(&cut), format!("{prefix}\n"));
}

#[test]
fn bad_input_gives_clear_errors() {
    let long = "many words ".repeat(20);
    let cases: &[(&[&str], &str)] = &[
        (
            &["generate", "-m", "/nonexistent/model", "-p", "x"],
            "neither an existing path",
        ),
        (
            &["generate", "-m", &tiny_chat(), "-p", "x", "--temp", "hot"],
            "invalid value 'hot'",
        ),
        (
            &[
                "generate",
                "-m",
                &tiny_chat(),
                "-p",
                "x",
                "--top-p",
                "2",
                "--backend",
                "cpu",
            ],
            "top-p must be in (0, 1]",
        ),
        (
            &[
                "generate",
                "-m",
                &tiny_chat(),
                "-p",
                "x",
                "--backend",
                "tpu",
            ],
            "invalid value 'tpu'",
        ),
        (
            &[
                "generate",
                "-m",
                &tiny_chat(),
                "-p",
                &long,
                "-c",
                "16",
                "--backend",
                "cpu",
            ],
            "context holds",
        ),
        (
            &[
                "generate",
                "-m",
                &common::fixtures().join("hf").display().to_string(),
                "-p",
                "x",
            ],
            "config.json",
        ),
    ];
    for (args, want) in cases {
        let o = anyllama(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains(want), "{args:?}: stderr lacks {want:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(stdout(&o).is_empty(), "{args:?} wrote to stdout");
    }
}

/// `--backend cuda` either runs (a CUDA build on a machine with a driver; --verbose prints the
/// decode speed) or says clearly why not (no CUDA in this build, or no driver): never a panic.
#[test]
fn cuda_backend_runs_or_says_why() {
    let o = anyllama(&[
        "chat",
        "-m",
        &tiny_chat(),
        "-p",
        "hi",
        "-n",
        "8",
        "--temp",
        "0",
        "--backend",
        "cuda",
        "--verbose",
    ]);
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "panicked: {err}");
    if o.status.success() {
        assert!(
            err.contains("decode:") && err.contains("tok/s"),
            "no decode speed: {err}"
        );
        assert!(!stdout(&o).is_empty(), "no reply");
    } else {
        let require = std::env::var("ANYLLAMA_REQUIRE_CUDA").is_ok_and(|v| v == "1");
        assert!(
            !require,
            "ANYLLAMA_REQUIRE_CUDA=1 but --backend cuda failed: {err}"
        );
        assert!(err.contains("CUDA"), "unclear error: {err}");
        eprintln!("SKIPPED cuda cli run: {err}");
    }
}
