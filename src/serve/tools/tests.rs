use super::*;
use crate::serve::grammar::{Grammars, ResponseFormat};

fn function(name: &str, parameters: Value) -> Function {
    Function {
        name: name.into(),
        description: None,
        parameters,
    }
}

fn weather() -> Vec<Function> {
    vec![
        function(
            "get_weather",
            json!({"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}),
        ),
        function("get_time", json!({"type": "object", "properties": {}})),
    ]
}

fn call(name: &str, arguments: &str) -> Call {
    Call {
        name: name.into(),
        arguments: arguments.into(),
    }
}

fn tools_of(choice: Choice, parallel: bool) -> Tools {
    Tools {
        functions: weather(),
        choice,
        parallel,
    }
}

#[test]
fn hermes_calls_are_read_out_of_the_text() {
    let f = weather();
    let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    assert_eq!(
        parse_calls(one, &f),
        Parsed {
            content: None,
            calls: vec![call("get_weather", r#"{"city":"Paris"}"#)]
        }
    );
    let two = "Let me look.\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>\n\
               <tool_call>\n{\"name\": \"get_weather\", \"arguments\": \"{\\\"city\\\": \\\"Oslo\\\"}\"}\n</tool_call>";
    assert_eq!(
        parse_calls(two, &f),
        Parsed {
            content: Some("Let me look.\n\n".into()),
            calls: vec![
                call("get_time", "{}"),
                call("get_weather", r#"{"city":"Oslo"}"#)
            ]
        }
    );
    // A reply that ended inside its last tag still made that call when the JSON is whole.
    let unclosed = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n";
    assert_eq!(
        parse_calls(unclosed, &f).calls,
        vec![call("get_time", "{}")]
    );
}

#[test]
fn bare_json_replies_are_calls_when_they_are_nothing_else() {
    let f = weather();
    // Llama 3.1's shape: "parameters".
    let llama = r#" {"name": "get_weather", "parameters": {"city": "Rome"}} "#;
    assert_eq!(
        parse_calls(llama, &f),
        Parsed {
            content: None,
            calls: vec![call("get_weather", r#"{"city":"Rome"}"#)]
        }
    );
    let mistral = r#"[TOOL_CALLS] [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Bern"}}]"#;
    assert_eq!(
        parse_calls(mistral, &f).calls,
        vec![
            call("get_time", "{}"),
            call("get_weather", r#"{"city":"Bern"}"#)
        ]
    );
    // JSON that is an answer, not a call, stays the content.
    for answer in [
        r#"{"name": "Bob", "age": 3}"#,
        r#"[{"name": "get_time"}, 3]"#,
        r#"{"city": "Paris"}"#,
    ] {
        assert_eq!(
            parse_calls(answer, &f),
            Parsed {
                content: Some(answer.into()),
                calls: vec![]
            },
            "{answer}"
        );
    }
}

#[test]
fn malformed_calls_stay_in_the_content_as_written() {
    let f = weather();
    for text in [
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>",
        "Sure: <tool_call>{\"name\": \"no_such_function\", \"arguments\": {}}</tool_call> done",
        "<tool_call>{\"name\": \"get_weather\", \"arguments\": [1]}</tool_call>",
        "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"ci",
        "<tool_call>not json at all",
        "plain text, no calls",
        "",
    ] {
        assert_eq!(
            parse_calls(text, &f),
            Parsed {
                content: Some(text.into()),
                calls: vec![]
            },
            "{text:?}"
        );
    }
    // A bad tag next to a good one: the good one is a call, the bad one content.
    let mixed = "<tool_call>{oops}</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
    assert_eq!(
        parse_calls(mixed, &f),
        Parsed {
            content: Some("<tool_call>{oops}</tool_call>\n".into()),
            calls: vec![call("get_time", "{}")]
        }
    );
}

#[test]
fn without_parallel_calls_only_the_first_counts() {
    let text = "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>\n\
                <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}</tool_call>";
    assert_eq!(tools_of(Choice::Auto, true).parse(text).calls.len(), 2);
    assert_eq!(
        tools_of(Choice::Auto, false).parse(text).calls,
        vec![call("get_time", "{}")]
    );
}

/// What a stream sends as it goes is always the start of the content found at the end, and
/// never shrinks: a stream's content equals the whole reply's.
#[test]
fn settled_text_is_always_the_start_of_the_final_content() {
    let f = weather();
    let replies = [
        "Hello there, friend.  ",
        "  \n Let me check.\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>\nDone.",
        "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>",
        "{\"name\": \"get_time\", \"arguments\": {}}",
        "{\"not\": \"a call\"}",
        "a <tool_c and more <tool_call>{bad}</tool_call> tail",
        "x <tool",
        "é ü <tool_call>{\"name\": \"get_time\"}",
    ];
    for text in replies {
        let content = parse_calls(text, &f).content.unwrap_or_default();
        let mut shown = 0;
        for end in (0..=text.len()).filter(|&e| text.is_char_boundary(e)) {
            let s = settled(&text[..end]);
            assert!(
                content.starts_with(s),
                "{text:?} at {end}: {s:?} vs {content:?}"
            );
            assert!(s.len() >= shown, "{text:?} at {end}: shrank to {s:?}");
            shown = s.len();
        }
    }
    assert_eq!(settled("Hi <tool"), "Hi");
    assert_eq!(settled("Hi <toolbox"), "Hi <toolbox");
    assert_eq!(settled("  {\"name\""), "");
    assert_eq!(settled("Sure.\n<tool_call>{"), "Sure.");
}

fn request(tools: Value, choice: Option<Value>) -> std::result::Result<Option<Tools>, String> {
    let tools: Option<Vec<ToolArg>> = serde_json::from_value(tools).map_err(|e| e.to_string())?;
    let choice: Option<ToolChoiceArg> = match choice {
        Some(c) => Some(serde_json::from_value(c).map_err(|e| e.to_string())?),
        None => None,
    };
    Tools::from_request(tools, choice, None).map_err(|e| e.param_and_message())
}

#[test]
fn tool_fields_are_checked() {
    let t = json!([{"type": "function", "function": {"name": "get_time"}},
                   {"type": "function", "function": {"name": "get_weather",
                    "parameters": {"type": "object"}}}]);
    let ok = request(t.clone(), None).unwrap().unwrap();
    assert_eq!(ok.choice, Choice::Auto);
    assert!(ok.parallel && ok.offered());
    // No parameters: a function of none.
    assert_eq!(
        ok.functions[0].parameters,
        json!({"type": "object", "properties": {}})
    );
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    assert_eq!(
        request(t.clone(), Some(named)).unwrap().unwrap().choice,
        Choice::Named(1)
    );
    assert!(!request(t.clone(), Some(json!("none")))
        .unwrap()
        .unwrap()
        .offered());
    assert!(request(json!(null), None).unwrap().is_none());
    assert!(request(json!([]), None).unwrap().is_none());
    for (tools, choice, want) in [
        (t.clone(), Some(json!("sometimes")), "tool_choice"),
        (
            t.clone(),
            Some(json!({"type": "function", "function": {"name": "nope"}})),
            "tool_choice",
        ),
        (
            t.clone(),
            Some(json!({"type": "other", "function": {"name": "get_time"}})),
            "tool_choice",
        ),
        (json!(null), Some(json!("required")), "tool_choice"),
        (json!([]), Some(json!("auto")), "tool_choice"),
        (
            json!([{"type": "retrieval", "function": {"name": "a"}}]),
            None,
            "tools",
        ),
        (
            json!([{"type": "function", "function": {"name": "has space"}}]),
            None,
            "tools",
        ),
        (
            json!([{"type": "function", "function": {"name": "a"}},
                   {"type": "function", "function": {"name": "a"}}]),
            None,
            "tools",
        ),
        (
            json!([{"type": "function", "function": {"name": "a", "parameters": [1]}}]),
            None,
            "tools",
        ),
    ] {
        let err = request(tools.clone(), choice.clone()).err();
        assert!(
            err.as_deref().is_some_and(|e| e.starts_with(want)),
            "{tools} {choice:?}: {err:?}"
        );
    }
}

/// The grammar of a forced call accepts the calls it should and refuses the rest, token by
/// token, on the tiny-chat tokenizer.
#[test]
fn forced_call_grammars_accept_only_valid_calls() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/tiny-chat");
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    let eos = tok.eos_ids()[0];
    let grammars = Grammars::new(tok.clone(), eos);
    let accepts = |tools: &Tools, text: &str| {
        let g = tools.grammar().expect("forced");
        let mut c = grammars.constraint(&ResponseFormat::Lark(g)).unwrap();
        let ids = tok.encode(text, false).unwrap();
        let mut done = false;
        for id in ids {
            match c.advance(id) {
                Ok(d) => done = d,
                Err(_) => return false,
            }
        }
        done || c.advance(eos).is_ok()
    };
    let paris = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let time = "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
    let required = tools_of(Choice::Required, true);
    assert!(accepts(&required, paris));
    assert!(accepts(&required, time));
    assert!(accepts(&required, &format!("{paris}\n{time}")));
    for bad in [
        // Arguments first, a missing required key, an unknown function, free whitespace.
        "<tool_call>\n{\"arguments\": {}, \"name\": \"get_time\"}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"get_date\", \"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{ \"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
        "Sure! <tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
    ] {
        assert!(!accepts(&required, bad), "{bad}");
    }
    let one = tools_of(Choice::Required, false);
    assert!(accepts(&one, paris));
    assert!(!accepts(&one, &format!("{paris}\n{time}")));
    let named = tools_of(Choice::Named(0), true);
    assert!(accepts(&named, paris));
    assert!(!accepts(&named, time));
    assert!(tools_of(Choice::Auto, true).grammar().is_none());
    assert!(tools_of(Choice::None, true).grammar().is_none());
}

#[test]
fn call_schemas_keep_the_parameters_definitions_reachable() {
    let f = function(
        "f",
        json!({"type": "object", "properties": {"p": {"$ref": "#/$defs/point"}},
               "$defs": {"point": {"type": "integer"}}}),
    );
    let s = call_schema(&f);
    assert_eq!(s["$defs"]["point"], json!({"type": "integer"}));
    assert!(s["properties"]["arguments"].get("$defs").is_none());
    assert_eq!(s["properties"]["name"], json!({"const": "f"}));
}

#[test]
fn history_calls_take_their_arguments_as_dicts() {
    let c: HistoryCall = serde_json::from_value(json!({"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}))
    .unwrap();
    assert_eq!(
        history_call(c),
        json!({"type": "function", "id": "call_1",
               "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})
    );
    let c: HistoryCall = serde_json::from_value(
        json!({"function": {"name": "get_weather", "arguments": "not json"}}),
    )
    .unwrap();
    assert_eq!(history_call(c)["function"]["arguments"], json!("not json"));
}

#[test]
fn templates_without_tools_get_them_in_the_system_prompt() {
    let t = tools_of(Choice::Auto, true);
    let mut assistant = Message::new("assistant", "");
    assistant.tool_calls = Some(vec![json!({"type": "function", "id": "call_1",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})]);
    let mut result = Message::new("tool", "18 C");
    result.tool_call_id = Some("call_1".into());
    let messages = vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Weather in Paris and Oslo?"),
        assistant,
        result,
        Message::new("tool", "12 C"),
    ];
    let out = polyfill(&messages, Some(&t));
    let roles: Vec<&str> = out.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert!(out[0].content.starts_with("Be brief.\n\n# Tools\n"));
    assert!(out[0].content.contains(
        "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \
         \"parameters\": {\"type\": \"object\""
    ));
    assert_eq!(
        out[2].content,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
    );
    assert!(out[2].tool_calls.is_none());
    assert_eq!(
        out[3].content,
        "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n12 C\n</tool_response>"
    );
    // What the system prompt teaches is what the parser reads.
    assert_eq!(
        parse_calls(&out[2].content, &t.functions).calls,
        vec![call("get_weather", r#"{"city":"Paris"}"#)]
    );
    // No system turn: one is added; no tools offered: none is.
    let out = polyfill(&messages[1..2], Some(&t));
    assert_eq!(out[0].role, "system");
    assert_eq!(polyfill(&messages[1..2], None), messages[1..2].to_vec());
}

#[test]
fn call_ids_are_unique() {
    let ids: std::collections::HashSet<String> = (0..100).map(|_| call_id()).collect();
    assert_eq!(ids.len(), 100);
    assert!(ids.iter().all(|i| i.len() == 29 && i.starts_with("call_")));
}
