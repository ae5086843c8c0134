//! Every HF fixture folder loads: config.json parses to what transformers read from it (the
//! `config_summary` make_fixtures.py recorded), the safetensors open, and every tensor has the
//! dtype, shape and contents (sums) transformers saw, with the shapes the config implies.

use anyllama::config::{ModelConfig, RopeScaling};
use anyllama::dtype::DType;
use anyllama::generation_config::GenerationConfig;
use anyllama::quant::dequantize;
use anyllama::weights::safetensors::SafetensorsSource;
use anyllama::weights::TensorSource;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn fixture_dirs() -> Vec<PathBuf> {
    let root = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/fixtures/hf");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 7,
        "expected the HF fixture folders under {}",
        root.display()
    );
    dirs
}

fn expected(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap()
}

/// Our parsed RoPE parameters under transformers' key names.
fn rope_fields(s: &RopeScaling) -> Map<String, Value> {
    let v = match s {
        RopeScaling::Default => json!({}),
        RopeScaling::Linear { factor } => json!({ "factor": factor }),
        RopeScaling::Dynamic { factor, .. } => json!({ "factor": factor }),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            json!({ "factor": factor, "low_freq_factor": low_freq_factor, "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings })
        }
        RopeScaling::LongRope {
            short_factor,
            long_factor,
            original_max_position_embeddings,
            attention_factor,
            factor,
        } => {
            json!({ "short_factor": short_factor, "long_factor": long_factor, "attention_factor": attention_factor,
                    "original_max_position_embeddings": original_max_position_embeddings, "factor": factor })
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            attention_factor,
            mscale,
            mscale_all_dim,
            truncate,
        } => {
            json!({ "factor": factor, "original_max_position_embeddings": original_max_position_embeddings,
                    "beta_fast": beta_fast, "beta_slow": beta_slow, "attention_factor": attention_factor,
                    "mscale": mscale, "mscale_all_dim": mscale_all_dim, "truncate": truncate })
        }
    };
    v.as_object().unwrap().clone()
}

/// Numbers compare as f64 (JSON may write 4 or 4.0); everything else structurally.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        _ => a == b,
    }
}

fn check_config(name: &str, cfg: &ModelConfig, s: &Value) {
    let n = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("{name}: summary lacks {k}")) as usize
    };
    assert_eq!(cfg.vocab_size, n("vocab_size"), "{name}");
    assert_eq!(cfg.dim, n("hidden_size"), "{name}");
    assert_eq!(cfg.ffn_dim, n("intermediate_size"), "{name}");
    assert_eq!(cfg.n_layers, n("num_hidden_layers"), "{name}");
    assert_eq!(cfg.n_heads, n("num_attention_heads"), "{name}");
    assert_eq!(cfg.n_kv_heads, n("num_key_value_heads"), "{name}");
    assert_eq!(cfg.head_dim, n("head_dim"), "{name}");
    assert_eq!(cfg.max_seq_len, n("max_position_embeddings"), "{name}");
    assert_eq!(
        cfg.norm_eps,
        s["rms_norm_eps"].as_f64().unwrap() as f32,
        "{name}"
    );
    assert_eq!(
        cfg.tie_embeddings,
        s["tie_word_embeddings"].as_bool().unwrap(),
        "{name}"
    );
    assert_eq!(
        cfg.attention_bias,
        s["attention_bias"].as_bool().unwrap(),
        "{name}"
    );
    assert_eq!(cfg.mlp_bias, s["mlp_bias"].as_bool().unwrap(), "{name}");
    assert_eq!(
        cfg.bos_token_id.map(u64::from),
        s["bos_token_id"].as_u64(),
        "{name}"
    );
    let eos: Vec<u32> = s["eos_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(cfg.eos_token_ids, eos, "{name}");
    assert_eq!(cfg.torch_dtype.as_deref(), s["dtype"].as_str(), "{name}");

    let rope = s["rope_parameters"].as_object().unwrap();
    assert_eq!(
        cfg.rope_scaling.rope_type(),
        rope["rope_type"].as_str().unwrap(),
        "{name}"
    );
    assert_eq!(
        cfg.rope_theta,
        rope["rope_theta"].as_f64().unwrap(),
        "{name}"
    );
    let ours = rope_fields(&cfg.rope_scaling);
    for (key, theirs) in rope {
        if key == "rope_type" || key == "rope_theta" {
            continue;
        }
        let mine = ours
            .get(key)
            .unwrap_or_else(|| panic!("{name}: rope parameter {key} not parsed"));
        assert!(
            same(mine, theirs),
            "{name}: rope {key}: ours {mine}, transformers {theirs}"
        );
    }
    if let RopeScaling::Dynamic {
        original_max_position_embeddings,
        ..
    } = cfg.rope_scaling
    {
        assert_eq!(original_max_position_embeddings, cfg.max_seq_len, "{name}");
    }
}

/// The tensors a Llama checkpoint must hold for this config, with their HF shapes.
fn implied_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, q, kv, f) = (cfg.dim, cfg.q_dim(), cfg.kv_dim(), cfg.ffn_dim);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    out.push(("model.norm.weight".into(), vec![d]));
    if !cfg.tie_embeddings {
        out.push(("lm_head.weight".into(), vec![cfg.vocab_size, d]));
    }
    for l in 0..cfg.n_layers {
        let p = format!("model.layers.{l}");
        let mut add = |name: &str, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
        add("input_layernorm.weight", vec![d]);
        add("post_attention_layernorm.weight", vec![d]);
        for (proj, rows, cols) in [
            ("q_proj", q, d),
            ("k_proj", kv, d),
            ("v_proj", kv, d),
            ("o_proj", d, q),
        ] {
            add(&format!("self_attn.{proj}.weight"), vec![rows, cols]);
            if cfg.attention_bias {
                add(&format!("self_attn.{proj}.bias"), vec![rows]);
            }
        }
        for (proj, rows, cols) in [("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)] {
            add(&format!("mlp.{proj}.weight"), vec![rows, cols]);
            if cfg.mlp_bias {
                add(&format!("mlp.{proj}.bias"), vec![rows]);
            }
        }
    }
    out.sort();
    out
}

