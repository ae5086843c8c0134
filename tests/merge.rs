//! `train::merge`: a PEFT LoRA adapter merged into its base gives the logits of the base with the
//! adapter applied unmerged (`Model::lora`), for HF bases in f32 and bf16 (the train fixtures with
//! their PEFT-written adapters, rsLoRA and biases included; tiny-chat with a random adapter) and
//! GGUF bases stored as q8_0, q4_1 and q4_k, written as HF folders (f32, bf16) and GGUF files
//! (f32, q8_0). Tokenizer, chat template and generation config are carried over as convert
//! carries them. Broken adapters, adapters for another model and outputs that exist are refused
//! with errors that name the file, and leave nothing behind.

mod common;

#[path = "hostile/gguf_writer.rs"]
#[allow(dead_code)]
mod gguf_writer;

use anyllama::backend::cpu::Cpu;
use anyllama::config::ModelConfig;
use anyllama::convert::hf_to_gguf;
use anyllama::dtype::DType;
use anyllama::generate::Generator;
use anyllama::loader::ModelFiles;
use anyllama::model::Model;
use anyllama::train::lora::{Lora, LoraConfig, Proj};
use anyllama::train::merge::merge;
use anyllama::train::peft;
use anyllama::weights::gguf::GgufFile;
use anyllama::weights::safetensors::SafetensorsSource;
use anyllama::weights::{load_weights, TensorSource};
use common::{fixtures, nmse};
use std::path::{Path, PathBuf};

/// A scratch folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("anyllama-merge-{}-{name}", std::process::id()));
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

/// The base with the adapter applied unmerged, its scale multiplied by `scale`.
fn with_adapter(b: &Cpu, base: &Path, adapter: &Path, scale: f32) -> Model<Cpu> {
    let mut m = model(b, base);
    let mut lora = peft::load(b, &m.cfg, adapter).unwrap();
    lora.scale *= scale;
    m.lora = Some(lora);
    m
}

fn logits(b: &Cpu, m: &mut Model<Cpu>, prompt: &[u32]) -> Vec<f32> {
    let mut gen = Generator::new(b, m, prompt.len().max(16), DType::F32, 64).unwrap();
    gen.all_logits(prompt).unwrap()
}

fn prompt(vocab: usize) -> Vec<u32> {
    (0..24).map(|i| ((i * 37 + 11) % vocab) as u32).collect()
}

/// Writes a random PEFT adapter for `cfg` (B non-zero, unlike PEFT's initialization).
fn random_adapter(b: &Cpu, cfg: &ModelConfig, dir: &Path, lora: LoraConfig, seed: u64) {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut rand = |n: usize, amp: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * amp
            })
            .collect()
    };
    let r = lora.r;
    let l = Lora::from_values(b, cfg, lora, |_, p| {
        let (out, inp) = p.shape(cfg);
        Ok((rand(r * inp, 1.0 / (inp as f32).sqrt()), rand(out * r, 0.2)))
    })
    .unwrap();
    peft::save(b, &l, "test base", dir).unwrap();
}

/// Nothing of a failed merge is left: neither the output nor its `.partial`.
fn assert_nothing_left(out: &Path) {
    let mut partial = out.as_os_str().to_owned();
    partial.push(".partial");
    assert!(
        !out.exists() && !Path::new(&partial).exists(),
        "{} left behind",
        out.display()
    );
}

/// Merges and checks the merged model's logits against the unmerged ones; returns the NMSE.
fn merged_nmse(b: &Cpu, base: &Path, adapter: &Path, scale: f32, out: &Path, dtype: DType) -> f64 {
    let last = std::cell::Cell::new((0, 1));
    merge(base, adapter, scale, out, dtype, &|d, t| last.set((d, t)))
        .unwrap_or_else(|e| panic!("merging into {}: {e}", out.display()));
    let (done, total) = last.get();
    assert_eq!(done, total, "progress ends at the total");
    let mut unmerged = with_adapter(b, base, adapter, scale);
    let p = prompt(unmerged.cfg.vocab_size);
    let want = logits(b, &mut unmerged, &p);
    let mut plain = model(b, base);
    let base_logits = logits(b, &mut plain, &p);
    assert!(
        nmse(&base_logits, &want) > 1e-6,
        "the adapter changes the logits"
    );
    let mut merged = model(b, out);
    assert!(merged.lora.is_none());
    nmse(&logits(b, &mut merged, &p), &want)
}

