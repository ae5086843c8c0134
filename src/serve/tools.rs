//! OpenAI function calling on /v1/chat/completions: `tools`, `tool_choice` and
//! `parallel_tool_calls` checked into `Tools`; the prompt (the template's own `tools`, or a
//! system block in the Hermes format for templates that know no tools); the grammar that forces
//! a call for `required` and named choices; and the calls parsed back out of the reply.
//!
//! The one wire format is Hermes': `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
//! (Qwen, Hermes, and the generic fallback of llama.cpp and vLLM), since it is what the system
//! block teaches and what the grammar writes; a reply that is nothing but a call object (Llama
//! 3.x's `{"name", "parameters"}`) or a list of them (Mistral) is read as calls too.

use super::http::ApiError;
use crate::chat_template::{python_json, render_chat_template_with_tools, special_token_variables};
use crate::chat_template::{render_chat_template, Message};
use crate::error::Result;
use crate::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// A function definition as the request gives it: `{"type": "function", "function": {...}}`.
#[derive(Deserialize)]
pub struct ToolArg {
    #[serde(rename = "type")]
    kind: String,
    function: FunctionArg,
}

#[derive(Deserialize)]
struct FunctionArg {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
    /// Accepted for OpenAI's clients; a forced call follows the schema whatever it says.
    #[allow(dead_code)]
    strict: Option<bool>,
}

/// `"none" | "auto" | "required"` or `{"type": "function", "function": {"name": ...}}`.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "tool_choice: \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"
)]
pub enum ToolChoiceArg {
    Mode(String),
    Function {
        #[serde(rename = "type")]
        kind: String,
        function: NamedFunction,
    },
}

#[derive(Deserialize)]
pub struct NamedFunction {
    name: String,
}

/// A call in an assistant turn of the history (OpenAI's shape; the arguments a JSON string, or
/// already an object as transformers' examples write them).
#[derive(Deserialize)]
pub struct HistoryCall {
    id: Option<String>,
    function: CalledFunction,
}

#[derive(Deserialize)]
struct CalledFunction {
    name: String,
    arguments: Option<Value>,
}

pub struct Function {
    pub name: String,
    description: Option<String>,
    /// The arguments' JSON schema (an object schema).
    parameters: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// The model is not offered the tools and its reply is not read for calls.
    None,
    /// The model may call; the reply is read for calls afterwards.
    Auto,
    /// The grammar forces one call (several with parallel_tool_calls) of any function.
    Required,
    /// The grammar forces one call of `functions[i]`.
    Named(usize),
}

/// A request's validated tools.
pub struct Tools {
    pub functions: Vec<Function>,
    pub choice: Choice,
    /// More than one call per reply.
    pub parallel: bool,
}

/// A call read from a reply; `arguments` is the JSON text OpenAI sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub name: String,
    pub arguments: String,
}

/// A reply split into its calls and the text around them.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    /// The text outside the calls (None when calls leave only whitespace); the whole reply when
    /// there are no calls.
    pub content: Option<String>,
    pub calls: Vec<Call>,
}

