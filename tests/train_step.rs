//! Whole training steps against PyTorch + PEFT (tests/fixtures/train, made by
//! make_train_fixtures.py with f32 math): on each tiny Llama (MHA, GQA 3 and 4, tied, bf16
//! stored, llama3 RoPE with rsLoRA, biases) and its batch of three packed sequences with
//! ignored labels, the loss and every LoRA gradient at the PEFT-initialised adapter, then the
//! losses, gradient norms and adapters over 3 AdamW steps with clipping; and one full
//! fine-tuning step (every weight, embeddings and norms). Checkpointing (per layer, and with
//! the kept inputs in host memory) must give the cpu's results bit for bit, and gradient
//! accumulation over micro-batches those of the whole batch.
//!
//! The same checks run on CUDA (both variants) when a driver is present; ANYLLAMA_REQUIRE_CUDA
//! makes its absence a failure.

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::train::TrainBackend;
use anyllama::backend::Backend;
use anyllama::config::ModelConfig;
use anyllama::model::Model;
use anyllama::train::optim::{OptimConfig, Schedule};
use anyllama::train::params::{visit, Param, Trained};
use anyllama::train::peft;
use anyllama::train::step::{Checkpointing, MicroBatch, Trainer};
use anyllama::weights::load_weights;
use anyllama::weights::safetensors::SafetensorsSource;
use common::{fixtures, nmse};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FIXTURES: [&str; 6] = [
    "mha-f32",
    "gqa4-f32-tied",
    "gqa3-bf16",
    "llama3-rope-f32",
    "bias-f32",
    "qwen3-f32",
];
const FULL_FIXTURES: [&str; 4] = ["mha-f32", "gqa4-f32-tied", "bias-f32", "qwen3-f32"];

/// How closely a backend must match the f32 reference: gradients by NMSE, losses and gradient
/// norms relatively, updated weights absolutely.
#[derive(Clone, Copy, Debug)]
struct Tol {
    grad_nmse: f64,
    /// The first step's loss and gradient norm (one pass over the initial weights).
    rel: f64,
    /// The later steps' (after updates that carry the first steps' differences along).
    rel_later: f64,
    weight_abs: f32,
}

/// The cpu computes in f32 as torch does; the two differ by summation order only (torch's own
/// f32 result differs from f64 by a relative L2 error below 1e-6, see the fixture json).
const CPU: Tol = Tol {
    grad_nmse: 1e-10,
    rel: 1e-5,
    rel_later: 1e-5,
    weight_abs: 2e-5,
};

fn dir(name: &str) -> PathBuf {
    fixtures().join("train").join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn read_safetensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            (name, bytemuck::pod_collect_to_vec(t.data()))
        })
        .collect()
}

fn load_model<B: TrainBackend>(b: &B, dir: &Path) -> Model<B> {
    let cfg = ModelConfig::from_hf_dir(dir).unwrap();
    let src = SafetensorsSource::open(dir).unwrap();
    let w = load_weights(b, &src, &cfg, false, &|_| {}).unwrap();
    Model::new(b, cfg, w).unwrap()
}

/// The fixture's batch, packed into micro-batches of the given sequences each.
fn micro_batches(dir: &Path, split: &[usize]) -> Vec<MicroBatch> {
    let v = json(&dir.join("batch.json"));
    let seqs = |k: &str| -> Vec<Vec<i64>> { serde_json::from_value(v[k].clone()).unwrap() };
    let (tokens, labels) = (seqs("tokens"), seqs("labels"));
    let mut out = Vec::new();
    let mut s = 0;
    for &n in split {
        let mut mb = MicroBatch::default();
        for j in s..s + n {
            mb.tokens.extend(tokens[j].iter().map(|&t| t as u32));
            mb.labels.extend(labels[j].iter().map(|&l| l as i32));
            mb.lens.push(tokens[j].len());
        }
        out.push(mb);
        s += n;
    }
    assert_eq!(s, tokens.len());
    out
}

