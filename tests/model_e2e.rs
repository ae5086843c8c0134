//! The forward pass and the decode loop against HF transformers on tiny random Llama fixtures
//! (tests/fixtures/hf, made by tests/fixtures/make_fixtures.py) and on the other architectures'
//! (tests/fixtures/arch, make_arch_fixtures.py: Qwen2, Qwen3, Phi-3, Mistral), as HF folders and
//! converted to GGUF: logits of the prompt within an NMSE bound, and the 24 greedy tokens HF
//! generated through its KV cache, identical.

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::Backend;
use anyllama::config::ModelConfig;
use anyllama::convert::hf_to_gguf;
use anyllama::dtype::DType;
use anyllama::generate::{GenerateOptions, Generator};
use anyllama::model::Model;
use anyllama::sample::SamplingParams;
use anyllama::weights::gguf::GgufFile;
use anyllama::weights::safetensors::SafetensorsSource;
use anyllama::weights::{load_weights, model_source, TensorSource};
use common::{fixtures, nmse};
use serde_json::Value;
use std::path::Path;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The model in an HF folder, or (`gguf`) in a GGUF file the folder converts to (f32).
fn load<B: Backend>(b: &B, dir: &Path, gguf: Option<&Path>) -> Model<B> {
    let (cfg, src): (ModelConfig, Box<dyn TensorSource>) = match gguf {
        None => {
            let cfg = ModelConfig::from_hf_dir(dir).unwrap();
            let src = model_source(SafetensorsSource::open(dir).unwrap(), &cfg);
            (cfg, src)
        }
        Some(out) => {
            let _ = std::fs::remove_file(out);
            hf_to_gguf(dir, out, DType::F32, &|_, _| {}).unwrap();
            let g = GgufFile::open(out).unwrap();
            let cfg = g.model_config().unwrap();
            (cfg.clone(), model_source(g, &cfg))
        }
    };
    let w = load_weights(b, src.as_ref(), &cfg, gguf.is_some(), &|_| {}).unwrap();
    Model::new(b, cfg, w).unwrap()
}

/// Query rows from which the CUDA backend's default mode runs attention on f16 tensor cores
/// (GEMM_ATTENTION_MIN_ROWS in src/backend/cuda/ops.rs).
const CUDA_HALF_ATTENTION_MIN_ROWS: usize = 32;

/// Checks every fixture on backend `b`; returns how many cases ran. `exact`: the backend
/// computes in f32 throughout (else f16/bf16 weights meet activations rounded to their type in
/// prefill GEMMs, as HF's own half-precision models do, and prompts of 32 tokens or more get
/// attention in f16: logits get a bound for that rounding and greedy tokens are compared only
/// where HF's margins are decisive).
fn check_all<B: Backend>(b: &B, exact: bool) -> usize {
    check_fixtures(b, exact, "hf", false)
}

