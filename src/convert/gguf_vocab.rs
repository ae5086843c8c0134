//! A byte-level BPE tokenizer (GPT-2 style: SmolLM2, Llama 3, Qwen2, ...) as GGUF vocabulary
//! metadata (`tokenizer.ggml.*`), the form llama.cpp's converter writes and `tokenizer_gguf`
//! reads back: tokens by id, their types, the merges, the name of the pre-tokenizer's split
//! pattern, the special-token ids and flags, and the chat template.
//!
//! GGUF cannot describe an arbitrary `tokenizers` pipeline, only a few known ones by name, so
//! the pipeline is matched against those and anything else is refused rather than written as a
//! vocabulary that would split text differently.

use super::gguf_writer::Metadata;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::tokenizer_gguf::{GPT4O_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT, TEKKEN_SPLIT};
use crate::weights::gguf::{Array, Value};
use serde_json::{json, Value as Json};
use std::path::Path;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// `tokenizer.ggml.pre` for a byte-level pre-tokenizer, by its serialized form.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    let byte_level = |use_regex: bool| {
        move |v: &Json| {
            v["type"] == "ByteLevel"
                && v["add_prefix_space"] == json!(false)
                && v["use_regex"] == json!(use_regex)
        }
    };
    if byte_level(true)(pre) {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"]
        .as_array()
        .filter(|_| pre["type"] == "Sequence")?;
    match parts.as_slice() {
        [digits, bl]
            if digits["type"] == "Digits" && digits["individual_digits"] == json!(true) =>
        {
            byte_level(true)(bl).then_some("smollm")
        }
        [split, bl] if split["type"] == "Split" && byte_level(false)(bl) => {
            if split["behavior"] != "Isolated" || split["invert"] != json!(false) {
                return None;
            }
            let pattern = split["pattern"]["Regex"].as_str()?;
            [
                (LLAMA3_SPLIT, "llama-bpe"),
                (QWEN2_SPLIT, "qwen2"),
                (TEKKEN_SPLIT, "tekken"),
                (GPT4O_SPLIT, "gpt-4o"),
            ]
            .into_iter()
            .find(|(p, _)| *p == pattern)
            .map(|(_, name)| name)
        }
        _ => None,
    }
}

/// Merges from a serialized BPE model: `[["a", "b"], ...]` (current form) or `["a b", ...]`.
fn merges_of(model: &Json) -> std::result::Result<Vec<String>, String> {
    let Some(list) = model["merges"].as_array() else {
        return Ok(Vec::new());
    };
    list.iter()
        .map(|m| {
            let (a, b) = match m {
                Json::String(s) => s.split_once(' ').ok_or_else(|| format!("merge {s:?}"))?,
                Json::Array(p) if p.len() == 2 => (
                    p[0].as_str().ok_or("merge part is not a string")?,
                    p[1].as_str().ok_or("merge part is not a string")?,
                ),
                other => return Err(format!("merge {other} is not a pair")),
            };
            // GGUF stores "a b": a part with a space could not be split back.
            if a.contains(' ') || b.contains(' ') {
                return Err(format!("merge ({a:?}, {b:?}) contains a space"));
            }
            Ok(format!("{a} {b}"))
        })
        .collect()
}

