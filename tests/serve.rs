//! `anyllama serve` over real HTTP on 127.0.0.1, on the tiny-chat fixture: replies equal the CLI's
//! greedy output, streamed and not; concurrent requests get what they get alone; a client that
//! disconnects frees its KV blocks; every error is an OpenAI error body with its status.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> std::ffi::OsString {
    // ANYLLAMA_BIN: the binary when the tests run away from the build tree (the GPU machine).
    std::env::var_os("ANYLLAMA_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_anyllama").into())
}

fn tiny_chat() -> String {
    common::fixtures()
        .join("hf/tiny-chat")
        .display()
        .to_string()
}

/// A running server, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Starts `anyllama serve` on a free port; None (after skip_or_fail) when a wgpu adapter is
    /// missing.
    fn start(backend: &str, extra: &[&str]) -> Option<Server> {
        let mut child = Command::new(bin())
            .args([
                "serve",
                "-m",
                &tiny_chat(),
                "--backend",
                backend,
                "--port",
                "0",
            ])
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
            common::skip_or_fail(&format!("wgpu: {seen}"));
            return None;
        }
        panic!("the server did not start:\n{seen}");
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = client()
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap())
    }

    fn get(&self, path: &str) -> Value {
        let r = client().get(format!("{}{path}", self.url)).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        r.json().unwrap()
    }

    /// The value of the Prometheus sample `name` (with its labels, if any) of /metrics.
    fn metric(&self, name: &str) -> f64 {
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
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
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
    fn wait_idle(&self) -> Value {
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

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// What the CLI prints for the same greedy request (its stdout less the final newline).
fn cli(sub: &str, prompt: &str, n: usize) -> String {
    let o = Command::new(bin())
        .args([sub, "-m", &tiny_chat(), "-p", prompt, "--temp", "0"])
        .args(["-n", &n.to_string(), "--backend", "cpu"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8(o.stdout).unwrap();
    out.strip_suffix('\n').unwrap_or(&out).to_string()
}

fn chat_body(user: &str, n: usize) -> Value {
    json!({"model": "tiny-chat", "messages": [{"role": "user", "content": user}],
           "temperature": 0, "max_tokens": n})
}

fn reply(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

/// Text of a streamed chat: the role chunk first, content deltas, a finish_reason, [DONE].
fn streamed_chat(events: &[String]) -> (String, String) {
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

fn serves_like_the_cli(backend: &str) {
    let Some(s) = Server::start(backend, &["--kv-dtype", "f32"]) else {
        return;
    };
    let h = s.get("/health");
    assert_eq!(h["status"], "ok");
    let models = s.get("/v1/models");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-chat");

    let user = "What is the capital of France?";
    let want = cli("chat", user, 24);
    let (status, v) = s.post("/v1/chat/completions", &chat_body(user, 24));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(reply(&v), want, "{backend}: chat");
    let usage = &v["usage"];
    let (p, c) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 0 && c > 0 && c <= 24);
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);
    let finish = v["choices"][0]["finish_reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(finish == "stop" || (finish == "length" && c == 24), "{v}");

    let mut body = chat_body(user, 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = s.stream("/v1/chat/completions", &body);
    let (text, f) = streamed_chat(&events);
    assert_eq!(text, want, "{backend}: streamed chat");
    assert_eq!(f, finish);
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], v["usage"]);

    let prompt = "Once upon a time";
    let want = cli("generate", prompt, 20);
    let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 20});
    let (status, v) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(
        v["choices"][0]["text"],
        want.as_str(),
        "{backend}: completion"
    );
    let mut body = body;
    body["stream"] = json!(true);
    let events = s.stream("/v1/completions", &body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion");
        text += c["choices"][0]["text"].as_str().unwrap();
    }
    assert_eq!(text, want, "{backend}: streamed completion");

    // A stop string cuts the reply right before it.
    let chars: Vec<char> = want.chars().collect();
    if chars.len() > 8 {
        let head: String = chars[..6].iter().collect();
        let stop: String = chars[6..9].iter().collect();
        if !head.contains(&stop) {
            let body =
                json!({"prompt": prompt, "temperature": 0, "max_tokens": 20, "stop": [stop]});
            let (_, v) = s.post("/v1/completions", &body);
            assert_eq!(v["choices"][0]["text"], head.as_str(), "{v}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
        }
    }
    s.wait_idle();
}

#[test]
fn cpu_serves_what_the_cli_prints() {
    serves_like_the_cli("cpu");
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_serves_what_the_cli_prints() {
    serves_like_the_cli("wgpu");
}

/// Request i of the invariance test: a chat or a completion, of its own length, greedy or
/// sampled with its own seed (some with penalties, which the host applies).
fn mixed_request(i: usize) -> (&'static str, Value) {
    let max_tokens = 4 + (i * 7) % 37;
    let mut body = if i % 2 == 0 {
        chat_body(
            &format!("Request {i}: tell me about the number {}", i * 7 + 3),
            max_tokens,
        )
    } else {
        json!({"prompt": format!("Story {i}: once upon a time, {} dragons", i % 9),
               "max_tokens": max_tokens, "temperature": 0})
    };
    if i % 3 != 0 {
        body["temperature"] = json!(0.9);
        body["top_p"] = json!(0.95);
        body["seed"] = json!(1000 + i);
    }
    if i % 5 == 0 {
        body["frequency_penalty"] = json!(0.5);
    }
    let path = if i % 2 == 0 {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    (path, body)
}

/// The text of a non-streamed reply of either kind, and of a streamed one (`events`).
fn text_of(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .or(v["choices"][0]["text"].as_str())
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

fn streamed_text(events: &[String]) -> String {
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

/// 64 requests (chat and completion, streamed and not, greedy and seeded sampling, some with
/// penalties) arrive at random moments at a server that runs at most 16 at once; a quarter are
/// cancelled mid-stream by disconnecting. Each finished one must produce exactly what it
/// produces alone, each cancelled one a prefix of that, and every KV block must be free after.
fn many_requests_get_what_they_get_alone(backend: &str) {
    let args = ["--kv-dtype", "f32", "--max-seqs", "16"];
    let Some(s) = Server::start(backend, &args) else {
        return;
    };
    const N: usize = 64;
    let alone: Vec<String> = (0..N)
        .map(|i| {
            let (path, body) = mixed_request(i);
            let (status, v) = s.post(path, &body);
            assert_eq!(status, 200, "{v}");
            text_of(&v)
        })
        .collect();
    let busiest = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let t0 = Instant::now();
    let together: Vec<(bool, String)> = std::thread::scope(|sc| {
        // Watches /health: the requests must really have run side by side.
        sc.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let n = s.get("/health")["running"].as_u64().unwrap();
                busiest.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let s = &s;
                sc.spawn(move || {
                    // Arrival: a fixed pseudo-random delay of up to ~150 ms.
                    std::thread::sleep(Duration::from_millis(((i * 37) % 16 * 10) as u64));
                    let (path, mut body) = mixed_request(i);
                    if i % 4 == 3 {
                        // Cancelled: read the first bytes of the stream, then hang up.
                        body["stream"] = json!(true);
                        let mut r = client()
                            .post(format!("{}{path}", s.url))
                            .json(&body)
                            .send()
                            .unwrap();
                        let mut head = vec![0u8; 16];
                        r.read_exact(&mut head).unwrap();
                        return (true, String::new());
                    }
                    if i % 2 == 1 || i % 8 == 0 {
                        body["stream"] = json!(true);
                        (false, streamed_text(&s.stream(path, &body)))
                    } else {
                        let (status, v) = s.post(path, &body);
                        assert_eq!(status, 200, "{v}");
                        (false, text_of(&v))
                    }
                })
            })
            .collect();
        let replies = handles.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        replies
    });
    for (i, (cancelled, text)) in together.iter().enumerate() {
        if !cancelled {
            assert_eq!(text, &alone[i], "{backend}: request {i}");
        }
    }
    let busiest = busiest.into_inner();
    assert!(busiest > 1, "{backend}: the requests never overlapped");
    let h = s.wait_idle();
    eprintln!(
        "{backend}: {N} requests, at most {busiest} running at once, {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(h["kv_blocks_free"], h["kv_blocks_total"]);
    // /metrics saw every request: 2 N admitted, a quarter of the second N cancelled, none
    // failed, a first token for each (cancelled ones had theirs before hanging up).
    let m = |name: &str| s.metric(name);
    assert_eq!(m("anyllama_requests_admitted_total"), (2 * N) as f64);
    let finished = ["stop", "length", "cancelled", "error"].map(|r| {
        m(&format!(
            "anyllama_requests_finished_total{{reason=\"{r}\"}}"
        ))
    });
    assert_eq!(finished.iter().sum::<f64>(), (2 * N) as f64, "{finished:?}");
    assert_eq!(finished[3], 0.0);
    assert!(finished[2] <= (N / 4) as f64, "{finished:?}");
    assert_eq!(
        m("anyllama_time_to_first_token_seconds_count"),
        (2 * N) as f64
    );
    assert_eq!(m("anyllama_requests_running"), 0.0);
    assert_eq!(m("anyllama_kv_blocks_used"), 0.0);
    assert!(m("anyllama_generation_tokens_total") >= m("anyllama_engine_steps_total"));
    assert!(m("anyllama_prompt_tokens_total") > 0.0);
}

#[test]
fn cpu_many_requests_get_what_they_get_alone() {
    many_requests_get_what_they_get_alone("cpu");
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_many_requests_get_what_they_get_alone() {
    many_requests_get_what_they_get_alone("wgpu");
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_many_requests_get_what_they_get_alone() {
    if let Some(why) = anyllama::backend::cuda::unavailable_reason() {
        return common::skip_or_fail_cuda("cuda serve", &why);
    }
    many_requests_get_what_they_get_alone("cuda");
}

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
    let s = Server::start("cpu", &["--api-key", "sk-test-key"]).unwrap();
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

/// Resident memory of process `pid` in KiB (Linux), for the abuse test's bound.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Slow-loris connections, bodies over the limit, a prompt far past the context, clients that
/// never read their streams, and requests past a full queue, all at once: every one gets its
/// error (or just waits), a normal request is still served meanwhile, memory stays bounded,
/// and afterwards the server is idle with every KV block free.
#[test]
fn abuse_leaves_the_server_serving_the_others() {
    use std::io::Write;
    use std::net::TcpStream;
    let s = Server::start("cpu", &["--max-seqs", "2", "--max-queue", "3"]).unwrap();
    let addr = s.url.trim_start_matches("http://").to_string();
    let rss0 = rss_kib(s.child.id());
    // 100 slow-loris connections: headers promising a body that never comes.
    let loris: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut c = TcpStream::connect(&addr).unwrap();
            write!(
                c,
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n"
            )
            .unwrap();
            c
        })
        .collect();
    // Streams whose clients never read a byte (they hold both sequence slots for a while).
    let body = json!({"prompt": "Once upon a time", "max_tokens": 200, "stream": true,
                      "ignore_eos": true})
    .to_string();
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(&addr).unwrap();
        write!(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        silent.push(c);
    }
    // A body over the 4 MiB limit, and a prompt of ~10k tokens (the context is 256).
    let big = json!({"prompt": "x ".repeat(3 << 20), "max_tokens": 1});
    let (status, v) = s.post("/v1/completions", &big);
    assert_eq!(status, 413, "{v}");
    let long = json!({"prompt": "word ".repeat(10_000), "max_tokens": 1});
    let (status, v) = s.post("/v1/completions", &long);
    assert_eq!(
        (status, v["error"]["param"].as_str()),
        (422, Some("prompt")),
        "{v}"
    );
    // Past the queue: eight long requests at once against two slots (held by the silent
    // streams) and three places in the queue: the first ones wait, the rest get 429 at once.
    let start = std::sync::Barrier::new(8);
    let codes: Vec<u16> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                sc.spawn(|| {
                    let body = json!({"prompt": "Hello", "max_tokens": 200, "ignore_eos": true});
                    start.wait();
                    let r = client()
                        .post(format!("{}/v1/completions", s.url))
                        .json(&body)
                        .send();
                    r.map(|r| r.status().as_u16()).unwrap_or(0)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(codes.iter().all(|&c| c == 200 || c == 429), "{codes:?}");
    assert!(
        codes.iter().filter(|&&c| c == 429).count() >= 3,
        "{codes:?}"
    );
    assert!(codes.contains(&200), "{codes:?}");
    // Still serving: /health answers and a request completes.
    assert_eq!(s.get("/health")["status"], "ok");
    let (status, v) = s.post("/v1/chat/completions", &chat_body("Hi", 4));
    assert_eq!(status, 200, "{v}");
    let rss1 = rss_kib(s.child.id());
    assert!(
        rss1 < rss0 + 256 * 1024,
        "memory grew from {rss0} to {rss1} KiB"
    );
    drop(loris);
    drop(silent);
    s.wait_idle();
    let (status, v) = s.post("/v1/chat/completions", &chat_body("Hi", 4));
    assert_eq!(status, 200, "{v}");
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

#[test]
fn a_client_that_disconnects_frees_its_blocks() {
    let s = Server::start("cpu", &[]).unwrap();
    let total = s.get("/health")["kv_blocks_total"].clone();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 240, "stream": true,
                      "temperature": 0});
    let mut r = client()
        .post(format!("{}/v1/completions", s.url))
        .json(&body)
        .send()
        .unwrap();
    let mut first = [0u8; 64];
    r.read_exact(&mut first).unwrap();
    let h = s.get("/health");
    assert_eq!(h["running"], 1, "{h}");
    assert!(h["kv_blocks_free"].as_u64() < total.as_u64(), "{h}");
    drop(r);
    let h = s.wait_idle();
    assert_eq!(h["kv_blocks_free"], total);
}

#[test]
fn errors_are_openai_error_bodies() {
    // No queue: a valid request is refused with 429 after every other check passed.
    let s = Server::start(
        "cpu",
        &["--api-key", "sekrit", "--ctx", "64", "--max-queue", "0"],
    )
    .unwrap();
    let send = |path: &str, auth: Option<&str>, body: reqwest::blocking::Body| {
        let mut r = client()
            .post(format!("{}{path}", s.url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = auth {
            r = r.bearer_auth(k);
        }
        let r = r.send().unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap())
    };
    let chat = "/v1/chat/completions";
    let ok = chat_body("hi", 4).to_string();
    for auth in [None, Some("wrong")] {
        let (st, v) = send(chat, auth, ok.clone().into());
        assert_eq!(st, 401, "{v}");
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let authed = |path: &str, body: String| send(path, Some("sekrit"), body.into());
    let check = |path: &str, body: String, status: u16, code: &str| {
        let (st, v) = authed(path, body.clone());
        assert_eq!(st, status, "{body}: {v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"].get("param").is_some() && v["error"]["type"].is_string());
    };
    check(chat, "{\"messages\": [".into(), 400, "invalid_json");
    check(
        chat,
        json!({"messages": "hi"}).to_string(),
        400,
        "invalid_json",
    );
    check(
        chat,
        json!({"messages": [], "max_tokens": 4}).to_string(),
        422,
        "invalid_value",
    );
    let mut b = chat_body("hi", 4);
    b["temperature"] = json!(-1);
    check(chat, b.to_string(), 422, "invalid_value");
    check(
        chat,
        chat_body("hi", 1000).to_string(),
        422,
        "invalid_value",
    );
    let mut b = chat_body("hi", 4);
    b["n"] = json!(17);
    check(chat, b.to_string(), 422, "invalid_value");
    let mut b = chat_body("hi", 4);
    b["model"] = json!("gpt-4");
    check(chat, b.to_string(), 404, "model_not_found");
    let long = "word ".repeat(200);
    check(
        "/v1/completions",
        json!({"prompt": long}).to_string(),
        422,
        "invalid_value",
    );
    check(
        chat,
        format!("{{\"messages\": \"{}\"}}", "x".repeat(5 << 20)),
        413,
        "body_too_large",
    );
    check("/v1/nothing", ok.clone(), 404, "not_found");
    check(chat, ok.clone(), 429, "queue_full");
    check(
        "/v1/completions",
        json!({"prompt": "hi"}).to_string(),
        429,
        "queue_full",
    );
    // /health needs no key; the rest does.
    let h: Value = client()
        .get(format!("{}/health", s.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(h["status"], "ok");
    let r = client().get(format!("{}/v1/models", s.url)).send().unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

#[cfg(unix)]
#[test]
fn sigterm_ends_running_streams_and_exits_cleanly() {
    let mut s = Server::start("cpu", &[]).unwrap();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 240, "stream": true,
                      "temperature": 0});
    let mut r = client()
        .post(format!("{}/v1/completions", s.url))
        .json(&body)
        .send()
        .unwrap();
    let mut first = [0u8; 64];
    r.read_exact(&mut first).unwrap();
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // The stream ends (with an error chunk and [DONE]) instead of hanging.
    let mut rest = String::new();
    r.read_to_string(&mut rest).unwrap();
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
