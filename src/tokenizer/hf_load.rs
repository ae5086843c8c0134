//! Loading an HF tokenizer folder the way transformers 5's `AutoTokenizer.from_pretrained` does.
//!
//! tokenizer.json alone is not the whole story. transformers also:
//! - ignores `add_bos_token` / `add_eos_token` from tokenizer_config.json when tokenizer.json
//!   exists (tokenizer.json's post-processor decides whether BOS/EOS are added);
//! - for `tokenizer_class: LlamaTokenizer` with a SentencePiece-style (not byte-level)
//!   tokenizer.json, keeps only the vocabulary, merges and post-processor and rebuilds the rest:
//!   no normalizer, a Metaspace pre-tokenizer that prefixes "▁" to the first piece only
//!   (`legacy: false`, the default) or to every piece between special tokens (`legacy: true`);
//! - adds every token named in the config (`added_tokens_decoder`, `bos_token`, ...) that
//!   tokenizer.json lacks, in a fixed order, and marks named tokens special;
//! - reads the chat template from chat_template.jinja before tokenizer_config.json.

use super::{disable_truncation_and_padding, guard, SpecialToken, SpecialTokens, Tokenizer};
use crate::error::{Error, Result};
use serde_json::{json, Map, Value};
use std::path::Path;
use tokenizers::AddedToken;

/// Named special tokens, in the order transformers registers them.
const NAMED_SPECIALS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

pub(super) fn load_dir(dir: &Path) -> Result<Tokenizer> {
    let tokenizer_json = dir.join("tokenizer.json");
    if !tokenizer_json.is_file() {
        return Err(Error::load(
            &tokenizer_json,
            "not found; the model folder needs tokenizer.json (the `tokenizers` file), tokenizer.model alone is not supported",
        ));
    }
    let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    load_files(
        &tokenizer_json,
        optional("tokenizer_config.json").as_deref(),
        optional("special_tokens_map.json").as_deref(),
        optional("chat_template.jinja").as_deref(),
    )
}

pub(super) fn load_files(
    tokenizer_json: &Path,
    config_path: Option<&Path>,
    special_tokens_map_path: Option<&Path>,
    chat_template_path: Option<&Path>,
) -> Result<Tokenizer> {
    let mut config = match config_path {
        Some(path) => read_json_object(path)?,
        None => Map::new(),
    };
    // The legacy special_tokens_map.json counts only when the config has no added_tokens_decoder,
    // and then its entries win over the config's.
    if let Some(path) =
        special_tokens_map_path.filter(|_| !config.contains_key("added_tokens_decoder"))
    {
        for (key, mut value) in read_json_object(path)? {
            if let Value::Object(token) = &mut value {
                token.insert("special".into(), Value::Bool(true));
            }
            config.insert(key, value);
        }
    }
    let config_name = config_path.map_or_else(
        || tokenizer_json.display().to_string(),
        |p| p.display().to_string(),
    );

    let bytes = crate::weights::read_text_file(tokenizer_json)
        .map_err(|e| Error::load(tokenizer_json, format!("cannot read: {e}")))?
        .into_bytes();
    let class = config
        .get("tokenizer_class")
        .and_then(Value::as_str)
        .unwrap_or("");
    let llama_class = class.trim_end_matches("Fast") == "LlamaTokenizer";
    // transformers loads a byte-level file declared as LlamaTokenizer (Llama 3) as it stands.
    let rebuild_as_llama = llama_class && !contains(&bytes, b"\"ByteLevel\"");
    let mut inner = if rebuild_as_llama {
        let legacy = config
            .get("legacy")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let add_prefix_space = config
            .get("add_prefix_space")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let mut json: Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::load(tokenizer_json, format!("invalid JSON: {e}")))?;
        llama_pipeline(&mut json, legacy, add_prefix_space);
        guard("parsing tokenizer.json", || {
            serde_json::from_value(json).map_err(Into::into)
        })
    } else {
        guard("parsing tokenizer.json", || {
            tokenizers::Tokenizer::from_bytes(&bytes)
        })
    }
    .map_err(|e| Error::load(tokenizer_json, e.to_string()))?;
    disable_truncation_and_padding(&mut inner);
    if config.get("split_special_tokens").and_then(Value::as_bool) == Some(true) {
        inner.set_encode_special_tokens(true);
    }
    let is_bpe = matches!(inner.get_model(), tokenizers::models::ModelWrapper::BPE(_));
    if !is_bpe
        && config
            .get("clean_up_tokenization_spaces")
            .and_then(Value::as_bool)
            == Some(true)
    {
        tracing::warn!("{config_name}: clean_up_tokenization_spaces is not applied; decoded text keeps its spaces");
    }

    // The named special tokens: config values, else the LlamaTokenizer class defaults.
    let mut named: Vec<(String, AddedToken)> = Vec::new();
    for name in NAMED_SPECIALS {
        let token = match config.get(name) {
            Some(value) => config_token(value, true)
                .map_err(|e| Error::load(&config_name, format!("{name}: {e}")))?,
            None if llama_class => llama_default(name).map(|text| AddedToken::from(text, true)),
            None => None,
        };
        named.extend(token.map(|t| (name.to_string(), t)));
    }
    let mut extra: Vec<AddedToken> = Vec::new();
    for key in ["additional_special_tokens", "extra_special_tokens"] {
        match config.get(key) {
            Some(Value::Array(list)) => {
                for value in list {
                    let token = config_token(value, true)
                        .map_err(|e| Error::load(&config_name, format!("{key}: {e}")))?;
                    extra.extend(token.filter(|t| !extra.iter().any(|e| e.content == t.content)));
                }
            }
            // A map names model-specific tokens (`image_token: "<image>"`) that templates can use.
            Some(Value::Object(map)) => {
                for (name, value) in map {
                    let token = config_token(value, true)
                        .map_err(|e| Error::load(&config_name, format!("{key}.{name}: {e}")))?;
                    named.extend(token.map(|t| (name.clone(), t)));
                }
            }
            _ => {}
        }
    }

    register_config_tokens(&mut inner, &config, &config_name, &mut named, &extra)?;
    let specials = resolve_specials(&inner, &named);
    let (chat_template, template_problem) =
        find_chat_template(&config, &config_name, chat_template_path)?;
    let mut tokenizer = Tokenizer {
        inner: inner.into(),
        specials,
        chat_template,
        template_problem,
    };
    let with_special = tokenizer.encode("", true)?;
    tokenizer.specials.add_bos =
        tokenizer.bos_id().is_some() && with_special.first().copied() == tokenizer.bos_id();
    tokenizer.specials.add_eos = tokenizer
        .specials
        .eos
        .as_ref()
        .is_some_and(|eos| with_special.last() == Some(&eos.id));
    Ok(tokenizer)
}

