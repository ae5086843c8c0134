//! A multi-turn chat with the library API on the best available backend; the KV cache is kept
//! between turns, so each turn only prefills what is new:
//!   cargo run --release --example chat -- [model folder or .gguf]

use anyllama::backend::select::{with_backend, BackendChoice, WithBackend};
use anyllama::backend::Backend;
use anyllama::chat_template::Message;
use anyllama::dtype::DType;
use anyllama::generate::{GenerateOptions, Generator};
use anyllama::loader::ModelFiles;
use anyllama::sample::SamplingParams;
use std::io::{BufRead, Write};

struct Chat(ModelFiles);

impl WithBackend for Chat {
    type Output = ();
    fn run<B: Backend>(self, b: B) -> anyllama::Result<()> {
        let files = &self.0;
        let mut model = files.load(&b, true)?;
        let mut gen = Generator::new(&b, &mut model, 2048, DType::F16, 512)?;
        let opts = GenerateOptions {
            max_new_tokens: 256,
            sampling: SamplingParams {
                seed: 1,
                ..Default::default()
            },
            eos_ids: files.eos_ids(),
            ignore_eos: false,
        };
        let mut messages = vec![];
        for line in std::io::stdin().lock().lines() {
            messages.push(Message::new("user", line?));
            let prompt = files.tokenizer.encode_chat(&messages, true)?;
            let mut text = files.tokenizer.stream_decoder(true);
            let mut reply = String::new();
            gen.generate(&prompt, &opts, &mut |id| {
                let piece = text.push(id).unwrap_or_default();
                print!("{piece}");
                reply += &piece;
                std::io::stdout().flush().is_ok()
            })?;
            reply += &text.finish()?;
            println!();
            messages.push(Message::new("assistant", reply.trim()));
        }
        Ok(())
    }
}

fn main() -> anyllama::Result<()> {
    let path = match std::env::args().nth(1) {
        Some(p) => p.into(),
        None => anyllama::default_model::ensure_default_model()?,
    };
    with_backend(BackendChoice::Auto, None, Chat(ModelFiles::open(&path)?))
}
