//! One JSONL line -> its format, its tokens and which tokens carry loss. Errors are the
//! `why` of `FILE:LINE: why` (the caller adds the place).

use super::LossOn;
use crate::tokenizer::{Message, Tokenizer};
use serde_json::{Map, Value};

/// The formats a line can have (see the module doc of `train::data`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Chat,
    PromptCompletion,
    Alpaca,
}

/// A tokenized line: its format, its tokens, and per token whether it carries loss.
pub(super) type Tokenized = (Format, Vec<u32>, Vec<bool>);

/// Roles a chat message may have.
const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// A line's content before tokenization.
enum Parsed {
    Text(String),
    Chat(Vec<Message>),
    /// A prompt (no loss) followed by its answer (loss).
    Split {
        format: Format,
        prompt: String,
        answer: String,
    },
}

/// Tokenizes every line (None for a blank one), on several threads since templates and
/// tokenizers are slow per call; results stay in line order.
pub(super) fn tokenize_lines(
    lines: &[&[u8]],
    tokenizer: &Tokenizer,
    loss_on: LossOn,
) -> Vec<Option<Result<Tokenized, String>>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let chunk = lines.len().div_ceil(threads).max(64);
    std::thread::scope(|scope| {
        let workers: Vec<_> = lines
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|line| tokenize_line(line, tokenizer, loss_on))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(results) => results,
                // Tokenizer and template panics are already contained; this is a bug of ours.
                Err(p) => vec![Some(Err(format!(
                    "internal error while tokenizing: {}",
                    crate::error::Error::panic_message(p.as_ref())
                )))],
            })
            .collect()
    })
}

fn tokenize_line(
    line: &[u8],
    tokenizer: &Tokenizer,
    loss_on: LossOn,
) -> Option<Result<Tokenized, String>> {
    if line.iter().all(|b| b.is_ascii_whitespace()) {
        return None;
    }
    Some(match std::str::from_utf8(line) {
        Ok(text) => parse(text.trim_start_matches('\u{feff}'))
            .and_then(|parsed| tokenize(parsed, tokenizer, loss_on)),
        Err(e) => Err(format!(
            "not UTF-8 text (bad byte at column {})",
            e.valid_up_to() + 1
        )),
    })
}

fn parse(line: &str) -> Result<Parsed, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| json_error(&e))?;
    let Value::Object(obj) = value else {
        return Err(format!("not a JSON object (found {})", kind(&value)));
    };
    if let Some(messages) = obj.get("messages") {
        return Ok(Parsed::Chat(parse_messages(messages)?));
    }
    if obj.contains_key("prompt") && obj.contains_key("completion") {
        return Ok(Parsed::Split {
            format: Format::PromptCompletion,
            prompt: string(&obj, "prompt")?.to_string(),
            answer: string(&obj, "completion")?.to_string(),
        });
    }
    if obj.contains_key("instruction") && obj.contains_key("output") {
        let input = match obj.get("input") {
            None | Some(Value::Null) => "",
            Some(_) => string(&obj, "input")?,
        };
        return Ok(Parsed::Split {
            format: Format::Alpaca,
            prompt: alpaca_prompt(string(&obj, "instruction")?, input),
            answer: string(&obj, "output")?.to_string(),
        });
    }
    if obj.contains_key("text") {
        return Ok(Parsed::Text(string(&obj, "text")?.to_string()));
    }
    Err(no_format(&obj))
}

/// The Stanford Alpaca prompt (the one Alpaca-format datasets were written for).
pub(super) fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

fn parse_messages(value: &Value) -> Result<Vec<Message>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "\"messages\" is not an array (found {})",
            kind(value)
        ));
    };
    if items.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(m) = item else {
            return Err(format!(
                "messages[{i}] is not an object (found {})",
                kind(item)
            ));
        };
        let field = |key: &str| match m.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!(
                "messages[{i}].{key} is not a string (found {})",
                kind(other)
            )),
            None => Err(format!("messages[{i}] has no \"{key}\"")),
        };
        let role = field("role")?;
        if !ROLES.contains(&role.as_str()) {
            return Err(format!(
                "messages[{i}] has the unknown role {role:?} (known: system, user, assistant, tool)"
            ));
        }
        messages.push(Message::new(role, field("content")?));
    }
    Ok(messages)
}

fn string<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("\"{key}\" is not a string (found {})", kind(other))),
        None => Err(format!("no \"{key}\"")),
    }
}

