//! Function calling on `anyllama serve` (tiny-chat, cpu): `tool_choice` "required" and a named
//! function force calls whose arguments match the function's schema, streamed and not; "auto"
//! reads calls out of free text; a conversation with calls and tool results renders, through a
//! template that knows tools (tools and dict arguments reach it exactly) and one that does not
//! (the fallback system prompt); the tool fields' errors. The official client's side:
//! tests/serve_openai_client.py.

mod common;

use common::server::*;
use serde_json::{json, Value};

/// tiny-chat's context (256) is too short for the tool descriptions the fallback adds.
const CTX: &[&str] = &["--kv-dtype", "f32", "--ctx", "2048"];

fn weather_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"enum": ["celsius", "fahrenheit"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}})
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
         "description": "The weather of a city", "parameters": weather_schema()}},
        {"type": "function", "function": {"name": "get_time", "parameters":
         {"type": "object", "additionalProperties": false, "required": ["zone"],
          "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}
    ])
}

fn body(choice: Value, seed: u64) -> Value {
    json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
           "tools": tools(), "tool_choice": choice, "max_tokens": 150,
           "temperature": 0.9, "seed": seed})
}

/// Checks a call's arguments against its function's schema (the keys, types and bounds of the
/// two test functions) and returns them parsed.
fn check_arguments(name: &str, arguments: &str) -> Value {
    let v: Value = serde_json::from_str(arguments).unwrap_or_else(|e| panic!("{arguments:?}: {e}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{arguments}"));
    match name {
        "get_weather" => {
            let city = o["city"].as_str().unwrap_or_else(|| panic!("{arguments}"));
            assert!(city.chars().count() <= 12, "{arguments}");
            assert!(
                ["celsius", "fahrenheit"].contains(&o["unit"].as_str().unwrap()),
                "{arguments}"
            );
            if let Some(d) = o.get("days") {
                assert!((1..=7).contains(&d.as_i64().unwrap()), "{arguments}");
            }
            assert!(
                o.keys()
                    .all(|k| ["city", "unit", "days"].contains(&k.as_str())),
                "{arguments}"
            );
        }
        "get_time" => {
            assert_eq!(o.len(), 1, "{arguments}");
            assert!(
                ["UTC", "CET"].contains(&o["zone"].as_str().unwrap()),
                "{arguments}"
            );
        }
        other => panic!("a call of {other}, which is not a tool"),
    }
    v
}

/// (name, arguments) of each call of a reply, checked against the schemas.
fn calls_of(v: &Value) -> Vec<(String, String)> {
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(!calls.is_empty(), "{v}");
    calls
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "function", "{c}");
            let id = c["id"].as_str().unwrap();
            assert!(id.starts_with("call_") && id.len() > 10, "{c}");
            let name = c["function"]["name"].as_str().unwrap().to_string();
            let args = c["function"]["arguments"].as_str().unwrap().to_string();
            check_arguments(&name, &args);
            (name, args)
        })
        .collect()
}

/// A streamed reply's calls put together from their `delta.tool_calls` chunks (the content
/// deltas, too), checking OpenAI's order: index, id, type and name first, then arguments.
fn streamed_calls(events: &[String]) -> (String, Vec<(String, String)>, String) {
    assert_eq!(events.last().unwrap(), "[DONE]");
    let (mut content, mut calls, mut finish) = (String::new(), Vec::new(), String::new());
    let mut ids = Vec::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        let choice = &c["choices"][0];
        content += choice["delta"]["content"].as_str().unwrap_or("");
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let k = d["index"].as_u64().unwrap() as usize;
            if let Some(id) = d["id"].as_str() {
                assert_eq!(k, calls.len(), "{e}");
                assert_eq!(d["type"], "function", "{e}");
                ids.push(id.to_string());
                calls.push((
                    d["function"]["name"].as_str().unwrap().to_string(),
                    String::new(),
                ));
            }
            assert!(k < calls.len(), "arguments before the call's name: {e}");
            calls[k].1 += d["function"]["arguments"].as_str().unwrap_or("");
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), calls.len(), "call ids repeat");
    (content, calls, finish)
}

