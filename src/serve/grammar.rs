//! `response_format` and forced tool calls through constrained decoding (llguidance): before
//! each token of a constrained request the engine masks the logits of every token the grammar
//! does not allow next (JSON of the given schema, any JSON object, or a Lark grammar such as
//! tools.rs writes for `tool_choice`), then samples as usual and feeds the
//! token to the grammar; the reply ends when the grammar is complete and the model picks EOS or
//! the grammar allows nothing more. The token vocabulary llguidance works over is built once,
//! at the first constrained request, from the model's tokenizer.json (each token's bytes).

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use std::sync::{Arc, OnceLock};

/// What a request's reply must be.
#[derive(Clone, Debug, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON matching this schema.
    JsonSchema(Value),
    /// Text of this Lark grammar (llguidance's dialect, `%json` embeds allowed): the tool calls
    /// `tool_choice` forces.
    Lark(String),
}

impl ResponseFormat {
    /// The request field a format comes from, for the error that refuses it.
    pub fn param(&self) -> &'static str {
        match self {
            ResponseFormat::Lark(_) => "tools",
            _ => "response_format",
        }
    }
}

/// Makes grammar matchers for requests; the parser factory is built on first use.
pub struct Grammars {
    tokenizer: Tokenizer,
    eos: u32,
    factory: OnceLock<std::result::Result<ParserFactory, String>>,
}

/// A request's grammar state, owned by its running sequence.
pub struct Constraint(Matcher);

impl Grammars {
    pub fn new(tokenizer: Tokenizer, eos: u32) -> Self {
        Grammars {
            tokenizer,
            eos,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> std::result::Result<&ParserFactory, String> {
        let made = self.factory.get_or_init(|| {
            let json = self
                .tokenizer
                .inner()
                .to_string(false)
                .map_err(|e| e.to_string())?;
            let json: Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
            let words = llguidance::token_bytes_from_tokenizer_json(&json)
                .map_err(|e| format!("the tokenizer's tokens: {e}"))?;
            let info = TokRxInfo::new(words.len() as u32, self.eos);
            let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
            let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            f.quiet();
            Ok(f)
        });
        made.as_ref().map_err(|e| e.clone())
    }

    /// The constraint of `format`, or why it cannot be had (a bad schema, a tokenizer
    /// llguidance cannot read): the message for a 422.
    pub fn constraint(&self, format: &ResponseFormat) -> std::result::Result<Constraint, String> {
        let mut schema = match format {
            ResponseFormat::JsonObject => serde_json::json!({"type": "object"}),
            ResponseFormat::JsonSchema(s) => s.clone(),
            ResponseFormat::Lark(g) => return self.matcher(TopLevelGrammar::from_lark(g.clone())),
        };
        // JSON laid out as Python's json.dumps writes it, not with free whitespace (which lets
        // a model pad a reply with blanks until max_tokens); a schema may say otherwise in its
        // own "x-guidance" options.
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance").or_insert(serde_json::json!({
                "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ",
            }));
        } else {
            return Err("the schema must be a JSON object".into());
        }
        self.matcher(TopLevelGrammar::from_json_schema(schema))
    }

    fn matcher(&self, grammar: TopLevelGrammar) -> std::result::Result<Constraint, String> {
        let parser = self
            .factory()?
            .create_parser(grammar)
            .map_err(|e| e.to_string())?;
        Ok(Constraint(Matcher::new(Ok(parser))))
    }
}

impl Constraint {
    /// Sets the logits of every token the grammar does not allow next to -inf.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self.0.compute_mask().map_err(grammar_err)?;
        if allowed.num_set() == 0 {
            return Err(Error::Generation(
                "the response format allows no token here".into(),
            ));
        }
        for (t, l) in logits.iter_mut().enumerate() {
            if t >= allowed.len() || !allowed.is_allowed(t as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Feeds the sampled token; true when the grammar allows nothing more (the reply is done).
    pub fn advance(&mut self, token: u32) -> Result<bool> {
        self.0.consume_token(token).map_err(grammar_err)?;
        Ok(self.0.is_stopped())
    }
}

fn grammar_err(e: impl std::fmt::Display) -> Error {
    Error::Generation(format!("response format: {e}"))
}
