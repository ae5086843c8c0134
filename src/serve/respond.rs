//! The response side of the OpenAI endpoints: a request's choices (one engine request each)
//! turned into one JSON body, or into a stream of SSE chunks in OpenAI's shape ending with
//! `data: [DONE]`. Chunks of different choices interleave as their tokens come; a token's
//! logprobs go out with the next text chunk of its choice.
//!
//! With tools offered, each reply is read for calls at its end (tools.rs). A stream sends
//! content only as far as no call can still start there, holds the rest, and at the end sends
//! what remains of the content, then each call as OpenAI streams one: a chunk with its index,
//! id, type and name (arguments ""), then one with its arguments.

use super::engine::{Event, Finish, TokenLogprob};
use super::http::{ApiError, AppState, Kind};
use super::logprobs;
use super::tools::{self, Call, Tools};
use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;

pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
    pub prompt_tokens: usize,
    /// Whether the choices carry logprobs (else `"logprobs": null`).
    pub logprobs: bool,
    /// Chat with tools offered: the replies are read for calls.
    pub tools: Option<Arc<Tools>>,
    pub state: AppState,
}

/// OpenAI's finish_reason: a reply that ended by itself and made calls ends in "tool_calls".
fn reason(finish: Finish, calls: &[Call]) -> &'static str {
    if finish == Finish::Stop && !calls.is_empty() {
        "tool_calls"
    } else {
        finish.as_str()
    }
}

/// A call as a message's `tool_calls` entry, under a new id.
fn call_json(c: &Call) -> Value {
    json!({"id": tools::call_id(), "type": "function",
           "function": {"name": c.name, "arguments": c.arguments}})
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
           "total_tokens": prompt + completion})
}

impl Meta {
    /// One streamed chunk with `choice` as its only choice.
    fn chunk(&self, choice: Value, with_usage: bool) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let mut c = json!({"id": self.id, "object": object, "created": self.created,
                           "model": self.model, "choices": [choice]});
        if with_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// Choice i's chunk with `text` and the logprobs of its tokens; `offset`: characters of
    /// the completion before it.
    fn piece(&self, i: usize, text: &str, tokens: &[TokenLogprob], offset: usize) -> Value {
        let lp = self.logprobs_json(tokens, offset);
        match self.kind {
            Kind::Chat => json!({"index": i, "delta": {"content": text}, "logprobs": lp,
                                 "finish_reason": null}),
            Kind::Text => json!({"index": i, "text": text, "logprobs": lp,
                                 "finish_reason": null}),
        }
    }

    fn logprobs_json(&self, tokens: &[TokenLogprob], offset: usize) -> Value {
        let tok = &self.state.tokenizer;
        match (self.logprobs, self.kind) {
            (false, _) => Value::Null,
            (true, Kind::Chat) => logprobs::chat(tok, tokens),
            (true, Kind::Text) => logprobs::text_completion(tok, tokens, offset),
        }
    }

    fn last(&self, i: usize, reason: &str) -> Value {
        match self.kind {
            Kind::Chat => json!({"index": i, "delta": {}, "logprobs": null,
                                 "finish_reason": reason}),
            Kind::Text => json!({"index": i, "text": "", "logprobs": null,
                                 "finish_reason": reason}),
        }
    }

    /// Choice i's chunks for call k: name and id first, then the arguments whole.
    fn call_chunks(&self, i: usize, k: usize, c: &Call, with_usage: bool) -> Vec<u8> {
        let head = json!({"index": k, "id": tools::call_id(), "type": "function",
                          "function": {"name": c.name, "arguments": ""}});
        let args = json!({"index": k, "function": {"arguments": c.arguments}});
        let mut b = Vec::new();
        for delta in [head, args] {
            let choice = json!({"index": i, "delta": {"tool_calls": [delta]}, "logprobs": null,
                                "finish_reason": null});
            b.extend_from_slice(&sse(&self.chunk(choice, with_usage)));
        }
        b
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn engine_error(message: String) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "engine_error", message)
}

/// A non-streamed reply: waits for every choice's events, then answers in one JSON body.
pub async fn collect(
    meta: Meta,
    receivers: Vec<UnboundedReceiver<Event>>,
) -> Result<Response, ApiError> {
    let (mut choices, mut completion) = (Vec::new(), 0);
    // The engine runs every choice at once; waiting on them in turn loses nothing.
    for (i, mut rx) in receivers.into_iter().enumerate() {
        let (mut text, mut tokens) = (String::new(), Vec::new());
        let finish = loop {
            match rx.recv().await {
                Some(Event::Logprob(t)) => tokens.push(t),
                Some(Event::Text(t)) => text += &t,
                Some(Event::Done {
                    finish,
                    completion_tokens,
                    ..
                }) => {
                    completion += completion_tokens;
                    break finish;
                }
                Some(Event::Error(e)) => return Err(engine_error(e)),
                None => return Err(engine_error("the engine stopped".into())),
            }
        };
        let lp = meta.logprobs_json(&tokens, 0);
        choices.push(match (meta.kind, &meta.tools) {
            (Kind::Chat, Some(t)) => {
                let p = t.parse(&text);
                let mut message = json!({"role": "assistant", "content": p.content});
                if !p.calls.is_empty() {
                    message["tool_calls"] = p.calls.iter().map(call_json).collect();
                }
                json!({"index": i, "message": message, "logprobs": lp,
                       "finish_reason": reason(finish, &p.calls)})
            }
            (Kind::Chat, None) => json!({"index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": lp, "finish_reason": finish.as_str()}),
            (Kind::Text, _) => json!({"index": i, "text": text, "logprobs": lp,
                "finish_reason": finish.as_str()}),
        });
    }
    let object = match meta.kind {
        Kind::Chat => "chat.completion",
        Kind::Text => "text_completion",
    };
    Ok(axum::Json(json!({
        "id": meta.id, "object": object, "created": meta.created,
        "model": meta.model, "choices": choices,
        "usage": usage(meta.prompt_tokens, completion),
    }))
    .into_response())
}

