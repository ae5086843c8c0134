//! Catalogue cases over GGUF files: the container (counts, lengths, dimensions, types, offsets,
//! alignment), the model metadata, tensor shapes and the tokenizer rebuilt from metadata. Each
//! starts from `Gguf::tiny()` and breaks one thing.

use super::gguf_writer::{Gguf, V};
use super::Kind::*;
use super::{gguf_case, Case};

fn tiny() -> Gguf {
    Gguf::tiny()
}

pub fn cases() -> Vec<Case> {
    vec![
        // ---- GGUF: the container ----
        gguf_case("gguf_empty", Load, &["too short"], Vec::new),
        gguf_case(
            "gguf_truncated",
            Load,
            &["past the end of the file"],
            || {
                let b = tiny().bytes();
                b[..b.len() / 3].to_vec()
            },
        ),
        gguf_case("gguf_bad_magic", Load, &["not a GGUF file"], || {
            let mut g = tiny();
            g.magic = *b"GGML";
            g.bytes()
        }),
        gguf_case(
            "gguf_version",
            Load,
            &["unsupported GGUF version 7"],
            || {
                let mut g = tiny();
                g.version = 7;
                g.bytes()
            },
        ),
        gguf_case("gguf_big_endian", Load, &["big-endian"], || {
            let mut g = tiny();
            g.version = 3u32.swap_bytes();
            g.bytes()
        }),
        gguf_case("gguf_huge_tensor_count", Load, &["tensor count"], || {
            let mut g = tiny();
            g.tensor_count = Some(1 << 60);
            g.bytes()
        }),
        gguf_case("gguf_huge_kv_count", Load, &["metadata count"], || {
            let mut g = tiny();
            g.kv_count = Some(u64::MAX);
            g.bytes()
        }),
        gguf_case("gguf_huge_string", Load, &["string length"], || {
            let mut body = (1u64 << 40).to_le_bytes().to_vec();
            body.extend_from_slice(b"abc");
            tiny().set("general.name", V::Raw(8, body)).bytes()
        }),
        gguf_case("gguf_huge_array", Load, &["array length"], || {
            let mut body = 8u32.to_le_bytes().to_vec();
            body.extend_from_slice(&(1u64 << 62).to_le_bytes());
            tiny().set("tokenizer.ggml.tokens", V::Raw(9, body)).bytes()
        }),
        gguf_case("gguf_nested_arrays", Load, &["nested"], || {
            // An array of arrays of arrays ... deeper than any real file.
            let mut body = Vec::new();
            for _ in 0..20 {
                body.extend_from_slice(&9u32.to_le_bytes());
                body.extend_from_slice(&1u64.to_le_bytes());
            }
            body.extend_from_slice(&4u32.to_le_bytes());
            body.extend_from_slice(&0u64.to_le_bytes());
            tiny().set("general.nested", V::Raw(9, body)).bytes()
        }),
        gguf_case(
            "gguf_unknown_value_type",
            Load,
            &["unknown value type 77"],
            || tiny().set("general.odd", V::Raw(77, vec![0; 8])).bytes(),
        ),
        gguf_case("gguf_too_many_dims", Load, &["5 dimensions"], || {
            tiny()
                .tensor("output_norm.weight", |t| t.dims = vec![8, 1, 1, 1, 1])
                .bytes()
        }),
        gguf_case("gguf_zero_dim", Load, &["zero dimension"], || {
            tiny()
                .tensor("blk.0.attn_q.weight", |t| t.dims = vec![8, 0])
                .bytes()
        }),
        gguf_case("gguf_dims_overflow", Load, &["overflow"], || {
            tiny()
                .tensor("blk.0.attn_q.weight", |t| {
                    t.dims = vec![1 << 32, 1 << 32, 16]
                })
                .bytes()
        }),
        gguf_case(
            "gguf_huge_tensor",
            Load,
            &["runs past the end of the file"],
            || {
                // 2^40 f32 values claimed by a 5 KB file.
                tiny()
                    .tensor("blk.0.attn_q.weight", |t| t.dims = vec![1 << 20, 1 << 20])
                    .bytes()
            },
        ),
        gguf_case("gguf_unknown_type", Load, &["unknown ggml type 99"], || {
            tiny().tensor("output_norm.weight", |t| t.ty = 99).bytes()
        }),
        gguf_case(
            "gguf_undecodable_type",
            Load,
            &["Q5_K", "cannot be decoded"],
            || {
                // Q5_K (type 13): a real ggml type, 256 values per 176-byte block, not supported.
                tiny()
                    .tensor("blk.0.ffn_down.weight", |t| {
                        t.dims = vec![256, 8];
                        t.ty = 13;
                        t.data = vec![0; 176 * 8];
                    })
                    .bytes()
            },
        ),
        gguf_case("gguf_offset_past_end", Load, &["runs past the end"], || {
            tiny()
                .tensor("output_norm.weight", |t| t.offset = Some(1 << 50))
                .bytes()
        }),
        gguf_case("gguf_misaligned", Load, &["alignment"], || {
            tiny()
                .tensor("output_norm.weight", |t| t.offset = Some(513))
                .bytes()
        }),
        gguf_case("gguf_overlap", Load, &["overlap"], || {
            tiny()
                .tensor("blk.0.attn_k.weight", |t| t.offset = Some(0))
                .bytes()
        }),
        gguf_case("gguf_duplicate_tensor", Load, &["appears twice"], || {
            tiny()
                .tensor("blk.0.attn_k.weight", |t| {
                    t.name = "blk.0.attn_q.weight".into()
                })
                .bytes()
        }),
        gguf_case("gguf_bad_alignment", Load, &["power of two"], || {
            tiny().set("general.alignment", V::U32(3)).bytes()
        }),
        gguf_case(
            "gguf_missing_key",
            Load,
            &["llama.embedding_length"],
            || tiny().without("llama.embedding_length").bytes(),
        ),
        gguf_case(
            "gguf_wrong_key_type",
            Load,
            &["llama.block_count", "expected"],
            || {
                tiny()
                    .set("llama.block_count", V::Str("one".into()))
                    .bytes()
            },
        ),
        gguf_case("gguf_zero_width", Config, &["must be positive"], || {
            tiny().set("llama.embedding_length", V::U32(0)).bytes()
        }),
        gguf_case(
            "gguf_heads_do_not_divide",
            Config,
            &["not a multiple"],
            || {
                tiny()
                    .set("llama.attention.head_count", V::U32(3))
                    .set("llama.attention.head_count_kv", V::U32(3))
                    .bytes()
            },
        ),
        gguf_case(
            "gguf_huge_layers",
            Config,
            &["num_hidden_layers", "larger than"],
            || tiny().set("llama.block_count", V::U64(1 << 40)).bytes(),
        ),
        gguf_case("gguf_arch", Config, &["\"gpt2\"", "not supported"], || {
            tiny()
                .set("general.architecture", V::Str("gpt2".into()))
                .bytes()
        }),
        gguf_case(
            "gguf_wrong_shape",
            Config,
            &["blk.0.attn_v.weight", "shape"],
            || {
                tiny()
                    .tensor("blk.0.attn_v.weight", |t| t.dims = vec![8, 4])
                    .bytes()
            },
        ),
        gguf_case(
            "gguf_missing_tensor",
            Config,
            &["blk.0.ffn_up.weight", "missing"],
            || {
                let mut g = tiny();
                g.tensors.retain(|t| t.name != "blk.0.ffn_up.weight");
                g.bytes()
            },
        ),
        gguf_case(
            "gguf_vocab_past_embedding",
            Config,
            &["16 tokens", "embedding only 12"],
            || {
                tiny()
                    .set("llama.vocab_size", V::U32(12))
                    .tensor("token_embd.weight", |t| {
                        t.dims = vec![8, 12];
                        t.data.truncate(8 * 12 * 4);
                    })
                    .bytes()
            },
        ),
        gguf_case(
            "gguf_special_id_out_of_vocab",
            Tokenizer,
            &["bos_token_id = 999"],
            || {
                tiny()
                    .set("tokenizer.ggml.bos_token_id", V::U32(999))
                    .bytes()
            },
        ),
        gguf_case(
            "gguf_tokenizer_model",
            Tokenizer,
            &["\"bert\"", "not supported"],
            || {
                tiny()
                    .set("tokenizer.ggml.model", V::Str("bert".into()))
                    .bytes()
            },
        ),
        gguf_case("gguf_bad_merge", Tokenizer, &["merge"], || {
            tiny()
                .set("tokenizer.ggml.merges", V::Strs(vec!["hel".into()]))
                .bytes()
        }),
        gguf_case("gguf_nan_scores", Tokenizer, &["scores[3] is NaN"], || {
            // Found by fuzzing: NaN scores broke the ordering of the rebuilt merges.
            let mut scores: Vec<u8> = 6u32.to_le_bytes().to_vec();
            scores.extend_from_slice(&16u64.to_le_bytes());
            for i in 0..16 {
                let s = if i == 3 { f32::NAN } else { -(i as f32) };
                scores.extend_from_slice(&s.to_le_bytes());
            }
            tiny()
                .set("tokenizer.ggml.model", V::Str("llama".into()))
                .without("tokenizer.ggml.merges")
                .set("tokenizer.ggml.scores", V::Raw(9, scores))
                .bytes()
        }),
        gguf_case(
            "gguf_token_types_length",
            Tokenizer,
            &["token_type"],
            || {
                tiny()
                    .set("tokenizer.ggml.token_type", V::I32s(vec![1, 1]))
                    .bytes()
            },
        ),
    ]
}
