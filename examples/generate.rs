//! Raw completion with the library API, greedy, on the CPU backend:
//!   cargo run --release --example generate -- <model folder or .gguf> "The sky is"

use anyllama::backend::cpu::Cpu;
use anyllama::dtype::DType;
use anyllama::generate::{GenerateOptions, Generator};
use anyllama::loader::ModelFiles;
use anyllama::sample::SamplingParams;
use std::io::Write;

fn main() -> anyllama::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (path, prompt) = match args.as_slice() {
        [_, path, prompt] => (path.clone(), prompt.clone()),
        _ => (
            anyllama::default_model::ensure_default_model()?
                .display()
                .to_string(),
            "The sky is".into(),
        ),
    };
    let files = ModelFiles::open(path.as_ref())?;
    let b = Cpu::new();
    let mut model = files.load(&b, true)?;
    let mut gen = Generator::new(&b, &mut model, 1024, DType::F16, 256)?;
    let opts = GenerateOptions {
        max_new_tokens: 48,
        sampling: SamplingParams::greedy(),
        eos_ids: files.eos_ids(),
        ignore_eos: false,
    };
    let prompt_ids = files.tokenizer.encode(&prompt, true)?;
    let mut text = files.tokenizer.stream_decoder(true);
    print!("{prompt}");
    gen.generate(&prompt_ids, &opts, &mut |id| {
        print!("{}", text.push(id).unwrap_or_default());
        std::io::stdout().flush().is_ok()
    })?;
    println!("{}", text.finish()?);
    Ok(())
}