#[test]
fn peft_adapters_of_the_train_fixtures_merge_into_hf_folders() {
    let b = Cpu::new();
    let tmp = Scratch::new("train");
    for (name, scale) in [
        ("mha-f32", 1.0),
        ("gqa4-f32-tied", 1.0),
        ("gqa3-bf16", 1.0),
        ("llama3-rope-f32", 1.0), // rsLoRA
        ("bias-f32", 0.5),
    ] {
        let dir = fixtures().join("train").join(name);
        let adapter = dir.join("adapter_init");
        let out = tmp.0.join(name);
        let e = merged_nmse(&b, &dir, &adapter, scale, &out, DType::F32);
        println!("{name}: merged vs unmerged nmse {e:e}");
        assert!(e < 1e-10, "{name}: nmse {e:e}");
        // Same tensors as the base (tied stays tied), and what no adapter touches is unchanged.
        let (a, m) = (
            SafetensorsSource::open(&dir).unwrap(),
            SafetensorsSource::open(&out).unwrap(),
        );
        let (mut na, mut nm) = (a.names(), m.names());
        na.sort();
        nm.sort();
        assert_eq!(na, nm, "{name}");
        if !name.contains("bf16") {
            for t in [
                "model.embed_tokens.weight",
                "model.layers.1.input_layernorm.weight",
            ] {
                let (x, y) = (a.get(t).unwrap().unwrap(), m.get(t).unwrap().unwrap());
                assert_eq!(x.data, y.data, "{name}: {t}");
            }
        }
        // The same config, but for the dtype the weights are now stored in.
        let mut want = ModelConfig::from_hf_dir(&dir).unwrap();
        want.torch_dtype = Some("float32".into());
        assert_eq!(ModelConfig::from_hf_dir(&out).unwrap(), want, "{name}");
    }
}

#[test]
fn tiny_chat_merges_to_hf_and_gguf_with_its_tokenizer() {
    let b = Cpu::new();
    let tmp = Scratch::new("tiny-chat");
    let base = fixtures().join("hf/tiny-chat");
    let cfg = ModelConfig::from_hf_dir(&base).unwrap();
    let adapter = tmp.0.join("adapter");
    random_adapter(
        &b,
        &cfg,
        &adapter,
        LoraConfig {
            r: 4,
            alpha: 8.0,
            rslora: false,
            targets: Proj::ALL.to_vec(),
            dropout: 0.0,
        },
        7,
    );
    let files = ModelFiles::open(&base).unwrap();
    // f32 holds the merged weights without rounding; bf16 and q8_0 (rows of 48 values are not
    // whole blocks, so only down_proj is q8_0, the other matrices f16) round them.
    for (out, dtype, bound) in [
        ("hf-f32", DType::F32, 1e-10),
        ("hf-bf16", DType::BF16, 1e-3),
        ("m-f32.gguf", DType::F32, 1e-10),
        ("m-q8_0.gguf", DType::Q8_0, 1e-3),
    ] {
        let out = tmp.0.join(out);
        let e = merged_nmse(&b, &base, &adapter, 1.5, &out, dtype);
        println!("tiny-chat -> {}: nmse {e:e}", out.display());
        assert!(e < bound, "{}: nmse {e:e} >= {bound:e}", out.display());
        // Tokenizer, chat template and stop tokens come along.
        let merged = ModelFiles::open(&out).unwrap();
        assert_eq!(
            merged.tokenizer.chat_template(),
            files.tokenizer.chat_template()
        );
        assert_eq!(merged.tokenizer.specials(), files.tokenizer.specials());
        let text = "hello tiny world";
        assert_eq!(
            merged.tokenizer.encode(text, true).unwrap(),
            files.tokenizer.encode(text, true).unwrap()
        );
        let (mut a, mut e) = (merged.eos_ids(), files.eos_ids());
        a.sort();
        e.sort();
        assert_eq!(a, e);
        if !out.is_dir() {
            let g = GgufFile::open(&out).unwrap();
            let down = g.get("blk.0.ffn_down.weight").unwrap().unwrap();
            assert_eq!(down.dtype, dtype);
            assert!(g.get("output.weight").unwrap().is_none(), "tied stays tied");
        } else {
            // An HF base's side files are copied as they are.
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
            assert!(!out.join("lm_head.weight").exists());
            assert!(SafetensorsSource::open(&out)
                .unwrap()
                .get("lm_head.weight")
                .unwrap()
                .is_none());
        }
    }
}

