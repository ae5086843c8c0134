//! Our LoRA adapters and HF PEFT's, both ways (tests/fixtures/peft, made by
//! make_peft_fixtures.py; see tests/fixtures/README.md):
//! - PEFT -> ours: adapters that PEFT itself built and saved (`get_peft_model` +
//!   `save_pretrained`, lora_B set non-zero; plain LoRA and rsLoRA) load with `peft::load`, and
//!   our logits with them applied equal PEFT's (unmerged, f32) within an NMSE bound;
//! - ours -> PEFT: an adapter trained here (seeded `Lora::new`, a few AdamW steps on the cpu
//!   backend) and written with `peft::save` is reproduced by this run (so the committed
//!   tests/fixtures/peft/ours still is what our code writes), its config has the keys PEFT
//!   needs, and our logits with it equal those PEFT computed after `PeftModel.from_pretrained`
//!   read that folder unchanged.
//!
//! To rewrite tests/fixtures/peft/ours (then rerun the Python script, which reads it):
//! `ANYLLAMA_WRITE_PEFT_FIXTURE=1 cargo test --release --test peft_roundtrip`.

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::Backend;
use anyllama::config::ModelConfig;
use anyllama::dtype::DType;
use anyllama::generate::Generator;
use anyllama::model::Model;
use anyllama::train::lora::{Lora, LoraConfig, Proj};
use anyllama::train::optim::{OptimConfig, Schedule};
use anyllama::train::params::Trained;
use anyllama::train::peft;
use anyllama::train::step::{Checkpointing, MicroBatch, Trainer};
use anyllama::weights::load_weights;
use anyllama::weights::safetensors::SafetensorsSource;
use common::{fixtures, nmse, root};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Our f32 logits against PEFT's f32 logits. The two differ by summation order only: measured
/// NMSE 2.4e-13 (peft-plain), 9.2e-13 (peft-rslora), 2.7e-13 (ours), the size of torch's own f32
/// error (its f32 logits differ from its f64 ones by 1.2e-13, 9.8e-13, 3.7e-13: `nmse_f32_vs_f64`
/// in expected.json), while the adapters move the logits from the base model's by NMSE 0.26,
/// 0.87 and 1.5 (`nmse_adapter_vs_base`). A wrong scale is off by far more (plain alpha / r on
/// the rsLoRA case: NMSE 0.54), and a transposed or missing matrix does not load.
const LOGITS_NMSE: f64 = 1e-10;
/// How far the adapter must move the logits from the base model's, so that agreeing proves
/// that the adapter was applied.
const MIN_ADAPTER_EFFECT: f64 = 1e-3;
/// A freshly trained adapter against the committed one (the same f32 arithmetic in the same
/// order gives identical bits; this leaves room for a compiler's different rounding).
const ADAPTER_ABS: f32 = 1e-6;

/// The base model and the training run of the adapter written by our code (`ours`).
const OURS_BASE: &str = "tests/fixtures/train/gqa4-f32-tied";
const OURS_SEED: u64 = 20_251_204;
const OURS_STEPS: usize = 5;

fn peft_dir() -> PathBuf {
    fixtures().join("peft")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn expected() -> Value {
    json(&peft_dir().join("expected.json"))
}

fn case<'a>(expected: &'a Value, name: &str) -> &'a Value {
    expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("expected.json has no case {name}"))
}

/// F32 tensors of a safetensors file by name, with their shapes.
fn read_safetensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(
                t.dtype(),
                safetensors::Dtype::F32,
                "{name} in {}",
                path.display()
            );
            let v = bytemuck::pod_collect_to_vec(t.data());
            (name, (t.shape().to_vec(), v))
        })
        .collect()
}

/// PEFT's logits of a case, [tokens, vocab] row after row.
fn peft_logits(name: &str, n_tokens: usize, vocab: usize) -> Vec<f32> {
    let all = read_safetensors(&peft_dir().join("logits.safetensors"));
    let (shape, v) = all
        .get(name)
        .unwrap_or_else(|| panic!("logits.safetensors has no {name}"))
        .clone();
    assert_eq!(shape, [n_tokens, vocab], "{name}: logits shape");
    assert!(
        v.iter().all(|x| x.is_finite()),
        "{name}: PEFT's logits are not finite"
    );
    v
}

