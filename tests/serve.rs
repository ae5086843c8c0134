//! `anyllama serve` over real HTTP on 127.0.0.1, on the tiny-chat fixture: replies equal the CLI's
//! greedy output, streamed and not; 64 mixed requests get what they get alone; a client that
//! disconnects frees its KV blocks; abuse leaves the server serving; every error is an OpenAI
//! error body with its status; SIGTERM ends cleanly. The API's features: serve_api.rs.

mod common;

use common::server::*;
use serde_json::{json, Value};
use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

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
fn a_client_that_disconnects_frees_its_blocks() {
    // The real 135M model: tiny-chat writes its whole 240-token context faster than a /health
    // round trip, so the request could end before the client hangs up. 2000 tokens of the 135M
    // model on the CPU take many seconds, and the `cancelled` counter proves the hang-up ended it.
    let Some(model) = common::smollm2_gguf() else {
        return;
    };
    let s = Server::start_model(&model.display().to_string(), "cpu", &["--ctx", "2048"]).unwrap();
    let total = s.get("/health")["kv_blocks_total"].clone();
    let max_tokens = 2000;
    let body = json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": true,
                      "temperature": 0, "ignore_eos": true});
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
    let cancelled = s.metric("anyllama_requests_finished_total{reason=\"cancelled\"}");
    assert_eq!(cancelled, 1.0);
    let generated = s.metric("anyllama_generation_tokens_total");
    assert!(
        generated < max_tokens as f64,
        "{generated} tokens: not cut short"
    );
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
