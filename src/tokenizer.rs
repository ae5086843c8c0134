//! Text <-> token ids, the way transformers' `AutoTokenizer` does it, plus the model's chat
//! template and a streaming decoder.
//!
//! The heavy lifting is the `tokenizers` crate (the same Rust code transformers calls). What this
//! file adds is what transformers does around it: which special tokens exist and what they are
//! called (tokenizer_config.json, GGUF metadata), whether BOS/EOS are added, the chat template,
//! and turning panics inside `tokenizers` into errors. Loading an HF folder lives in `hf_load`,
//! streaming decode in `stream`.

mod hf_load;
mod stream;

pub use crate::chat_template::Message;
pub use stream::StreamDecoder;

use crate::chat_template::render_chat_template;
use crate::error::{Error, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use tokenizers::AddedToken;

/// A special token: its id and its text, e.g. `(1, "<s>")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}

/// The named special tokens of a model and whether encoding adds BOS/EOS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    pub unk: Option<SpecialToken>,
    pub pad: Option<SpecialToken>,
    /// Other named special tokens (`sep_token`, `cls_token`, `mask_token`, model-specific ones
    /// such as `image_token`), keyed by the variable name chat templates see them under.
    pub other: Vec<(String, SpecialToken)>,
    /// `encode(text, true)` starts with BOS / ends with EOS.
    pub add_bos: bool,
    pub add_eos: bool,
}

impl SpecialTokens {
    /// Template variables: `bos_token`, `eos_token`, `unk_token`, `pad_token`, then the others.
    fn template_variables(&self) -> Vec<(String, String)> {
        let named = [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("unk_token", &self.unk),
            ("pad_token", &self.pad),
        ];
        let mut vars: Vec<(String, String)> = named
            .iter()
            .filter_map(|(name, token)| token.as_ref().map(|t| (name.to_string(), t.text.clone())))
            .collect();
        vars.extend(
            self.other
                .iter()
                .map(|(name, token)| (name.clone(), token.text.clone())),
        );
        vars
    }

    fn all(&self) -> impl Iterator<Item = &SpecialToken> {
        [&self.bos, &self.eos, &self.unk, &self.pad]
            .into_iter()
            .flatten()
            .chain(self.other.iter().map(|(_, t)| t))
    }
}

/// A model's tokenizer. Cloning is cheap (the vocabulary is shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    specials: SpecialTokens,
    chat_template: Option<String>,
    /// Why there is no usable template, when the model ships something we cannot use.
    template_problem: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("specials", &self.specials)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Loads tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja
    /// from an HF model folder, with transformers 5's rules for combining them.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer> {
        Error::contain_panics(
            |m| {
                Error::Tokenizer(format!(
                    "{}: the tokenizer library panicked: {m}",
                    dir.display()
                ))
            },
            || hf_load::load_dir(dir),
        )
    }

    /// Like [`Tokenizer::from_hf_dir`] for files that do not sit in one folder under their usual names.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
        chat_template_jinja: Option<&Path>,
    ) -> Result<Tokenizer> {
        Error::contain_panics(
            |m| {
                Error::Tokenizer(format!(
                    "{}: the tokenizer library panicked: {m}",
                    tokenizer_json.display()
                ))
            },
            || hf_load::load_files(tokenizer_json, tokenizer_config, None, chat_template_jinja),
        )
    }

    /// Wraps a tokenizer built elsewhere (from GGUF metadata). As transformers does for GGUF, the
    /// post-processor is rebuilt from `specials.add_bos` / `add_eos`, and every named special token
    /// is registered as a special added token (split out of text, skipped by `decode(.., true)`).
    pub fn from_parts(
        mut inner: tokenizers::Tokenizer,
        mut specials: SpecialTokens,
        chat_template: Option<String>,
    ) -> Tokenizer {
        disable_truncation_and_padding(&mut inner);
        // Without the token there is nothing to add (transformers clears the flag the same way).
        specials.add_bos &= specials.bos.is_some();
        specials.add_eos &= specials.eos.is_some();
        for token in specials.all() {
            register_special(&mut inner, &token.text);
            if inner.token_to_id(&token.text) != Some(token.id) {
                tracing::warn!(
                    "special token {:?} has id {} in the metadata but {:?} in the vocabulary",
                    token.text,
                    token.id,
                    inner.token_to_id(&token.text)
                );
            }
        }
        let bos = specials.bos.as_ref().filter(|_| specials.add_bos);
        let eos = specials.eos.as_ref().filter(|_| specials.add_eos);
        match bos_eos_post_processor(bos, eos) {
            Ok(post_processor) => {
                inner.with_post_processor(Some(post_processor));
            }
            Err(e) => tracing::warn!(
                "cannot build the BOS/EOS post-processor, encoding adds neither: {e}"
            ),
        }
        Tokenizer {
            inner: Arc::new(inner),
            specials,
            chat_template,
            template_problem: None,
        }
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn specials(&self) -> &SpecialTokens {
        &self.specials
    }

    /// The chat template source, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text`, identical to transformers' `tokenizer(text, add_special_tokens=...)`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = guard("encoding text", || {
            self.inner.encode(text, add_special_tokens)
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, identical to transformers' `decode(ids, skip_special_tokens=...)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        guard("decoding ids", || {
            self.inner.decode(ids, skip_special_tokens)
        })
    }

    /// Number of ids the tokenizer can produce, added tokens included (`len(tokenizer)`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.specials.bos.as_ref().map(|t| t.id)
    }

    /// End-of-sequence ids known to the tokenizer. generation_config.json may name more.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.specials.eos.iter().map(|t| t.id).collect()
    }

    /// A decoder that turns ids into text one token at a time.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder::new(self.clone(), skip_special_tokens)
    }

    /// The prompt text for `messages`, identical to transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(template) = &self.chat_template else {
            let why = self.template_problem.as_deref().unwrap_or(
                "the model has no chat template (no chat_template.jinja, no chat_template in \
                 tokenizer_config.json or GGUF metadata); use plain text generation instead",
            );
            return Err(Error::Template(why.to_string()));
        };
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            &self.specials.template_variables(),
        )
    }

    /// The prompt ids for `messages`, identical to transformers'
    /// `apply_chat_template(messages, tokenize=True, ...)`: the rendered text is encoded without
    /// adding special tokens, because templates write BOS themselves (adding it again would
    /// start the prompt with two).
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(messages, add_generation_prompt)?;
        self.encode(&text, false)
    }
}

