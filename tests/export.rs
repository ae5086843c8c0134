//! `train::export::save_hf`: a fully fine-tuned model (tiny-chat, bf16 weights on the device;
//! the same model from an f32 GGUF file) saved as an HF folder loads back with the trained
//! model's logits, identical in f32 and within bf16 rounding in bf16; weights changed on the
//! device (an untied classifier and biases included) are what the folder holds; tied embeddings
//! stay tied; tokenizer, chat template and generation config come along. Block-quantized
//! weights, models with adapters and outputs that exist are refused. (Sharding with a small
//! limit is tested in the module itself.)

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::Backend;
use anyllama::convert::hf_to_gguf;
use anyllama::dtype::DType;
use anyllama::generate::Generator;
use anyllama::loader::ModelFiles;
use anyllama::model::Model;
use anyllama::train::export::{save_hf, write_tokenizer_files, DEFAULT_DTYPE};
use anyllama::train::lora::{Lora, LoraConfig};
use anyllama::train::optim::OptimConfig;
use anyllama::train::params::Trained;
use anyllama::train::step::{Checkpointing, MicroBatch, Trainer};
use anyllama::weights::safetensors::SafetensorsSource;
use anyllama::weights::TensorSource;
use common::{fixtures, nmse};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("anyllama-export-{}-{name}", std::process::id()));
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

fn tiny_chat() -> PathBuf {
    fixtures().join("hf/tiny-chat")
}

fn prompt(vocab: usize) -> Vec<u32> {
    (0..24).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

fn logits(b: &Cpu, m: &mut Model<Cpu>) -> Vec<f32> {
    let p = prompt(m.cfg.vocab_size);
    let mut gen = Generator::new(b, m, 32, DType::F32, 64).unwrap();
    gen.all_logits(&p).unwrap()
}

/// Two full fine-tuning steps on one packed batch of two sequences.
fn fine_tune(b: &Cpu, m: &mut Model<Cpu>) {
    let vocab = m.cfg.vocab_size;
    let mut mb = MicroBatch::default();
    for (len, mul) in [(12usize, 53usize), (9, 29)] {
        let tokens: Vec<u32> = (0..len).map(|i| ((i * mul + 5) % vocab) as u32).collect();
        let labels: Vec<i32> = (0..len)
            .map(|i| tokens.get(i + 1).map_or(-100, |&t| t as i32))
            .collect();
        mb.tokens.extend(tokens);
        mb.labels.extend(labels);
        mb.lens.push(len);
    }
    let optim = OptimConfig {
        lr: 1e-2,
        total_steps: 2,
        ..Default::default()
    };
    let rows = mb.tokens.len();
    let mut t = Trainer::new(b, m, Trained::Full, Checkpointing::Off, rows, optim).unwrap();
    for _ in 0..2 {
        t.step(b, m, std::slice::from_ref(&mb)).unwrap();
    }
}

/// Rounds every norm weight on the device to bf16 (what saving them as bf16 does).
fn round_norms_to_bf16(b: &Cpu, m: &mut Model<Cpu>) {
    let dim = m.cfg.dim;
    let mut norms = vec![&mut m.w.norm];
    for l in &mut m.w.layers {
        norms.push(&mut l.attn_norm);
        norms.push(&mut l.ffn_norm);
    }
    for buf in norms {
        let mut raw = vec![0u8; dim * 4];
        b.read(buf, 0, &mut raw).unwrap();
        let v: Vec<f32> = bytemuck::pod_collect_to_vec(&raw);
        let r: Vec<f32> = v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_ne!(v, r, "training moved the norm off the bf16 grid");
        b.upload(buf, 0, bytemuck::cast_slice(&r)).unwrap();
    }
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Saves `m` as `dtype`, loads the folder again and returns the loaded model.
fn save_and_load(
    b: &Cpu,
    m: &Model<Cpu>,
    files: &ModelFiles,
    out: &Path,
    dtype: DType,
) -> Model<Cpu> {
    save_hf(b, m, files, out, dtype).unwrap_or_else(|e| panic!("saving {}: {e}", out.display()));
    assert!(!out.with_extension("partial").exists());
    let st = SafetensorsSource::open(out).unwrap();
    for n in st.names() {
        assert_eq!(st.get(&n).unwrap().unwrap().dtype, dtype, "{n}");
    }
    ModelFiles::open(out).unwrap().load(b, false).unwrap()
}

#[test]
fn fully_fine_tuned_tiny_chat_saves_and_loads_back() {
    let b = Cpu::new();
    let tmp = Scratch::new("tiny-chat");
    let base = tiny_chat();
    let files = ModelFiles::open(&base).unwrap();
    let mut m = files.load(&b, false).unwrap();
    assert_eq!(m.w.tok_embeddings.dtype, DType::BF16);
    let before = logits(&b, &mut m);
    fine_tune(&b, &mut m);
    let after = logits(&b, &mut m);
    assert!(nmse(&before, &after) > 1e-6, "training changed the model");

    // f32 holds the device's bf16 weights and f32 norms exactly.
    let out = tmp.0.join("f32");
    let mut again = save_and_load(&b, &m, &files, &out, DType::F32);
    assert_eq!(logits(&b, &mut again), after);

    // bf16 (the default): the matrices are the device's bytes; the f32 norms are rounded to
    // bf16, and with them rounded on the device too the logits are the same again.
    let out = tmp.0.join("bf16");
    let mut again = save_and_load(&b, &m, &files, &out, DEFAULT_DTYPE);
    let got = logits(&b, &mut again);
    let e = nmse(&got, &after);
    println!("bf16: nmse {e:e} against the f32 norms");
    assert!(e < 1e-3, "bf16: nmse {e:e}");
    round_norms_to_bf16(&b, &mut m);
    assert_eq!(got, logits(&b, &mut m));
    let st = SafetensorsSource::open(&out).unwrap();
    let w = &m.w.layers[1].wv;
    let mut raw = vec![0u8; w.rows * w.cols * 2];
    b.read(&w.buf, 0, &mut raw).unwrap();
    let saved = st
        .get("model.layers.1.self_attn.v_proj.weight")
        .unwrap()
        .unwrap();
    assert_eq!(&saved.data[..], &raw[..]);

    // Tied stays tied; the side files are the base's own.
    assert!(st.get("lm_head.weight").unwrap().is_none());
    let config = json_file(&out.join("config.json"));
    assert_eq!(config["tie_word_embeddings"], json!(true));
    assert_eq!(config["dtype"], json!("bfloat16"));
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(base.join(f)).unwrap(),
            "{f}"
        );
    }
    let loaded = ModelFiles::open(&out).unwrap();
    assert_eq!(
        loaded.tokenizer.chat_template(),
        files.tokenizer.chat_template()
    );
    assert_eq!(loaded.eos_ids(), files.eos_ids());

    // The tokenizer files alone, into an adapter folder that exists.
    let adapter = tmp.0.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::write(adapter.join("adapter_config.json"), "{}").unwrap();
    write_tokenizer_files(&files, &adapter).unwrap();
    assert_eq!(
        std::fs::read(adapter.join("tokenizer_config.json")).unwrap(),
        std::fs::read(base.join("tokenizer_config.json")).unwrap()
    );
    let tok = anyllama::tokenizer::Tokenizer::from_hf_dir(&adapter).unwrap();
    assert_eq!(tok.chat_template(), files.tokenizer.chat_template());
}

