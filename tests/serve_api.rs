//! The OpenAI API's features on `anyllama serve` (cpu, and wgpu where the backend matters):
//! the official openai Python client, logprobs, n choices, prefix caching, response_format.

mod common;

use common::server::*;
use serde_json::{json, Value};
use std::process::Command;

/// The official `openai` Python client (its package on PYTHONPATH; ANYLLAMA_OPENAI_PY names a
/// folder to add, which .ci/run fills with `pip install --target`) drives the server through
/// tests/serve_openai_client.py.
#[test]
fn the_openai_python_client_works_against_the_server() {
    let py_path = std::env::var("ANYLLAMA_OPENAI_PY").unwrap_or_default();
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .env("PYTHONPATH", &py_path)
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        return common::skip_or_fail("the openai Python package is not installed");
    }
    // A context long enough for the tool descriptions of the function-calling part.
    let s = Server::start("cpu", &["--api-key", "sk-test-key", "--ctx", "2048"]).unwrap();
    let script = common::root().join("tests/serve_openai_client.py");
    let o = Command::new("python3")
        .arg(&script)
        .args([&s.url, "sk-test-key"])
        .env("PYTHONPATH", &py_path)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success() && out.contains("OK"), "{out}\n{err}");
}

#[test]
fn logprobs_come_in_openais_shapes() {
    let s = Server::start("cpu", &["--kv-dtype", "f32"]).unwrap();
    let mut body = chat_body("What is the capital of France?", 10);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        "{v}"
    );
    let mut joined = String::new();
    for e in &content {
        let lp = e["logprob"].as_f64().unwrap();
        let top: Vec<f64> = e["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect();
        assert_eq!(top.len(), 3, "{e}");
        assert!(top.windows(2).all(|w| w[0] >= w[1]) && top[0] <= 0.0, "{e}");
        assert!(
            top.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-5,
            "{e}"
        );
        // Greedy: the picked token is the most likely one.
        assert_eq!(lp, top[0], "{e}");
        assert_eq!(e["token"], e["top_logprobs"][0]["token"], "{e}");
        let token = e["token"].as_str().unwrap();
        assert_eq!(e["bytes"], json!(token.as_bytes()));
        joined += token;
    }
    assert_eq!(joined, reply(&v));
    // Streamed: the same entries, spread over the chunks.
    body["stream"] = json!(true);
    let events = s.stream("/v1/chat/completions", &body);
    let streamed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(streamed, content);
    // Completions: logprobs N, the legacy shape.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                      "logprobs": 2});
    let (status, v) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        tokens.concat(),
        v["choices"][0]["text"].as_str().unwrap(),
        "{v}"
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    for (i, t) in tokens.iter().enumerate().skip(1) {
        assert_eq!(
            offsets[i],
            offsets[i - 1] + tokens[i - 1].chars().count() as u64,
            "{t}"
        );
    }
    for (top, l) in lp["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(lp["token_logprobs"].as_array().unwrap())
    {
        let best = top
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            top.as_object().unwrap().len() <= 2 && best == l.as_f64().unwrap(),
            "{lp}"
        );
    }
    // Wrong combinations are 422s naming the field.
    for (path, extra, param) in [
        (
            "/v1/chat/completions",
            json!({"top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        ("/v1/chat/completions", json!({"logprobs": 3}), "logprobs"),
        ("/v1/completions", json!({"logprobs": true}), "logprobs"),
    ] {
        let mut body = if path.contains("chat") {
            chat_body("Hi", 4)
        } else {
            json!({"prompt": "Hi", "max_tokens": 4})
        };
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = s.post(path, &body);
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (422, Some(param)),
            "{v}"
        );
    }
}

#[test]
fn n_choices_are_the_seeded_requests_side_by_side() {
    let s = Server::start("cpu", &["--kv-dtype", "f32"]).unwrap();
    let mut body = chat_body("Tell me a story", 12);
    body["temperature"] = json!(0.9);
    body["seed"] = json!(5);
    body["n"] = json!(3);
    let (status, v) = s.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{v}");
    let mut completion = 0;
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        // Choice i is the request seeded with seed + i, alone.
        let mut one = body.clone();
        one["n"] = json!(1);
        one["seed"] = json!(5 + i);
        let (_, alone) = s.post("/v1/chat/completions", &one);
        assert_eq!(
            c["message"]["content"],
            alone["choices"][0]["message"]["content"]
        );
        completion += alone["usage"]["completion_tokens"].as_u64().unwrap();
    }
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        completion
    );
    // Streamed completions with n = 2: chunks of both indices, one [DONE], usage summed.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0.8,
                      "seed": 9, "n": 2, "stream_options": {"include_usage": true}});
    let (_, whole) = s.post("/v1/completions", &body);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = s.stream("/v1/completions", &streamed);
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    let mut texts = [String::new(), String::new()];
    let mut finished = 0;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        if let Some(choice) = c["choices"].as_array().and_then(|a| a.first()) {
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i] += choice["text"].as_str().unwrap();
            finished += choice["finish_reason"].is_string() as usize;
        } else {
            assert_eq!(c["usage"], whole["usage"], "{c}");
        }
    }
    assert_eq!(finished, 2);
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(t, whole["choices"][i]["text"].as_str().unwrap());
    }
    for n in [0, 17] {
        let mut bad = chat_body("Hi", 4);
        bad["n"] = json!(n);
        let (status, v) = s.post("/v1/chat/completions", &bad);
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (422, Some("n")),
            "{v}"
        );
    }
    s.wait_idle();
}

