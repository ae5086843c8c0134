//! GGUF loading: the reader on files written by gguf-py (every metadata type, versions 2 and 3,
//! custom alignment), refusals of malformed files without large allocations, the Q/K row
//! un-permutation, ModelConfig, and the real SmolLM2 file against transformers and gguf-py.
//! Block formats are in gguf/quant.rs, tokenizers in gguf/tokenizer.rs.

#[path = "gguf/common.rs"]
mod common;
#[path = "gguf/quant.rs"]
mod quant;
#[path = "gguf/tokenizer.rs"]
mod tokenizer;

use anyllama::dtype::DType;
use anyllama::quant::dequantize;
use anyllama::weights::gguf::{Array, GgmlType, GgufFile, Value};
use anyllama::weights::TensorSource;
use anyllama::Error;
use common::*;
use serde_json::Value as Json;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator;

fn decode(t: &anyllama::weights::HostTensor<'_>) -> Vec<f32> {
    let mut out = vec![0f32; t.numel()];
    dequantize(t.dtype, &t.data, &mut out);
    out
}

/// Checks a metadata value against its description in meta_expected.json.
fn check_value(key: &str, got: &Value, want: &Json) {
    let ty = want["type"].as_str().unwrap();
    let v = &want["value"];
    let ok = match (ty, got) {
        ("u8", Value::U8(x)) => v.as_u64() == Some(*x as u64),
        ("i8", Value::I8(x)) => v.as_i64() == Some(*x as i64),
        ("u16", Value::U16(x)) => v.as_u64() == Some(*x as u64),
        ("i16", Value::I16(x)) => v.as_i64() == Some(*x as i64),
        ("u32", Value::U32(x)) => v.as_u64() == Some(*x as u64),
        ("i32", Value::I32(x)) => v.as_i64() == Some(*x as i64),
        ("u64", Value::U64(x)) => v.as_u64() == Some(*x),
        ("i64", Value::I64(x)) => v.as_i64() == Some(*x),
        ("f32", Value::F32(x)) => v.as_f64().map(|f| f as f32) == Some(*x),
        ("f64", Value::F64(x)) => v.as_f64() == Some(*x),
        ("bool", Value::Bool(x)) => v.as_bool() == Some(*x),
        ("string", Value::String(x)) => v.as_str() == Some(x.as_str()),
        ("array", Value::Array(a)) => {
            check_array(a, want["element"].as_str().unwrap(), v, want.get("inner"))
        }
        _ => false,
    };
    assert!(ok, "{key}: got {got:?}, want {want}");
}

fn check_array(a: &Array, element: &str, v: &Json, inner: Option<&Json>) -> bool {
    let items = v.as_array().unwrap();
    match (element, a) {
        ("string", Array::String(s)) => {
            s.iter().zip(items).all(|(x, y)| y.as_str() == Some(x)) && s.len() == items.len()
        }
        ("bool", Array::Bool(b)) => {
            b.iter().zip(items).all(|(x, y)| y.as_bool() == Some(*x)) && b.len() == items.len()
        }
        ("f32", Array::F32(f)) => f.as_slice() == f32_list(v).as_slice(),
        ("f64", Array::F64(f)) => {
            f.iter().zip(items).all(|(x, y)| y.as_f64() == Some(*x)) && f.len() == items.len()
        }
        ("u64", Array::U64(u)) => {
            u.iter().zip(items).all(|(x, y)| y.as_u64() == Some(*x)) && u.len() == items.len()
        }
        ("array", Array::Array(inner_arrays)) => {
            inner_arrays.len() == items.len()
                && inner_arrays
                    .iter()
                    .zip(items)
                    .all(|(ia, iv)| check_array(ia, inner.unwrap().as_str().unwrap(), iv, None))
        }
        (ty, a) if a.element_type_name() == ty => {
            let want: Vec<i64> = items.iter().map(|y| y.as_i64().unwrap()).collect();
            a.to_i64_vec() == Some(want)
        }
        _ => false,
    }
}

