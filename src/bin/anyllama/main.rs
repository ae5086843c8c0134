//! The anyllama command line: generate, chat, info, devices, convert, bench.

mod args;
mod bench;
mod run;

use args::{Cli, Command};
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("ANYLLAMA_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => run::generate(a),
        Command::Chat(a) => run::chat(a),
        Command::Info(a) => run::info(a),
        Command::Devices => run::devices(),
        Command::Convert(a) => run::convert(a),
        Command::Bench(a) => bench::bench(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