fn tokens(expected: &Value) -> Vec<u32> {
    expected["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

fn load_model<B: Backend>(b: &B, dir: &Path) -> Model<B> {
    let cfg = ModelConfig::from_hf_dir(dir).unwrap();
    let src = SafetensorsSource::open(dir).unwrap();
    let w = load_weights(b, &src, &cfg, false, &|_| {}).unwrap();
    Model::new(b, cfg, w).unwrap()
}

/// Logits of every position of `tokens` with whatever adapter `m.lora` holds (f32 KV cache:
/// f32 throughout).
fn logits<B: Backend>(b: &B, m: &mut Model<B>, tokens: &[u32]) -> Vec<f32> {
    let mut gen = Generator::new(b, m, 64, DType::F32, 64).unwrap();
    let out = gen.all_logits(tokens).unwrap();
    assert!(
        out.iter().all(|x| x.is_finite()),
        "our logits are not finite"
    );
    out
}

/// Our logits with the adapter against PEFT's: within LOGITS_NMSE, and far enough from the
/// base model's that the adapter mattered. Returns the NMSE.
fn check_logits<B: Backend>(
    b: &B,
    m: &mut Model<B>,
    lora: Lora<B>,
    name: &str,
    tokens: &[u32],
) -> f64 {
    let vocab = m.cfg.vocab_size;
    let want = peft_logits(name, tokens.len(), vocab);
    m.lora = None;
    let base = logits(b, m, tokens);
    m.lora = Some(lora);
    let got = logits(b, m, tokens);
    let err = nmse(&got, &want);
    let effect = nmse(&base, &want);
    eprintln!(
        "{name}: NMSE of our logits vs PEFT's {err:.2e} (bound {LOGITS_NMSE:.0e}); \
         PEFT's vs the base model's {effect:.2e}"
    );
    assert!(
        effect >= MIN_ADAPTER_EFFECT,
        "{name}: the adapter hardly changes the logits (NMSE {effect:.2e} from the base \
         model's): agreeing would prove nothing"
    );
    assert!(
        err <= LOGITS_NMSE,
        "{name}: our logits differ from PEFT's: NMSE {err:.2e} > {LOGITS_NMSE:.0e}"
    );
    err
}

/// PEFT-made adapters, loaded by us, give PEFT's logits.
#[test]
fn peft_made_adapters_give_peft_logits() {
    let b = Cpu::new();
    let expected = expected();
    let tokens = tokens(&expected);
    let mut n = 0;
    for c in expected["cases"].as_array().unwrap() {
        if c["direction"] != "peft->ours" {
            continue;
        }
        let name = c["name"].as_str().unwrap();
        let mut m = load_model(&b, &root().join(c["base"].as_str().unwrap()));
        let dir = peft_dir().join(name);
        let lora = peft::load(&b, &m.cfg, &dir).unwrap();
        // What PEFT's config says is what we read.
        assert_eq!(lora.cfg.r as u64, c["r"].as_u64().unwrap(), "{name}: r");
        assert_eq!(
            lora.cfg.alpha as f64,
            c["lora_alpha"].as_f64().unwrap(),
            "{name}: alpha"
        );
        assert_eq!(
            Value::Bool(lora.cfg.rslora),
            c["use_rslora"],
            "{name}: use_rslora"
        );
        let scale = c["scale"].as_f64().unwrap();
        assert!(
            (lora.scale as f64 - scale).abs() <= 1e-6 * scale,
            "{name}: scale {} vs PEFT's {scale}",
            lora.scale
        );
        let mut targets: Vec<&str> = lora.cfg.targets.iter().map(|p| p.module()).collect();
        targets.sort();
        let want: Vec<&str> = c["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(targets, want, "{name}: target modules");
        check_logits(&b, &mut m, lora, name, &tokens);
        n += 1;
    }
    assert_eq!(n, 2, "the PEFT-made cases (plain LoRA and rsLoRA)");
}

/// The `ours` adapter: seeded adapters on the gqa4-f32-tied fixture, every projection, rsLoRA,
/// trained for a few steps at a high learning rate on that fixture's batch (so B is far from
/// its zero init), on the cpu backend.
fn train_ours(b: &Cpu) -> Model<Cpu> {
    let base = root().join(OURS_BASE);
    let mut m = load_model(b, &base);
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        rslora: true,
        targets: Proj::ALL.to_vec(),
        dropout: 0.0,
    };
    m.lora = Some(Lora::new(b, &m.cfg, cfg, OURS_SEED).unwrap());
    let batch = json(&base.join("batch.json"));
    let seqs = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(batch[k].clone()).unwrap() };
    let mut mb = MicroBatch::default();
    for (t, l) in seqs("tokens").iter().zip(seqs("labels")) {
        mb.tokens.extend(t.iter().map(|&x| x as u32));
        mb.labels.extend(l.iter().map(|&x| x as i32));
        mb.lens.push(t.len());
    }
    let optim = OptimConfig {
        lr: 2e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        max_grad_norm: Some(1.0),
        schedule: Schedule::Constant,
        warmup_steps: 0,
        total_steps: OURS_STEPS,
    };
    let rows = mb.tokens.len();
    let mut t = Trainer::new(b, &m, Trained::Lora, Checkpointing::Off, rows, optim).unwrap();
    let mut losses = Vec::new();
    for _ in 0..OURS_STEPS {
        losses.push(t.step(b, &mut m, std::slice::from_ref(&mb)).unwrap().loss);
    }
    eprintln!("ours: training losses {losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[OURS_STEPS - 1] < losses[0], "{losses:?}");
    m
}

/// The adapter_config.json keys PEFT's `LoraConfig` needs to rebuild the adapter, with the
/// values of the `ours` run.
fn check_config(dir: &Path) {
    let c = json(&dir.join(peft::CONFIG_FILE));
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["base_model_name_or_path"], OURS_BASE);
    assert_eq!(c["r"], 8);
    assert_eq!(c["lora_alpha"].as_f64(), Some(16.0));
    assert_eq!(c["use_rslora"], true);
    let mut targets: Vec<&str> = c["target_modules"]
        .as_array()
        .expect("target_modules is a list")
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    targets.sort();
    let mut all: Vec<&str> = Proj::ALL.iter().map(|p| p.module()).collect();
    all.sort();
    assert_eq!(targets, all);
}

/// Trains the `ours` adapter again, checks that it is the committed one, and that our logits
/// with it are those PEFT computed from the committed folder.
#[test]
fn our_adapter_is_reproduced_and_gives_peft_logits() {
    let b = Cpu::new();
    let mut m = train_ours(&b);
    let lora = m.lora.take().unwrap();
    let committed = peft_dir().join("ours");
    if std::env::var_os("ANYLLAMA_WRITE_PEFT_FIXTURE").is_some_and(|v| !v.is_empty()) {
        assert!(
            !common::in_ci(),
            "ANYLLAMA_WRITE_PEFT_FIXTURE rewrites a committed fixture: not in CI"
        );
        if committed.exists() {
            std::fs::remove_dir_all(&committed).unwrap();
        }
        peft::save(&b, &lora, OURS_BASE, &committed).unwrap();
        check_config(&committed);
        eprintln!(
            "wrote {}: now rerun tests/fixtures/peft/make_peft_fixtures.py",
            committed.display()
        );
        return;
    }

    // What our code writes now equals the committed adapter that PEFT read.
    let fresh = std::env::temp_dir().join(format!("anyllama-peft-ours-{}", std::process::id()));
    peft::save(&b, &lora, OURS_BASE, &fresh).unwrap();
    check_config(&fresh);
    assert_eq!(
        json(&fresh.join(peft::CONFIG_FILE)),
        json(&committed.join(peft::CONFIG_FILE)),
        "adapter_config.json differs from the committed one"
    );
    let now = read_safetensors(&fresh.join(peft::WEIGHTS_FILE));
    let then = read_safetensors(&committed.join(peft::WEIGHTS_FILE));
    std::fs::remove_dir_all(&fresh).unwrap();
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        then.keys().collect::<Vec<_>>(),
        "tensor names differ from the committed adapter's"
    );
    assert_eq!(now.len(), 2 * m.cfg.n_layers * Proj::ALL.len());
    let (mut worst, mut identical, mut b_max) = (0f32, true, 0f32);
    for (k, (shape, v)) in &now {
        let (shape0, v0) = &then[k];
        assert_eq!(shape, shape0, "{k}: shape");
        for (x, y) in v.iter().zip(v0) {
            let d = if x.is_finite() {
                (x - y).abs()
            } else {
                f32::INFINITY
            };
            worst = worst.max(d);
            identical &= x.to_bits() == y.to_bits();
        }
        if k.contains("lora_B") {
            b_max = b_max.max(v.iter().fold(0f32, |a, x| a.max(x.abs())));
        }
    }
    eprintln!(
        "ours: largest |fresh - committed| {worst:.1e} (bit-identical: {identical}), \
         largest |B| {b_max:.3}"
    );
    assert!(
        worst <= ADAPTER_ABS,
        "the adapter trained now differs from tests/fixtures/peft/ours by {worst:.2e} > \
         {ADAPTER_ABS:.0e}: rerun with ANYLLAMA_WRITE_PEFT_FIXTURE=1, then the Python script"
    );
    assert!(b_max > 0.05, "B stayed near its zero init: {b_max}");

    let expected = expected();
    let tokens = tokens(&expected);
    let c = case(&expected, "ours");
    assert_eq!(c["direction"], "ours->peft");
    assert_eq!(c["base"], OURS_BASE);
    // The adapter as trained (in memory), and as read back from the committed folder.
    check_logits(&b, &mut m, lora, "ours", &tokens);
    let loaded = peft::load(&b, &m.cfg, &committed).unwrap();
    check_logits(&b, &mut m, loaded, "ours", &tokens);
}

/// A PEFT config that gives some modules their own alpha or rank is refused: reading only `r`
/// and `lora_alpha` would scale those modules wrongly without a word.
#[test]
fn per_module_alpha_or_rank_is_refused() {
    let b = Cpu::new();
    let src = peft_dir().join("peft-plain");
    let m = load_model(&b, &root().join("tests/fixtures/train/gqa4-f32-tied"));
    let config = json(&src.join(peft::CONFIG_FILE));
    for key in ["alpha_pattern", "rank_pattern"] {
        let dir = std::env::temp_dir().join(format!("anyllama-peft-{key}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = config.clone();
        c[key] = serde_json::json!({ "q_proj": 4 });
        std::fs::write(dir.join(peft::CONFIG_FILE), c.to_string()).unwrap();
        std::fs::copy(src.join(peft::WEIGHTS_FILE), dir.join(peft::WEIGHTS_FILE)).unwrap();
        let err = peft::load(&b, &m.cfg, &dir).err().map(|e| e.to_string());
        std::fs::remove_dir_all(&dir).unwrap();
        let err = err.unwrap_or_else(|| panic!("an adapter with {key} loaded"));
        assert!(err.contains(key), "{err}");
    }
}
