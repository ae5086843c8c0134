//! The OpenAI-compatible HTTP API over the engine: /v1/chat/completions, /v1/completions (JSON
//! or server-sent events), /v1/models and /health. Function calling's fields: tools.rs.
//!
//! Requests are parsed, tokenized and checked here, so that everything wrong with one is an
//! OpenAI error body with the right status before it reaches the engine. Each accepted request
//! gets its own channel; when the client goes away, the response (and with it the receiver) is
//! dropped, and the engine frees the sequence at its next step. Tokenizing runs inline on the
//! tokio worker; BODY_LIMIT bounds what it can cost.

use super::engine::{blocks_for, Handle, Refused, Request};
use super::grammar::{Grammars, ResponseFormat};
use super::respond::{collect, stream, Meta};
use super::tools::{self, HistoryCall, ToolArg, ToolChoiceArg, Tools};
use crate::chat_template::Message;
use crate::sample::SamplingParams;
use crate::tokenizer::Tokenizer;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::unbounded_channel;

/// Request bodies larger than this are refused (413): a whole context of text is far smaller.
pub const BODY_LIMIT: usize = 4 << 20;

pub struct ServerState {
    pub engine: Handle,
    pub tokenizer: Tokenizer,
    pub model_id: String,
    pub ctx_len: usize,
    pub kv_blocks: usize,
    pub api_key: Option<String>,
    /// The model's defaults (generation_config.json), which request fields override.
    pub defaults: SamplingParams,
    pub created: u64,
    next_id: AtomicU64,
    /// response_format's grammars over the tokenizer's vocabulary.
    grammars: Grammars,
}

impl ServerState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Handle,
        tokenizer: Tokenizer,
        model_id: String,
        ctx_len: usize,
        kv_blocks: usize,
        api_key: Option<String>,
        defaults: SamplingParams,
    ) -> Self {
        // Grammars end on the model's first EOS token (the one the tokenizer names).
        let eos = tokenizer.eos_ids().first().copied().unwrap_or(0);
        ServerState {
            grammars: Grammars::new(tokenizer.clone(), eos),
            engine,
            tokenizer,
            model_id,
            ctx_len,
            kv_blocks,
            api_key,
            defaults,
            created: now(),
            next_id: AtomicU64::new(1),
        }
    }
}