fn check_tensors(name: &str, dir: &Path, cfg: &ModelConfig, exp: &Value) {
    let src = SafetensorsSource::open(dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        src.files().len() > 1,
        exp["sharded"].as_bool().unwrap(),
        "{name}"
    );
    let table = exp["tensors"].as_object().unwrap();
    let names = src.names();
    assert_eq!(names, table.keys().cloned().collect::<Vec<_>>(), "{name}");
    let implied = implied_shapes(cfg);
    assert_eq!(
        names,
        implied.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>(),
        "{name}"
    );

    for (tensor, shape) in implied {
        let want = &table[&tensor];
        let t = src.get(&tensor).unwrap().unwrap();
        assert_eq!(t.shape, shape, "{name} {tensor}: shape the config implies");
        let want_shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape, want_shape, "{name} {tensor}");
        let dtype = match want["dtype"].as_str().unwrap() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => panic!("{other}"),
        };
        assert_eq!(t.dtype, dtype, "{name} {tensor}");
        let mut values = vec![0f32; t.numel()];
        dequantize(t.dtype, &t.data, &mut values);
        let sum: f64 = values.iter().map(|&v| v as f64).sum();
        let abs_sum: f64 = values.iter().map(|&v| (v as f64).abs()).sum();
        for (got, key) in [(sum, "sum"), (abs_sum, "abs_sum")] {
            let want = want[key].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-9 * abs_sum.max(1.0),
                "{name} {tensor} {key}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn every_fixture_config_and_weights_load() {
    let mut rope_types = BTreeSet::new();
    let mut dtypes = BTreeSet::new();
    let mut forms = BTreeSet::new();
    let mut kv_ratios = BTreeSet::new();
    let (mut tied, mut sharded, mut biased, mut explicit_head_dim) = (0, 0, 0, 0);
    for dir in fixture_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let exp = expected(&dir);
        let cfg = ModelConfig::from_hf_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_config(&name, &cfg, &exp["config_summary"]);
        check_tensors(&name, &dir, &cfg, &exp);

        rope_types.insert(cfg.rope_scaling.rope_type());
        dtypes.insert(exp["stored_dtype"].as_str().unwrap().to_string());
        forms.insert(exp["config_form"].as_str().unwrap().to_string());
        kv_ratios.insert(cfg.n_heads / cfg.n_kv_heads);
        tied += cfg.tie_embeddings as usize;
        sharded += exp["sharded"].as_bool().unwrap() as usize;
        biased += (cfg.attention_bias && cfg.mlp_bias) as usize;
        explicit_head_dim += (cfg.head_dim != cfg.dim / cfg.n_heads) as usize;
    }
    // The fixture set must keep covering what the end-to-end test relies on.
    assert_eq!(rope_types.len(), 6, "{rope_types:?}");
    assert_eq!(dtypes.len(), 3, "{dtypes:?}");
    assert!(
        forms.contains("v5") && forms.contains("v4") && forms.contains("v4-legacy-type"),
        "{forms:?}"
    );
    assert!(
        [1, 2, 3, 4].iter().all(|r| kv_ratios.contains(r)),
        "{kv_ratios:?}"
    );
    assert!(tied > 0 && sharded > 0 && biased > 0 && explicit_head_dim > 0);
}

#[test]
fn generation_config_only_where_shipped() {
    for dir in fixture_dirs() {
        let g = GenerationConfig::from_hf_dir(&dir).unwrap();
        if dir.ends_with("tiny-chat") {
            let g = g.expect("tiny-chat ships generation_config.json");
            assert_eq!(g.eos_token_ids, vec![2, 0]);
            assert_eq!((g.bos_token_id, g.pad_token_id), (Some(1), Some(2)));
            assert_eq!(
                (g.do_sample, g.max_new_tokens, g.repetition_penalty),
                (Some(false), Some(32), Some(1.0))
            );
        } else {
            assert_eq!(g, None, "{}", dir.display());
        }
    }
}

#[test]
fn expected_json_is_self_consistent() {
    for dir in fixture_dirs() {
        let exp = expected(&dir);
        let vocab = exp["config_summary"]["vocab_size"].as_u64().unwrap() as usize;
        for case in exp["cases"].as_array().unwrap() {
            let prompt = case["prompt_ids"].as_array().unwrap();
            let argmax = case["argmax"].as_array().unwrap();
            assert_eq!(argmax.len(), prompt.len());
            let positions = case["logits_positions"].as_array().unwrap();
            let rows = case["logits"].as_array().unwrap();
            assert_eq!(positions.len(), rows.len());
            assert_eq!(
                positions.last().unwrap().as_u64().unwrap() as usize,
                prompt.len() - 1
            );
            for (pos, row) in positions.iter().zip(rows) {
                let row: Vec<f64> = row
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(row.len(), vocab);
                let best = (0..vocab)
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                    .unwrap();
                assert_eq!(
                    best as u64,
                    argmax[pos.as_u64().unwrap() as usize].as_u64().unwrap()
                );
            }
            // The first generated token is the argmax of the prompt's last position.
            assert_eq!(case["generated_ids"][0], *argmax.last().unwrap());
        }
    }
}