fn optim(expected: &Value, steps: usize) -> OptimConfig {
    let f = |k: &str| expected[k].as_f64().unwrap() as f32;
    OptimConfig {
        lr: f("lr"),
        beta1: expected["betas"][0].as_f64().unwrap() as f32,
        beta2: expected["betas"][1].as_f64().unwrap() as f32,
        eps: f("eps"),
        weight_decay: f("weight_decay"),
        max_grad_norm: Some(f("max_grad_norm")),
        schedule: Schedule::Constant,
        warmup_steps: 0,
        total_steps: steps,
    }
}

fn read_f32<B: TrainBackend>(b: &B, buf: &anyllama::pool::Buf<B>, n: usize) -> Vec<f32> {
    let mut raw = vec![0u8; n * 4];
    b.read(buf, 0, &mut raw).unwrap();
    bytemuck::pod_collect_to_vec(&raw)
}

/// Every trained tensor's gradient and value, by its HF / PEFT name.
fn snapshot<B: TrainBackend>(
    b: &B,
    m: &mut Model<B>,
    t: &Trainer<B>,
) -> (BTreeMap<String, Vec<f32>>, BTreeMap<String, Vec<f32>>) {
    let (mut grads, mut values) = (BTreeMap::new(), BTreeMap::new());
    visit(m, &t.grads, |name, p, g| {
        let n = g.len() / 4;
        grads.insert(name.to_string(), read_f32(b, g, n));
        let v = match p {
            Param::Weight(w) => {
                assert_eq!(w.dtype, anyllama::dtype::DType::F32, "{name}");
                read_f32(b, &w.buf, n)
            }
            Param::Vector(v) => read_f32(b, v, n),
        };
        values.insert(name.to_string(), v);
        Ok(())
    })
    .unwrap();
    (grads, values)
}

/// What a run computed: the gradients of the first step (before any update), each step's loss
/// and gradient norm, and the trained tensors after the last step.
#[derive(Debug, PartialEq)]
struct Run {
    grads: BTreeMap<String, Vec<f32>>,
    losses: Vec<f32>,
    grad_norms: Vec<f32>,
    values: BTreeMap<String, Vec<f32>>,
}

fn run<B: TrainBackend>(
    b: &B,
    name: &str,
    trained: Trained,
    ckpt: Checkpointing,
    split: &[usize],
) -> Run {
    let d = dir(name);
    let mut m = load_model(b, &d);
    let (expected, steps) = match trained {
        Trained::Lora => {
            m.lora = Some(peft::load(b, &m.cfg, &d.join("adapter_init")).unwrap());
            (json(&d.join("lora_expected.json")), 3)
        }
        Trained::Full => (json(&d.join("full_expected.json")), 1),
    };
    let mbs = micro_batches(&d, split);
    let max_rows = mbs.iter().map(|mb| mb.tokens.len()).max().unwrap();
    let cfg = optim(&expected, steps);
    let mut t = Trainer::new(b, &m, trained, ckpt, max_rows, cfg).unwrap();
    let labelled: usize = mbs.iter().map(|mb| mb.labelled()).sum();
    assert_eq!(labelled as u64, expected["n_labels"].as_u64().unwrap());
    // The first step's gradients, read before the optimizer changes anything.
    t.grads.zero(b).unwrap();
    for mb in &mbs {
        t.forward_backward(b, &mut m, mb, 1.0 / labelled as f32)
            .unwrap();
    }
    let (grads, _) = snapshot(b, &mut m, &t);
    let (mut losses, mut grad_norms) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let s = t.step(b, &mut m, &mbs).unwrap();
        assert_eq!(s.labelled, labelled);
        losses.push(s.loss);
        grad_norms.push(s.info.grad_norm);
    }
    let (_, values) = snapshot(b, &mut m, &t);
    Run {
        grads,
        losses,
        grad_norms,
        values,
    }
}

fn rel_err(got: f32, want: f64) -> f64 {
    if got.is_finite() {
        (got as f64 - want).abs() / want.abs().max(1e-12)
    } else {
        f64::INFINITY
    }
}

