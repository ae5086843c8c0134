//! `convert::hf_to_gguf` on the tiny HF fixtures (tests/fixtures/hf, references from transformers):
//! the GGUF file we write, read back by our own loader, gives transformers' logits (f32 tightly,
//! bf16 and Q8_0 within their rounding), keeps the tokenizer and chat template, and stores
//! what it cannot quantize as f16. Models GGUF cannot describe, and bad requests, are refused
//! with clear errors and leave nothing behind. The real-model round trips are in convert_real.rs.

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::config::{ModelConfig, RopeScaling};
use anyllama::convert::{gguf_to_hf, hf_to_gguf};
use anyllama::dtype::DType;
use anyllama::generate::Generator;
use anyllama::loader::ModelFiles;
use anyllama::model::Model;
use anyllama::weights::gguf::{GgmlType, GgufFile};
use anyllama::weights::safetensors::SafetensorsSource;
use anyllama::weights::{load_weights, tensor_name, TensorSource};
use common::{fixtures, nmse};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p =
            std::env::temp_dir().join(format!("anyllama-convert-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A model from a GGUF file or HF folder, through the weight loader only (no tokenizer needed).
fn model(b: &Cpu, path: &Path) -> Model<Cpu> {
    let (cfg, src, gguf): (ModelConfig, Box<dyn TensorSource>, bool) = if path.is_dir() {
        let cfg = ModelConfig::from_hf_dir(path).unwrap();
        (cfg, Box::new(SafetensorsSource::open(path).unwrap()), false)
    } else {
        let g = GgufFile::open(path).unwrap();
        (g.model_config().unwrap(), Box::new(g), true)
    };
    let w = load_weights(b, src.as_ref(), &cfg, gguf, &|_| {}).unwrap();
    Model::new(b, cfg, w).unwrap()
}

fn logits(b: &Cpu, m: &mut Model<Cpu>, prompt: &[u32]) -> Vec<f32> {
    let mut gen = Generator::new(b, m, prompt.len().max(16), DType::F32, 64).unwrap();
    gen.all_logits(prompt).unwrap()
}

fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(fixtures().join("hf"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs
}

/// Nothing of a failed conversion is left: neither the output nor its `.partial`.
fn assert_nothing_left(out: &Path) {
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    assert!(
        !out.exists() && !Path::new(&partial).exists(),
        "{} left behind",
        out.display()
    );
}

#[test]
fn hf_fixtures_to_gguf_give_transformers_logits() {
    let b = Cpu::new();
    let tmp = Scratch::new("fixtures");
    let mut checked = 0;
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let hf = ModelConfig::from_hf_dir(&dir).unwrap();
        // f32 holds every fixture weight exactly; bf16 and Q8_0 round them.
        for (dtype, bound) in [(DType::F32, 1e-8), (DType::BF16, 1e-2), (DType::Q8_0, 3e-2)] {
            let out = tmp.0.join(format!("{name}-{dtype}.gguf"));
            let result = hf_to_gguf(&dir, &out, dtype, &|_, _| {});
            if matches!(
                hf.rope_scaling,
                RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }
            ) {
                let e = result.unwrap_err().to_string();
                assert!(
                    e.contains("has no GGUF form") && e.contains(hf.rope_scaling.rope_type()),
                    "{name}: {e}"
                );
                assert_nothing_left(&out);
                continue;
            }
            result.unwrap_or_else(|e| panic!("{name} to {dtype}: {e}"));
            let mut m = model(&b, &out);
            let c = m.cfg.clone();
            let shape = |c: &ModelConfig| {
                (
                    c.vocab_size,
                    c.dim,
                    c.ffn_dim,
                    c.n_layers,
                    c.n_heads,
                    c.n_kv_heads,
                    c.head_dim,
                    c.max_seq_len,
                )
            };
            assert_eq!(shape(&c), shape(&hf), "{name}");
            assert_eq!(
                (c.norm_eps, c.rope_theta),
                (hf.norm_eps, hf.rope_theta),
                "{name}"
            );
            assert_eq!(
                (c.tie_embeddings, c.attention_bias, c.mlp_bias),
                (hf.tie_embeddings, hf.attention_bias, hf.mlp_bias),
                "{name}"
            );
            // llama3 comes back as an equivalent parameter set, the others as they were.
            assert_eq!(
                c.rope_scaling.rope_type(),
                hf.rope_scaling.rope_type(),
                "{name}"
            );
            if !matches!(hf.rope_scaling, RopeScaling::Llama3 { .. }) {
                assert_eq!(c.rope_scaling, hf.rope_scaling, "{name}");
            }
            let vocab = c.vocab_size;
            let mut worst = 0f64;
            for case in expected["cases"].as_array().unwrap() {
                let got = logits(&b, &mut m, &ids(&case["prompt_ids"]));
                let positions = case["logits_positions"].as_array().unwrap();
                for (p, want) in positions.iter().zip(case["logits"].as_array().unwrap()) {
                    let p = p.as_u64().unwrap() as usize;
                    let want: Vec<f32> = want
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_f64().unwrap() as f32)
                        .collect();
                    let e = nmse(&got[p * vocab..(p + 1) * vocab], &want);
                    worst = worst.max(e);
                    assert!(
                        e < bound,
                        "{name} as {dtype}: logits at {p}: nmse {e:e} >= {bound:e}"
                    );
                }
            }
            eprintln!("{name} as {dtype}: worst logits nmse {worst:e}");
            checked += 1;
        }
    }
    assert_eq!(checked, 15, "5 convertible fixtures x 3 types");
}