pub(super) type AppState = Arc<ServerState>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such path") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            param: None,
        }
    }
    pub(super) fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param),
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message)
        }
    }

    /// `param: message`, for tests of the checks.
    #[cfg(test)]
    pub(super) fn param_and_message(&self) -> String {
        format!("{}: {}", self.param.unwrap_or(""), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {
            "message": self.message, "type": kind, "param": self.param, "code": self.code,
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

/// `--api-key`: every route but /health wants `Authorization: Bearer KEY`.
async fn auth(State(s): State<AppState>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if req.uri().path() != "/health" && given != Some(key.as_str()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or wrong API key: send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(s): State<AppState>) -> Response {
    let st = &s.engine.status;
    axum::Json(json!({
        "status": if st.ready.load(Ordering::SeqCst) { "ok" } else { "loading" },
        "model": s.model_id,
        "running": st.running.load(Ordering::SeqCst),
        "waiting": st.waiting.load(Ordering::SeqCst),
        "kv_blocks_total": st.total_blocks.load(Ordering::SeqCst),
        "kv_blocks_free": st.free_blocks.load(Ordering::SeqCst),
    }))
    .into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let st = &s.engine.status;
    let gauges = crate::serve::metrics::Gauges {
        running: st.running.load(Ordering::SeqCst),
        waiting: st.waiting.load(Ordering::SeqCst),
        kv_blocks_total: st.total_blocks.load(Ordering::SeqCst),
        kv_blocks_free: st.free_blocks.load(Ordering::SeqCst),
    };
    let body = st.metrics.render(&gauges);
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}

async fn models(State(s): State<AppState>) -> Response {
    axum::Json(json!({"object": "list", "data": [{
        "id": s.model_id, "object": "model", "created": s.created, "owned_by": "anyllama",
    }]}))
    .into_response()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share. Unknown fields are ignored, as OpenAI's clients send more.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    stop: Option<OneOrMany>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    n: Option<usize>,
    /// Chat: true for each token's log-probability; completions: how many alternatives.
    logprobs: Option<LogprobsArg>,
    /// Chat: alternatives per token (with logprobs: true).
    top_logprobs: Option<usize>,
    response_format: Option<ResponseFormatArg>,
    /// Extension (vLLM, llama.cpp): generate max_tokens tokens even past EOS (load tests).
    #[serde(default)]
    ignore_eos: bool,
}

/// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema"}}`.
#[derive(Deserialize)]
struct ResponseFormatArg {
    #[serde(rename = "type")]
    kind: String,
    json_schema: Option<JsonSchemaArg>,
}

#[derive(Deserialize)]
struct JsonSchemaArg {
    schema: Option<serde_json::Value>,
}

/// `logprobs` is a boolean in chat and a number of alternatives in completions.
#[derive(Deserialize)]
#[serde(untagged)]
enum LogprobsArg {
    Chat(bool),
    Text(usize),
}

/// The most choices one request may ask for.
const N_MAX: usize = 16;

/// The most alternatives per token a request may ask for (OpenAI's limit).
const TOP_LOGPROBS_MAX: usize = 20;

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
    /// An assistant turn's calls (its content may then be null).
    tool_calls: Option<Vec<HistoryCall>>,
    /// A tool turn: the call it answers, and (optionally) the function's name.
    tool_call_id: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    tools: Option<Vec<ToolArg>>,
    tool_choice: Option<ToolChoiceArg>,
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: OneOrMany,
    #[serde(flatten)]
    common: Common,
}

/// The body as JSON of type T: 413 past the limit, 400 when it is not JSON of that shape.
fn parse<T: serde::de::DeserializeOwned>(
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(
            status,
            code,
            format!("{} (the limit is {BODY_LIMIT} bytes)", e.body_text()),
        )
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the request body is not valid: {e}"),
        )
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Chat,
    Text,
}

/// A request ready for the engine, with what the response needs.
struct Prepared {
    prompt: Vec<u32>,
    sampling: SamplingParams,
    max_tokens: usize,
    stops: Vec<String>,
    ignore_eos: bool,
    logprobs: Option<usize>,
    format: Option<ResponseFormat>,
    /// Chat: the tools whose calls the replies are read for.
    tools: Option<Arc<Tools>>,
    /// Choices: n engine requests of the same prompt (seed + i each, when seeded).
    n: usize,
    stream: bool,
    include_usage: bool,
}

/// Checks the shared fields against the model and context; `what` names the prompt's field.
fn prepare(
    s: &ServerState,
    c: Common,
    prompt: Vec<u32>,
    what: &'static str,
) -> Result<Prepared, ApiError> {
    if let Some(m) = &c.model {
        if m != &s.model_id {
            return Err(ApiError {
                param: Some("model"),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    "model_not_found",
                    format!(
                        "the model `{m}` does not exist; this server has `{}`",
                        s.model_id
                    ),
                )
            });
        }
    }
    let n = c.n.unwrap_or(1);
    if !(1..=N_MAX).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be from 1 to {N_MAX}"),
        ));
    }
    let ctx = s.ctx_len;
    if prompt.is_empty() {
        return Err(ApiError::invalid(what, "the prompt is empty"));
    }
    if prompt.len() >= ctx {
        return Err(ApiError::invalid(
            what,
            format!(
                "the prompt has {} tokens but the context holds {ctx}",
                prompt.len()
            ),
        ));
    }
    let room = ctx - prompt.len();
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => room,
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ))
        }
        Some(n) if n > room => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "max_tokens {n} plus the prompt's {} tokens is beyond the context of {ctx}",
                    prompt.len()
                ),
            ))
        }
        Some(n) => n,
    };
    if blocks_for(prompt.len(), max_tokens) > s.kv_blocks {
        return Err(ApiError::invalid(
            "max_tokens",
            "prompt plus max_tokens is larger than the whole KV cache",
        ));
    }
    let mut p = s.defaults.clone();
    p.temperature = c.temperature.unwrap_or(p.temperature);
    p.top_p = c.top_p.unwrap_or(p.top_p);
    p.top_k = c.top_k.unwrap_or(p.top_k);
    p.min_p = c.min_p.unwrap_or(p.min_p);
    p.presence_penalty = c.presence_penalty.unwrap_or(p.presence_penalty);
    p.frequency_penalty = c.frequency_penalty.unwrap_or(p.frequency_penalty);
    p.repetition_penalty = c.repetition_penalty.unwrap_or(p.repetition_penalty);
    p.seed = c.seed.unwrap_or(p.seed);
    p.validate().map_err(|e| {
        let m = e.to_string();
        let param = [
            ("temperature", "temperature"),
            ("top-p", "top_p"),
            ("min-p", "min_p"),
            ("repeat", "repetition_penalty"),
        ]
        .into_iter()
        .find(|(word, _)| m.contains(word))
        .map_or("presence_penalty", |(_, p)| p);
        ApiError::invalid(param, m)
    })?;
    let stops = c.stop.map(OneOrMany::into_vec).unwrap_or_default();
    if stops.len() > 4 {
        return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
    }
    let chat = what == "messages";
    let logprobs = match (c.logprobs, c.top_logprobs) {
        (Some(LogprobsArg::Chat(true)), top) if chat => Some(top.unwrap_or(0)),
        (Some(LogprobsArg::Chat(false)) | None, Some(_)) if chat => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ))
        }
        (Some(LogprobsArg::Chat(false)) | None, None) if chat => None,
        (Some(LogprobsArg::Text(n)), None) if !chat => Some(n),
        (None, None) if !chat => None,
        _ => {
            return Err(ApiError::invalid(
                "logprobs",
                if chat {
                    "chat takes logprobs: true/false and top_logprobs: N"
                } else {
                    "completions take logprobs: N (no top_logprobs)"
                },
            ))
        }
    };
    if logprobs.is_some_and(|n| n > TOP_LOGPROBS_MAX) {
        let param = if chat { "top_logprobs" } else { "logprobs" };
        return Err(ApiError::invalid(
            param,
            format!("at most {TOP_LOGPROBS_MAX} alternatives per token"),
        ));
    }
    let format = match c.response_format {
        None => None,
        Some(f) => match (f.kind.as_str(), f.json_schema.and_then(|j| j.schema)) {
            ("text", _) => None,
            ("json_object", _) => Some(ResponseFormat::JsonObject),
            ("json_schema", Some(schema)) => Some(ResponseFormat::JsonSchema(schema)),
            ("json_schema", None) => {
                return Err(ApiError::invalid(
                    "response_format",
                    "json_schema needs json_schema.schema",
                ))
            }
            (other, _) => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!("unknown type {other:?} (text, json_object or json_schema)"),
                ))
            }
        },
    };
    // A schema the grammar compiler rejects is the request's fault: 422 now, not mid-reply.
    if let Some(f) = &format {
        s.grammars
            .constraint(f)
            .map_err(|e| ApiError::invalid("response_format", e))?;
    }
    Ok(Prepared {
        logprobs,
        format,
        tools: None,
        n,
        prompt,
        sampling: p,
        max_tokens,
        stops,
        ignore_eos: c.ignore_eos,
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
    })
}

