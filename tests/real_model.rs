//! The real SmolLM2-135M-Instruct against HF transformers' greedy output on the same weights
//! (tests/fixtures/smollm2/expected.json, made by make_expected.py): several chat and raw prompts,
//! 48 new tokens each; our tokenizer must produce the same prompt ids and every backend the same
//! generated ids (f32 KV cache). Runs on the Q4_1 GGUF (the default model, fetched if needed) and,
//! on an HF folder of it: `ANYLLAMA_SMOLLM2_HF` (as transformers saves it with
//! tests/fixtures/smollm2/gguf_to_hf.py), else the folder `anyllama convert` writes.

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::Backend;
use anyllama::chat_template::Message;
use anyllama::dtype::DType;
use anyllama::generate::{GenerateOptions, Generator, StopReason};
use anyllama::loader::ModelFiles;
use anyllama::sample::SamplingParams;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check<B: Backend>(b: &B, path: &Path) {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("smollm2/expected.json")).unwrap(),
    )
    .unwrap();
    let files = ModelFiles::open(path).unwrap();
    let mut model = files.load(b, false).unwrap();
    let mut gen = Generator::new(b, &mut model, 512, DType::F32, 128).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: expected["new_tokens"].as_u64().unwrap() as usize,
        sampling: SamplingParams::greedy(),
        eos_ids: files.eos_ids(),
        ignore_eos: false,
    };
    for (i, case) in expected["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!(
            "case {i} ({}) on {} from {}",
            case["kind"],
            b.name(),
            path.display()
        );
        let prompt = ids(&case["prompt_ids"]);
        let ours = if case["kind"] == "chat" {
            let messages: Vec<Message> = case["prompt"]["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            files.tokenizer.encode_chat(&messages, true).unwrap()
        } else {
            files
                .tokenizer
                .encode(case["prompt"]["text"].as_str().unwrap(), true)
                .unwrap()
        };
        assert_eq!(ours, prompt, "{what}: prompt ids");
        gen.reset();
        let out = gen.generate(&prompt, &opts, &mut |_| true).unwrap();
        let mut got = out.tokens.clone();
        if out.reason == StopReason::Eos {
            got.push(opts.eos_ids[0]); // HF's output ends with the eos it stopped on
        }
        assert_eq!(
            got,
            ids(&case["generated_ids"]),
            "{what}: {:?}",
            case["text"]
        );
        let text = files.tokenizer.decode(&out.tokens, true).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{what}: decoded text");
    }
}

/// The HF folder: `ANYLLAMA_SMOLLM2_HF` (e.g. saved by transformers with gguf_to_hf.py), else
/// the GGUF written out as an f32 HF folder by our converter (once per test process).
fn hf_folder() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ANYLLAMA_SMOLLM2_HF").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let gguf = common::smollm2_gguf()?;
        let dir = std::env::temp_dir().join("anyllama-test-smollm2-hf");
        let _ = std::fs::remove_dir_all(&dir);
        anyllama::convert::gguf_to_hf(&gguf, &dir, DType::F32, &|_, _| {}).unwrap();
        Some(dir)
    })
    .clone()
}

#[test]
fn smollm2_gguf_on_cpu() {
    if let Some(p) = common::smollm2_gguf() {
        check(&Cpu::new(), &p);
    }
}

#[test]
fn smollm2_hf_folder_on_cpu() {
    if let Some(p) = hf_folder() {
        check(&Cpu::new(), &p);
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn smollm2_gguf_on_wgpu() {
    if let (Some(b), Some(p)) = (common::wgpu_backend(), common::smollm2_gguf()) {
        check(&b, &p);
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn smollm2_hf_folder_on_wgpu() {
    if let (Some(b), Some(p)) = (common::wgpu_backend(), hf_folder()) {
        check(&b, &p);
    }
}

#[cfg(feature = "cuda")]
#[test]
fn smollm2_gguf_on_cuda() {
    if let (Some(b), Some(p)) = (
        common::cuda_with(Default::default()),
        common::smollm2_gguf(),
    ) {
        check(&b, &p);
    }
}

#[cfg(feature = "cuda")]
#[test]
fn smollm2_hf_folder_on_cuda() {
    let exact = anyllama::backend::cuda::CudaOptions {
        exact: true,
        ..Default::default()
    };
    if let (Some(b), Some(p)) = (common::cuda_with(exact), hf_folder()) {
        check(&b, &p);
    }
}