#[test]
fn tiny_chat_gguf_keeps_tokenizer_template_and_stop_tokens() {
    let dir = fixtures().join("hf/tiny-chat");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let tmp = Scratch::new("tiny-chat");
    let out = tmp.0.join("tiny-chat.gguf");
    hf_to_gguf(&dir, &out, DType::F32, &|_, _| {}).unwrap();
    let g = ModelFiles::open(&out).unwrap();
    let hf = ModelFiles::open(&dir).unwrap();
    for check in expected["tokenizer_checks"].as_array().unwrap() {
        let text = check["text"].as_str().unwrap();
        let got = g.tokenizer.encode(text, true).unwrap();
        assert_eq!(got, ids(&check["ids"]), "{text:?}");
        assert_eq!(
            g.tokenizer.decode(&got, false).unwrap(),
            check["decoded"].as_str().unwrap()
        );
    }
    for check in expected["chat_template_checks"].as_array().unwrap() {
        let messages: Vec<anyllama::chat_template::Message> = check["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                anyllama::chat_template::Message::new(
                    m["role"].as_str().unwrap(),
                    m["content"].as_str().unwrap(),
                )
            })
            .collect();
        let gen_prompt = check["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(
            g.tokenizer.encode_chat(&messages, gen_prompt).unwrap(),
            ids(&check["ids"])
        );
    }
    assert_eq!(g.tokenizer.specials(), hf.tokenizer.specials());
    let (mut a, mut b) = (g.eos_ids(), hf.eos_ids());
    a.sort();
    b.sort();
    assert_eq!(
        a, b,
        "stop tokens (generation_config.json's two become EOS + end of turn)"
    );
}