#[test]
fn reads_every_metadata_type_and_tensor_in_versions_2_and_3() {
    let expected = load_json("meta_expected.json");
    for (file, version) in [("meta_v3.gguf", 3), ("meta_v2.gguf", 2)] {
        let g = GgufFile::open(fixture(file)).unwrap();
        assert_eq!(g.version(), version);
        assert_eq!(g.alignment(), 64);
        assert_eq!(g.data_offset() % 64, 0);
        let want = expected["metadata"].as_object().unwrap();
        assert_eq!(
            g.metadata_entries().count(),
            want.len(),
            "{file}: metadata count"
        );
        for (key, w) in want {
            let got = g
                .metadata(key)
                .unwrap_or_else(|| panic!("{file}: missing {key}"));
            check_value(key, got, w);
        }
        // typed getters: right type, absent key, wrong type
        assert_eq!(g.get_u64("test.u32").unwrap(), Some(4_000_000_000));
        assert_eq!(
            g.get_str("test.string").unwrap(),
            Some("héllo wörld ✓ 你好")
        );
        assert_eq!(g.get_u64("no.such.key").unwrap(), None);
        let err = g.get_u64("test.string").unwrap_err().to_string();
        assert!(err.contains(file) && err.contains("test.string"), "{err}");
        assert_eq!(g.architecture().unwrap(), "testarch");

        let tensors = expected["tensors"].as_object().unwrap();
        assert_eq!(g.tensor_infos().len(), tensors.len());
        for (name, w) in tensors {
            let info = g.tensor_info(name).unwrap();
            assert_eq!(info.ggml_type.name(), w["type"].as_str().unwrap(), "{name}");
            assert_eq!(info.offset % 64, 0);
            let t = g.get(name).unwrap().unwrap();
            let shape: Vec<usize> = w["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(t.shape, shape, "{name}");
            assert_eq!(info.shape(), shape);
            assert_eq!(decode(&t), f32_list(&w["values"]), "{name}");
        }
        assert!(g.get("absent").unwrap().is_none());
        // Not a Llama file: no config, with the architecture named.
        let err = g.model_config().unwrap_err();
        assert!(
            matches!(err, Error::Config(_)) && err.to_string().contains("testarch"),
            "{err}"
        );
    }
}

/// Opens `bytes` as a file and expects a load error mentioning the file and `needle`, without
/// any allocation near the sizes the file claims.
fn expect_refusal(bytes: &[u8], needle: &str) {
    let path = temp_file(bytes);
    let (result, largest) = largest_allocation(|| GgufFile::open(&path));
    let _ = std::fs::remove_file(&path);
    let err = result.expect_err(needle);
    let msg = err.to_string();
    assert!(matches!(err, Error::Load { .. }), "{msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name the file: {msg}"
    );
    assert!(msg.contains(needle), "expected {needle:?} in: {msg}");
    assert!(
        largest < 1 << 20,
        "opening a {}-byte file allocated {largest} bytes at once",
        bytes.len()
    );
}

fn llama_kv() -> (u64, Vec<u8>) {
    let mut kv = Bytes::default();
    kv.kv_str("general.architecture", "llama");
    (1, kv.0)
}

#[test]
fn refuses_malformed_headers() {
    expect_refusal(b"", "too short");
    expect_refusal(b"GGUF\x03\x00\x00\x00", "too short");
    let mut bad_magic = Bytes::header(3, 0, 0);
    bad_magic.0[0] = b'X';
    expect_refusal(&bad_magic.0, "not a GGUF file");
    expect_refusal(&Bytes::header(1, 0, 0).0, "unsupported GGUF version 1");
    expect_refusal(&Bytes::header(4, 0, 0).0, "unsupported GGUF version 4");
    expect_refusal(&Bytes::header(3u32.swap_bytes(), 0, 0).0, "big-endian");
    expect_refusal(&Bytes::header(3, 0, u64::MAX).0, "metadata count");
    expect_refusal(&Bytes::header(3, u64::MAX / 2, 0).0, "tensor count");

    // a string (the key) whose length runs past the end of the file
    let mut b = Bytes::header(3, 0, 1);
    b.u64(1 << 40).raw(&[b'a'; 32]);
    expect_refusal(&b.0, "string length");
    let mut b = Bytes::header(3, 0, 1);
    b.u64(u64::MAX).raw(&[0; 32]);
    expect_refusal(&b.0, "string length");
    // a string value past the end
    let mut b = Bytes::header(3, 0, 1);
    b.string("k").u32(8).u64(100).raw(b"short");
    expect_refusal(&b.0, "string length 100");
    // huge arrays of every element size, and of strings and arrays
    for ty in [0u32, 4, 12, 8, 9] {
        let mut b = Bytes::header(3, 0, 1);
        b.string("arr").u32(9).u32(ty).u64(1 << 50).raw(&[0; 64]);
        expect_refusal(&b.0, "array length");
    }
    // arrays nested past the depth limit
    let mut b = Bytes::header(3, 0, 1);
    b.string("deep").u32(9);
    for _ in 0..20 {
        b.u32(9).u64(1);
    }
    b.u32(0).u64(0);
    expect_refusal(&b.0, "nested");
    // unknown value type, duplicate key, bad alignment
    let mut b = Bytes::header(3, 0, 1);
    b.string("k").u32(13).u32(0);
    expect_refusal(&b.0, "unknown value type 13");
    let mut b = Bytes::header(3, 0, 2);
    b.kv_u32("k", 1).kv_u32("k", 2);
    expect_refusal(&b.0, "appears twice");
    let mut b = Bytes::header(3, 0, 1);
    b.kv_u32("general.alignment", 24);
    expect_refusal(&b.0, "power of two");
    // invalid UTF-8 in a key
    let mut b = Bytes::header(3, 0, 1);
    b.u64(2).raw(&[0xff, 0xfe]).u32(4).u32(0);
    expect_refusal(&b.0, "UTF-8");
}

#[test]
fn refuses_malformed_tensor_infos() {
    let (n_kv, kv) = llama_kv();
    let file = |infos: &dyn Fn(&mut Bytes), n_tensors: u64, data: usize| {
        let mut b = Bytes::header(3, n_tensors, n_kv);
        b.raw(&kv);
        infos(&mut b);
        b.pad_to(32).raw(&vec![0u8; data]);
        b.0
    };
    // data offset past the end of the file
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[4], 0, 0);
            },
            1,
            8,
        ),
        "runs past the end",
    );
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[4], 0, 1 << 20);
            },
            1,
            64,
        ),
        "runs past the end",
    );
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[4], 0, u64::MAX - 31);
            },
            1,
            64,
        ),
        "runs past the end",
    );
    // dimensions whose product overflows, or that are merely huge
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[1 << 32, 1 << 32, 1 << 32], 0, 0);
            },
            1,
            64,
        ),
        "overflow",
    );
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[u64::MAX, 2], 0, 0);
            },
            1,
            64,
        ),
        "overflow",
    );
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[1 << 40, 1 << 20], 0, 0);
            },
            1,
            64,
        ),
        "past the end",
    );
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[1 << 40, 1 << 23], 0, 0);
            },
            1,
            64,
        ),
        "overflows",
    );
    // too many dimensions, none, unknown type, partial blocks, unaligned offset, duplicate name
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[1, 1, 1, 1, 1], 0, 0);
            },
            1,
            64,
        ),
        "5 dimensions",
    );
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[], 0, 0);
            },
            1,
            64,
        ),
        "0 dimensions",
    );
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[4], 4, 0);
            },
            1,
            64,
        ),
        "unknown ggml type 4",
    );
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[48], 8, 0);
            },
            1,
            64,
        ),
        "not a multiple of the Q8_0 block size",
    );
    expect_refusal(
        &file(
            &|b| {
                b.tensor_info("t", &[4], 0, 16);
            },
            1,
            64,
        ),
        "not a multiple of the alignment",
    );
    let two = |b: &mut Bytes| {
        b.tensor_info("t", &[4], 0, 0).tensor_info("t", &[4], 0, 32);
    };
    expect_refusal(&file(&two, 2, 64), "appears twice");
    // a tensor name whose length runs past the end
    expect_refusal(
        &file(
            &|b| {
                b.u64(1 << 33);
            },
            1,
            64,
        ),
        "string length",
    );
}