fn valid_name(name: &str) -> bool {
    // OpenAI's rule, so that a request this server takes is one OpenAI takes too.
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Tools {
    /// Checks the request's tool fields: None when it offers no tools.
    pub fn from_request(
        tools: Option<Vec<ToolArg>>,
        choice: Option<ToolChoiceArg>,
        parallel: Option<bool>,
    ) -> std::result::Result<Option<Tools>, ApiError> {
        let tools = tools.unwrap_or_default();
        if tools.is_empty() {
            return match choice {
                None => Ok(None),
                Some(_) => Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice is only allowed when tools are given",
                )),
            };
        }
        let mut functions: Vec<Function> = Vec::with_capacity(tools.len());
        for t in tools {
            let f = t.function;
            if t.kind != "function" {
                return Err(ApiError::invalid(
                    "tools",
                    format!("tool type `{}` is not supported (function)", t.kind),
                ));
            }
            if !valid_name(&f.name) {
                return Err(ApiError::invalid(
                    "tools",
                    format!(
                        "function name {:?} must be 1 to 64 letters, digits, _ or -",
                        f.name
                    ),
                ));
            }
            if functions.iter().any(|g| g.name == f.name) {
                return Err(ApiError::invalid(
                    "tools",
                    format!("function `{}` is defined twice", f.name),
                ));
            }
            // OpenAI: leaving parameters out defines a function that takes none.
            let parameters = match f.parameters {
                None => json!({"type": "object", "properties": {}}),
                Some(p) if p.is_object() => p,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "tools",
                        format!(
                            "the parameters of `{}` must be a JSON schema object",
                            f.name
                        ),
                    ))
                }
            };
            functions.push(Function {
                name: f.name,
                description: f.description,
                parameters,
            });
        }
        let choice = match choice {
            None => Choice::Auto,
            Some(ToolChoiceArg::Mode(m)) => match m.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!(
                            "unknown tool_choice {other:?} (none, auto, required or a function)"
                        ),
                    ))
                }
            },
            Some(ToolChoiceArg::Function { kind, function }) => {
                if kind != "function" {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!("tool_choice type `{kind}` is not supported (function)"),
                    ));
                }
                match functions.iter().position(|f| f.name == function.name) {
                    Some(i) => Choice::Named(i),
                    None => {
                        return Err(ApiError::invalid(
                            "tool_choice",
                            format!(
                                "tool_choice names `{}`, which is not in tools",
                                function.name
                            ),
                        ))
                    }
                }
            }
        };
        Ok(Some(Tools {
            functions,
            choice,
            parallel: parallel.unwrap_or(true),
        }))
    }

    /// Whether the model sees the tools and its reply is read for calls.
    pub fn offered(&self) -> bool {
        self.choice != Choice::None
    }

    /// The template's `tools`: the definitions in OpenAI's shape, as transformers passes them.
    fn template_tools(&self) -> Value {
        let list = self.functions.iter().map(|f| {
            let mut function = json!({"name": f.name});
            if let Some(d) = &f.description {
                function["description"] = json!(d);
            }
            function["parameters"] = f.parameters.clone();
            json!({"type": "function", "function": function})
        });
        Value::Array(list.collect())
    }

    /// The Lark grammar a forced choice decodes under (None for none and auto): Hermes call
    /// tags around JSON whose name is a function's and whose arguments match its schema.
    pub fn grammar(&self) -> Option<String> {
        let (functions, repeat) = match self.choice {
            Choice::None | Choice::Auto => return None,
            Choice::Required => (&self.functions[..], self.parallel),
            Choice::Named(i) => (&self.functions[i..=i], false),
        };
        let mut g = String::from(if repeat {
            "start: call (\"\\n\" call)*\n"
        } else {
            "start: call\n"
        });
        let alternatives: Vec<String> = (0..functions.len()).map(|i| format!("f{i}")).collect();
        g += &format!(
            "call: \"{OPEN}\\n\" ({}) \"\\n{CLOSE}\"\n",
            alternatives.join(" | ")
        );
        for (i, f) in functions.iter().enumerate() {
            g += &format!("f{i}: %json {}\n", call_schema(f));
        }
        Some(g)
    }

    /// Reads `text` for calls of these functions; with parallel_tool_calls false only the first
    /// call counts.
    pub fn parse(&self, text: &str) -> Parsed {
        let mut p = parse_calls(text, &self.functions);
        if !self.parallel {
            p.calls.truncate(1);
        }
        p
    }
}

/// The JSON schema of one call of `f`: `{"name": const, "arguments": <its parameters>}`, name
/// first, laid out as `json.dumps` writes it (as response_format's JSON is).
fn call_schema(f: &Function) -> Value {
    let mut arguments = f.parameters.clone();
    let mut schema = json!({
        "type": "object",
        "properties": {"name": {"const": f.name}},
        "required": ["name", "arguments"],
        "additionalProperties": false,
        "x-guidance": {"whitespace_flexible": false, "item_separator": ", ",
                       "key_separator": ": "},
    });
    // `$ref`s point into the parameters' own `$defs` from their root ("#/$defs/x"); once the
    // parameters sit under "arguments" that root is the call's, so the definitions move there.
    if let Some(o) = arguments.as_object_mut() {
        for key in ["$defs", "definitions"] {
            if let Some(defs) = o.remove(key) {
                schema[key] = defs;
            }
        }
    }
    schema["properties"]["arguments"] = arguments;
    schema
}

