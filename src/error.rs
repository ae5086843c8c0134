//! One error type for the whole crate. Each variant names the stage that failed; the message says
//! what was wrong with which file or value, so the CLI can print `error: <stage>: <why>`.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file (safetensors, GGUF, index json) is missing, unreadable or malformed.
    #[error("loading {path}: {msg}")]
    Load { path: String, msg: String },
    /// config.json / GGUF metadata describe a model we cannot run.
    #[error("config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// The GPU / backend failed (no adapter, out of memory, device lost, shader error).
    #[error("device: {0}")]
    Device(String),
    /// Bad generation request (prompt longer than the context, bad sampling values, ...).
    #[error("generation: {0}")]
    Generation(String),
    #[error("{0}")]
    Usage(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn load(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Load {
            path: path.as_ref().display().to_string(),
            msg: msg.into(),
        }
    }
}
