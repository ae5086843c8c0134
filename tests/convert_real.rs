//! The converter on the real SmolLM2-135M-Instruct GGUF (Q4_1; the default model, or
//! `ANYLLAMA_SMOLLM2_GGUF`): GGUF -> HF folder in f32 / f16 / bf16 gives the GGUF's logits (f32
//! within 1e-10 NMSE), the same config, tokenizer, chat template and stop tokens; HF -> GGUF again
//! at f32 gives the folder's logits exactly. transformers, loading the f32 folder we wrote, gave
//! the logits and greedy tokens in tests/fixtures/convert/transformers_smollm2.json (made by
//! check_transformers.py there); ours on that folder must agree.
//!
//! Set `ANYLLAMA_CONVERT_OUT` to a folder to keep the converted files there.

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::chat_template::Message;
use anyllama::config::ModelConfig;
use anyllama::convert::{gguf_to_hf, hf_to_gguf};
use anyllama::dtype::DType;
use anyllama::generate::Generator;
use anyllama::loader::ModelFiles;
use common::{fixtures, nmse};
use serde_json::Value;
use std::cell::Cell;
use std::path::PathBuf;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn logits(b: &Cpu, files: &ModelFiles, prompt: &[u32]) -> Vec<f32> {
    let mut m = files.load(b, false).unwrap();
    let mut gen = Generator::new(b, &mut m, 64, DType::F32, 64).unwrap();
    gen.all_logits(prompt).unwrap()
}

/// The config, less the informational stored dtype.
fn shape_of(files: &ModelFiles) -> ModelConfig {
    ModelConfig {
        torch_dtype: None,
        ..files.cfg.clone()
    }
}

