//! anyllama: Llama-family language models on any GPU.
//!
//! Reading order: config and rope (the model's shape), weights (files -> tensors), backend (the
//! trait, the cpu reference, wgpu), pool and kv_cache (memory), model (the forward pass),
//! sample and generate (the decode loop), tokenizer and chat_template (text <-> ids), loader
//! (a model folder or GGUF file -> everything above), convert (GGUF <-> HF folder), bench
//! (speed measurements over any backend), serve (the OpenAI-compatible server).

pub mod arch;
pub mod config;
pub mod generation_config;
pub mod rope;

pub mod dtype;
pub mod hub;
pub mod quant;
pub mod quant_blocks;
pub mod weights;

pub mod backend;
pub mod batch;
pub mod kv_cache;
pub mod pool;
pub mod prefix_cache;

pub mod model;
pub mod train;

pub mod bench;

pub mod generate;
pub mod sample;
pub mod serve;
pub mod stop;

pub mod chat_template;
pub mod tokenizer;
pub mod tokenizer_gguf;

pub mod convert;
pub mod default_model;
pub mod error;
pub mod loader;

pub use error::{Error, Result};