#[test]
fn a_gguf_base_fine_tuned_in_f32_saves_with_its_tokenizer() {
    let b = Cpu::new();
    let tmp = Scratch::new("gguf");
    let gguf = tmp.0.join("tiny-chat.gguf");
    hf_to_gguf(&tiny_chat(), &gguf, DType::F32, &|_, _| {}).unwrap();
    let files = ModelFiles::open(&gguf).unwrap();
    let mut m = files.load(&b, false).unwrap();
    assert_eq!(m.w.tok_embeddings.dtype, DType::F32);
    fine_tune(&b, &mut m);
    let after = logits(&b, &mut m);
    let out = tmp.0.join("hf");
    let mut again = save_and_load(&b, &m, &files, &out, DType::F32);
    assert_eq!(logits(&b, &mut again), after);
    let loaded = ModelFiles::open(&out).unwrap();
    assert_eq!(
        loaded.tokenizer.chat_template(),
        files.tokenizer.chat_template()
    );
    assert_eq!(loaded.tokenizer.specials(), files.tokenizer.specials());
    let text = "hello tiny world";
    assert_eq!(
        loaded.tokenizer.encode(text, true).unwrap(),
        files.tokenizer.encode(text, true).unwrap()
    );
    let (mut x, mut y) = (loaded.eos_ids(), files.eos_ids());
    x.sort();
    y.sort();
    assert_eq!(x, y);
    assert_eq!(
        json_file(&out.join("config.json"))["tie_word_embeddings"],
        json!(true)
    );
}