/// Checks the fixtures of tests/fixtures/`set`, each loaded from its HF folder, or with `gguf`
/// from its GGUF conversion.
fn check_fixtures<B: Backend>(b: &B, exact: bool, set: &str, gguf: bool) -> usize {
    let mut checked = 0;
    let mut dirs: Vec<_> = std::fs::read_dir(fixtures().join(set))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    let tmp =
        std::env::temp_dir().join(format!("anyllama-e2e-{}-{}", std::process::id(), b.name()));
    std::fs::create_dir_all(&tmp).unwrap();
    for dir in dirs {
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let mut name = dir.file_name().unwrap().to_string_lossy().to_string();
        let out = tmp.join(format!("{name}.gguf"));
        let mut model = load(b, &dir, gguf.then_some(out.as_path()));
        if gguf {
            name += " (gguf)";
        }
        let vocab = model.cfg.vocab_size;
        let half_weights = model
            .cfg
            .torch_dtype
            .as_deref()
            .is_some_and(|t| t != "float32");
        for case in expected["cases"].as_array().unwrap() {
            let case_name = format!("{name}/{} on {}", case["name"].as_str().unwrap(), b.name());
            let prompt = ids(&case["prompt_ids"]);
            let half = !exact && (half_weights || prompt.len() >= CUDA_HALF_ATTENTION_MIN_ROWS);
            for kv in [DType::F32, DType::F16] {
                let mut gen = Generator::new(b, &mut model, 128, kv, 64).unwrap();
                // Logits of the stored positions, from one forward over the whole prompt.
                let logits = gen.all_logits(&prompt).unwrap();
                let positions = case["logits_positions"].as_array().unwrap();
                let bound = match (kv, half) {
                    (_, true) => 1e-3,
                    (DType::F32, false) => 1e-8,
                    _ => 1e-4,
                };
                for (p, want) in positions.iter().zip(case["logits"].as_array().unwrap()) {
                    let p = p.as_u64().unwrap() as usize;
                    let want: Vec<f32> = want
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                        .collect();
                    let got = &logits[p * vocab..(p + 1) * vocab];
                    let e = nmse(got, &want);
                    assert!(
                        e < bound,
                        "{case_name} kv {kv}: logits at position {p}: nmse {e:e} >= {bound:e}"
                    );
                }
                // Greedy argmax at every prompt position.
                let argmax: Vec<u32> = logits
                    .chunks_exact(vocab)
                    .map(|row| {
                        row.iter()
                            .enumerate()
                            .fold(0, |best, (i, v)| if *v > row[best] { i } else { best })
                            as u32
                    })
                    .collect();
                // With an f16 cache, near ties (HF's margin < 0.02) may flip; f32 must match all.
                let margins = case["prompt_margins"].as_array().unwrap();
                for (p, (got, want)) in argmax.iter().zip(ids(&case["argmax"])).enumerate() {
                    let decisive =
                        (kv == DType::F32 && !half) || margins[p].as_f64().unwrap() >= 0.02;
                    assert!(
                        !decisive || *got == want,
                        "{case_name} kv {kv}: argmax at position {p}: {got} != {want}"
                    );
                }
                // 24 greedy tokens through the paged KV cache, prefilled in chunks of 64.
                gen.reset();
                let opts = GenerateOptions {
                    max_new_tokens: 24,
                    sampling: SamplingParams::greedy(),
                    eos_ids: vec![],
                    ignore_eos: true,
                };
                let g = gen.generate(&prompt, &opts, &mut |_| true).unwrap();
                if half {
                    // Rounded activations may flip a near tie and then the rest diverges:
                    // the first tokens must still agree.
                    assert_eq!(
                        g.tokens[..4],
                        ids(&case["generated_ids"])[..4],
                        "{case_name}"
                    );
                    checked += 1;
                    continue;
                }
                assert_eq!(
                    g.tokens,
                    ids(&case["generated_ids"]),
                    "{case_name} kv {kv}: greedy tokens"
                );
                checked += 1;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    checked
}

/// Qwen2, Qwen3, Phi-3 and Mistral, from HF folders and GGUF conversions.
fn check_arch<B: Backend>(b: &B, exact: bool) {
    for gguf in [false, true] {
        let n = check_fixtures(b, exact, "arch", gguf);
        assert!(n >= 8, "only {n} cases ran (gguf {gguf})");
    }
}

#[test]
fn arch_fixtures_on_cpu() {
    check_arch(&Cpu::new(), true);
}

#[cfg(feature = "wgpu")]
#[test]
fn arch_fixtures_on_wgpu() {
    if let Some(b) = common::wgpu_backend() {
        check_arch(&b, true);
    }
}

#[cfg(feature = "cuda")]
#[test]
fn arch_fixtures_on_cuda() {
    use anyllama::backend::cuda::CudaOptions;
    for exact in [true, false] {
        let options = CudaOptions {
            exact,
            ..Default::default()
        };
        if let Some(b) = common::cuda_with(options) {
            check_arch(&b, exact);
        }
    }
}

#[test]
fn hf_fixtures_on_cpu() {
    let n = check_all(&Cpu::new(), true);
    assert!(n >= 14, "only {n} cases ran");
}

#[cfg(feature = "wgpu")]
#[test]
fn hf_fixtures_on_wgpu() {
    if let Some(b) = common::wgpu_backend() {
        let n = check_all(&b, true);
        assert!(n >= 14, "only {n} cases ran");
    }
}

#[cfg(feature = "cuda")]
#[test]
fn hf_fixtures_on_cuda() {
    use anyllama::backend::cuda::CudaOptions;
    for exact in [true, false] {
        let options = CudaOptions {
            exact,
            ..Default::default()
        };
        if let Some(b) = common::cuda_with(options) {
            let n = check_all(&b, exact);
            assert!(n >= 14, "only {n} cases ran");
        }
    }
}

/// Generation enqueues the step after each token before the token reaches the host, and takes
/// that step back when the token ends generation. Stopping early (by EOS or by the callback)
/// and resuming with the conversation so far must then give what one uninterrupted run gives,
/// reusing the cache of every token that was fed before the stop.
fn stop_and_resume<B: Backend>(b: &B) {
    let dir = fixtures().join("hf").join("default-mha-f32-v4");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let prompt = ids(&expected["cases"][0]["prompt_ids"]);
    let mut model = load(b, &dir, None);
    let mut gen = Generator::new(b, &mut model, 128, DType::F32, 64).unwrap();
    let opts = |n: usize, eos: Vec<u32>| GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams::greedy(),
        ignore_eos: eos.is_empty(),
        eos_ids: eos,
    };
    let whole = gen
        .generate(&prompt, &opts(24, vec![]), &mut |_| true)
        .unwrap();
    assert_eq!(whole.tokens.len(), 24);
    let t = &whole.tokens;

    // Stopped by the callback after 10 tokens, then resumed for the rest.
    gen.reset();
    let mut seen = 0;
    let first = gen
        .generate(&prompt, &opts(24, vec![]), &mut |_| {
            seen += 1;
            seen < 10
        })
        .unwrap();
    assert_eq!(
        first.tokens,
        t[..10],
        "{}: stopped by the callback",
        b.name()
    );
    let so_far = [&prompt[..], &first.tokens].concat();
    let rest = gen
        .generate(&so_far, &opts(14, vec![]), &mut |_| true)
        .unwrap();
    assert_eq!(rest.stats.cached_tokens, so_far.len() - 1, "{}", b.name());
    assert_eq!(
        rest.tokens,
        t[10..],
        "{}: resumed after the callback",
        b.name()
    );

    // Stopped by EOS at token 6 (not emitted, not cached), then resumed from it.
    let eos = t[6];
    let stop = t.iter().position(|&x| x == eos).unwrap();
    gen.reset();
    let first = gen
        .generate(&prompt, &opts(24, vec![eos]), &mut |_| true)
        .unwrap();
    assert_eq!(first.tokens, t[..stop], "{}: stopped by EOS", b.name());
    let so_far = [&prompt[..], &t[..=stop]].concat();
    let rest = gen
        .generate(&so_far, &opts(23 - stop, vec![]), &mut |_| true)
        .unwrap();
    assert_eq!(rest.stats.cached_tokens, so_far.len() - 1, "{}", b.name());
    assert_eq!(
        rest.tokens,
        t[stop + 1..],
        "{}: resumed after EOS",
        b.name()
    );
}

#[test]
fn stop_and_resume_on_cpu() {
    stop_and_resume(&Cpu::new());
}

#[cfg(feature = "wgpu")]
#[test]
fn stop_and_resume_on_wgpu() {
    if let Some(b) = common::wgpu_backend() {
        stop_and_resume(&b);
    }
}

#[cfg(feature = "cuda")]
#[test]
fn stop_and_resume_on_cuda() {
    if let Some(b) = common::cuda_with(Default::default()) {
        stop_and_resume(&b);
    }
}

/// A sliding window runs as full attention, exact up to the window's length: a longer context
/// is refused with the reason, never computed wrong.
#[test]
fn contexts_past_a_sliding_window_are_refused() {
    let dir = fixtures().join("arch").join("mistral-gqa4-f32-window");
    let cfg = ModelConfig::from_hf_dir(&dir).unwrap();
    assert_eq!(cfg.sliding_window, Some(64));
    cfg.check_context(64).unwrap();
    let e = cfg.check_context(65).unwrap_err().to_string();
    assert!(
        e.contains("sliding window of 64") && e.contains("65"),
        "{e}"
    );
    let qwen3 = ModelConfig::from_hf_dir(&fixtures().join("arch").join("qwen3-gqa2-f32-headdim"));
    assert_eq!(qwen3.unwrap().sliding_window, None);
}