/// Runs a `tokenizers` call, turning both its errors and its panics (possible on crafted input)
/// into `Error::Tokenizer`.
fn guard<T>(what: &str, f: impl FnOnce() -> tokenizers::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Error::Tokenizer(format!("{what}: {e}"))),
        Err(panic) => {
            let msg = Error::panic_message(panic.as_ref());
            Err(Error::Tokenizer(format!(
                "{what}: the tokenizer library panicked: {msg}"
            )))
        }
    }
}

/// transformers never truncates or pads unless asked per call, whatever tokenizer.json says.
fn disable_truncation_and_padding(inner: &mut tokenizers::Tokenizer) {
    // Removing truncation cannot fail; the Result only reports invalid new parameters.
    let _ = inner.with_truncation(None);
    inner.with_padding(None);
}

/// Makes `text` a special added token, keeping the flags it already has as an added token, else
/// with the flags transformers gives named special tokens (matched as is, not normalized).
fn register_special(inner: &mut tokenizers::Tokenizer, text: &str) {
    let existing = inner
        .get_added_tokens_decoder()
        .into_values()
        .find(|t| t.content == text);
    let token = existing.unwrap_or_else(|| AddedToken::from(text, true).normalized(false));
    inner.add_special_tokens(&[token.special(true)]);
}

/// transformers' `update_post_processor`: `[bos] $A [eos]`, and for pairs that followed by
/// `[bos] $B [eos]` with type id 1.
fn bos_eos_post_processor(
    bos: Option<&SpecialToken>,
    eos: Option<&SpecialToken>,
) -> serde_json::Result<tokenizers::processors::PostProcessorWrapper> {
    use serde_json::json;
    let template = |sequence: &str, type_id: u32| {
        let mut pieces = Vec::new();
        pieces.extend(bos.map(|t| json!({"SpecialToken": {"id": t.text, "type_id": type_id}})));
        pieces.push(json!({"Sequence": {"id": sequence, "type_id": type_id}}));
        pieces.extend(eos.map(|t| json!({"SpecialToken": {"id": t.text, "type_id": type_id}})));
        pieces
    };
    let mut tokens = serde_json::Map::new();
    for t in [bos, eos].into_iter().flatten() {
        tokens.insert(
            t.text.clone(),
            json!({"id": t.text, "ids": [t.id], "tokens": [t.text]}),
        );
    }
    let pair = [template("A", 0), template("B", 1)].concat();
    serde_json::from_value(json!({
        "type": "TemplateProcessing",
        "single": template("A", 0),
        "pair": pair,
        "special_tokens": tokens,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_inside_the_library_become_errors() {
        let result: Result<()> = guard("encoding text", || panic!("index out of bounds"));
        let err = result.unwrap_err();
        assert!(
            matches!(&err, Error::Tokenizer(m) if m.contains("panicked: index out of bounds")),
            "{err}"
        );
    }
}
