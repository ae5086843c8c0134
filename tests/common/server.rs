//! `anyllama serve` as the HTTP tests drive it: a server on a free port of 127.0.0.1 with the
//! tiny-chat fixture, killed when dropped, and helpers for its OpenAI-shaped replies.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> std::ffi::OsString {
    // ANYLLAMA_BIN: the binary when the tests run away from the build tree (the GPU machine).
    std::env::var_os("ANYLLAMA_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_anyllama").into())
}

pub fn tiny_chat() -> String {
    super::fixtures().join("hf/tiny-chat").display().to_string()
}

/// A running server, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    /// Starts `anyllama serve` on a free port; None (after skip_or_fail) when a wgpu adapter is
    /// missing.
    pub fn start(backend: &str, extra: &[&str]) -> Option<Server> {
        Server::start_model(&tiny_chat(), backend, extra)
    }

    /// `start` with another model than tiny-chat.
    pub fn start_model(model: &str, backend: &str, extra: &[&str]) -> Option<Server> {
        let mut child = Command::new(bin())
            .args(["serve", "-m", model, "--backend", backend, "--port", "0"])
            .args(extra)
            // CUDA's half-precision GEMMs round activations, so a row's logits would depend on
            // how many rows its batch had (the mat-vec kernel or cuBLAS); f32 GEMMs keep the
            // batch-invariance checks meaningful there.
            .env("ANYLLAMA_CUDA_EXACT", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start anyllama serve");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = String::new();
        while let Some(Ok(line)) = lines.next() {
            if let Some(url) = line.strip_prefix("listening on ") {
                // Keep draining stderr so that the server never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                return Some(Server {
                    child,
                    url: url.to_string(),
                });
            }
            seen += &line;
            seen.push('\n');
        }
        let _ = child.wait();
        if backend == "wgpu" && seen.contains("adapter") {
            super::skip_or_fail(&format!("wgpu: {seen}"));
            return None;
        }
        panic!("the server did not start:\n{seen}");
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = client()
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap())
    }

    pub fn get(&self, path: &str) -> Value {
        let r = client().get(format!("{}{path}", self.url)).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        r.json().unwrap()
    }

    /// The value of the Prometheus sample `name` (with its labels, if any) of /metrics.
    pub fn metric(&self, name: &str) -> f64 {
        let r = client()
            .get(format!("{}/metrics", self.url))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.text().unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    /// A streamed request: every `data:` payload in order.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = client()
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let text = r.text().unwrap();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").expect(e).to_string())
            .collect()
    }

    /// Waits until every KV block is free and nothing runs.
    pub fn wait_idle(&self) -> Value {
        let t0 = Instant::now();
        loop {
            let h = self.get("/health");
            if h["running"] == 0 && h["kv_blocks_free"] == h["kv_blocks_total"] {
                return h;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "never idle: {h}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

pub fn chat_body(user: &str, n: usize) -> Value {
    json!({"model": "tiny-chat", "messages": [{"role": "user", "content": user}],
           "temperature": 0, "max_tokens": n})
}

pub fn reply(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

/// Text of a streamed chat: the role chunk first, content deltas, a finish_reason, [DONE].
pub fn streamed_chat(events: &[String]) -> (String, String) {
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    let mut finish = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        let choice = &c["choices"][0];
        text += choice["delta"]["content"].as_str().unwrap_or("");
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    // The finish_reason is in the last chunk with a choice (a usage chunk may follow it).
    let last = chunks
        .iter()
        .rfind(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty()))
        .unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    (text, finish)
}

/// The text of a non-streamed reply of either kind, and of a streamed one (`events`).
pub fn text_of(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .or(v["choices"][0]["text"].as_str())
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

pub fn streamed_text(events: &[String]) -> String {
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        let choice = &c["choices"][0];
        text += choice["delta"]["content"]
            .as_str()
            .or(choice["text"].as_str())
            .unwrap_or("");
    }
    text
}