/// The calls in `text` whose function is one of `functions`: Hermes tags anywhere, else the
/// whole reply as one call object or a list of them. A tag whose JSON is not such a call stays
/// in the content as it was written.
pub fn parse_calls(text: &str, functions: &[Function]) -> Parsed {
    let (mut content, mut calls) = (String::new(), Vec::new());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        // An unclosed tag (the reply ended inside it) is a call when its JSON is complete.
        let (body, end) = match after.find(CLOSE) {
            Some(e) => (&after[..e], start + OPEN.len() + e + CLOSE.len()),
            None => (after, rest.len()),
        };
        match serde_json::from_str(body)
            .ok()
            .and_then(|v| call_of(&v, functions))
        {
            Some(call) => {
                content += &rest[..start];
                calls.push(call);
            }
            None => content += &rest[..end],
        }
        rest = &rest[end..];
    }
    content += rest;
    if calls.is_empty() {
        calls = bare_calls(text, functions);
        if !calls.is_empty() {
            content.clear();
        }
    }
    let content = if calls.is_empty() || !content.trim().is_empty() {
        Some(content)
    } else {
        None
    };
    Parsed { content, calls }
}

/// The reply as nothing but JSON calls: `{"name", "arguments" | "parameters"}` or a list of
/// those (after Mistral's `[TOOL_CALLS]` marker, if there is one); every item must be a call.
fn bare_calls(text: &str, functions: &[Function]) -> Vec<Call> {
    let t = text.trim();
    let t = t.strip_prefix("[TOOL_CALLS]").unwrap_or(t);
    let items = match serde_json::from_str::<Value>(t) {
        Ok(Value::Array(items)) => items,
        Ok(v @ Value::Object(_)) => vec![v],
        _ => return Vec::new(),
    };
    let calls: Option<Vec<Call>> = items.iter().map(|v| call_of(v, functions)).collect();
    calls.unwrap_or_default()
}

/// `{"name": <a function's>, "arguments": {...}}` (or Llama's "parameters"; the arguments may
/// also be a string holding the JSON object) as a call.
fn call_of(v: &Value, functions: &[Function]) -> Option<Call> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?;
    if !functions.iter().any(|f| f.name == name) {
        return None;
    }
    let arguments = match o.get("arguments").or(o.get("parameters")) {
        None => json!({}),
        Some(Value::String(s)) => serde_json::from_str(s).ok()?,
        Some(a) => a.clone(),
    };
    if !arguments.is_object() {
        return None;
    }
    Some(Call {
        name: name.to_string(),
        arguments: arguments.to_string(),
    })
}

/// What of a reply still being generated can go out as content now: a prefix of `text` that
/// no later call can take back. Nothing when the reply opens like a bare JSON call; else up to
/// the first call tag (or a tail that may become one), less trailing whitespace, which a call
/// may yet follow. The content `parse` finds at the end always starts with it.
pub fn settled(text: &str) -> &str {
    let lead = text.len() - text.trim_start().len();
    let rest = &text[lead..];
    if rest.is_empty() || rest.starts_with(['{', '[']) {
        return "";
    }
    let cut = rest.find(OPEN).unwrap_or_else(|| {
        // OPEN is ASCII, so a tail matching its start begins on a character boundary.
        let partial = (1..OPEN.len())
            .rev()
            .find(|&k| rest.ends_with(&OPEN[..k]))
            .unwrap_or(0);
        rest.len() - partial
    });
    text[..lead + cut].trim_end()
}

/// A unique id for a call: `call_` and 24 random letters and digits, as OpenAI's look.
pub fn call_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

