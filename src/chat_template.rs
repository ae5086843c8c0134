//! Chat templates: renders a model's Jinja chat template exactly as transformers'
//! `apply_chat_template` does, with minijinja in place of Jinja2.
//!
//! transformers renders with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, its
//! own `tojson` (Python's `json.dumps`, no ASCII escaping) and the globals `raise_exception` and
//! `strftime_now`. The template sees `messages`, `add_generation_prompt`, `tools` (the
//! request's function definitions, or `None`), `documents` (`None`) and every named special
//! token (`bos_token`, `eos_token`, ...).
//! Templates also call Python string and dict methods (`.strip()`, `.items()`, ...), which
//! minijinja-contrib's pycompat layer provides, and Jinja2 prints `None`/`True` and lists the
//! Python way, which the formatter below reproduces.

mod python;

pub use python::strftime_utc;

use crate::error::{Error, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// One chat turn. Serialized as `{"role": ..., "content": ...}` in that order, which is the order
/// `tojson` prints it in, as with a Python dict; the tool fields follow only when a turn has
/// them, so a plain turn is exactly the dict transformers' callers pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's function calls in the shape transformers documents for templates:
    /// `{"id", "type": "function", "function": {"name", "arguments"}}`, the arguments a dict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` turn: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` turn: the function that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// The template variables naming special tokens (`bos_token`, `eos_token`, `unk_token`,
/// `pad_token`, then the model's others), as `Tokenizer::apply_chat_template` passes them.
pub fn special_token_variables(
    specials: &crate::tokenizer::SpecialTokens,
) -> Vec<(String, String)> {
    let named = [
        ("bos_token", &specials.bos),
        ("eos_token", &specials.eos),
        ("unk_token", &specials.unk),
        ("pad_token", &specials.pad),
    ];
    let named = named
        .into_iter()
        .filter_map(|(name, token)| token.as_ref().map(|t| (name.to_string(), t.text.clone())));
    let other = specials
        .other
        .iter()
        .map(|(name, token)| (name.clone(), token.text.clone()));
    named.chain(other).collect()
}

/// `json.dumps(value)` as a template's `tojson` prints it (`", "` and `": "`, floats as Python
/// writes them, no ASCII escaping), for text that has to look like what templates render.
pub fn python_json(value: &serde_json::Value) -> String {
    let options = python::JsonOptions::new(None);
    // A serde_json value has no undefined or non-string keys, the only things json_dumps
    // refuses; the fallback is never taken.
    python::json_dumps(&Value::from_serialize(value), &options)
        .unwrap_or_else(|_| value.to_string())
}

/// Instructions one render may execute.
const TEMPLATE_FUEL: u64 = 5_000_000;
/// Wall-clock time one render may take; real templates take well under a millisecond.
const TEMPLATE_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(3);
/// The renderer's stack: deep enough for minijinja's nesting limits in any build.
const TEMPLATE_STACK: usize = 16 << 20;

/// Marks an error raised by the template itself through `raise_exception(message)`, so that the
/// message reaches the user unchanged instead of wrapped in minijinja's error text.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

/// Renders `template` for `messages`. `special_tokens` are the template variables naming special
/// tokens, e.g. `("bos_token", "<s>")`.
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    special_tokens: &[(String, String)],
) -> Result<String> {
    render_chat_template_with_tools(
        template,
        messages,
        None,
        add_generation_prompt,
        special_tokens,
    )
}

/// `render_chat_template` with `tools` (a list of `{"type": "function", "function": {...}}`,
/// as `apply_chat_template(messages, tools=...)` takes them) in the template's `tools`.
pub fn render_chat_template_with_tools(
    template: &str,
    messages: &[Message],
    tools: Option<&serde_json::Value>,
    add_generation_prompt: bool,
    special_tokens: &[(String, String)],
) -> Result<String> {
    if messages.is_empty() {
        return Err(Error::Template(
            "cannot apply a chat template to an empty conversation".into(),
        ));
    }
    // Fuel bounds the template's own instructions, but some built-in operations loop inside
    // one instruction (`() * 10**18` iterates 10**18 empty repetitions), so the render runs on
    // its own thread and a render past the time limit is an error instead of a hang. A render
    // that never ends is left to finish (or not) on its detached thread.
    let (template, messages, tools, specials) = (
        template.to_string(),
        messages.to_vec(),
        tools.cloned(),
        special_tokens.to_vec(),
    );
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("chat-template".into())
        .stack_size(TEMPLATE_STACK)
        .spawn(move || {
            let result = Error::contain_panics(
                |m| Error::Template(format!("rendering panicked: {m}")),
                || {
                    render(
                        &template,
                        &messages,
                        tools.as_ref(),
                        add_generation_prompt,
                        &specials,
                    )
                },
            );
            let _ = send.send(result);
        })
        .map_err(|e| Error::Template(format!("cannot start the renderer: {e}")))?;
    match receive.recv_timeout(TEMPLATE_TIME_LIMIT) {
        Ok(result) => result,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Error::Template(format!(
            "rendering did not finish within {} s; the template does not end",
            TEMPLATE_TIME_LIMIT.as_secs()
        ))),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Error::Template(
            "the renderer stopped without a result".into(),
        )),
    }
}

