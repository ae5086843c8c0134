//! anyllama: Llama-family language models on any GPU.
//!
//! Reading order: config -> weights -> backend (trait, cpu reference, wgpu) -> model -> generate.

pub mod config;
pub mod dtype;
pub mod error;
pub mod generation_config;
pub mod hub;
pub mod quant;
pub mod quant_blocks;
pub mod rope;
pub mod weights;

pub use error::{Error, Result};
pub mod backend;
pub mod pool;
pub mod sample;
pub mod kv_cache;
pub mod generate;
pub mod model;
pub mod default_model;
pub mod stop;