async fn chat_completions(
    State(s): State<AppState>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: ChatBody = parse(body)?;
    if body.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let tools = Tools::from_request(body.tools, body.tool_choice, body.parallel_tool_calls)?;
    let mut messages = Vec::with_capacity(body.messages.len());
    for m in body.messages {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" | "assistant" | "tool" => m.role.as_str(),
            other => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("role `{other}` is not supported (system, user, assistant, tool)"),
                ))
            }
        };
        if m.tool_calls.is_some() && role != "assistant" {
            return Err(ApiError::invalid(
                "messages",
                format!("a `{role}` message cannot have tool_calls (only assistant messages)"),
            ));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            "messages",
                            format!("content parts of type `{}` are not supported", p.kind),
                        ));
                    }
                    t += p.text.as_deref().unwrap_or("");
                }
                t
            }
        };
        let mut message = Message::new(role, content);
        message.tool_calls = m
            .tool_calls
            .map(|calls| calls.into_iter().map(tools::history_call).collect());
        if role == "tool" {
            (message.tool_call_id, message.name) = (m.tool_call_id, m.name);
        }
        messages.push(message);
    }
    // Rendered as encode_chat does (templates write their own BOS), with the tools.
    let prompt = tools::render_prompt(&s.tokenizer, &messages, tools.as_ref())
        .and_then(|text| s.tokenizer.encode(&text, false))
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let mut p = prepare(&s, body.common, prompt, "messages")?;
    // A forced call is the whole reply, so its grammar takes the place of any response_format.
    if let Some(g) = tools.as_ref().and_then(Tools::grammar) {
        let format = ResponseFormat::Lark(g);
        s.grammars
            .constraint(&format)
            .map_err(|e| ApiError::invalid("tools", e))?;
        p.format = Some(format);
    }
    p.tools = tools.filter(Tools::offered).map(Arc::new);
    start(s, p, Kind::Chat).await
}