#[test]
fn forced_calls_follow_the_functions_schema() {
    let s = Server::start("cpu", CTX).unwrap();
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let mut names = Vec::new();
    for (choice, parallel, seed) in [
        (json!("required"), false, 1),
        (json!("required"), false, 2),
        (json!("required"), true, 3),
        (named.clone(), true, 4),
        (named.clone(), false, 5),
    ] {
        let mut b = body(choice.clone(), seed);
        b["parallel_tool_calls"] = json!(parallel);
        let (status, v) = s.post("/v1/chat/completions", &b);
        assert_eq!(status, 200, "{v}");
        let calls = calls_of(&v);
        assert!(v["choices"][0]["message"]["content"].is_null(), "{v}");
        if !parallel || choice == named {
            assert_eq!(calls.len(), 1, "{v}");
        }
        if choice == named {
            assert!(calls.iter().all(|(n, _)| n == "get_weather"), "{v}");
        }
        names.extend(calls.into_iter().map(|(n, _)| n));
        // Streamed: the same calls (the same seed samples the same tokens), in OpenAI's chunks.
        b["stream"] = json!(true);
        let (content, streamed, finish) = streamed_calls(&s.stream("/v1/chat/completions", &b));
        assert_eq!((content.as_str(), finish.as_str()), ("", "tool_calls"));
        assert_eq!(streamed, calls_of(&v), "{choice}");
    }
    eprintln!("functions called: {names:?}");
    s.wait_idle();
}

/// "auto" leaves the model free and reads its reply: here a response_format makes the reply a
/// bare call object, which comes back as a call; free text stays content, streamed the same.
#[test]
fn auto_reads_calls_out_of_the_reply() {
    let s = Server::start("cpu", CTX).unwrap();
    let call = json!({"type": "object", "additionalProperties": false,
        "required": ["name", "arguments"],
        "properties": {"name": {"const": "get_weather"}, "arguments": weather_schema()}});
    let mut b = body(json!("auto"), 7);
    b["response_format"] = json!({"type": "json_schema", "json_schema": {"schema": call}});
    let (status, v) = s.post("/v1/chat/completions", &b);
    assert_eq!(status, 200, "{v}");
    let calls = calls_of(&v);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "get_weather");
    b["stream"] = json!(true);
    let (content, streamed, finish) = streamed_calls(&s.stream("/v1/chat/completions", &b));
    assert_eq!((content.as_str(), finish.as_str()), ("", "tool_calls"));
    assert_eq!(streamed, calls);

    // Free text: no calls, the content whole, and the same when streamed.
    for seed in [1, 2, 3] {
        let mut b = body(json!("auto"), seed);
        b["max_tokens"] = json!(40);
        let (status, v) = s.post("/v1/chat/completions", &b);
        assert_eq!(status, 200, "{v}");
        let text = reply(&v);
        assert!(
            v["choices"][0]["message"].get("tool_calls").is_none(),
            "{v}"
        );
        b["stream"] = json!(true);
        let (content, calls, finish) = streamed_calls(&s.stream("/v1/chat/completions", &b));
        assert!(calls.is_empty());
        assert_eq!(content, text);
        assert_eq!(finish, v["choices"][0]["finish_reason"].as_str().unwrap());
    }
    s.wait_idle();
}

/// A conversation after a call: the assistant's tool_calls (content null) and the tool's
/// result, rendered and answered.
fn conversation(result: &str, city: &str) -> Value {
    json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function",
         "function": {"name": "get_weather",
                      "arguments": format!("{{\"city\": \"{city}\", \"unit\": \"celsius\"}}")}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": result}
    ])
}

fn prompt_tokens(s: &Server, body: &Value) -> u64 {
    let (status, v) = s.post("/v1/chat/completions", body);
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    v["usage"]["prompt_tokens"].as_u64().unwrap()
}

/// tiny-chat's template knows no tools: the tools go into the system prompt and the history's
/// calls and results are written out, so every part of them changes the prompt.
#[test]
fn tool_turns_render_through_a_template_without_tools() {
    let s = Server::start("cpu", CTX).unwrap();
    let ask = |msgs: Value, tools: Option<Value>| {
        let mut b = json!({"messages": msgs, "max_tokens": 8, "temperature": 0});
        if let Some(t) = tools {
            b["tools"] = t;
        }
        prompt_tokens(&s, &b)
    };
    let base = ask(conversation("18 C", "Paris"), Some(tools()));
    let msgs = conversation("18 C", "Paris");
    let first_two = json!([msgs[0], msgs[1]]);
    assert!(base > ask(first_two.clone(), Some(tools())));
    assert!(ask(first_two.clone(), Some(tools())) > ask(first_two.clone(), None));
    assert_ne!(
        base,
        ask(
            conversation("18 C and sunny, light wind", "Paris"),
            Some(tools())
        )
    );
    assert_ne!(
        base,
        ask(conversation("18 C", "Marseille-sur-Mer"), Some(tools()))
    );
    // tool_choice none: the tools are not shown.
    let mut none = json!({"messages": first_two.clone(), "max_tokens": 8, "temperature": 0,
                          "tools": tools(), "tool_choice": "none"});
    assert_eq!(prompt_tokens(&s, &none), ask(first_two.clone(), None));
    // Without tools the calls and results still render.
    none["messages"] = conversation("18 C", "Paris");
    assert!(prompt_tokens(&s, &none) > ask(first_two, None));
    s.wait_idle();
}

