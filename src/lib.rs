//! anyllama: Llama-family language models on any GPU.
//!
//! Reading order: config -> weights -> backend (trait, cpu reference, wgpu) -> model -> generate.

pub mod chat_template;
pub mod config;
pub mod dtype;
pub mod error;
pub mod quant;
pub mod quant_blocks;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
