//! `anyllama serve`: an OpenAI-compatible HTTP server. engine.rs schedules every request over
//! one shared paged KV cache on one thread; http.rs turns HTTP requests into engine requests
//! and engine events into OpenAI responses (tools.rs: function calling); metrics.rs is
//! `/metrics`.

pub mod engine;
pub mod grammar;
pub mod http;
pub mod logprobs;
pub mod metrics;
mod respond;
mod tools;