fn assert_rel(what: &str, got: f32, want: f64, tol: f64) {
    let err = rel_err(got, want);
    assert!(
        err <= tol,
        "{what}: {got} vs {want} (relative error {err:.2e} > {tol:.0e})"
    );
}

/// The worst of a set of measurements and where it was.
#[derive(Default)]
struct Worst(f64, String);

impl Worst {
    fn see(&mut self, e: f64, at: impl Into<String>) {
        if e.is_nan() || e > self.0 {
            *self = Worst(e, at.into());
        }
    }
}

/// Compares a run with the reference json and safetensors (`grad.<name>`, `<step>.<name>`):
/// every measure first (printed, so a failing run shows them all), then the bounds.
fn check(backend: &str, name: &str, trained: Trained, r: &Run, tol: Tol) {
    let d = dir(name);
    let (file, after) = match trained {
        Trained::Lora => ("lora_expected", "step3"),
        Trained::Full => ("full_expected", "step1"),
    };
    let expected = json(&d.join(format!("{file}.json")));
    let tensors = read_safetensors(&d.join(format!("{file}.safetensors")));
    let what = format!("{backend} {name} {trained:?}");
    let losses = expected["losses"].as_array().unwrap();
    let norms = expected["grad_norms"].as_array().unwrap();
    assert_eq!(r.losses.len(), losses.len(), "{what}: steps");
    assert_eq!(r.grads.len() * 2, tensors.len(), "{what}: trained tensors");
    let (mut first, mut later) = (Worst::default(), Worst::default());
    for (k, (l, n)) in losses.iter().zip(norms).enumerate() {
        let worst = if k == 0 { &mut first } else { &mut later };
        worst.see(
            rel_err(r.losses[k], l.as_f64().unwrap()),
            format!("loss {k}"),
        );
        let norm = n.as_f64().unwrap();
        worst.see(rel_err(r.grad_norms[k], norm), format!("grad norm {k}"));
    }
    let (mut grad, mut weight) = (Worst::default(), Worst::default());
    for (key, g) in &r.grads {
        grad.see(nmse(g, &tensors[&format!("grad.{key}")]), key);
        let want = &tensors[&format!("{after}.{key}")];
        let diff = r.values[key]
            .iter()
            .zip(want)
            .map(|(a, b)| {
                if a.is_finite() {
                    (a - b).abs() as f64
                } else {
                    f64::INFINITY
                }
            })
            .fold(0.0, f64::max);
        weight.see(diff, key);
    }
    eprintln!(
        "{what}: losses {:?}, worst relative error of the first step's loss and gradient norm \
         {:.1e} ({}), of the later steps' {:.1e} ({}), worst gradient NMSE {:.1e} ({}), \
         worst weight diff {:.1e} ({})",
        r.losses, first.0, first.1, later.0, later.1, grad.0, grad.1, weight.0, weight.1
    );
    let bounds = [
        ("first step's relative error", first, tol.rel),
        ("later steps' relative error", later, tol.rel_later),
        ("gradient NMSE", grad, tol.grad_nmse),
        ("weight difference", weight, tol.weight_abs as f64),
    ];
    for (measure, Worst(e, at), bound) in bounds {
        assert!(e <= bound, "{what}: {measure} {e:.2e} ({at}) > {bound:.0e}");
    }
}

/// Every fixture, LoRA and full, one micro-batch, checkpointing off.
fn check_all<B: TrainBackend>(backend: &str, b: &B, tol: Tol) {
    for name in FIXTURES {
        let r = run(b, name, Trained::Lora, Checkpointing::Off, &[3]);
        check(backend, name, Trained::Lora, &r, tol);
    }
    for name in FULL_FIXTURES {
        let r = run(b, name, Trained::Full, Checkpointing::Off, &[3]);
        check(backend, name, Trained::Full, &r, tol);
    }
}

#[test]
fn cpu_matches_peft_and_torch() {
    check_all("cpu", &Cpu::new(), CPU);
}