/// The `tokenizer.*` metadata for `tok`, with `vocab_size` token slots (the embedding's rows;
/// slots the tokenizer does not use are filled with unused `[PADn]` tokens, as llama.cpp does).
/// `eos_ids` are the ids that end generation; one besides the tokenizer's EOS is recorded as
/// the end-of-turn token.
pub(super) fn vocab_metadata(
    tok: &Tokenizer,
    vocab_size: usize,
    eos_ids: &[u32],
    src: &Path,
) -> Result<Metadata> {
    let fail = |m: String| Error::Tokenizer(format!("{}: {m}", src.display()));
    let inner = tok.inner();
    let model = serde_json::to_value(inner.get_model())
        .map_err(|e| fail(format!("serializing the model: {e}")))?;
    let pre = serde_json::to_value(inner.get_pre_tokenizer())
        .map_err(|e| fail(format!("serializing the pre-tokenizer: {e}")))?;
    let unsupported = |what: String| {
        fail(format!(
            "{what}; only byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2 style) can be \
             written to GGUF"
        ))
    };
    if model["type"] != "BPE" || model["byte_fallback"] == json!(true) {
        return Err(unsupported(format!(
            "the tokenizer model is {} (byte_fallback {})",
            model["type"], model["byte_fallback"]
        )));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if !(model[key].is_null() || model[key] == "") {
            return Err(unsupported(format!("the BPE model sets {key}")));
        }
    }
    if inner.get_normalizer().is_some() {
        return Err(unsupported("the tokenizer has a normalizer".into()));
    }
    let pre_name = pre_tokenizer_name(&pre).ok_or_else(|| {
        let mut text = pre.to_string();
        text.truncate(300);
        unsupported(format!("pre-tokenizer {text} is not one GGUF can name"))
    })?;
    if model["ignore_merges"] == json!(true) {
        tracing::warn!(
            "{}: the tokenizer sets ignore_merges, which GGUF does not record (llama.cpp applies \
             it to llama-bpe vocabularies); other readers may split some words differently",
            src.display()
        );
    }
    let merges = merges_of(&model).map_err(|m| fail(format!("bad merges: {m}")))?;

    // Tokens by id; ids nothing spells are unused padding.
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    for (text, id) in inner.get_vocab(true) {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            fail(format!(
                "token {text:?} has id {id}, past the embedding's {vocab_size} rows"
            ))
        })?;
        *slot = Some(text);
    }
    let added = inner.get_added_tokens_decoder();
    let mut types = Vec::with_capacity(vocab_size);
    let mut texts = Vec::with_capacity(vocab_size);
    let known: std::collections::HashSet<String> = inner.get_vocab(true).into_keys().collect();
    for (id, t) in tokens.into_iter().enumerate() {
        let ty = match (&t, added.get(&(id as u32))) {
            (None, _) => UNUSED,
            (Some(_), Some(a)) if a.special => CONTROL,
            (Some(_), Some(_)) => USER_DEFINED,
            (Some(_), None) => NORMAL,
        };
        let text = t.unwrap_or_else(|| {
            let mut pad = format!("[PAD{id}]");
            while known.contains(&pad) {
                pad.push('_');
            }
            pad
        });
        types.push(ty);
        texts.push(text);
    }

    // GGUF records only "add BOS" / "add EOS": the post-processor must do no more than that.
    let sp = tok.specials();
    let probe = "Hello world 123";
    let plain = tok.encode(probe, false)?;
    let mut expect = Vec::new();
    expect.extend(sp.bos.as_ref().filter(|_| sp.add_bos).map(|t| t.id));
    expect.extend(&plain);
    expect.extend(sp.eos.as_ref().filter(|_| sp.add_eos).map(|t| t.id));
    if tok.encode(probe, true)? != expect {
        return Err(unsupported(
            "the post-processor adds tokens other than BOS / EOS".into(),
        ));
    }

    let s = |v: &str| Value::String(v.to_string());
    let mut m: Metadata = vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre_name)),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(texts)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(merges)),
        ),
    ];
    let named = [
        ("bos_token_id", &sp.bos),
        ("eos_token_id", &sp.eos),
        ("unknown_token_id", &sp.unk),
        ("padding_token_id", &sp.pad),
    ];
    for (key, t) in named {
        if let Some(t) = t {
            m.push((format!("tokenizer.ggml.{key}"), Value::U32(t.id)));
        }
    }
    let eos = sp.eos.as_ref().map(|t| t.id);
    let mut others = eos_ids.iter().filter(|&&id| Some(id) != eos);
    if let Some(&eot) = others.next() {
        m.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(eot)));
    }
    let dropped: Vec<&u32> = others.collect();
    if !dropped.is_empty() {
        tracing::warn!(
            "{}: GGUF records one end-of-sequence and one end-of-turn token; stop tokens \
             {dropped:?} are not recorded",
            src.display()
        );
    }
    m.push((
        "tokenizer.ggml.add_bos_token".into(),
        Value::Bool(sp.add_bos),
    ));
    m.push((
        "tokenizer.ggml.add_eos_token".into(),
        Value::Bool(sp.add_eos),
    ));
    if let Some(t) = tok.chat_template() {
        m.push(("tokenizer.chat_template".into(), s(t)));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_tokenizers_are_named_or_refused() {
        let bl = |re: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": re});
        assert_eq!(pre_tokenizer_name(&bl(true)), Some("gpt-2"));
        let smol = json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, bl(true)]});
        assert_eq!(pre_tokenizer_name(&smol), Some("smollm"));
        let split = |p: &str| {
            json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": false},
            bl(false)]})
        };
        assert_eq!(pre_tokenizer_name(&split(LLAMA3_SPLIT)), Some("llama-bpe"));
        assert_eq!(pre_tokenizer_name(&split(QWEN2_SPLIT)), Some("qwen2"));
        assert_eq!(pre_tokenizer_name(&split("\\s+")), None);
        let prefixed = json!({"type": "ByteLevel", "add_prefix_space": true, "use_regex": true});
        assert_eq!(pre_tokenizer_name(&prefixed), None);
        assert_eq!(pre_tokenizer_name(&Json::Null), None);
    }

    #[test]
    fn merges_in_both_forms() {
        let m = merges_of(&json!({"merges": [["a", "b"], "c d"]})).unwrap();
        assert_eq!(m, vec!["a b", "c d"]);
        assert!(merges_of(&json!({"merges": [["a b", "c"]]})).is_err());
        assert!(merges_of(&json!({"merges": [1]})).is_err());
    }
}