#[test]
fn unsupported_tensor_types_open_but_are_refused_by_name() {
    let (n_kv, kv) = llama_kv();
    let q5 = TensorSpec {
        name: "blk.0.ffn_up.weight".into(),
        dims: vec![32, 2],
        ggml_type: 6,
        data: vec![0; 44],
    };
    let f = TensorSpec {
        name: "ok".into(),
        dims: vec![2],
        ggml_type: 0,
        data: 1.5f32.to_le_bytes().repeat(2),
    };
    let path = temp_file(&write_gguf(n_kv, &kv, &[q5, f]));
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(
        g.tensor_info("blk.0.ffn_up.weight").unwrap().ggml_type,
        GgmlType(6)
    );
    let err = g.get("blk.0.ffn_up.weight").unwrap_err().to_string();
    assert!(
        err.contains("blk.0.ffn_up.weight") && err.contains("Q5_0"),
        "{err}"
    );
    assert_eq!(decode(&g.get("ok").unwrap().unwrap()), vec![1.5, 1.5]);
    let _ = std::fs::remove_file(path);
}

/// llama.cpp's converter, as its Python reads: `w.reshape(n_head, 2, rows // n_head // 2, *rest)
/// .swapaxes(1, 2).reshape(w.shape)`, i.e. output row (h, d, t) is input row (h, t, d).
fn llamacpp_permute(rows: &[Vec<u8>], n_head: usize) -> Vec<Vec<u8>> {
    let half = rows.len() / n_head / 2;
    let mut out = Vec::new();
    for h in 0..n_head {
        for d in 0..half {
            for t in 0..2 {
                out.push(rows[h * 2 * half + t * half + d].clone());
            }
        }
    }
    out
}

