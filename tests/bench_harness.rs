//! `anyllama bench` on the CPU backend with the tiny synthetic shape: every figure is measured,
//! finite and consistent with the others, and the synthetic model computes finite logits.

use anyllama::backend::cpu::Cpu;
use anyllama::bench::synthetic::{shape, synthetic_model};
use anyllama::bench::{bench_backend, BenchOptions, ModelSpec};
use anyllama::dtype::DType;
use anyllama::generate::Generator;

#[test]
fn tiny_synthetic_model_gives_every_figure() {
    let spec = ModelSpec::Synthetic {
        shape: shape("tiny").unwrap(),
        dtype: DType::Q8_0,
    };
    let opts = BenchOptions {
        prompt_tokens: 16,
        gen_tokens: 6,
        runs: 2,
        prefill: vec![32, 64],
        long_ctx: 96,
        long_ctx_gen: 4,
        chunk: 16,
        copy_bytes: 1 << 20,
        max_seconds: 0.0,
        ..Default::default()
    };
    let r = bench_backend(&Cpu::new(), &spec, &opts).unwrap();
    assert_eq!((r.backend.as_str(), r.model.as_str()), ("cpu", "tiny"));
    assert_eq!(r.dtype, "q8_0");
    assert!(r.error.is_none() && r.notes.is_empty(), "{:?}", r.notes);
    assert_eq!(r.decode_runs, 2);
    assert_eq!(r.decode_tok_s_all.len(), 2);
    assert!(r.decode_tok_s.unwrap() > 0.0);
    assert!(r.ttft_ms.unwrap() > 0.0);
    assert_eq!(
        r.prefill_tok_s.keys().collect::<Vec<_>>(),
        vec![&"32".to_string(), &"64".to_string()]
    );
    assert!(r.long_ctx_decode_tok_s.unwrap() > 0.0);
    assert_eq!(r.long_ctx_tokens, Some(96));

    // Tied tiny model: weights = embedding + layers + norm; a decode step reads all of it
    // (the embedding as the output projection) plus one embedding row.
    let weights = r.weights_bytes.unwrap();
    let row_bytes = DType::Q8_0.bytes_for(256).unwrap() as u64;
    assert_eq!(r.bytes_per_token.unwrap(), weights + row_bytes);
    // Peak memory holds the weights and the KV cache of the decode request.
    assert!(r.peak_mem_bytes.unwrap() > weights);
    assert_eq!(r.bandwidth_source.as_deref(), Some("copy"));
    let achieved = r.bytes_per_token.unwrap() as f64 * r.decode_tok_s.unwrap() / 1e9;
    assert!((r.achieved_gbps.unwrap() - achieved).abs() < 1e-9);
    assert!(r.bandwidth_fraction.unwrap() > 0.0);
}

#[test]
fn synthetic_weights_give_finite_logits_in_every_dtype() {
    let b = Cpu::new();
    for dtype in [DType::BF16, DType::F16, DType::Q8_0, DType::Q4K, DType::Q6K] {
        let mut model = synthetic_model(&b, shape("tiny").unwrap(), dtype, 7).unwrap();
        let mut g = Generator::new(&b, &mut model, 64, DType::F16, 64).unwrap();
        let logits = g.all_logits(&[1, 500, 1023, 7]).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()), "{dtype}");
        let spread = logits.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 1e-3, "{dtype}: logits all near zero");
    }
}

#[test]
fn q4_k_rejects_a_shape_whose_rows_are_not_whole_blocks() {
    let e = synthetic_model(&Cpu::new(), shape("smollm2-135m").unwrap(), DType::Q4K, 0)
        .err()
        .expect("576 columns are not whole 256-value blocks");
    assert!(e.to_string().contains("576"), "{e}");
}

/// bench/ab.py (old vs new build on one GPU) runs the binary it is given and writes its table:
/// here the same binary twice on the tiny shape, so every case has both figures.
#[test]
fn ab_script_compares_two_builds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("anyllama-ab-{}", std::process::id()));
    let bin = env!("CARGO_BIN_EXE_anyllama");
    let done = std::process::Command::new("python3")
        .arg(root.join("bench/ab.py"))
        .args([
            bin,
            bin,
            "--check",
            "--long-ctx",
            "8192",
            "--prefill",
            "2048",
        ])
        .env("OUT", &out)
        .output()
        .expect("python3 runs bench/ab.py");
    let log =
        String::from_utf8_lossy(&done.stdout).to_string() + &String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "bench/ab.py failed:\n{log}");
    let table = std::fs::read_to_string(out.join("ab.md")).unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with("| tiny "))
        .unwrap_or_else(|| panic!("{table}"));
    // shape, backend, then old, new and new / old for decode, long-context decode and prefill.
    let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
    assert_eq!(cells.len(), 11, "{row}");
    for c in &cells[2..] {
        let v: f64 = c
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("{row}"));
        assert!(v.is_finite() && v > 0.0, "{row}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ab.json")).unwrap()).unwrap();
    assert_eq!(json["cases"][0]["new"][0]["backend"], "cpu");
    std::fs::remove_dir_all(&out).ok();
}