#[test]
fn cpu_checkpointing_is_exact() {
    let b = Cpu::new();
    for (name, trained) in [
        ("gqa4-f32-tied", Trained::Lora),
        ("bias-f32", Trained::Lora),
        ("bias-f32", Trained::Full),
    ] {
        let off = run(&b, name, trained, Checkpointing::Off, &[3]);
        for ckpt in [Checkpointing::Layer, Checkpointing::Offload] {
            let on = run(&b, name, trained, ckpt, &[3]);
            assert!(
                on == off,
                "{name} {trained:?}: {ckpt:?} differs from no checkpointing"
            );
        }
    }
}

#[test]
fn cpu_gradient_accumulation_matches_one_batch() {
    let b = Cpu::new();
    for (name, trained) in [("mha-f32", Trained::Lora), ("gqa4-f32-tied", Trained::Full)] {
        for split in [[1, 2].as_slice(), &[2, 1], &[1, 1, 1]] {
            let r = run(&b, name, trained, Checkpointing::Layer, split);
            check(
                &format!("cpu micro-batches {split:?}"),
                name,
                trained,
                &r,
                CPU,
            );
        }
    }
}

/// The fixture's LoRA setup with dropout `p`: (model, trainer, micro-batch, 1 / labelled rows).
fn dropout_setup<B: TrainBackend>(b: &B, p: f32) -> (Model<B>, Trainer<B>, MicroBatch, f32) {
    let d = dir("gqa4-f32-tied");
    let mut m = load_model(b, &d);
    let mut lora = peft::load(b, &m.cfg, &d.join("adapter_init")).unwrap();
    lora.cfg.dropout = p;
    m.lora = Some(lora);
    let mb = micro_batches(&d, &[3]).remove(0);
    let cfg = OptimConfig::default();
    let t = Trainer::new(
        b,
        &m,
        Trained::Lora,
        Checkpointing::Layer,
        mb.tokens.len(),
        cfg,
    )
    .unwrap();
    let scale = 1.0 / mb.labelled() as f32;
    (m, t, mb, scale)
}

/// The summed loss and the gradients of one forward-backward with the trainer's first masks.
fn dropout_pass<B: TrainBackend>(
    b: &B,
    m: &mut Model<B>,
    t: &mut Trainer<B>,
    mb: &MicroBatch,
    scale: f32,
) -> (f32, BTreeMap<String, Vec<f32>>) {
    t.micro = 0;
    t.grads.zero(b).unwrap();
    let loss = t.forward_backward(b, m, mb, scale).unwrap();
    (loss, snapshot(b, m, t).0)
}

#[test]
fn cpu_lora_dropout_gradients_match_finite_differences() {
    use anyllama::train::lora::{peft_key, Proj};
    let b = Cpu::new();
    // p = 0 is no dropout at all: PEFT's loss exactly.
    let (mut m, mut t, mb, scale) = dropout_setup(&b, 0.0);
    let (plain, _) = dropout_pass(&b, &mut m, &mut t, &mb, scale);
    let expected = json(&dir("gqa4-f32-tied").join("lora_expected.json"));
    assert_rel(
        "p = 0",
        plain * scale,
        expected["losses"][0].as_f64().unwrap(),
        1e-5,
    );

    let (mut m, mut t, mb, scale) = dropout_setup(&b, 0.3);
    let (loss, grads) = dropout_pass(&b, &mut m, &mut t, &mb, scale);
    assert!(
        (loss - plain).abs() > 1e-3 * plain,
        "dropout changed nothing: {loss} vs {plain}"
    );
    // Another micro-batch draws other masks.
    t.grads.zero(&b).unwrap();
    let other = t.forward_backward(&b, &mut m, &mb, scale).unwrap();
    assert!(
        (other - loss).abs() > 1e-4 * loss,
        "the same masks twice: {other}"
    );
    // Central differences of the loss (same masks) against the gradient, over A and B of
    // projections in both layers.
    let h = 1e-2f32;
    let mut checked = 0;
    for (layer, p, which, idx) in [
        (0, Proj::Q, 'A', 5),
        (0, Proj::V, 'B', 3),
        (1, Proj::O, 'A', 17),
        (1, Proj::Gate, 'A', 40),
        (0, Proj::Down, 'A', 9),
        (1, Proj::Up, 'B', 11),
    ] {
        let key = peft_key(layer, p, which);
        let g = grads[&key][idx];
        let at = |m: &mut Model<Cpu>, delta: f32| {
            let ad = m.lora.as_mut().unwrap().layers[layer][p.index()]
                .as_mut()
                .unwrap();
            let w = if which == 'A' { &mut ad.a } else { &mut ad.b };
            let v = read_f32(&b, &w.buf, idx + 1)[idx];
            b.upload(&mut w.buf, idx * 4, &(v + delta).to_le_bytes())
                .unwrap();
        };
        at(&mut m, h);
        let (up, _) = dropout_pass(&b, &mut m, &mut t, &mb, scale);
        at(&mut m, -2.0 * h);
        let (down, _) = dropout_pass(&b, &mut m, &mut t, &mb, scale);
        at(&mut m, h);
        let fd = (up - down) / (2.0 * h) * scale;
        let err = (fd - g).abs();
        assert!(
            err <= 2e-4 + 2e-2 * g.abs(),
            "{key}[{idx}]: gradient {g} vs central difference {fd}"
        );
        checked += (g.abs() > 1e-3) as usize;
    }
    assert!(
        checked >= 4,
        "too few of the checked gradients are away from zero"
    );
}