/// `b` tokenizes every reference prompt as transformers did, and like `a` on harder text.
fn same_tokenizer(a: &ModelFiles, b: &ModelFiles, expected: &Value, what: &str) {
    for case in expected["cases"].as_array().unwrap() {
        let got = if case["kind"] == "chat" {
            let messages: Vec<Message> = case["prompt"]["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
                .collect();
            b.tokenizer.encode_chat(&messages, true).unwrap()
        } else {
            b.tokenizer
                .encode(case["prompt"]["text"].as_str().unwrap(), true)
                .unwrap()
        };
        assert_eq!(got, ids(&case["prompt_ids"]), "{what}: prompt ids");
        let text = b
            .tokenizer
            .decode(&ids(&case["generated_ids"]), true)
            .unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{what}: decoded text");
    }
    for text in [
        "a\n\n1 x  12 3.14159",
        "Café naïve über 日本語 🦙\t\r\n",
        "<|im_start|>user\nhi<|im_end|><|endoftext|>",
        "   leading and trailing   ",
    ] {
        for special in [false, true] {
            let (x, y) = (
                a.tokenizer.encode(text, special).unwrap(),
                b.tokenizer.encode(text, special).unwrap(),
            );
            assert_eq!(x, y, "{what}: {text:?}");
            assert_eq!(
                a.tokenizer.decode(&x, false).unwrap(),
                b.tokenizer.decode(&y, false).unwrap()
            );
        }
    }
    assert_eq!(
        a.tokenizer.chat_template(),
        b.tokenizer.chat_template(),
        "{what}"
    );
    assert_eq!(a.tokenizer.specials(), b.tokenizer.specials(), "{what}");
    assert_eq!(a.eos_ids(), b.eos_ids(), "{what}: stop tokens");
}

/// Our logits on the folder against transformers' on the same folder.
fn matches_transformers(b: &Cpu, folder: &ModelFiles, expected: &Value) {
    let reference = &json(fixtures().join("convert/transformers_smollm2.json"));
    // transformers tokenized and generated exactly as it did from the GGUF itself.
    let (theirs, original) = (
        reference["cases"].as_array().unwrap(),
        expected["cases"].as_array().unwrap(),
    );
    assert_eq!(theirs.len(), original.len());
    for (t, o) in theirs.iter().zip(original) {
        assert_eq!(ids(&t["prompt_ids"]), ids(&o["prompt_ids"]));
        assert_eq!(ids(&t["generated_ids"]), ids(&o["generated_ids"]));
    }
    let prompt = ids(&reference["logits_prompt_ids"]);
    let got = logits(b, folder, &prompt);
    let vocab = folder.cfg.vocab_size;
    let sampled: Vec<usize> = ids(&reference["sampled_ids"])
        .iter()
        .map(|&i| i as usize)
        .collect();
    for row in reference["sampled_logits"].as_array().unwrap() {
        let p = row["position"].as_u64().unwrap() as usize;
        let want: Vec<f32> = row["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let ours: Vec<f32> = sampled.iter().map(|&i| got[p * vocab + i]).collect();
        let e = nmse(&ours, &want);
        eprintln!("transformers on our folder, position {p}: nmse {e:e}");
        assert!(e < 1e-8, "position {p}: nmse {e:e} against transformers");
    }
    let margins = reference["margins"].as_array().unwrap();
    for (p, want) in ids(&reference["argmax"]).into_iter().enumerate() {
        let row = &got[p * vocab..(p + 1) * vocab];
        let best = (0..vocab).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        let decisive = margins[p].as_f64().unwrap() > 1e-3;
        assert!(
            !decisive || best as u32 == want,
            "argmax at {p}: {best} != {want}"
        );
    }
}

#[test]
fn smollm2_gguf_to_hf_and_back() {
    let Some(gguf) = common::smollm2_gguf() else {
        return;
    };
    let keep = std::env::var_os("ANYLLAMA_CONVERT_OUT").map(PathBuf::from);
    let base = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("anyllama-convert-real-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let run = || {
        let b = Cpu::new();
        let expected = json(fixtures().join("smollm2/expected.json"));
        let original = ModelFiles::open(&gguf).unwrap();
        let prompt = ids(&expected["cases"][0]["prompt_ids"])[..16].to_vec();
        let want = logits(&b, &original, &prompt);
        // Dequantized Q4_1 values are exact in f32, rounded in f16 / bf16.
        for (dtype, bound) in [(DType::F32, 1e-10), (DType::F16, 1e-5), (DType::BF16, 1e-3)] {
            let hf = base.join(format!("hf-{dtype}"));
            let seen = Cell::new((0, 0));
            gguf_to_hf(&gguf, &hf, dtype, &|d, t| seen.set((d, t))).unwrap();
            assert!(
                seen.get().0 == seen.get().1 && seen.get().1 > 0,
                "progress {:?}",
                seen.get()
            );
            let folder = ModelFiles::open(&hf).unwrap();
            assert_eq!(shape_of(&folder), shape_of(&original));
            same_tokenizer(&original, &folder, &expected, &format!("hf {dtype}"));
            let got = logits(&b, &folder, &prompt);
            let e = nmse(&got, &want);
            eprintln!("gguf -> hf {dtype}: logits nmse {e:e}");
            assert!(e < bound, "gguf -> hf {dtype}: nmse {e:e} >= {bound:e}");
            if dtype != DType::F32 {
                continue;
            }
            matches_transformers(&b, &folder, &expected);
            // And back: the same f32 values, the Q/K rows interleaved and put back.
            let again = base.join("roundtrip-f32.gguf");
            hf_to_gguf(&hf, &again, DType::F32, &|_, _| {}).unwrap();
            let back = ModelFiles::open(&again).unwrap();
            assert_eq!(shape_of(&back), shape_of(&original));
            same_tokenizer(&original, &back, &expected, "gguf -> hf -> gguf");
            let e = nmse(&logits(&b, &back, &prompt), &got);
            eprintln!("gguf -> hf -> gguf f32 against the folder: logits nmse {e:e}");
            assert!(e == 0.0, "round trip changed the logits: nmse {e:e}");
        }
    };
    let result = std::panic::catch_unwind(run);
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
