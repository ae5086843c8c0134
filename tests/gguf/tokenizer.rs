//! Tokenizers rebuilt from GGUF vocabularies give the ids transformers gives for the same file
//! (SmolLM2's with the digit split its own tokenizer uses; see make_smollm2_fixtures.py).

use crate::common::*;
use anyllama::tokenizer_gguf::tokenizer_from_gguf;
use anyllama::weights::gguf::GgufFile;
use serde_json::Value as Json;

fn check_cases(label: &str, tok: &tokenizers::Tokenizer, cases: &Json) {
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 20, "{label}: too few cases");
    for case in cases {
        let text = case["text"].as_str().unwrap();
        for (key, special) in [("with_special", true), ("without_special", false)] {
            let ids = tok.encode(text, special).unwrap().get_ids().to_vec();
            assert_eq!(ids, u32_list(&case[key]), "{label}: {key} {text:?}");
        }
        let ids = u32_list(&case["without_special"]);
        // transformers' decode keeps special tokens by default
        let decoded = tok.decode(&ids, false).unwrap();
        assert_eq!(
            decoded,
            case["decoded"].as_str().unwrap(),
            "{label}: decode {text:?}"
        );
    }
}

#[test]
fn small_vocabularies_encode_like_transformers() {
    let expected = load_json("tokenizer_expected.json");
    for (file, want) in expected.as_object().unwrap() {
        let g = GgufFile::open(fixture(file)).unwrap();
        let (tok, special) = tokenizer_from_gguf(&g).unwrap();
        assert_eq!(special.bos.as_deref(), want["bos_token"].as_str(), "{file}");
        assert_eq!(special.eos.as_deref(), want["eos_token"].as_str(), "{file}");
        assert_eq!(
            special.add_bos,
            want["add_bos"].as_bool().unwrap(),
            "{file}"
        );
        assert_eq!(
            special.add_eos,
            want["add_eos"].as_bool().unwrap(),
            "{file}"
        );
        check_cases(file, &tok, &want["cases"]);
    }
    let g = GgufFile::open(fixture("tok_spm.gguf")).unwrap();
    let (_, special) = tokenizer_from_gguf(&g).unwrap();
    assert_eq!(special.chat_template.as_deref(), Some("{{ messages }}"));
    assert_eq!(
        (special.bos_id, special.eos_id, special.unk_id),
        (Some(1), Some(2), Some(0))
    );
}

#[test]
fn files_without_a_usable_vocabulary_are_refused() {
    let err = tokenizer_from_gguf(&GgufFile::open(fixture("meta_v3.gguf")).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("meta_v3.gguf") && err.contains("tokenizer.ggml.model"),
        "{err}"
    );
    let mut kv = Bytes::default();
    kv.kv_str("general.architecture", "llama")
        .kv_str("tokenizer.ggml.model", "rwkv");
    kv.string("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(1)
        .string("a");
    let path = temp_file(&write_gguf(3, &kv.0, &[]));
    let err = tokenizer_from_gguf(&GgufFile::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"rwkv\"") && err.contains(&path.display().to_string()),
        "{err}"
    );
    let _ = std::fs::remove_file(path);
    // a SentencePiece vocabulary with neither merges nor scores
    let mut kv = Bytes::default();
    kv.kv_str("general.architecture", "llama")
        .kv_str("tokenizer.ggml.model", "llama");
    kv.string("tokenizer.ggml.tokens")
        .u32(9)
        .u32(8)
        .u64(2)
        .string("a")
        .string("b");
    kv.kv_u32("tokenizer.ggml.bos_token_id", 5);
    let path = temp_file(&write_gguf(4, &kv.0, &[]));
    let err = tokenizer_from_gguf(&GgufFile::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("scores"), "{err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn smollm2_tokenizer_matches_its_reference_ids() {
    let Some(path) = smollm2() else { return };
    let expected = load_json("smollm2_expected.json");
    let want = &expected["tokenizer"];
    let g = GgufFile::open(&path).unwrap();
    let (tok, special) = tokenizer_from_gguf(&g).unwrap();
    assert_eq!(special.bos.as_deref(), want["bos_token"].as_str());
    assert_eq!(special.eos.as_deref(), want["eos_token"].as_str());
    assert_eq!(special.add_bos, want["add_bos"].as_bool().unwrap());
    assert_eq!(special.add_eos, want["add_eos"].as_bool().unwrap());
    assert_eq!(
        special.chat_template.as_deref(),
        want["chat_template"].as_str()
    );
    assert_eq!(tok.get_vocab_size(true), 49152);
    check_cases("smollm2", &tok, &want["cases"]);
}