#[test]
fn bad_micro_batches_are_errors() {
    let b = Cpu::new();
    let d = dir("mha-f32");
    let mut m = load_model(&b, &d);
    m.lora = Some(peft::load(&b, &m.cfg, &d.join("adapter_init")).unwrap());
    let cfg = OptimConfig::default();
    let mut t = Trainer::new(&b, &m, Trained::Lora, Checkpointing::Off, 8, cfg).unwrap();
    let mb = |tokens: Vec<u32>, labels: Vec<i32>, lens: Vec<usize>| MicroBatch {
        tokens,
        labels,
        lens,
    };
    let cases = [
        (mb(vec![1; 9], vec![2; 9], vec![9]), "9 rows"),
        (mb(vec![1; 3], vec![2; 2], vec![3]), "2 labels for 3 tokens"),
        (mb(vec![1; 3], vec![2; 3], vec![2]), "do not add up"),
        (mb(vec![96, 1], vec![2, 2], vec![2]), "token id 96"),
        (mb(vec![1, 1], vec![2, 96], vec![2]), "label 96"),
        (
            mb(vec![1, 1], vec![-100, -100], vec![2]),
            "no labelled rows",
        ),
    ];
    for (batch, why) in cases {
        let err = t.step(&b, &mut m, &[batch]).unwrap_err().to_string();
        assert!(err.contains(why), "{why:?} not in {err:?}");
    }
    // Lora training without adapters is refused up front.
    m.lora = None;
    let err = Trainer::new(&b, &m, Trained::Lora, Checkpointing::Off, 8, cfg)
        .err()
        .unwrap();
    assert!(err.to_string().contains("adapters"), "{err}");
}