/// A template that renders `tools` and `tool_calls` itself (tiny-chat with such a template):
/// the definitions and the history's arguments, as a dict, reach it exactly.
#[test]
fn tool_turns_render_through_a_template_with_tools() {
    let dir = std::env::temp_dir().join(format!("anyllama-tools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = common::fixtures().join("hf/tiny-chat");
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let template = "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n\
        {% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n\
        {% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function.name }} \
        {{ c.function.arguments | tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}\
        {% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\
        {% endif %}";
    std::fs::write(dir.join("chat_template.jinja"), template).unwrap();
    let s = Server::start_model(&dir.display().to_string(), "cpu", CTX).unwrap();
    let tok = anyllama::tokenizer::Tokenizer::from_hf_dir(&dir).unwrap();
    let defs: Vec<String> = tools()
        .as_array()
        .unwrap()
        .iter()
        .map(python_json)
        .collect();
    let want = format!(
        "<|im_start|>system\n{}\n<|im_end|>\n<|im_start|>system\nBe brief.<|im_end|>\n\
         <|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n\
         <tool_call>get_weather {{\"city\": \"Paris\", \"unit\": \"celsius\"}}</tool_call>\
         <|im_end|>\n<|im_start|>tool\n18 C<|im_end|>\n<|im_start|>assistant\n",
        defs.join("\n")
    );
    let want = tok.encode(&want, false).unwrap().len() as u64;
    let b = json!({"messages": conversation("18 C", "Paris"), "tools": tools(),
                   "max_tokens": 8, "temperature": 0});
    assert_eq!(prompt_tokens(&s, &b), want);
    // A forced call through this template follows the schema as well.
    let mut b = body(json!("required"), 3);
    b["parallel_tool_calls"] = json!(false);
    let (status, v) = s.post("/v1/chat/completions", &b);
    assert_eq!(status, 200, "{v}");
    assert_eq!(calls_of(&v).len(), 1);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `json.dumps` of a tool definition as the template's `tojson` prints it.
fn python_json(v: &Value) -> String {
    anyllama::chat_template::python_json(v)
}

#[test]
fn tool_fields_are_checked() {
    let s = Server::start("cpu", CTX).unwrap();
    let user = json!([{"role": "user", "content": "Hi"}]);
    for (extra, status, param) in [
        (json!({"tool_choice": "required"}), 422, Some("tool_choice")),
        (json!({"tool_choice": "auto"}), 422, Some("tool_choice")),
        (
            json!({"tools": tools(), "tool_choice": {"type": "function",
                   "function": {"name": "get_stock_price"}}}),
            422,
            Some("tool_choice"),
        ),
        (
            json!({"tools": tools(), "tool_choice": "always"}),
            422,
            Some("tool_choice"),
        ),
        (json!({"tools": tools(), "tool_choice": 3}), 400, None),
        (json!({"tools": "get_weather"}), 400, None),
        (json!({"tools": [{"type": "function"}]}), 400, None),
        (
            json!({"tools": [{"type": "function", "function": {"description": "x"}}]}),
            400,
            None,
        ),
        (
            json!({"tools": tools(), "parallel_tool_calls": "yes"}),
            400,
            None,
        ),
        (
            json!({"tools": [{"type": "code_interpreter", "function": {"name": "a"}}]}),
            422,
            Some("tools"),
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
            422,
            Some("tools"),
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a"}},
                             {"type": "function", "function": {"name": "a"}}]}),
            422,
            Some("tools"),
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a", "parameters": 1}}]}),
            422,
            Some("tools"),
        ),
        // A schema the grammar compiler refuses, when the call is forced.
        (
            json!({"tools": [{"type": "function", "function": {"name": "a",
                   "parameters": {"type": "no-such-type"}}}], "tool_choice": "required"}),
            422,
            Some("tools"),
        ),
        (
            json!({"messages": [{"role": "user", "content": "Hi", "tool_calls": []}]}),
            422,
            Some("messages"),
        ),
        (
            json!({"messages": [{"role": "assistant", "content": null,
                   "tool_calls": [{"id": "x", "type": "function"}]}]}),
            400,
            None,
        ),
    ] {
        let mut b = json!({"messages": user, "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (got, v) = s.post("/v1/chat/completions", &b);
        assert_eq!(
            (got, v["error"]["param"].as_str()),
            (status, param),
            "{extra}: {v}"
        );
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    s.wait_idle();
}