#[test]
fn llama_q_and_k_rows_are_put_back_in_hf_order() {
    // 2 query heads and 1 KV head of width 4; q is f32 [8, 3], its bias f32 [8], k is Q8_0
    // [4, 32] so whole blocks must move, v is not permuted.
    let (n_heads, n_kv, head_dim) = (2usize, 1usize, 4usize);
    let q_rows: Vec<Vec<u8>> = (0..n_heads * head_dim)
        .map(|r| {
            (0..3)
                .flat_map(|c| ((r * 10 + c) as f32).to_le_bytes())
                .collect()
        })
        .collect();
    let bias_rows: Vec<Vec<u8>> = (0..n_heads * head_dim)
        .map(|r| (r as f32 + 0.5).to_le_bytes().to_vec())
        .collect();
    let k_rows: Vec<Vec<u8>> = (0..n_kv * head_dim)
        .map(|r| {
            let x: Vec<f32> = (0..32).map(|c| (r * 32 + c) as f32 / 64.0).collect();
            anyllama::quant_blocks::quantize_blocks(DType::Q8_0, &x).unwrap()
        })
        .collect();
    let v_rows = q_rows[..4].to_vec();

    let mut kv = Bytes::default();
    kv.kv_str("general.architecture", "llama")
        .kv_u32("llama.attention.head_count", n_heads as u32)
        .kv_u32("llama.attention.head_count_kv", n_kv as u32);
    let spec = |name: &str, dims: Vec<u64>, ty: u32, rows: Vec<Vec<u8>>| TensorSpec {
        name: name.into(),
        dims,
        ggml_type: ty,
        data: rows.concat(),
    };
    let tensors = [
        spec(
            "blk.0.attn_q.weight",
            vec![3, 8],
            0,
            llamacpp_permute(&q_rows, n_heads),
        ),
        spec(
            "blk.0.attn_q.bias",
            vec![8],
            0,
            llamacpp_permute(&bias_rows, n_heads),
        ),
        spec(
            "blk.0.attn_k.weight",
            vec![32, 4],
            8,
            llamacpp_permute(&k_rows, n_kv),
        ),
        spec("blk.0.attn_v.weight", vec![3, 4], 0, v_rows.clone()),
    ];
    let path = temp_file(&write_gguf(3, &kv.0, &tensors));
    let g = GgufFile::open(&path).unwrap();
    let get = |n: &str| g.get(n).unwrap().unwrap();
    assert_eq!(
        get("blk.0.attn_q.weight").data.as_ref(),
        q_rows.concat().as_slice()
    );
    assert_eq!(
        get("blk.0.attn_q.bias").data.as_ref(),
        bias_rows.concat().as_slice()
    );
    let k = get("blk.0.attn_k.weight");
    assert_eq!((k.dtype, k.shape.clone()), (DType::Q8_0, vec![4, 32]));
    assert_eq!(k.data.as_ref(), k_rows.concat().as_slice());
    let v = get("blk.0.attn_v.weight");
    assert!(matches!(v.data, std::borrow::Cow::Borrowed(_)));
    assert_eq!(v.data.as_ref(), v_rows.concat().as_slice());
    // The raw bytes are still available as stored.
    let info = g.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        g.tensor_bytes(info),
        llamacpp_permute(&q_rows, n_heads).concat().as_slice()
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn smollm2_reader_config_and_rows_match_transformers_and_gguf_py() {
    let Some(path) = smollm2() else { return };
    let expected = load_json("smollm2_expected.json");
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(
        g.tensor_infos().len() as u64,
        expected["tensor_count"].as_u64().unwrap()
    );
    let mut types: Vec<&str> = g
        .tensor_infos()
        .iter()
        .map(|t| t.ggml_type.name())
        .collect();
    types.sort();
    types.dedup();
    let want_types: Vec<&str> = expected["tensor_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(types, want_types);

    // ModelConfig equals the fields of transformers' config for the file.
    let c = g.model_config().unwrap();
    let w = &expected["config"];
    let u = |k: &str| w[k].as_u64().unwrap() as usize;
    assert_eq!(c.vocab_size, u("vocab_size"));
    assert_eq!(c.dim, u("hidden_size"));
    assert_eq!(c.ffn_dim, u("intermediate_size"));
    assert_eq!(c.n_layers, u("num_hidden_layers"));
    assert_eq!(c.n_heads, u("num_attention_heads"));
    assert_eq!(c.n_kv_heads, u("num_key_value_heads"));
    assert_eq!(c.head_dim, u("head_dim"));
    assert_eq!(c.max_seq_len, u("max_position_embeddings"));
    assert_eq!(c.norm_eps, w["rms_norm_eps"].as_f64().unwrap() as f32);
    assert_eq!(c.rope_theta, w["rope_theta"].as_f64().unwrap());
    assert_eq!(w["rope_type"], "default");
    assert_eq!(c.rope_scaling, anyllama::config::RopeScaling::Default);
    assert_eq!(
        c.tie_embeddings,
        w["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(c.attention_bias, w["attention_bias"].as_bool().unwrap());
    assert_eq!(c.mlp_bias, w["mlp_bias"].as_bool().unwrap());
    assert_eq!(
        c.bos_token_id,
        Some(w["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        c.eos_token_ids,
        vec![w["eos_token_id"].as_u64().unwrap() as u32]
    );

    // Rows of each stored type, dequantized, equal gguf-py's decoding bit for bit.
    for (name, t) in expected["rows"].as_object().unwrap() {
        let host = g.get(name).unwrap().unwrap();
        assert_eq!(
            host.dtype.name().to_uppercase(),
            t["type"].as_str().unwrap()
        );
        let all = decode(&host);
        let cols = *host.shape.last().unwrap();
        for (row, values) in t["rows"].as_object().unwrap() {
            let r: usize = row.parse().unwrap();
            assert_eq!(
                &all[r * cols..(r + 1) * cols],
                f32_list(values).as_slice(),
                "{name} row {r}"
            );
        }
    }

    // Un-permuted q_proj / k_proj rows equal the rows transformers loads.
    for (name, rows) in expected["qk_rows"].as_object().unwrap() {
        let host = g.get(name).unwrap().unwrap();
        assert!(matches!(host.data, std::borrow::Cow::Owned(_)));
        let all = decode(&host);
        let cols = host.shape[1];
        for (row, values) in rows.as_object().unwrap() {
            let r: usize = row.parse().unwrap();
            assert_eq!(
                &all[r * cols..(r + 1) * cols],
                f32_list(values).as_slice(),
                "{name} row {r}"
            );
        }
    }
}

/// A small llama file with the given metadata (kv entries already encoded) and tensor names.
fn llama_file(n_kv: u64, kv: &Bytes, tensor_names: &[&str]) -> std::path::PathBuf {
    let tensors: Vec<TensorSpec> = tensor_names
        .iter()
        .map(|n| TensorSpec {
            name: n.to_string(),
            dims: vec![2],
            ggml_type: 0,
            data: vec![0; 8],
        })
        .collect();
    temp_file(&write_gguf(n_kv, &kv.0, &tensors))
}

#[test]
fn model_config_from_hand_made_metadata() {
    let base = || {
        let mut kv = Bytes::default();
        kv.kv_str("general.architecture", "llama")
            .kv_u32("llama.block_count", 2)
            .kv_u32("llama.embedding_length", 64)
            .kv_u32("llama.feed_forward_length", 96)
            .kv_u32("llama.attention.head_count", 4)
            .kv_u32("llama.context_length", 128)
            .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-6);
        kv.string("tokenizer.ggml.tokens")
            .u32(9)
            .u32(8)
            .u64(3)
            .string("a")
            .string("b")
            .string("c");
        (8u64, kv)
    };
    // No head_count_kv (every head has its keys), no head width keys (dim / heads), no vocab_size
    // (the token count), linear RoPE scaling, no output.weight (tied), a q bias.
    let (n, mut kv) = base();
    kv.kv_str("llama.rope.scaling.type", "linear")
        .kv_f32("llama.rope.scaling.factor", 2.0);
    let path = llama_file(n + 2, &kv, &["token_embd.weight", "blk.0.attn_q.bias"]);
    let c = GgufFile::open(&path).unwrap().model_config().unwrap();
    assert_eq!(
        (c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size),
        (4, 4, 16, 3)
    );
    assert_eq!(
        (c.dim, c.ffn_dim, c.n_layers, c.max_seq_len),
        (64, 96, 2, 128)
    );
    assert_eq!(c.norm_eps, 1e-6);
    assert_eq!(c.rope_theta, 10000.0);
    assert_eq!(
        c.rope_scaling,
        anyllama::config::RopeScaling::Linear { factor: 2.0 }
    );
    assert!(c.tie_embeddings && c.attention_bias && !c.mlp_bias);
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (None, vec![]));
    let _ = std::fs::remove_file(path);

    // An explicit head width, and an output projection.
    let (n, mut kv) = base();
    kv.kv_u32("llama.attention.key_length", 32)
        .kv_u32("llama.rope.dimension_count", 32)
        .kv_u32("llama.attention.head_count_kv", 2);
    let path = llama_file(n + 3, &kv, &["output.weight"]);
    let c = GgufFile::open(&path).unwrap().model_config().unwrap();
    assert_eq!((c.head_dim, c.n_kv_heads, c.tie_embeddings), (32, 2, false));
    let _ = std::fs::remove_file(path);

    // Refusals: partial rotary, unknown scaling, a missing required key, a bad head ratio.
    let refuse = |extra: &dyn Fn(&mut Bytes) -> u64, needle: &str| {
        let (n, mut kv) = base();
        let added = extra(&mut kv);
        let path = llama_file(n + added, &kv, &[]);
        let err = GgufFile::open(&path)
            .unwrap()
            .model_config()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(needle) && err.contains(&path.display().to_string()),
            "{needle}: {err}"
        );
        let _ = std::fs::remove_file(path);
    };
    refuse(
        &|kv| {
            kv.kv_u32("llama.rope.dimension_count", 8);
            1
        },
        "partial rotary",
    );
    refuse(
        &|kv| {
            kv.kv_str("llama.rope.scaling.type", "su");
            1
        },
        "\"su\"",
    );
    refuse(
        &|kv| {
            kv.kv_u32("llama.attention.head_count_kv", 3);
            1
        },
        "not a multiple",
    );
    refuse(
        &|kv| {
            kv.kv_str("llama.rope.scaling.type", "yarn")
                .kv_f32("llama.rope.scaling.factor", 4.0);
            2
        },
        "original_context_length",
    );
    let mut kv = Bytes::default();
    kv.kv_str("general.architecture", "llama")
        .kv_u32("llama.embedding_length", 64);
    let path = llama_file(2, &kv, &[]);
    let err = GgufFile::open(&path)
        .unwrap()
        .model_config()
        .unwrap_err()
        .to_string();
    assert!(err.contains("llama.attention.head_count"), "{err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn llama3_rope_scaling_is_recovered_from_rope_freqs() {
    let want = &load_json("meta_expected.json")["llama3_rope"];
    let g = GgufFile::open(fixture("llama3_rope.gguf")).unwrap();
    let c = g.model_config().unwrap();
    assert_eq!(
        c.rope_scaling,
        anyllama::config::RopeScaling::Llama3 {
            factor: want["factor"].as_f64().unwrap(),
            low_freq_factor: want["low_freq_factor"].as_f64().unwrap(),
            high_freq_factor: want["high_freq_factor"].as_f64().unwrap(),
            original_max_position_embeddings: want["original_max_position_embeddings"]
                .as_u64()
                .unwrap() as usize,
        }
    );
    assert_eq!(
        (c.head_dim, c.rope_theta, c.max_seq_len),
        (128, 500000.0, 131072)
    );
}

/// Corrupted copies of valid files (bytes overwritten with random or extreme values, files cut
/// short) must give errors, never panics, and never allocate much beyond the file's size.
#[test]
fn corrupted_files_never_panic_or_allocate_hugely() {
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut opened, mut refused) = (0, 0);
    for name in [
        "meta_v3.gguf",
        "tok_spm.gguf",
        "tok_bpe_llama3.gguf",
        "llama3_rope.gguf",
    ] {
        let original = std::fs::read(fixture(name)).unwrap();
        for round in 0..150 {
            let mut bytes = original.clone();
            if round % 5 == 4 {
                bytes.truncate(next() as usize % bytes.len());
            } else {
                for _ in 0..1 + round % 3 {
                    // mostly in the header, where the counts and lengths live; often a printable
                    // byte, which keeps strings valid UTF-8 and so reaches the tokenizer builder
                    let span = if next() % 4 == 0 {
                        bytes.len()
                    } else {
                        bytes.len().min(2048)
                    };
                    let at = next() as usize % span;
                    bytes[at] = match next() % 3 {
                        0 => [0x00, 0xff, 0x7f, 0x80][next() as usize % 4],
                        1 => next() as u8,
                        _ => b' ' + (next() % 95) as u8,
                    };
                }
            }
            let path = temp_file(&bytes);
            let (_, largest) = largest_allocation(|| {
                let Ok(g) = GgufFile::open(&path) else {
                    refused += 1;
                    return;
                };
                opened += 1;
                {
                    for n in g.names() {
                        if let Ok(Some(t)) = g.get(&n) {
                            let _ = decode(&t);
                        }
                    }
                    let _ = g.model_config();
                    let _ = anyllama::tokenizer_gguf::tokenizer_from_gguf(&g);
                }
            });
            let _ = std::fs::remove_file(&path);
            assert!(
                largest < 16 << 20,
                "{name} round {round}: allocated {largest} bytes at once"
            );
        }
    }
    // Both outcomes must be exercised for the test to mean anything.
    eprintln!("corrupted files: {opened} opened, {refused} refused");
    assert!(
        opened > 100 && refused > 100,
        "{opened} opened, {refused} refused"
    );
}
