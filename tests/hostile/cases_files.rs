//! Catalogue cases over HF folders (single safetensors, sharded index, config.json, tokenizer
//! files), chat templates, generation requests and device memory. File cases start from a copy of
//! a valid fixture folder and break one thing.

use super::common;
use super::Kind::*;
use super::{edit_json, edit_safetensors, generate_with, hf_case, index_path, other_case, render};
use super::{sharded_case, Case};
use anyllama::backend::MemoryLimits;
use anyllama::dtype::DType;
use anyllama::loader::ModelFiles;
use serde_json::json;

pub fn cases() -> Vec<Case> {
    vec![
        // ---- safetensors, single file ----
        hf_case("st_header_past_end", Load, &["model.safetensors"], |d| {
            let p = d.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            let claimed = b.len() as u64 * 2;
            b[..8].copy_from_slice(&claimed.to_le_bytes());
            std::fs::write(&p, b).unwrap();
        }),
        hf_case("st_huge_header", Load, &["model.safetensors"], |d| {
            let p = d.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            b[..8].copy_from_slice(&(1u64 << 62).to_le_bytes());
            std::fs::write(&p, b).unwrap();
        }),
        hf_case("st_header_not_json", Load, &["model.safetensors"], |d| {
            let p = d.join("model.safetensors");
            let mut b = std::fs::read(&p).unwrap();
            b[8] = b'#';
            std::fs::write(&p, b).unwrap();
        }),
        hf_case("st_unknown_dtype", Load, &["model.safetensors"], |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, _| {
                h["model.norm.weight"]["dtype"] = json!("F9_E9");
            })
        }),
        hf_case(
            "st_unsupported_dtype",
            Load,
            &["model.norm.weight", "I32"],
            |d| {
                edit_safetensors(&d.join("model.safetensors"), |h, _| {
                    // I32 has the size of the stored BF16 pair count / 2: same bytes, other dtype.
                    let shape = h["model.norm.weight"]["shape"][0].as_u64().unwrap();
                    h["model.norm.weight"]["dtype"] = json!("I32");
                    h["model.norm.weight"]["shape"] = json!([shape / 2]);
                })
            },
        ),
        hf_case("st_shape_vs_bytes", Load, &["model.safetensors"], |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, _| {
                h["model.norm.weight"]["shape"] = json!([1000]);
            })
        }),
        hf_case("st_overlap", Load, &["model.safetensors"], |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, _| {
                let (name, first) = h
                    .as_object()
                    .unwrap()
                    .iter()
                    .find(|(k, _)| *k != "__metadata__")
                    .map(|(k, v)| (k.clone(), v["data_offsets"].clone()))
                    .unwrap();
                let other = h
                    .as_object()
                    .unwrap()
                    .keys()
                    .find(|k| **k != name && *k != "__metadata__")
                    .unwrap()
                    .clone();
                // Two tensors on the same bytes (shapes left as they are: the sizes differ or
                // the coverage breaks, either way the ranges no longer tile the file).
                h[&other]["data_offsets"] = first;
            })
        }),
        hf_case("st_truncated", Load, &["model.safetensors"], |d| {
            let p = d.join("model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() - 100]).unwrap();
        }),
        hf_case(
            "st_wrong_shape",
            Config,
            &["model.embed_tokens.weight", "shape"],
            |d| {
                edit_safetensors(&d.join("model.safetensors"), |h, _| {
                    let s = h["model.embed_tokens.weight"]["shape"].clone();
                    let (r, c) = (s[0].as_u64().unwrap(), s[1].as_u64().unwrap());
                    h["model.embed_tokens.weight"]["shape"] = json!([c, r]);
                })
            },
        ),
        // ---- sharded index ----
        sharded_case("idx_traversal", Load, &["not a plain file name"], |d| {
            edit_json(&index_path(d), |v| {
                let map = v["weight_map"].as_object_mut().unwrap();
                let k = map.keys().next().unwrap().clone();
                map[&k] = json!("../model-00001-of-00003.safetensors");
            })
        }),
        sharded_case("idx_absolute", Load, &["not a plain file name"], |d| {
            edit_json(&index_path(d), |v| {
                let map = v["weight_map"].as_object_mut().unwrap();
                let k = map.keys().next().unwrap().clone();
                map[&k] = json!("/etc/passwd");
            })
        }),
        sharded_case(
            "idx_link_outside",
            Load,
            &["outside the model folder"],
            |d| {
                // A shard that is a link to a file in the parent folder.
                let shard = d.join("model-00003-of-00003.safetensors");
                let outside = d.parent().unwrap().join("elsewhere.safetensors");
                std::fs::rename(&shard, &outside).unwrap();
                std::os::unix::fs::symlink(&outside, &shard).unwrap();
            },
        ),
        sharded_case("idx_missing_tensor", Load, &["does not hold it"], |d| {
            edit_json(&index_path(d), |v| {
                v["weight_map"]["model.layers.9.mlp.up_proj.weight"] =
                    json!("model-00001-of-00003.safetensors");
            })
        }),
        sharded_case("idx_unlisted_tensor", Load, &["does not list"], |d| {
            edit_json(&index_path(d), |v| {
                // A tensor of the shard that holds several, so the shard is still opened.
                let map = v["weight_map"].as_object_mut().unwrap();
                let k = map
                    .iter()
                    .find(|(_, s)| *s == "model-00002-of-00003.safetensors")
                    .unwrap()
                    .0
                    .clone();
                map.remove(&k);
            })
        }),
        sharded_case("idx_wrong_shard", Load, &["puts in"], |d| {
            edit_json(&index_path(d), |v| {
                let map = v["weight_map"].as_object_mut().unwrap();
                let k = map
                    .iter()
                    .find(|(_, s)| *s == "model-00001-of-00003.safetensors")
                    .unwrap()
                    .0
                    .clone();
                map[&k] = json!("model-00002-of-00003.safetensors");
            })
        }),
        sharded_case("idx_broken_json", Load, &["invalid JSON"], |d| {
            std::fs::write(index_path(d), "{\"weight_map\": {").unwrap();
        }),
        sharded_case(
            "idx_missing_shard",
            Load,
            &["model-00002-of-00003.safetensors"],
            |d| {
                std::fs::remove_file(d.join("model-00002-of-00003.safetensors")).unwrap();
            },
        ),
        // ---- config.json ----
        hf_case("cfg_broken_json", Config, &["not valid JSON"], |d| {
            std::fs::write(d.join("config.json"), "{\"hidden_size\": 48,").unwrap();
        }),
        hf_case(
            "cfg_unknown_rope",
            Config,
            &["unknown rope type `su`"],
            |d| {
                edit_json(&d.join("config.json"), |v| {
                    v["rope_parameters"] = json!({"rope_type": "su", "factor": 2.0});
                })
            },
        ),
        hf_case("cfg_heads", Config, &["num_attention_heads"], |d| {
            edit_json(&d.join("config.json"), |v| {
                v["num_attention_heads"] = json!(5)
            })
        }),
        hf_case("cfg_kv_heads", Config, &["num_key_value_heads"], |d| {
            edit_json(&d.join("config.json"), |v| {
                v["num_key_value_heads"] = json!(4)
            })
        }),
        hf_case("cfg_zero_width", Config, &["hidden_size"], |d| {
            edit_json(&d.join("config.json"), |v| v["hidden_size"] = json!(0))
        }),
        hf_case(
            "cfg_huge_vocab",
            Config,
            &["vocab_size", "larger than"],
            |d| {
                edit_json(&d.join("config.json"), |v| {
                    v["vocab_size"] = json!(1u64 << 40)
                })
            },
        ),
        hf_case("cfg_wrong_type", Config, &["`hidden_size` must be"], |d| {
            edit_json(&d.join("config.json"), |v| v["hidden_size"] = json!("48"))
        }),
        hf_case(
            "cfg_vocab_vs_embedding",
            Config,
            &["model.embed_tokens.weight", "shape"],
            |d| edit_json(&d.join("config.json"), |v| v["vocab_size"] = json!(600)),
        ),
        hf_case(
            "cfg_vocab_vs_tokenizer",
            Config,
            &["tokenizer has", "embedding only 256"],
            |d| edit_json(&d.join("config.json"), |v| v["vocab_size"] = json!(256)),
        ),
        hf_case(
            "cfg_huge_context",
            Config,
            &["max_position_embeddings", "larger than"],
            |d| {
                edit_json(&d.join("config.json"), |v| {
                    v["max_position_embeddings"] = json!(1u64 << 40)
                })
            },
        ),
        // ---- tokenizer files ----
        hf_case("tok_missing", Load, &["tokenizer.json", "not found"], |d| {
            std::fs::remove_file(d.join("tokenizer.json")).unwrap();
        }),
        hf_case("tok_broken_json", Load, &["tokenizer.json"], |d| {
            std::fs::write(d.join("tokenizer.json"), "{\"model\": [").unwrap();
        }),
        hf_case("tok_bad_merges", Load, &["tokenizer.json"], |d| {
            edit_json(&d.join("tokenizer.json"), |v| {
                v["model"]["merges"] = json!([["no-such-token", "other"]]);
            })
        }),
        hf_case(
            "tok_config_not_object",
            Load,
            &["tokenizer_config.json"],
            |d| {
                std::fs::write(d.join("tokenizer_config.json"), "[1, 2]").unwrap();
            },
        ),
        // ---- chat templates ----
        other_case("tpl_syntax", Template, &["syntax error"], || {
            render("{% for m in messages %}{{ m.content }")
        }),
        other_case("tpl_endless", Template, &["fuel"], || {
            render(
                "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            )
        }),
        other_case("tpl_recursion", Template, &["recursion"], || {
            render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
        }),
        other_case("tpl_raise", Template, &["roles must alternate"], || {
            render("{{ raise_exception('roles must alternate') }}")
        }),
        other_case(
            "tpl_print_huge",
            Template,
            &["cannot print a sequence"],
            || render("{{ [1] * 1000000000000 }}"),
        ),
        other_case("tpl_spin", Template, &["did not finish within"], || {
            // An empty sequence repeated 10**12 times: one loop instruction that never ends.
            render("{% for x in () * 1000000000000 %}{% endfor %}")
        }),
        other_case(
            "tpl_fuzz_timeout",
            Template,
            &["did not finish within"],
            || {
                // Found by fuzzing (a 14 s render): the repetition hides inside a concatenation.
                render(
                "{{ 288888888888888888~8888888888-88888888888<8+888808.8<888088887*888888888888888\
                 888888<8+8888888~8888~88888888*() }}x",
            )
            },
        ),
        // ---- generation ----
        other_case(
            "gen_prompt_too_long",
            Generation,
            &["20 tokens", "context holds"],
            || generate_with(8, &[5; 20]),
        ),
        other_case(
            "gen_token_past_vocab",
            Generation,
            &["token id 4000"],
            || generate_with(16, &[1, 4000]),
        ),
        other_case(
            "gen_context_overflows",
            Usage,
            &["too large to address"],
            || generate_with(usize::MAX / 2, &[1, 2]),
        ),
        other_case(
            "gen_context_does_not_fit",
            Device,
            &["does not fit"],
            || generate_with(1 << 40, &[1, 2]),
        ),
        // ---- device memory ----
        other_case(
            "mem_tensor_over_max_buffer",
            Device,
            &["larger than the largest buffer"],
            || {
                let files = ModelFiles::open(&common::fixtures().join("hf/tiny-chat"))?;
                let plan = files.memory_plan(16, DType::F16, 8)?;
                let limits = MemoryLimits {
                    max_buffer: Some(1024),
                    ..Default::default()
                };
                plan.check(&limits, &files.name(), "a small device")
            },
        ),
        other_case(
            "mem_model_over_available",
            Device,
            &["does not fit"],
            || {
                let files = ModelFiles::open(&common::fixtures().join("hf/tiny-chat"))?;
                let plan = files.memory_plan(256, DType::F32, 8)?;
                let limits = MemoryLimits {
                    available: Some(64 << 10),
                    ..Default::default()
                };
                plan.check(&limits, &files.name(), "a small device")
            },
        ),
    ]
}
