//! The anyllama command line: generate, chat, info, devices, convert, bench, train, merge,
//! serve.
//!
//! Every failure ends as one line `error: <what>: <why>` on stderr (plus a `hint:` line where
//! one helps) and a non-zero exit code. A panic anywhere is a bug: it is reported the same way
//! instead of as a Rust backtrace, with its location so that it can be reported.

mod args;
mod bench;
mod run;
mod serve;
mod train;

use args::{Cli, Command};
use clap::Parser;
use std::process::ExitCode;
use std::sync::Mutex;

/// Where the last panic happened, recorded by the panic hook for the final error line.
static PANIC_AT: Mutex<Option<String>> = Mutex::new(None);

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("ANYLLAMA_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Panics inside libraries that are contained (tokenizers, templates) become ordinary
    // errors; the default hook would still print them, so the hook only records where they
    // happened. RUST_BACKTRACE keeps the default output for debugging.
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            *PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
        }));
    }
    let result = std::panic::catch_unwind(|| match cli.command {
        Command::Generate(a) => run::generate(a),
        Command::Chat(a) => run::chat(a),
        Command::Info(a) => run::info(a),
        Command::Devices => run::devices(),
        Command::Convert(a) => run::convert(a),
        Command::Bench(a) => bench::bench(a),
        Command::Train(a) => train::train(*a),
        Command::Merge(a) => run::merge(a),
        Command::Serve(a) => serve::serve(a),
    });
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            if let Some(hint) = e.hint() {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
        Err(payload) => {
            let msg = anyllama::Error::panic_message(payload.as_ref());
            let at = PANIC_AT.lock().unwrap_or_else(|e| e.into_inner()).take();
            eprintln!(
                "error: internal: {msg}{}",
                at.map(|a| format!(" (at {a})")).unwrap_or_default()
            );
            eprintln!("hint: this is a bug in anyllama; please report it with the command line");
            ExitCode::from(101)
        }
    }
}