fn render(
    template: &str,
    messages: &[Message],
    tools: Option<&serde_json::Value>,
    add_generation_prompt: bool,
    special_tokens: &[(String, String)],
) -> Result<String> {
    let source = neutralize_generation_tags(template);
    let env = hf_environment();
    let compiled = env.template_from_str(&source).map_err(template_error)?;

    // Special tokens first so that the fixed variables win a name clash, as in transformers.
    let mut context: Vec<(String, Value)> = special_tokens
        .iter()
        .map(|(name, text)| (name.clone(), Value::from(text.as_str())))
        .collect();
    context.push(("messages".into(), Value::from_serialize(messages)));
    context.push((
        "add_generation_prompt".into(),
        Value::from(add_generation_prompt),
    ));
    let tools = tools.map_or(Value::from(()), Value::from_serialize);
    context.push(("tools".into(), tools));
    context.push(("documents".into(), Value::from(())));
    let context: Value = context.into_iter().collect();
    compiled.render(context).map_err(template_error)
}

/// The Jinja environment transformers builds in `_compile_jinja_template`.
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    // A template comes with the model file; bounding the instructions it may run turns a
    // crafted endless loop (nested ranges, recursion) into an error instead of a hang. Real
    // templates render a long conversation in well under a hundredth of this.
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, minijinja::Error> {
            Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, message.clone())
                    .with_source(RaisedByTemplate(message)),
            )
        },
    );
    env.add_function("strftime_now", |format: String| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        strftime_utc(&format, now)
    });
    env.add_filter("tojson", tojson);
    env.set_formatter(|out, state, value| {
        // Jinja2 prints Python objects with str(): None, True/False, ['a', 'b'], {'k': 1}.
        let python_text = match value.kind() {
            ValueKind::None => Some("None".to_string()),
            ValueKind::Bool => Some((if value.is_true() { "True" } else { "False" }).to_string()),
            // pycompat's str.split() returns a lazy sequence where Python has a list.
            ValueKind::Seq | ValueKind::Map | ValueKind::Iterable => {
                Some(python::python_repr(value)?)
            }
            _ => None,
        };
        match python_text {
            Some(text) => out
                .write_str(&text)
                .map_err(|_| minijinja::Error::from(ErrorKind::WriteFailure)),
            None => minijinja::escape_formatter(out, state, value),
        }
    });
    env
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<String, minijinja::Error> {
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::String => {
            Some(v.as_str().unwrap_or_default().to_string())
        }
        // json.dumps repeats a space `indent` times; a negative indent means no spaces.
        Some(v) => Some(" ".repeat(usize::try_from(i64::try_from(v)?).unwrap_or(0))),
    };
    let mut options = python::JsonOptions::new(indent);
    if let Some(ensure_ascii) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        options.ensure_ascii = ensure_ascii;
    }
    if let Some(sort_keys) = kwargs.get::<Option<bool>>("sort_keys")? {
        options.sort_keys = sort_keys;
    }
    if let Some(separators) = kwargs.get::<Option<Vec<String>>>("separators")? {
        let [item, key] = <[String; 2]>::try_from(separators).map_err(|_| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be (item_separator, key_separator)",
            )
        })?;
        options.item_separator = item;
        options.key_separator = key;
    }
    kwargs.assert_all_used()?;
    python::json_dumps(&value, &options)
}

fn template_error(err: minijinja::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(current) = source {
        if let Some(raised) = current.downcast_ref::<RaisedByTemplate>() {
            return Error::Template(raised.0.clone());
        }
        source = current.source();
    }
    Error::Template(err.to_string())
}