/// A GGUF model whose ffn_down matrices are q4_k blocks (dim 8, ffn 256, one layer; the rest
/// f32), from the hostile tests' field-by-field writer.
fn q4_k_gguf(path: &Path) {
    use gguf_writer::{Gguf, V};
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let f32s = |n: usize, next: &mut dyn FnMut() -> u64| -> Vec<u8> {
        (0..n)
            .flat_map(|_| (((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6).to_le_bytes())
            .collect()
    };
    let gate = f32s(8 * 256, &mut next);
    let up = f32s(8 * 256, &mut next);
    // 8 rows of one q4_k block each: f16 d and dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles.
    let mut down = Vec::new();
    for _ in 0..8 {
        down.extend_from_slice(&half::f16::from_f32(0.004).to_le_bytes());
        down.extend_from_slice(&half::f16::from_f32(0.002).to_le_bytes());
        down.extend((0..140).map(|_| next() as u8));
    }
    let g = Gguf::tiny()
        .set("llama.feed_forward_length", V::U32(256))
        .tensor("blk.0.ffn_gate.weight", |t| {
            t.dims = vec![8, 256];
            t.data = gate;
        })
        .tensor("blk.0.ffn_up.weight", |t| {
            t.dims = vec![8, 256];
            t.data = up;
        })
        .tensor("blk.0.ffn_down.weight", |t| {
            t.dims = vec![256, 8];
            t.ty = 12; // GGML_TYPE_Q4_K
            t.data = down;
        });
    std::fs::write(path, g.bytes()).unwrap();
}

#[test]
fn quantized_gguf_bases_merge_through_their_decoders() {
    let b = Cpu::new();
    let tmp = Scratch::new("quant");
    let mut bases = Vec::new();
    for dtype in [DType::Q8_0, DType::Q4_1] {
        let path = tmp.0.join(format!("tiny-chat-{dtype}.gguf"));
        hf_to_gguf(&fixtures().join("hf/tiny-chat"), &path, dtype, &|_, _| {}).unwrap();
        bases.push(path);
    }
    let q4k = tmp.0.join("tiny-q4_k.gguf");
    q4_k_gguf(&q4k);
    let g = GgufFile::open(&q4k).unwrap();
    assert_eq!(
        g.get("blk.0.ffn_down.weight").unwrap().unwrap().dtype,
        DType::Q4K
    );
    bases.push(q4k);
    for (i, base) in bases.iter().enumerate() {
        let cfg = model(&b, base).cfg;
        let adapter = tmp.0.join(format!("adapter-{i}"));
        let targets = vec![Proj::Q, Proj::V, Proj::Down];
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            rslora: true,
            targets,
            dropout: 0.0,
        };
        random_adapter(&b, &cfg, &adapter, lora, 11 + i as u64);
        for (out, dtype) in [("hf", DType::F32), ("m.gguf", DType::F32)] {
            let out = tmp.0.join(format!("{i}-{out}"));
            let e = merged_nmse(&b, base, &adapter, 1.0, &out, dtype);
            println!("{} -> {}: nmse {e:e}", base.display(), out.display());
            assert!(e < 1e-10, "{}: nmse {e:e}", out.display());
            ModelFiles::open(&out).unwrap();
        }
    }
}

#[test]
fn bad_adapters_and_outputs_are_refused_cleanly() {
    let tmp = Scratch::new("errors");
    let err = |r: anyllama::Result<()>| r.unwrap_err().to_string();
    let base = fixtures().join("train/mha-f32");
    let adapter = base.join("adapter_init");
    let out = tmp.0.join("out");

    let missing = tmp.0.join("no-such-adapter");
    let e = err(merge(&base, &missing, 1.0, &out, DType::F32, &|_, _| {}));
    assert!(
        e.contains("no-such-adapter") && e.contains("no such adapter folder"),
        "{e}"
    );
    assert_nothing_left(&out);

    // Only the config: the weights file is named.
    let half = tmp.0.join("config-only");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::copy(
        adapter.join(peft::CONFIG_FILE),
        half.join(peft::CONFIG_FILE),
    )
    .unwrap();
    let e = err(merge(&base, &half, 1.0, &out, DType::F32, &|_, _| {}));
    assert!(e.contains(peft::WEIGHTS_FILE), "{e}");
    assert_nothing_left(&out);
    // Corrupt weights.
    std::fs::write(
        half.join(peft::WEIGHTS_FILE),
        b"\x08\0\0\0\0\0\0\0{\"a\":1}",
    )
    .unwrap();
    let e = err(merge(&base, &half, 1.0, &out, DType::F32, &|_, _| {}));
    assert!(e.contains(peft::WEIGHTS_FILE), "{e}");
    assert_nothing_left(&out);
    // A corrupt config.
    std::fs::write(half.join(peft::CONFIG_FILE), "{ not json").unwrap();
    let e = err(merge(&base, &half, 1.0, &out, DType::F32, &|_, _| {}));
    assert!(e.contains(peft::CONFIG_FILE), "{e}");

    // An adapter for another model (hidden 32, not 48): the tensor and both shapes are named.
    let other = fixtures().join("train/gqa3-bf16");
    let e = err(merge(&other, &adapter, 1.0, &out, DType::F32, &|_, _| {}));
    assert!(
        e.contains(
            "model.layers.0.self_attn.q_proj.lora_A.weight is [4, 32], this model needs [4, 48]"
        ) && e.contains(peft::WEIGHTS_FILE),
        "{e}"
    );
    assert_nothing_left(&out);

    // Target modules the model does not have.
    let config = std::fs::read_to_string(adapter.join(peft::CONFIG_FILE)).unwrap();
    let foreign = tmp.0.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::copy(
        adapter.join(peft::WEIGHTS_FILE),
        foreign.join(peft::WEIGHTS_FILE),
    )
    .unwrap();
    std::fs::write(
        foreign.join(peft::CONFIG_FILE),
        config.replace("\"down_proj\",", "\"c_attn\","),
    )
    .unwrap();
    let e = err(merge(&base, &foreign, 1.0, &out, DType::F32, &|_, _| {}));
    assert!(e.contains("c_attn") && e.contains(peft::CONFIG_FILE), "{e}");
    // Tensors of modules the config does not list.
    std::fs::write(
        foreign.join(peft::CONFIG_FILE),
        config.replace("\"down_proj\",", ""),
    )
    .unwrap();
    let e = err(merge(&base, &foreign, 1.0, &out, DType::F32, &|_, _| {}));
    assert!(
        e.contains("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight")
            && e.contains("not LoRA matrices of this model"),
        "{e}"
    );
    assert_nothing_left(&out);

    // Outputs: an existing file or non-empty folder is kept; an HF folder holds no q8_0.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep"), b"keep me").unwrap();
    let e = err(merge(&base, &adapter, 1.0, &out, DType::F32, &|_, _| {}));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(out.join("keep")).unwrap(), b"keep me");
    let file = tmp.0.join("x.gguf");
    std::fs::write(&file, b"keep me").unwrap();
    let e = err(merge(&base, &adapter, 1.0, &file, DType::F32, &|_, _| {}));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    let e = err(merge(
        &base,
        &adapter,
        1.0,
        &tmp.0.join("hf"),
        DType::Q8_0,
        &|_, _| {},
    ));
    assert!(e.contains("f32, f16 or bf16"), "{e}");
    let e = err(merge(
        &base,
        &adapter,
        1.0,
        &tmp.0.join("q.gguf"),
        DType::Q4K,
        &|_, _| {},
    ));
    assert!(e.contains("q4_k"), "{e}");
    let e = err(merge(
        &base,
        &adapter,
        f32::NAN,
        &tmp.0.join("n"),
        DType::F32,
        &|_, _| {},
    ));
    assert!(e.contains("finite"), "{e}");
    let e = err(merge(
        &tmp.0.join("no-model"),
        &adapter,
        1.0,
        &tmp.0.join("n"),
        DType::F32,
        &|_, _| {},
    ));
    assert!(e.contains("no-model") && e.contains("no such file"), "{e}");
    // An empty output folder is fine (and replaced by the model).
    let empty = tmp.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    merge(&base, &adapter, 1.0, &empty, DType::F16, &|_, _| {}).unwrap();
    assert!(empty.join("model.safetensors").is_file());
}
