//! rope_freqs against transformers: every variant, and the length-dependent ones (dynamic NTK,
//! longrope) below, at and above their original context length. Reference values come from
//! tests/fixtures/rope/make_rope.py.

use anyllama::config::ModelConfig;
use anyllama::rope::{rope_freqs, varies_with_len};
use serde_json::Value;

const ROPE_JSON: &str = include_str!("fixtures/rope/rope.json");

/// Relative error budget: a few float32 ulps, the spread between two correct pow implementations.
const TOL: f64 = 1e-6;

#[test]
fn matches_transformers_for_every_variant() {
    let doc: Value = serde_json::from_str(ROPE_JSON).unwrap();
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "fixture lost its cases");
    let mut seen_types = std::collections::BTreeSet::new();
    let mut worst = 0.0f64;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let cfg = ModelConfig::from_hf_json(&case["config"].to_string())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        seen_types.insert(cfg.rope_scaling.rope_type());
        for result in case["results"].as_array().unwrap() {
            let seq_len = result["seq_len"].as_u64().unwrap() as usize;
            let want: Vec<f64> = result["inv_freq"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let got = rope_freqs(&cfg, seq_len);
            assert_eq!(got.inv_freq.len(), cfg.head_dim / 2, "{name}");
            assert_eq!(got.inv_freq.len(), want.len(), "{name}");
            for (i, (&g, &w)) in got.inv_freq.iter().zip(&want).enumerate() {
                let rel = ((g as f64) - w).abs() / w.abs();
                worst = worst.max(rel);
                assert!(
                    rel <= TOL,
                    "{name} seq_len {seq_len} inv_freq[{i}]: got {g:e}, want {w:e}"
                );
            }
            let want_scale = result["attention_scaling"].as_f64().unwrap();
            let got_scale = got.attention_scaling as f64;
            assert!(
                (got_scale - want_scale).abs() <= TOL * want_scale.abs(),
                "{name} seq_len {seq_len} attention_scaling: got {got_scale}, want {want_scale}"
            );
        }
    }
    let all = ["default", "linear", "dynamic", "llama3", "longrope", "yarn"];
    assert_eq!(seen_types.into_iter().collect::<Vec<_>>().len(), all.len());
    eprintln!("worst relative error {worst:e}");
}

#[test]
fn length_dependence_is_declared_and_real() {
    let doc: Value = serde_json::from_str(ROPE_JSON).unwrap();
    for case in doc["cases"].as_array().unwrap() {
        let cfg = ModelConfig::from_hf_json(&case["config"].to_string()).unwrap();
        let results = case["results"].as_array().unwrap();
        let first = &results[0]["inv_freq"];
        let changes = results.iter().any(|r| &r["inv_freq"] != first);
        // A variant whose frequencies changed with the length must say so.
        if changes {
            assert!(varies_with_len(&cfg), "{}", case["name"]);
        }
        let kind = cfg.rope_scaling.rope_type();
        assert_eq!(
            varies_with_len(&cfg),
            kind == "dynamic" || kind == "longrope"
        );
    }
}