/// The template shape of a history call: arguments as a dict (what templates such as Llama
/// 3.1's and Qwen's `tojson`), kept a string when it is not JSON.
pub fn history_call(c: HistoryCall) -> Value {
    let arguments = match c.function.arguments {
        None => json!({}),
        Some(Value::String(s)) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        Some(a) => a,
    };
    let mut v = json!({"type": "function",
                       "function": {"name": c.function.name, "arguments": arguments}});
    if let Some(id) = c.id {
        v["id"] = json!(id);
    }
    v
}

/// Whether the template renders tools and calls itself. One that names neither `tools` nor
/// `tool_calls` would drop them, so the conversation is rewritten for it (`polyfill`).
fn template_knows_tools(template: &str) -> bool {
    template.contains("tools") && template.contains("tool_calls")
}

/// The prompt text for `messages` with `tools` offered (when they are): through the template's
/// own `tools` where it has them, else with the tools described in the system prompt and the
/// history's calls and results written out in the same Hermes format.
pub fn render_prompt(
    tokenizer: &Tokenizer,
    messages: &[Message],
    tools: Option<&Tools>,
) -> Result<String> {
    let tools = tools.filter(|t| t.offered());
    let has_tool_turns = messages
        .iter()
        .any(|m| m.role == "tool" || m.tool_calls.is_some());
    let Some(template) = tokenizer.chat_template() else {
        // The tokenizer's own error says why there is no template.
        return tokenizer.apply_chat_template(messages, true);
    };
    if tools.is_none() && !has_tool_turns {
        return tokenizer.apply_chat_template(messages, true);
    }
    let specials = special_token_variables(tokenizer.specials());
    if template_knows_tools(template) {
        let tools = tools.map(Tools::template_tools);
        return render_chat_template_with_tools(
            template,
            messages,
            tools.as_ref(),
            true,
            &specials,
        );
    }
    let messages = polyfill(messages, tools);
    render_chat_template(template, &messages, true, &specials)
}

/// The conversation for a template without tools: the tools described in the system prompt,
/// each assistant call written out as the model is told to write it, and tool results as a
/// user turn of `<tool_response>` blocks (consecutive results in one turn, for templates that
/// insist on alternating roles).
fn polyfill(messages: &[Message], tools: Option<&Tools>) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
    let mut last_was_tool = false;
    for m in messages {
        if m.role == "tool" {
            let block = format!("<tool_response>\n{}\n</tool_response>", m.content);
            match out.last_mut() {
                Some(prev) if last_was_tool => {
                    prev.content += "\n";
                    prev.content += &block;
                }
                _ => out.push(Message::new("user", block)),
            }
            last_was_tool = true;
            continue;
        }
        last_was_tool = false;
        let mut m = m.clone();
        if let Some(calls) = m.tool_calls.take() {
            let written: Vec<String> = calls.iter().map(written_call).collect();
            if !m.content.is_empty() {
                m.content += "\n";
            }
            m.content += &written.join("\n");
        }
        out.push(m);
    }
    if let Some(t) = tools {
        let block = system_block(t);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{block}", first.content);
            }
            _ => out.insert(0, Message::new("system", block)),
        }
    }
    out
}

/// A history call as the model writes one: `<tool_call>\n{"name": ..., "arguments": ...}\n
/// </tool_call>`.
fn written_call(call: &Value) -> String {
    let f = &call["function"];
    let body = json!({"name": f["name"], "arguments": f["arguments"]});
    format!("{OPEN}\n{}\n{CLOSE}", python_json(&body))
}

/// The tools and the call format for the system prompt (Qwen2.5's wording, which models tuned
/// on the Hermes format know).
fn system_block(t: &Tools) -> String {
    let defs: Vec<String> = match t.template_tools() {
        Value::Array(list) => list.iter().map(python_json).collect(),
        _ => Vec::new(),
    };
    let how_many = if t.parallel {
        "You may call one or more functions to assist with the user query."
    } else {
        "You may call one function to assist with the user query."
    };
    format!(
        "# Tools\n\n{how_many}\n\nYou are provided with function signatures within \
         <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\nFor each function call, return a \
         json object with function name and arguments within {OPEN}{CLOSE} XML tags:\n\
         {OPEN}\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n{CLOSE}",
        defs.join("\n")
    )
}

#[cfg(test)]
mod tests;