/// What the stream holds between chunks.
struct Streaming {
    meta: Meta,
    events:
        futures_util::stream::SelectAll<futures_util::stream::BoxStream<'static, (usize, Event)>>,
    include_usage: bool,
    choices: Vec<ChoiceState>,
    /// Choices not finished yet; completion tokens of the finished ones.
    open: usize,
    completion: usize,
    /// The chat role chunks are still to be sent first.
    roles: bool,
    /// [DONE] (or the end) is out.
    done: bool,
}

/// Where one choice of a stream stands.
#[derive(Clone, Default)]
struct ChoiceState {
    /// Logprobs waiting for the choice's next text chunk.
    logprobs: Vec<TokenLogprob>,
    /// Characters sent so far.
    sent: usize,
    /// With tools: the reply so far, and how many of its bytes went out as content.
    text: String,
    shown: usize,
}

/// A streamed reply: `data: {chunk}` lines, then `data: [DONE]`.
pub fn stream(
    meta: Meta,
    receivers: Vec<UnboundedReceiver<Event>>,
    include_usage: bool,
) -> Response {
    let n = receivers.len();
    let tagged = receivers.into_iter().enumerate().map(|(i, rx)| {
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
            .map(move |e| (i, e))
            .boxed()
    });
    let state = Streaming {
        roles: meta.kind == Kind::Chat,
        meta,
        events: futures_util::stream::select_all(tagged),
        include_usage,
        choices: vec![ChoiceState::default(); n],
        open: n,
        completion: 0,
        done: false,
    };
    let chunks = futures_util::stream::unfold(state, |mut st| async move {
        let bytes = next_chunk(&mut st).await?;
        Some((Ok::<_, std::convert::Infallible>(bytes), st))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(chunks))
        .expect("valid response")
}

/// The next bytes of the stream, or None once it has ended.
async fn next_chunk(st: &mut Streaming) -> Option<Bytes> {
    if st.done {
        return None;
    }
    let (meta, with_usage) = (&st.meta, st.include_usage);
    if st.roles {
        st.roles = false;
        let mut b = Vec::new();
        for i in 0..st.choices.len() {
            let role = json!({"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": null, "finish_reason": null});
            b.extend_from_slice(&sse(&meta.chunk(role, with_usage)));
        }
        return Some(Bytes::from(b));
    }
    loop {
        let Some((i, event)) = st.events.next().await else {
            // Every sender is gone without a Done: the engine stopped.
            st.done = true;
            return None;
        };
        let c = &mut st.choices[i];
        match event {
            Event::Logprob(t) => c.logprobs.push(t),
            Event::Text(t) => {
                let t = match &meta.tools {
                    None => t,
                    Some(_) => {
                        c.text += &t;
                        let settled = tools::settled(&c.text);
                        if settled.len() <= c.shown {
                            continue;
                        }
                        let new = settled[c.shown..].to_string();
                        c.shown = settled.len();
                        new
                    }
                };
                let piece = meta.piece(i, &t, &c.logprobs, c.sent);
                c.logprobs.clear();
                c.sent += t.chars().count();
                return Some(sse(&meta.chunk(piece, with_usage)));
            }
            Event::Done {
                finish,
                completion_tokens,
                ..
            } => {
                // With tools: the content not sent yet (it starts where the sent part ends)
                // and the calls.
                let (rest, calls) = match &meta.tools {
                    None => (String::new(), Vec::new()),
                    Some(t) => {
                        let p = t.parse(&c.text);
                        let content = p.content.unwrap_or_default();
                        (content.get(c.shown..).unwrap_or("").to_string(), p.calls)
                    }
                };
                let mut b = Vec::new();
                if !rest.is_empty() || (meta.logprobs && !c.logprobs.is_empty()) {
                    let piece = meta.piece(i, &rest, &c.logprobs, c.sent);
                    b.extend_from_slice(&sse(&meta.chunk(piece, with_usage)));
                    c.logprobs.clear();
                }
                for (k, call) in calls.iter().enumerate() {
                    b.extend_from_slice(&meta.call_chunks(i, k, call, with_usage));
                }
                let last = meta.last(i, reason(finish, &calls));
                b.extend_from_slice(&sse(&meta.chunk(last, with_usage)));
                st.completion += completion_tokens;
                st.open -= 1;
                if st.open == 0 {
                    if with_usage {
                        let mut u = meta.chunk(Value::Null, true);
                        u["choices"] = json!([]);
                        u["usage"] = usage(meta.prompt_tokens, st.completion);
                        b.extend_from_slice(&sse(&u));
                    }
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    st.done = true;
                }
                return Some(Bytes::from(b));
            }
            // Mid-stream the status is sent already: the error goes in a chunk.
            Event::Error(e) => {
                let err = json!({"error": {"message": e, "type": "server_error",
                                           "param": null, "code": "engine_error"}});
                let mut b = sse(&err).to_vec();
                b.extend_from_slice(b"data: [DONE]\n\n");
                st.done = true;
                return Some(Bytes::from(b));
            }
        }
    }
}