/// Requests that share a system prompt, and a chat's next turn, reuse the KV blocks of their
/// common prefix (counted by /metrics) and reply exactly as a server without the prefix cache
/// does, also when a cache of one context's blocks must evict cached blocks all the time.
fn prefix_cache_changes_nothing_but_the_work(backend: &str) {
    let shared = ["--kv-dtype", "f32", "--kv-blocks", "16", "--max-seqs", "1"];
    let Some(with) = Server::start(backend, &shared) else {
        return;
    };
    let without = Server::start(backend, &["--kv-dtype", "f32", "--no-prefix-cache"]).unwrap();
    let system = "You are a careful assistant. Answer in one short sentence, name your \
                  sources, never guess, and keep every number exact. "
        .repeat(2);
    let turn = |msgs: Value| {
        let body = json!({"messages": msgs, "max_tokens": 12, "temperature": 0.7, "seed": 3});
        let replies: Vec<String> = [&with, &without]
            .iter()
            .map(|s| {
                let (status, v) = s.post("/v1/chat/completions", &body);
                assert_eq!(status, 200, "{v}");
                reply(&v)
            })
            .collect();
        assert_eq!(replies[0], replies[1], "{backend}: {msgs}");
        replies[0].clone()
    };
    let sys = json!({"role": "system", "content": system});
    let a = turn(json!([sys, {"role": "user", "content": "What is the capital of France?"}]));
    turn(json!([sys, {"role": "user", "content": "How many legs has a spider?"}]));
    turn(
        json!([sys, {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": a},
                {"role": "user", "content": "And of Italy?"}]),
    );
    for i in 0..4 {
        turn(json!([{"role": "user", "content": format!("Unrelated question {i} about rivers")}]));
    }
    turn(json!([sys, {"role": "user", "content": "What is the capital of France?"}]));
    let hits = with.metric("anyllama_prefix_cache_hit_tokens_total");
    eprintln!("{backend}: {hits} prompt tokens from the prefix cache");
    assert!(
        hits >= 32.0,
        "{backend}: {hits} prompt tokens from the cache"
    );
    assert_eq!(
        without.metric("anyllama_prefix_cache_hit_tokens_total"),
        0.0
    );
    let h = with.wait_idle();
    assert_eq!(h["kv_blocks_free"], h["kv_blocks_total"]);
}

#[test]
fn cpu_prefix_cache_changes_nothing_but_the_work() {
    prefix_cache_changes_nothing_but_the_work("cpu");
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_prefix_cache_changes_nothing_but_the_work() {
    prefix_cache_changes_nothing_but_the_work("wgpu");
}

#[test]
fn response_format_constrains_the_reply_to_the_schema() {
    let s = Server::start("cpu", &[]).unwrap();
    let schema = json!({"type": "object", "additionalProperties": false,
        "required": ["ok", "color"],
        "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}}});
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}});
    for (seed, stream) in [(1, false), (2, false), (3, true), (4, true)] {
        let mut body = chat_body("Describe the sky", 60);
        body["temperature"] = json!(0.9);
        body["seed"] = json!(seed);
        body["response_format"] = format.clone();
        let text = if stream {
            body["stream"] = json!(true);
            streamed_chat(&s.stream("/v1/chat/completions", &body)).0
        } else {
            let (status, v) = s.post("/v1/chat/completions", &body);
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
            reply(&v)
        };
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 2, "{text}");
        assert!(obj["ok"].is_boolean(), "{text}");
        assert!(
            ["red", "green", "blue"].contains(&obj["color"].as_str().unwrap()),
            "{text}"
        );
    }
    // json_object on completions: whatever it writes is the start of a JSON object.
    let body = json!({"prompt": "Data:", "max_tokens": 40, "temperature": 0.7, "seed": 5,
                      "response_format": {"type": "json_object"}});
    let (status, v) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.trim_start().starts_with('{'), "{text:?}");
    if v["choices"][0]["finish_reason"] == "stop" {
        let o: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(o.is_object());
    }
    for bad in [
        json!({"type": "xml"}),
        json!({"type": "json_schema"}),
        json!({"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}),
    ] {
        let mut body = chat_body("Hi", 4);
        body["response_format"] = bad;
        let (status, v) = s.post("/v1/chat/completions", &body);
        assert_eq!(
            (status, v["error"]["param"].as_str()),
            (422, Some("response_format")),
            "{v}"
        );
    }
    s.wait_idle();
}
