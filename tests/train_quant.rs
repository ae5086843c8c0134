//! LoRA on a quantized base: the frozen weights stay in their GGUF block format (dx = dy . W
//! dequantizes them on the fly) and the adapters train. On a Q8_0 GGUF file (a tiny llama3-RoPE
//! fixture with biases and an explicit head_dim converted by `convert::hf_to_gguf`) and on Q4_K blocks (the synthetic `tiny`
//! shape: 256-wide rows, real Q4_K super-blocks from a seeded generator): the loss of a fixed
//! batch falls steadily over steps, and CUDA (when present) computes the same losses as the cpu.

mod common;

use anyllama::backend::cpu::Cpu;
use anyllama::backend::train::TrainBackend;
use anyllama::bench::synthetic::{shape, synthetic_model};
use anyllama::convert::hf_to_gguf;
use anyllama::dtype::DType;
use anyllama::model::Model;
use anyllama::train::lora::{Lora, LoraConfig};
use anyllama::train::optim::OptimConfig;
use anyllama::train::params::Trained;
use anyllama::train::step::{Checkpointing, MicroBatch, Trainer};
use anyllama::weights::gguf::GgufFile;
use anyllama::weights::load_weights;
use common::fixtures;
use std::path::PathBuf;

const STEPS: usize = 12;

/// Two packed sequences of a repeating pattern (easy to learn), next-token labels.
fn batch(vocab: usize) -> MicroBatch {
    let seq = |start: usize, n: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((start + 7 * (i % 5)) % vocab) as u32)
            .collect()
    };
    let mut mb = MicroBatch::default();
    for (start, n) in [(3, 24), (11, 17)] {
        let t = seq(start, n);
        mb.labels
            .extend(t[1..].iter().map(|&x| x as i32).chain([-100]));
        mb.tokens.extend(t);
        mb.lens.push(n);
    }
    mb
}

/// LoRA losses over STEPS steps on `m`, from a seeded PEFT-style init (B = 0).
fn losses<B: TrainBackend>(b: &B, m: &mut Model<B>) -> Vec<f32> {
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        ..Default::default()
    };
    m.lora = Some(Lora::new(b, &m.cfg, cfg, 3).unwrap());
    let mb = batch(m.cfg.vocab_size);
    let optim = OptimConfig {
        lr: 5e-3,
        max_grad_norm: Some(1.0),
        ..Default::default()
    };
    let mut t = Trainer::new(
        b,
        m,
        Trained::Lora,
        Checkpointing::Layer,
        mb.tokens.len(),
        optim,
    )
    .unwrap();
    (0..STEPS)
        .map(|_| t.step(b, m, std::slice::from_ref(&mb)).unwrap().loss)
        .collect()
}

fn q8_gguf() -> PathBuf {
    let out = std::env::temp_dir().join(format!("anyllama-train-q8-{}.gguf", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let src = fixtures().join("hf").join("llama3-bias-headdim-f32-v5");
    hf_to_gguf(&src, &out, DType::Q8_0, &|_, _| {}).unwrap();
    out
}

fn load_q8<B: TrainBackend>(b: &B, path: &PathBuf) -> Model<B> {
    let g = GgufFile::open(path).unwrap();
    let cfg = g.model_config().unwrap();
    let w = load_weights(b, &g, &cfg, true, &|_| {}).unwrap();
    let m = Model::new(b, cfg, w).unwrap();
    assert!(
        m.w.layers[0].wq.dtype == DType::Q8_0,
        "{}",
        m.w.layers[0].wq.dtype
    );
    m
}

fn load_q4k<B: TrainBackend>(b: &B) -> Model<B> {
    let m = synthetic_model(b, shape("tiny").unwrap(), DType::Q4K, 5).unwrap();
    assert!(m.w.layers[0].w2.dtype == DType::Q4K);
    m
}

fn assert_falls(what: &str, l: &[f32]) {
    assert!(l.iter().all(|x| x.is_finite()), "{what}: {l:?}");
    let (first, last) = (l[0], l[l.len() - 1]);
    assert!(last < 0.9 * first, "{what}: the loss did not fall: {l:?}");
    let rises = l.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(rises <= 2, "{what}: the loss rose {rises} times: {l:?}");
    eprintln!("{what}: {first:.4} -> {last:.4}");
}

#[test]
fn lora_trains_on_a_q8_0_gguf_and_on_q4_k_blocks() {
    let b = Cpu::new();
    let path = q8_gguf();
    let q8 = losses(&b, &mut load_q8(&b, &path));
    assert_falls("cpu q8_0", &q8);
    let q4k = losses(&b, &mut load_q4k(&b));
    assert_falls("cpu q4_k", &q4k);
    #[cfg(feature = "cuda")]
    for exact in [true, false] {
        use anyllama::backend::cuda::CudaOptions;
        let options = CudaOptions {
            exact,
            ..Default::default()
        };
        let Some(gpu) = common::cuda_with(options) else {
            break;
        };
        // The exact variant's f32 products match the cpu's up to summation order. The default
        // one rounds GEMM and attention operands to bf16: its first loss is one pass of that
        // rounding, and Adam carries the differences along (train_step's CUDA_HALF says why).
        let (first_tol, later_tol) = if exact { (1e-5, 1e-4) } else { (2e-3, 2e-2) };
        for (what, cpu, gpu_losses) in [
            ("q8_0", &q8, losses(&gpu, &mut load_q8(&gpu, &path))),
            ("q4_k", &q4k, losses(&gpu, &mut load_q4k(&gpu))),
        ] {
            let what = format!("cuda exact={exact} {what}");
            let errs: Vec<f32> = cpu
                .iter()
                .zip(&gpu_losses)
                .map(|(c, g)| ((c - g) / c).abs())
                .collect();
            let worst_later = errs[1..].iter().cloned().fold(0.0, f32::max);
            eprintln!(
                "{what}: {gpu_losses:?}; relative error of the first loss {:.1e}, of the later ones {:.1e}",
                errs[0], worst_later
            );
            assert!(
                errs[0] <= first_tol,
                "{what}: first loss off by {:.2e}",
                errs[0]
            );
            assert!(
                errs.iter().all(|e| *e <= later_tol),
                "{what}: losses off by up to {worst_later:.2e} > {later_tol:.0e}"
            );
            assert_falls(&what, &gpu_losses);
        }
    }
    std::fs::remove_file(&path).unwrap();
}
