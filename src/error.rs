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
    /// A line of advice for the user where one helps (printed by the CLI after the error).
    pub fn hint(&self) -> Option<&'static str> {
        let msg = self.to_string();
        let has = |s: &str| msg.contains(s);
        match self {
            Error::Load { .. }
                if has("no such file")
                    || has("No such file")
                    || has("neither an existing path")
                    || has("not in the Hugging Face cache") =>
            {
                Some("check the path; -m takes a model folder, a .gguf file or org/name")
            }
            Error::Load { .. } => Some(
                "the file is damaged or not a model file: download it again from its source",
            ),
            Error::Generation(_) if has("context holds") => {
                Some("raise -c/--ctx-size, shorten the prompt, or pass --truncate to keep its end")
            }
            Error::Device(_) if has("memory") || has("does not fit") || has("larger than") => {
                Some("try a smaller -c/--ctx-size, a smaller or more quantized model, or another device (--backend, --adapter)")
            }
            Error::Device(_) if has("lost") => {
                Some("the GPU driver reset the device; run again, or use --backend cpu")
            }
            _ => None,
        }
    }

    /// Turns a caught panic payload into a message (for code that contains panics of libraries
    /// known to panic on crafted input).
    pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into())
    }

    /// Runs `f`, turning a panic inside it into the error `wrap` makes of the panic message.
    /// Used around libraries known to panic on crafted input (tokenizers, template rendering).
    pub fn contain_panics<T>(
        wrap: impl FnOnce(String) -> Error,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(result) => result,
            Err(payload) => Err(wrap(Error::panic_message(payload.as_ref()))),
        }
    }

    pub fn load(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Load {
            path: path.as_ref().display().to_string(),
            msg: msg.into(),
        }
    }
}