/// A random HF model folder; `edit` may change its config and tensors before they are written.
fn synthetic(dir: &Path, config: Value, edit: impl Fn(&str, &mut [f32])) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let c = ModelConfig::from_hf_dir(dir).unwrap();
    let (d, f, q, kv, v) = (c.dim, c.ffn_dim, c.q_dim(), c.kv_dim(), c.vocab_size);
    let mut shapes = vec![
        ("tok_embeddings", 0, vec![v, d]),
        ("norm", 0, vec![d]),
        ("output", 0, vec![v, d]),
    ];
    for l in 0..c.n_layers {
        for (r, s) in [
            ("attn_norm", vec![d]),
            ("ffn_norm", vec![d]),
            ("wq", vec![q, d]),
            ("wk", vec![kv, d]),
            ("wv", vec![kv, d]),
            ("wo", vec![d, q]),
            ("w1", vec![f, d]),
            ("w2", vec![d, f]),
            ("w3", vec![f, d]),
            ("bq", vec![q]),
            ("bk", vec![kv]),
            ("bv", vec![kv]),
            ("bo", vec![d]),
            ("b1", vec![f]),
            ("b2", vec![d]),
            ("b3", vec![f]),
        ] {
            shapes.push((r, l, s));
        }
    }
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (role, layer, shape) in shapes {
        let name = tensor_name(role, layer, false);
        let mut values: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if role.contains("norm") {
                    1.0 + u * 0.2
                } else {
                    u * 0.4
                }
            })
            .collect();
        edit(&name, &mut values);
        data.push((
            name,
            shape,
            values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn synthetic_config() -> Value {
    // Rows of 40 values are not whole 32-value blocks; rows of ffn_down (64) are.
    json!({"model_type": "llama", "hidden_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1,
           "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 96, "max_position_embeddings": 64,
           "rms_norm_eps": 1e-5, "attention_bias": true, "mlp_bias": true, "tie_word_embeddings": false,
           "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}})
}

#[test]
fn rows_that_are_not_whole_blocks_are_stored_as_f16() {
    let b = Cpu::new();
    let tmp = Scratch::new("synthetic");
    let dir = tmp.0.join("hf");
    synthetic(&dir, synthetic_config(), |_, _| {});
    let prompt: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 96).collect();
    let want = logits(&b, &mut model(&b, &dir), &prompt);
    for (dtype, bound) in [(DType::F32, 1e-12), (DType::Q8_0, 1e-3)] {
        let out = tmp.0.join(format!("m-{dtype}.gguf"));
        let done = std::cell::Cell::new((0, 0));
        hf_to_gguf(&dir, &out, dtype, &|d, t| done.set((d, t))).unwrap();
        assert!(
            done.get().0 == done.get().1 && done.get().1 > 0,
            "progress {:?}",
            done.get()
        );
        let g = GgufFile::open(&out).unwrap();
        let ty = |n: &str| {
            g.tensor_info(n)
                .unwrap_or_else(|| panic!("{n} missing"))
                .ggml_type
        };
        let matrix = |rows_whole: bool| match dtype {
            DType::Q8_0 if !rows_whole => GgmlType::F16,
            d => GgmlType::from_dtype(d),
        };
        assert_eq!(ty("token_embd.weight"), matrix(false));
        assert_eq!(ty("blk.1.attn_q.weight"), matrix(false));
        assert_eq!(ty("blk.1.ffn_down.weight"), matrix(true));
        for n in [
            "rope_freqs.weight",
            "blk.0.attn_q.bias",
            "blk.0.ffn_norm.weight",
            "output_norm.weight",
        ] {
            assert_eq!(ty(n), GgmlType::F32, "{n}");
        }
        let mut m = model(&b, &out);
        assert!(
            matches!(m.cfg.rope_scaling, RopeScaling::Llama3 { .. }),
            "{:?}",
            m.cfg.rope_scaling
        );
        let e = nmse(&logits(&b, &mut m, &prompt), &want);
        eprintln!("synthetic as {dtype}: logits nmse {e:e}");
        assert!(e < bound, "{dtype}: nmse {e:e} >= {bound:e}");
    }
}

#[test]
fn bad_requests_and_unwritable_models_are_refused_cleanly() {
    let tmp = Scratch::new("errors");
    let fixture = fixtures().join("hf/default-mha-f32-v4");
    let err = |r: anyllama::Result<()>| r.unwrap_err().to_string();
    let out = tmp.0.join("x.gguf");
    let e = err(hf_to_gguf(&fixture, &out, DType::Q4K, &|_, _| {}));
    assert!(e.contains("q4_k") && e.contains("q8_0"), "{e}");
    let e = err(hf_to_gguf(
        &fixture,
        &tmp.0.join("x.bin"),
        DType::F32,
        &|_, _| {},
    ));
    assert!(e.contains(".gguf"), "{e}");
    std::fs::write(&out, b"keep me").unwrap();
    let e = err(hf_to_gguf(&fixture, &out, DType::F32, &|_, _| {}));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let e = err(gguf_to_hf(
        &fixture,
        &tmp.0.join("hf"),
        DType::F32,
        &|_, _| {},
    ));
    assert!(e.contains("not a .gguf file"), "{e}");
    let e = err(gguf_to_hf(&out, &tmp.0.join("hf"), DType::Q8_0, &|_, _| {}));
    assert!(e.contains("f32, f16 or bf16"), "{e}");
    let e = err(gguf_to_hf(&out, &tmp.0.join("hf"), DType::F32, &|_, _| {}));
    assert!(e.contains("x.gguf") && e.contains("too short"), "{e}");
    assert_nothing_left(&tmp.0.join("hf"));

    // A tensor whose shape the config contradicts is named.
    let dir = tmp.0.join("wrong-shape");
    let mut config = synthetic_config();
    synthetic(&dir, config.clone(), |_, _| {});
    config["intermediate_size"] = json!(96);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let out = tmp.0.join("wrong-shape.gguf");
    let e = err(hf_to_gguf(&dir, &out, DType::F32, &|_, _| {}));
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[64, 40]"),
        "{e}"
    );
    assert_nothing_left(&out);

    // A SentencePiece-style vocabulary (byte fallback, "▁" for spaces) has no GGUF form here.
    let dir = tmp.0.join("sentencepiece");
    let mut config = synthetic_config();
    config["vocab_size"] = json!(400);
    synthetic(&dir, config, |_, _| {});
    let sp = fixtures().join("tokenizer/sp_llama/tokenizer.json");
    std::fs::copy(sp, dir.join("tokenizer.json")).unwrap();
    let out = tmp.0.join("sentencepiece.gguf");
    let e = err(hf_to_gguf(&dir, &out, DType::F32, &|_, _| {}));
    assert!(
        e.contains("byte_fallback") && e.contains("only byte-level BPE"),
        "{e}"
    );
    assert_nothing_left(&out);

    // Values a 16-bit type cannot hold stop the conversion midway; nothing is left behind.
    let dir = tmp.0.join("huge");
    synthetic(&dir, synthetic_config(), |n, v| {
        if n == "model.layers.1.mlp.up_proj.weight" {
            v[5] = 1e6;
        }
    });
    let out = tmp.0.join("huge.gguf");
    let e = err(hf_to_gguf(&dir, &out, DType::F16, &|_, _| {}));
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("f16"),
        "{e}"
    );
    assert_nothing_left(&out);
    hf_to_gguf(&dir, &out, DType::BF16, &|_, _| {}).unwrap(); // bf16 has the range
}

#[test]
fn embedding_rows_past_the_tokenizer_become_unused_tokens() {
    let tmp = Scratch::new("padded");
    let dir = tmp.0.join("hf");
    let mut config = synthetic_config();
    config["vocab_size"] = json!(520); // tiny-chat's tokenizer has 512 tokens
    synthetic(&dir, config, |_, _| {});
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("hf/tiny-chat").join(f), dir.join(f)).unwrap();
    }
    let out = tmp.0.join("padded.gguf");
    hf_to_gguf(&dir, &out, DType::F32, &|_, _| {}).unwrap();
    let g = GgufFile::open(&out).unwrap();
    let tokens = g
        .get_string_array("tokenizer.ggml.tokens")
        .unwrap()
        .unwrap();
    assert_eq!((tokens.len(), tokens[515].as_str()), (520, "[PAD515]"));
    let types = g
        .get_array("tokenizer.ggml.token_type")
        .unwrap()
        .unwrap()
        .to_i64_vec()
        .unwrap();
    assert_eq!((types[1], types[100], types[515]), (3, 1, 5)); // control, normal, unused
    let files = ModelFiles::open(&out).unwrap();
    let hf = ModelFiles::open(&dir).unwrap();
    for text in ["Hello world", "<|im_start|>user\n12 [PAD515]<|im_end|>"] {
        assert_eq!(
            files.tokenizer.encode(text, true).unwrap(),
            hf.tokenizer.encode(text, true).unwrap(),
            "{text:?}"
        );
    }
}