/// Why an object matches no format: half of a pair, or keys we do not know.
fn no_format(obj: &Map<String, Value>) -> String {
    let pairs = [
        ("prompt", "completion"),
        ("completion", "prompt"),
        ("instruction", "output"),
        ("output", "instruction"),
    ];
    if let Some((has, lacks)) = pairs.iter().find(|(has, _)| obj.contains_key(*has)) {
        return format!("has \"{has}\" but no \"{lacks}\"");
    }
    // In the order the line has them.
    let keys: Vec<String> = obj.keys().take(8).map(|k| format!("{k:?}")).collect();
    let found = if keys.is_empty() {
        "an empty object".to_string()
    } else {
        format!("keys {}", keys.join(", "))
    };
    format!(
        "no known format: expected \"messages\", \"prompt\" + \"completion\", \"instruction\" + \
         \"output\" or \"text\" (found {found})"
    )
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde_json's message without its "at line 1" (the caller names the file's line).
fn json_error(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let what = full
        .rfind(" at line ")
        .map_or(full.as_str(), |at| &full[..at]);
    format!("not valid JSON: {what} at column {}", e.column())
}

fn tokenize(parsed: Parsed, tok: &Tokenizer, loss_on: LossOn) -> Result<Tokenized, String> {
    let all = loss_on == LossOn::All;
    match parsed {
        Parsed::Text(text) => {
            let tokens = framed(tok, &text, true)?;
            let mask = vec![true; tokens.len()];
            Ok((Format::Text, tokens, mask))
        }
        Parsed::Split {
            format,
            prompt,
            answer,
        } => {
            let tokens = framed(tok, &(prompt.clone() + &answer), true)?;
            let start = if all {
                0
            } else {
                common_prefix(&framed(tok, &prompt, false)?, &tokens)
            };
            let mask = (0..tokens.len()).map(|i| i >= start).collect();
            Ok((format, tokens, mask))
        }
        Parsed::Chat(messages) => {
            let (tokens, mask) = chat(tok, &messages, all)?;
            Ok((Format::Chat, tokens, mask))
        }
    }
}

/// BOS (if the tokenizer adds one) + `text` + EOS (if `eos` and the tokenizer has one). Encoded
/// without special tokens and framed by hand, so a tokenizer that adds EOS itself cannot end
/// a prompt with one.
fn framed(tok: &Tokenizer, text: &str, eos: bool) -> Result<Vec<u32>, String> {
    let mut tokens: Vec<u32> = tok
        .bos_id()
        .filter(|_| tok.specials().add_bos)
        .into_iter()
        .collect();
    tokens.extend(tok.encode(text, false).map_err(|e| e.to_string())?);
    if eos {
        tokens.extend(tok.eos_ids().first());
    }
    Ok(tokens)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A conversation's tokens and loss mask: each assistant turn's tokens are the ones rendering
/// it adds to the conversation before it with the generation prompt (module doc).
fn chat(tok: &Tokenizer, messages: &[Message], all: bool) -> Result<(Vec<u32>, Vec<bool>), String> {
    let render = |upto: usize, gen: bool| {
        tok.apply_chat_template(&messages[..upto], gen)
            .map_err(|e| e.to_string())
    };
    let encode = |text: &str| tok.encode(text, false).map_err(|e| e.to_string());
    let full_text = render(messages.len(), false)?;
    let tokens = encode(&full_text)?;
    let mut mask = vec![all; tokens.len()];
    if all {
        return Ok((tokens, mask));
    }
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        if i == 0 {
            return Err(
                "messages[0] is an assistant turn: there is no prompt before it to \
                        find where it starts"
                    .into(),
            );
        }
        let before = render(i, true)?;
        let upto = if i + 1 == messages.len() {
            full_text.clone()
        } else {
            render(i + 1, false)?
        };
        if !full_text.starts_with(&upto) || !full_text.starts_with(&before) {
            return Err(format!(
                "the chat template is not prefix-stable: the conversation up to messages[{i}] \
                 does not render as the start of the whole conversation, so its assistant turns \
                 cannot be located (loss on all tokens does not need them)"
            ));
        }
        if before.len() > upto.len() {
            return Err(format!(
                "the chat template's generation prompt is not how it starts the assistant turn \
                 messages[{i}], so the turn cannot be located"
            ));
        }
        // Common prefixes, not lengths: a token merged across a boundary goes to the side
        // that differs (the answer at the start, the next turn at the end).
        let start = common_prefix(&encode(&before)?, &tokens);
        let end = common_prefix(&encode(&upto)?, &tokens);
        for flag in mask.iter_mut().take(end).skip(start) {
            *flag = true;
        }
    }
    Ok((tokens, mask))
}