/// tiny-chat made untied (an lm_head of its own) with q/k/v/o and MLP biases.
fn untied_with_biases(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let base = tiny_chat();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(base.join(f), dir.join(f)).unwrap();
    }
    let mut config = json_file(&base.join("config.json"));
    config["tie_word_embeddings"] = json!(false);
    config["attention_bias"] = json!(true);
    config["mlp_bias"] = json!(true);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(base.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rand = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect()
    };
    let lm: Vec<u8> = rand(512 * 48)
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect();
    tensors.push((
        "lm_head.weight".into(),
        safetensors::Dtype::BF16,
        vec![512, 48],
        lm,
    ));
    for l in 0..2 {
        for (m, n) in [
            ("self_attn.q_proj", 96),
            ("self_attn.k_proj", 32),
            ("self_attn.v_proj", 32),
            ("self_attn.o_proj", 48),
            ("mlp.gate_proj", 96),
            ("mlp.up_proj", 96),
            ("mlp.down_proj", 48),
        ] {
            let v: Vec<u8> = rand(n).iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((
                format!("model.layers.{l}.{m}.bias"),
                safetensors::Dtype::F32,
                vec![n],
                v,
            ));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn weights_changed_on_the_device_are_what_the_folder_holds() {
    let b = Cpu::new();
    let tmp = Scratch::new("modified");
    let dir = tmp.0.join("untied");
    untied_with_biases(&dir);
    let files = ModelFiles::open(&dir).unwrap();
    let mut m = files.load(&b, false).unwrap();
    assert!(m.w.layers[0].bq.is_some());
    let before = logits(&b, &mut m);

    // New values for a projection (bf16 on the device), the classifier, a bias and a norm.
    let w = &mut m.w.layers[1].wq;
    let n = w.rows * w.cols;
    let wq: Vec<half::bf16> = (0..n)
        .map(|i| half::bf16::from_f32(((i % 17) as f32 - 8.0) * 0.01))
        .collect();
    b.upload(&mut w.buf, 0, bytemuck::cast_slice(&wq)).unwrap();
    let bias: Vec<f32> = (0..32).map(|i| i as f32 * 0.05 - 0.5).collect();
    b.upload(
        m.w.layers[0].bv.as_mut().unwrap(),
        0,
        bytemuck::cast_slice(&bias),
    )
    .unwrap();
    let norm: Vec<f32> = (0..48).map(|i| 1.0 + i as f32 / 64.0).collect();
    b.upload(&mut m.w.norm, 0, bytemuck::cast_slice(&norm))
        .unwrap();
    let changed = logits(&b, &mut m);
    assert!(nmse(&before, &changed) > 1e-6);

    let out = tmp.0.join("saved");
    let mut again = save_and_load(&b, &m, &files, &out, DType::F32);
    assert_eq!(logits(&b, &mut again), changed);
    let st = SafetensorsSource::open(&out).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        bytemuck::pod_collect_to_vec(&st.get(name).unwrap().unwrap().data)
    };
    let wq32: Vec<f32> = wq.iter().map(|v| v.to_f32()).collect();
    assert_eq!(f32s("model.layers.1.self_attn.q_proj.weight"), wq32);
    assert_eq!(f32s("model.layers.0.self_attn.v_proj.bias"), bias);
    assert_eq!(f32s("model.norm.weight"), norm);
    assert!(st.get("lm_head.weight").unwrap().is_some());
    let config = json_file(&out.join("config.json"));
    assert_eq!(config["tie_word_embeddings"], json!(false));
    assert_eq!(
        (config["attention_bias"].clone(), config["mlp_bias"].clone()),
        (json!(true), json!(true))
    );
}

#[test]
fn what_cannot_be_saved_is_refused() {
    let b = Cpu::new();
    let tmp = Scratch::new("errors");
    let err = |r: anyllama::Result<()>| r.unwrap_err().to_string();

    // Block-quantized weights (tiny-chat's down_proj rows are whole q8_0 blocks).
    let gguf = tmp.0.join("q8.gguf");
    hf_to_gguf(&tiny_chat(), &gguf, DType::Q8_0, &|_, _| {}).unwrap();
    let files = ModelFiles::open(&gguf).unwrap();
    let m = files.load(&b, false).unwrap();
    let out = tmp.0.join("out");
    let e = err(save_hf(&b, &m, &files, &out, DType::BF16));
    assert!(
        e.contains("q8_0 blocks") && e.contains("o_proj.weight"),
        "{e}"
    );
    assert!(!out.exists());

    let files = ModelFiles::open(&tiny_chat()).unwrap();
    let mut m = files.load(&b, false).unwrap();
    let e = err(save_hf(&b, &m, &files, &out, DType::Q8_0));
    assert!(e.contains("f32, f16 or bf16"), "{e}");
    let e = err(save_hf(&b, &m, &files, &tiny_chat(), DType::BF16));
    assert!(
        e.contains("already exists") || e.contains("source itself"),
        "{e}"
    );
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep"), b"keep me").unwrap();
    let e = err(save_hf(&b, &m, &files, &out, DType::BF16));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(out.join("keep")).unwrap(), b"keep me");

    m.lora = Some(Lora::new(&b, &m.cfg, LoraConfig::default(), 1).unwrap());
    let e = err(save_hf(&b, &m, &files, &tmp.0.join("lora"), DType::BF16));
    assert!(e.contains("LoRA") && e.contains("peft::save"), "{e}");
    assert!(!tmp.0.join("lora").exists());
}