#[test]
fn peft_adapter_round_trips() {
    let b = Cpu::new();
    let d = dir("llama3-rope-f32");
    let m = load_model(&b, &d);
    let lora = peft::load(&b, &m.cfg, &d.join("adapter_init")).unwrap();
    assert!(lora.cfg.rslora);
    let out = std::env::temp_dir().join(format!("anyllama-peft-{}", std::process::id()));
    peft::save(&b, &lora, "tests/fixtures/train/llama3-rope-f32", &out).unwrap();
    let again = peft::load(&b, &m.cfg, &out).unwrap();
    assert_eq!(again.cfg, lora.cfg);
    let a = read_safetensors(&d.join("adapter_init").join(peft::WEIGHTS_FILE));
    let b2 = read_safetensors(&out.join(peft::WEIGHTS_FILE));
    assert_eq!(a, b2);
    std::fs::remove_dir_all(&out).unwrap();
    // A wrong rank for the model is named.
    let bad = std::env::temp_dir().join(format!("anyllama-peft-bad-{}", std::process::id()));
    std::fs::create_dir_all(&bad).unwrap();
    let cfg = std::fs::read_to_string(d.join("adapter_init").join(peft::CONFIG_FILE)).unwrap();
    std::fs::write(
        bad.join(peft::CONFIG_FILE),
        cfg.replace("\"r\": 4", "\"r\": 5"),
    )
    .unwrap();
    std::fs::copy(
        d.join("adapter_init").join(peft::WEIGHTS_FILE),
        bad.join(peft::WEIGHTS_FILE),
    )
    .unwrap();
    let err = peft::load(&b, &m.cfg, &bad).err().unwrap().to_string();
    assert!(err.contains("this model needs [5, 32]"), "{err}");
    std::fs::remove_dir_all(&bad).unwrap();
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use anyllama::backend::cuda::CudaOptions;

    /// CUDA's exact variant computes in f32 throughout: the reference's bounds with room for
    /// atomics' summation order.
    const CUDA_EXACT: Tol = Tol {
        grad_nmse: 1e-9,
        rel: 2e-5,
        rel_later: 2e-5,
        weight_abs: 5e-5,
    };

    /// The default variant rounds the operands of its GEMMs (forward and backward, the loss's)
    /// and of attention at head sizes 64 and 128 to bf16 where the weights are not f32 (8
    /// significant bits, a relative error of up to 2^-9 per operand; f32 weights keep the f32
    /// paths and meet CUDA_EXACT). Adam normalises each update, so an element whose gradient
    /// is near zero moves by up to lr per step whatever the sign its rounding gives it: the
    /// later steps' losses and gradient norms drift further (measured on the H200, gqa3-bf16:
    /// 9.2e-3 on the third step's gradient norm, where the first step met 2.9e-4), and 3 steps
    /// at lr 1e-2 bound the weights' difference at 3e-2. The first step's gradients: NMSE
    /// 1.1e-4 measured (gqa3-bf16's k_proj lora_A, the end of the longest rounded path), held
    /// to 1e-3; a wrong gradient is off by NMSE ~1.
    const CUDA_HALF: Tol = Tol {
        grad_nmse: 1e-3,
        rel: 2e-3,
        rel_later: 2e-2,
        weight_abs: 3e-2,
    };

    #[test]
    fn cuda_lora_dropout_draws_the_cpus_masks() {
        let options = CudaOptions {
            exact: true,
            ..Default::default()
        };
        let Some(gpu) = common::cuda_with(options) else {
            return;
        };
        let cpu = Cpu::new();
        let (mut m, mut t, mb, scale) = dropout_setup(&cpu, 0.3);
        let (loss, grads) = dropout_pass(&cpu, &mut m, &mut t, &mb, scale);
        let (mut m, mut t, mb, scale) = dropout_setup(&gpu, 0.3);
        let (gpu_loss, gpu_grads) = dropout_pass(&gpu, &mut m, &mut t, &mb, scale);
        assert_rel("cuda dropout loss", gpu_loss, loss as f64, 2e-5);
        for (key, g) in &grads {
            let e = nmse(&gpu_grads[key], g);
            assert!(e <= 1e-9, "cuda dropout gradient of {key}: NMSE {e:.2e}");
        }
    }

    #[test]
    fn cuda_matches_peft_and_torch() {
        for exact in [true, false] {
            let options = CudaOptions {
                exact,
                ..Default::default()
            };
            let Some(b) = common::cuda_with(options) else {
                return;
            };
            let tol = if exact { CUDA_EXACT } else { CUDA_HALF };
            check_all(&format!("cuda exact={exact}"), &b, tol);
            for ckpt in [Checkpointing::Layer, Checkpointing::Offload] {
                let r = run(&b, "gqa3-bf16", Trained::Lora, ckpt, &[2, 1]);
                let what = format!("cuda exact={exact} {ckpt:?} [2, 1]");
                check(&what, "gqa3-bf16", Trained::Lora, &r, tol);
            }
        }
    }
}