/// Adds the config's tokens the way TokenizersBackend.__init__ and _post_init do: first every
/// `added_tokens_decoder` entry (by id order; the ids in the file are not used), then named and
/// extra special tokens the vocabulary lacks, then every named token again as special.
fn register_config_tokens(
    inner: &mut tokenizers::Tokenizer,
    config: &Map<String, Value>,
    config_name: &str,
    named: &mut [(String, AddedToken)],
    extra: &[AddedToken],
) -> Result<()> {
    let mut from_config: Vec<(u64, AddedToken)> = Vec::new();
    if let Some(Value::Object(decoder)) = config.get("added_tokens_decoder") {
        for (id, value) in decoder {
            let id: u64 = id.parse().map_err(|_| {
                Error::load(
                    config_name,
                    format!("added_tokens_decoder: key {id:?} is not a token id"),
                )
            })?;
            let token = config_token(value, false)
                .map_err(|e| Error::load(config_name, format!("added_tokens_decoder.{id}: {e}")))?
                .ok_or_else(|| {
                    Error::load(
                        config_name,
                        format!("added_tokens_decoder.{id}: null token"),
                    )
                })?;
            from_config.push((id, token));
        }
    }
    from_config.sort_by_key(|(id, _)| *id);
    // A named token that is also in added_tokens_decoder takes that entry's flags.
    for (_, token) in named.iter_mut() {
        if let Some((_, listed)) = from_config.iter().find(|(_, t)| t.content == token.content) {
            *token = listed.clone();
        }
    }
    let mut to_add: Vec<AddedToken> = from_config.into_iter().map(|(_, t)| t).collect();
    let existing: Vec<String> = inner
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    let mut extra = extra.to_vec();
    for token in named.iter_mut().map(|(_, t)| t).chain(extra.iter_mut()) {
        let known =
            existing.contains(&token.content) || to_add.iter().any(|t| t.content == token.content);
        if !known {
            token.special = true;
            to_add.push(token.clone());
        }
    }
    inner.add_tokens(&to_add);
    let all_named: Vec<AddedToken> = named.iter().map(|(_, t)| t.clone()).chain(extra).collect();
    inner.add_special_tokens(&all_named);
    Ok(())
}