/// transformers registers a `{% generation %}...{% endgeneration %}` block that marks assistant
/// text for training masks and otherwise renders its body unchanged. minijinja has no such tag,
/// so it becomes `{% if true %}...{% endif %}`, keeping the whitespace-control markers.
fn neutralize_generation_tags(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` comes after the opening `{%` (in `{%}` they share the `%`).
        match tag[2..].find("%}").map(|e| e + 2) {
            Some(end) => {
                let inner = &tag[2..end];
                let marker_open = inner.starts_with(['-', '+']);
                let body = if marker_open { &inner[1..] } else { inner };
                let marker_close = body.ends_with(['-', '+']);
                let word = if marker_close {
                    &body[..body.len() - 1]
                } else {
                    body
                }
                .trim();
                let replacement = match word {
                    "generation" => Some("if true"),
                    "endgeneration" => Some("endif"),
                    _ => None,
                };
                match replacement {
                    Some(new_word) => {
                        out.push_str("{%");
                        if marker_open {
                            out.push_str(&inner[..1]);
                        }
                        out.push(' ');
                        out.push_str(new_word);
                        out.push(' ');
                        if marker_close {
                            out.push_str(&body[body.len() - 1..]);
                        }
                        out.push_str("%}");
                    }
                    None => out.push_str(&tag[..end + 2]),
                }
                rest = &tag[end + 2..];
            }
            None => {
                out.push_str(tag);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_blocks_render_their_body() {
        let template = "{% for m in messages %}{%- generation -%} [{{ m.content }}] {%- endgeneration %}{% endfor %}";
        let rendered =
            render_chat_template(template, &[Message::new("assistant", "hi")], false, &[]).unwrap();
        assert_eq!(rendered, "[hi]");
    }

    #[test]
    fn raise_exception_message_is_kept() {
        let err = render_chat_template(
            "{{ raise_exception('no ' ~ messages[0].role) }}",
            &[Message::new("x", "")],
            false,
            &[],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "chat template: no x");
    }

    #[test]
    fn empty_conversation_is_an_error() {
        assert!(matches!(
            render_chat_template("x", &[], false, &[]),
            Err(Error::Template(_))
        ));
    }

    #[test]
    fn tag_markers_sharing_a_percent_sign_are_not_a_tag() {
        // Found by fuzzing: `{%}` once made the tag scanner slice backwards.
        assert_eq!(neutralize_generation_tags("a{%}b"), "a{%}b");
        // As in Jinja's lexer, the first tag runs to the next `%}`, swallowing the second `{%`.
        assert_eq!(
            neutralize_generation_tags("{%}{% generation %}x{% endgeneration %}"),
            "{%}{% generation %}x{% endif %}"
        );
        let err = render_chat_template("{%}", &[Message::new("user", "hi")], false, &[]);
        assert!(matches!(err, Err(Error::Template(m)) if !m.contains("panicked")));
    }

    #[test]
    fn lazy_repetitions_print_without_iterating() {
        let render = |t: &str| render_chat_template(t, &[Message::new("user", "")], false, &[]);
        let t0 = std::time::Instant::now();
        assert_eq!(render("{{ () * 1000000000000000000 }}").unwrap(), "[]");
        assert_eq!(
            render("{{ ([] * 1000000000000000000) | tojson }}").unwrap(),
            "[]"
        );
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
        assert!(render("{{ [1] * 1000000000000 }}").is_err());
    }

    #[test]
    fn tools_and_calls_reach_the_template_as_transformers_passes_them() {
        let template = "{% for t in tools %}[{{ t.function.name }}: {{ t.function.parameters | tojson }}]{% endfor %}\
            {% for m in messages %}<{{ m | tojson }}>{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}{% endif %}{% endfor %}";
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(vec![serde_json::json!({"type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})]);
        let messages = [Message::new("user", "hi"), call];
        let rendered =
            render_chat_template_with_tools(template, &messages, Some(&tools), false, &[]).unwrap();
        assert_eq!(
            rendered,
            "[get_weather: {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}]\
             <{\"role\": \"user\", \"content\": \"hi\"}>\
             <{\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"type\": \"function\", \
             \"function\": {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}}]}>Paris"
        );
        // Without tools the template sees None, as before.
        let none = render_chat_template("{{ tools }}", &messages[..1], false, &[]).unwrap();
        assert_eq!(none, "None");
    }

    #[test]
    fn python_json_is_what_tojson_prints() {
        let v = serde_json::json!({"b": [1, 2.5, "é"], "a": null});
        assert_eq!(python_json(&v), "{\"b\": [1, 2.5, \"é\"], \"a\": null}");
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        let err =
            render_chat_template("{% if %}", &[Message::new("user", "")], false, &[]).unwrap_err();
        assert!(matches!(err, Error::Template(_)), "{err}");
    }
}
