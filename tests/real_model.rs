//! The real SmolLM2-135M-Instruct (Q4_1 GGUF) against HF transformers' greedy output on the same
//! file (tests/fixtures/smollm2/expected.json, made by make_expected.py): several chat and raw
//! prompts, 48 new tokens each, identical ids on every backend (f32 KV cache).

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::Backend;
use anyllama::dtype::DType;
use anyllama::generate::{GenerateOptions, Generator, StopReason};
use anyllama::model::Model;
use anyllama::sample::SamplingParams;
use anyllama::weights::gguf::GgufFile;
use anyllama::weights::load_weights;
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check<B: Backend>(b: &B) {
    let Some(path) = common::smollm2_gguf() else {
        return;
    };
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("smollm2/expected.json")).unwrap(),
    )
    .unwrap();
    let g = GgufFile::open(&path).unwrap();
    let cfg = g.model_config().unwrap();
    let eos = cfg.eos_token_ids.clone();
    let w = load_weights(b, &g, &cfg, true, &|_| {}).unwrap();
    let mut model = Model::new(b, cfg, w).unwrap();
    let mut gen = Generator::new(b, &mut model, 512, DType::F32, 128).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: expected["new_tokens"].as_u64().unwrap() as usize,
        sampling: SamplingParams::greedy(),
        eos_ids: eos,
        ignore_eos: false,
    };
    for (i, case) in expected["cases"].as_array().unwrap().iter().enumerate() {
        gen.reset();
        let out = gen
            .generate(&ids(&case["prompt_ids"]), &opts, &mut |_| true)
            .unwrap();
        let mut got = out.tokens.clone();
        if out.reason == StopReason::Eos {
            got.push(opts.eos_ids[0]); // HF's output ends with the eos token it stopped on
        }
        assert_eq!(
            got,
            ids(&case["generated_ids"]),
            "case {i} ({}) on {}: {:?}",
            case["kind"],
            b.name(),
            case["text"]
        );
    }
}

#[test]
fn smollm2_greedy_matches_transformers_on_cpu() {
    check(&Cpu::new());
}

#[cfg(feature = "wgpu")]
#[test]
fn smollm2_greedy_matches_transformers_on_wgpu() {
    if let Some(b) = common::wgpu_backend() {
        check(&b);
    }
}