fn resolve_specials(
    inner: &tokenizers::Tokenizer,
    named: &[(String, AddedToken)],
) -> SpecialTokens {
    let mut specials = SpecialTokens::default();
    for (name, token) in named {
        let Some(id) = inner.token_to_id(&token.content) else {
            tracing::warn!(
                "special token {name} = {:?} is not in the vocabulary",
                token.content
            );
            continue;
        };
        let special = SpecialToken {
            id,
            text: token.content.clone(),
        };
        match name.as_str() {
            "bos_token" => specials.bos = Some(special),
            "eos_token" => specials.eos = Some(special),
            "unk_token" => specials.unk = Some(special),
            "pad_token" => specials.pad = Some(special),
            _ => specials.other.push((name.clone(), special)),
        }
    }
    specials
}

/// chat_template.jinja wins; else tokenizer_config.json's `chat_template`, a string or a list of
/// `{name, template}` of which the one named "default" is used.
fn find_chat_template(
    config: &Map<String, Value>,
    config_name: &str,
    jinja_path: Option<&Path>,
) -> Result<(Option<String>, Option<String>)> {
    if let Some(path) = jinja_path {
        let text = crate::weights::read_text_file(path)
            .map_err(|e| Error::load(path, format!("cannot read: {e}")))?;
        return Ok((Some(text), None));
    }
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok((None, None)),
        Some(Value::String(text)) => Ok((Some(text.clone()), None)),
        Some(Value::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let name = entry.get("name").and_then(Value::as_str);
                let template = entry.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some("default"), Some(template)) => {
                        return Ok((Some(template.to_string()), None))
                    }
                    (Some(name), Some(_)) => names.push(name.to_string()),
                    _ => return Err(Error::load(
                        config_name,
                        "chat_template: list entries must be {\"name\": ..., \"template\": ...}",
                    )),
                }
            }
            let why =
                format!("{config_name} has chat templates {names:?} but none named \"default\"");
            Ok((None, Some(why)))
        }
        Some(_) => Err(Error::load(
            config_name,
            "chat_template must be a string or a list of named templates",
        )),
    }
}

/// A token given in a config as "text" or as {"content": "text", "lstrip": .., ...}. Missing
/// flags take transformers' AddedToken defaults (normalized = not special).
fn config_token(
    value: &Value,
    special_by_default: bool,
) -> std::result::Result<Option<AddedToken>, String> {
    match value {
        Value::Null => Ok(None),
        Value::String(text) => Ok(Some(AddedToken::from(text.as_str(), special_by_default))),
        Value::Object(fields) => {
            let content = fields
                .get("content")
                .and_then(Value::as_str)
                .ok_or("token object without a \"content\" string")?;
            let flag = |name: &str| fields.get(name).and_then(Value::as_bool);
            let special = flag("special").unwrap_or(special_by_default);
            Ok(Some(
                AddedToken::from(content, special)
                    .single_word(flag("single_word").unwrap_or(false))
                    .lstrip(flag("lstrip").unwrap_or(false))
                    .rstrip(flag("rstrip").unwrap_or(false))
                    .normalized(flag("normalized").unwrap_or(!special)),
            ))
        }
        other => Err(format!(
            "expected a string or a token object, found {other}"
        )),
    }
}

fn llama_default(name: &str) -> Option<&'static str> {
    match name {
        "bos_token" => Some("<s>"),
        "eos_token" => Some("</s>"),
        "unk_token" => Some("<unk>"),
        _ => None,
    }
}

/// The pipeline transformers' LlamaTokenizer builds around the file's vocabulary and merges.
fn llama_pipeline(json: &mut Value, legacy: bool, add_prefix_space: bool) {
    let prepend_scheme = match (add_prefix_space, legacy) {
        (false, _) => "never",
        (true, true) => "always",
        (true, false) => "first",
    };
    let is_bpe = json.pointer("/model/type").and_then(Value::as_str) == Some("BPE");
    if !is_bpe {
        tracing::warn!("tokenizer_class LlamaTokenizer with a non-BPE tokenizer.json: using the file as it stands");
        return;
    }
    json["normalizer"] = Value::Null;
    json["pre_tokenizer"] = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": prepend_scheme, "split": false});
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json["decoder"] = json!({"type": "Sequence", "decoders": decoders});
    if let Some(model) = json.get_mut("model").and_then(Value::as_object_mut) {
        model.insert("fuse_unk".into(), Value::Bool(true));
        model.insert("byte_fallback".into(), Value::Bool(true));
        model.insert("dropout".into(), Value::Null);
        model.insert("unk_token".into(), Value::Null);
    }
}

fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = crate::weights::read_text_file(path)
        .map_err(|e| Error::load(path, format!("cannot read: {e}")))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::load(path, "expected a JSON object")),
        Err(e) => Err(Error::load(path, format!("invalid JSON: {e}"))),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