async fn completions(
    State(s): State<AppState>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: CompletionBody = parse(body)?;
    let mut prompts = body.prompt.into_vec();
    if prompts.len() != 1 {
        return Err(ApiError::invalid(
            "prompt",
            "exactly one prompt is supported",
        ));
    }
    let text = prompts.pop().expect("one prompt");
    let prompt = s
        .tokenizer
        .encode(&text, true)
        .map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    let p = prepare(&s, body.common, prompt, "prompt")?;
    start(s, p, Kind::Text).await
}

/// Hands the request's n choices to the engine and answers with the whole reply or a stream.
async fn start(s: AppState, p: Prepared, kind: Kind) -> Result<Response, ApiError> {
    let prompt_tokens = p.prompt.len();
    let mut receivers = Vec::with_capacity(p.n);
    for i in 0..p.n {
        let (tx, rx) = unbounded_channel();
        let mut sampling = p.sampling.clone();
        sampling.seed = sampling.seed.wrapping_add(i as u64);
        // A refusal drops the receivers of the choices already submitted: they are cancelled.
        s.engine
            .submit(Request {
                prompt: p.prompt.clone(),
                sampling,
                max_tokens: p.max_tokens,
                stops: p.stops.clone(),
                ignore_eos: p.ignore_eos,
                logprobs: p.logprobs,
                constraint: match &p.format {
                    Some(f) => Some(Box::new(
                        s.grammars
                            .constraint(f)
                            .map_err(|e| ApiError::invalid(f.param(), e))?,
                    )),
                    None => None,
                },
                arrived: std::time::Instant::now(),
                events: tx,
            })
            .map_err(|e| match e {
                Refused::QueueFull(n) => ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!("the server is busy: {n} requests are already waiting; retry later"),
                ),
                Refused::Stopped => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    "the server is shutting down",
                ),
            })?;
        receivers.push(rx);
    }
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let meta = Meta {
        id: match kind {
            Kind::Chat => format!("chatcmpl-{id}"),
            Kind::Text => format!("cmpl-{id}"),
        },
        created: now(),
        model: s.model_id.clone(),
        kind,
        prompt_tokens,
        logprobs: p.logprobs.is_some(),
        tools: p.tools.clone(),
        state: s.clone(),
    };
    if p.stream {
        Ok(stream(meta, receivers, p.include_usage))
    } else {
        // Not streamed: the handler's future collects the events; dropping it (the client is
        // gone) drops the receivers.
        collect(meta, receivers).await
    }
}
