//! What each subcommand does, on whichever backend `--backend` picks.

use crate::args::{
    ChatArgs, ConvertArgs, GenerateArgs, InfoArgs, KvDtypeArg, MergeArgs, ModelArgs, OutDtype,
    SamplingArgs,
};
use anyllama::backend::select::{with_backend, WithBackend};
use anyllama::backend::Backend;
use anyllama::chat_template::Message;
use anyllama::dtype::DType;
use anyllama::generate::{GenerateOptions, Generation, Generator};
use anyllama::loader::ModelFiles;
use anyllama::sample::SamplingParams;
use anyllama::stop::StopMatcher;
use anyllama::{Error, Result};
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Tokens prefilled per forward call: long prompts run as GEMMs of this many rows (on an H100
/// an 8B prompt of 2048 tokens prefills 13% faster in one call than in four of 512; the
/// activations of 2048 rows take ~0.5 GB at the 8B shape).
pub const PREFILL_CHUNK: usize = 2048;

pub fn open(m: &ModelArgs, default_if_missing: bool) -> Result<ModelFiles> {
    let path = match &m.model {
        Some(arg) => anyllama::hub::resolve_model_path(arg)?,
        None if default_if_missing => anyllama::default_model::ensure_default_model()?,
        None => {
            return Err(Error::Usage(
                "no model given: pass -m <folder | file.gguf | org/name>".into(),
            ))
        }
    };
    ModelFiles::open(&path)
}

/// The user's flags over generation_config.json's values over llama.cpp's defaults.
pub fn sampling(files: &ModelFiles, s: &SamplingArgs) -> SamplingParams {
    let mut p = SamplingParams {
        seed: s.seed,
        penalty_last_n: s.repeat_last_n,
        ..Default::default()
    };
    if let Some(g) = &files.generation {
        if g.do_sample == Some(false) {
            p.temperature = 0.0;
        }
        if g.do_sample != Some(false) {
            p.temperature = g.temperature.map_or(p.temperature, |v| v as f32);
        }
        p.top_k = g.top_k.unwrap_or(p.top_k);
        p.top_p = g.top_p.map_or(p.top_p, |v| v as f32);
        p.min_p = g.min_p.map_or(p.min_p, |v| v as f32);
        p.repetition_penalty = g
            .repetition_penalty
            .map_or(p.repetition_penalty, |v| v as f32);
    }
    p.temperature = s.temp.unwrap_or(p.temperature);
    p.top_k = s.top_k.unwrap_or(p.top_k);
    p.top_p = s.top_p.unwrap_or(p.top_p);
    p.min_p = s.min_p.unwrap_or(p.min_p);
    p.repetition_penalty = s.repeat_penalty.unwrap_or(p.repetition_penalty);
    p.presence_penalty = s.presence_penalty;
    p.frequency_penalty = s.frequency_penalty;
    p
}

fn options(files: &ModelFiles, s: &SamplingArgs) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: s
            .n_predict
            .or(files.generation.as_ref().and_then(|g| g.max_new_tokens))
            .unwrap_or(512),
        sampling: sampling(files, s),
        eos_ids: files.eos_ids(),
        ignore_eos: s.ignore_eos,
    }
}

pub fn kv_dtype(m: &ModelArgs) -> DType {
    match m.kv_dtype {
        KvDtypeArg::F16 => DType::F16,
        KvDtypeArg::F32 => DType::F32,
    }
}

/// --ctx, by default the model's context up to 4096 (and up to its sliding window, the longest
/// context it runs exactly).
pub fn ctx_len(files: &ModelFiles, m: &ModelArgs) -> usize {
    let exact = files.cfg.max_exact_context().unwrap_or(usize::MAX);
    m.ctx_size
        .unwrap_or(files.cfg.max_seq_len.min(4096).min(exact))
}

/// Checks that the model and its KV cache fit the device, then uploads the weights with a
/// progress bar and applies --lora; `verbose` adds a line saying what went where.
fn load<B: Backend>(files: &ModelFiles, b: &B, m: &ModelArgs) -> Result<anyllama::model::Model<B>> {
    let verbose = m.verbose;
    files.cfg.check_context(ctx_len(files, m))?;
    files.check_fits(b, ctx_len(files, m), kv_dtype(m), PREFILL_CHUNK)?;
    let mut model = files.load(b, true)?;
    if let Some(adapter) = &m.lora {
        adapter.apply(b, &mut model)?;
        eprintln!("adapter: {}", adapter.describe(&model));
    }
    if verbose {
        let mb = model.w.bytes() as f64 / 1e6;
        eprintln!(
            "loaded {} ({mb:.1} MB of weights) on {}",
            files.name(),
            b.device_name()
        );
    }
    Ok(model)
}

/// A prompt that does not fit the context: an error, or with --truncate its last tokens (after
/// the BOS it starts with, if any), leaving room for the reply.
fn fit_prompt(
    prompt: Vec<u32>,
    ctx: usize,
    max_new_tokens: usize,
    truncate: bool,
    bos: Option<u32>,
) -> Result<Vec<u32>> {
    if prompt.len() < ctx {
        return Ok(prompt);
    }
    if !truncate {
        return Err(Error::Generation(format!(
            "the prompt has {} tokens but the context holds {ctx}; raise -c or shorten the prompt",
            prompt.len()
        )));
    }
    let room = max_new_tokens.clamp(1, (ctx / 2).max(1));
    let keep = ctx.saturating_sub(room).max(1);
    let head = usize::from(bos.is_some() && prompt.first() == bos.as_ref() && keep > 1);
    let mut out = prompt[..head].to_vec();
    out.extend_from_slice(&prompt[prompt.len() - (keep - head)..]);
    eprintln!(
        "prompt: {} tokens do not fit the context of {ctx}; --truncate kept the last {}",
        prompt.len(),
        keep - head
    );
    Ok(out)
}

/// Ctrl-C stops the current generation (a second one exits).
fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    // Setting the handler fails only if one is already set (a second chat turn): keep it.
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    flag
}

/// Streams generated tokens as text to stdout, honouring stop strings.
fn stream_reply<B: Backend>(
    gen: &mut Generator<B>,
    files: &ModelFiles,
    prompt: &[u32],
    opts: &GenerateOptions,
    stops: &[String],
    stop_flag: &AtomicBool,
) -> Result<(String, Generation)> {
    let mut dec = files.tokenizer.stream_decoder(true);
    let mut stop = StopMatcher::new(stops);
    let mut text = String::new();
    let mut err = None;
    let mut out = std::io::stdout().lock();
    let generation = gen.generate(prompt, opts, &mut |id| {
        let piece = match dec.push(id) {
            Ok(p) => p,
            Err(e) => {
                err = Some(e);
                return false;
            }
        };
        let emit = stop.push(&piece);
        text.push_str(&emit);
        let _ = out.write_all(emit.as_bytes()).and_then(|_| out.flush());
        !stop.stopped() && !stop_flag.load(Ordering::SeqCst)
    })?;
    if let Some(e) = err {
        return Err(e);
    }
    if !stop.stopped() {
        let tail = stop.push(&dec.finish()?) + &stop.finish();
        text.push_str(&tail);
        let _ = out.write_all(tail.as_bytes());
    }
    let _ = out.flush();
    Ok((text, generation))
}

fn report(verbose: bool, g: &Generation) {
    if verbose {
        let s = &g.stats;
        eprintln!(
            "\nprompt: {} tokens ({} cached) in {:.3} s, {:.1} tok/s | decode: {} tokens in {:.3} s, {:.1} tok/s | stop: {:?}",
            s.prompt_tokens, s.cached_tokens, s.prompt_time.as_secs_f64(), s.prompt_tok_s(),
            s.generated_tokens, s.decode_time.as_secs_f64(), s.decode_tok_s(), g.reason
        );
    }
}

struct GenerateJob {
    files: ModelFiles,
    args: GenerateArgs,
}

impl WithBackend for GenerateJob {
    type Output = ();
    fn run<B: Backend>(self, b: B) -> Result<()> {
        let (files, a) = (&self.files, &self.args);
        let opts = options(files, &a.sampling);
        let prompt = fit_prompt(
            files.tokenizer.encode(&a.prompt, true)?,
            ctx_len(files, &a.model),
            opts.max_new_tokens,
            a.model.truncate,
            files.tokenizer.bos_id(),
        )?;
        let mut model = load(files, &b, &a.model)?;
        let mut gen = Generator::new(
            &b,
            &mut model,
            ctx_len(files, &a.model),
            kv_dtype(&a.model),
            PREFILL_CHUNK,
        )?;
        let flag = interrupt_flag();
        let (_, g) = stream_reply(&mut gen, files, &prompt, &opts, &a.sampling.stop, &flag)?;
        println!();
        report(a.model.verbose, &g);
        Ok(())
    }
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let files = open(&a.model, false)?;
    with_backend(
        a.model.backend.into(),
        a.model.adapter,
        GenerateJob { files, args: a },
    )
}

struct ChatJob {
    files: ModelFiles,
    args: ChatArgs,
}

impl WithBackend for ChatJob {
    type Output = ();
    fn run<B: Backend>(self, b: B) -> Result<()> {
        let (files, a) = (&self.files, &self.args);
        let mut model = load(files, &b, &a.model)?;
        let mut gen = Generator::new(
            &b,
            &mut model,
            ctx_len(files, &a.model),
            kv_dtype(&a.model),
            PREFILL_CHUNK,
        )?;
        let opts = options(files, &a.sampling);
        let mut messages: Vec<Message> = Vec::new();
        if let Some(sys) = &a.system {
            messages.push(Message::new("system", sys));
        }
        let flag = interrupt_flag();
        let mut turn = |messages: &mut Vec<Message>, user: &str| -> Result<()> {
            messages.push(Message::new("user", user));
            let prompt = fit_prompt(
                files.tokenizer.encode_chat(messages, true)?,
                ctx_len(files, &a.model),
                opts.max_new_tokens,
                a.model.truncate,
                files.tokenizer.bos_id(),
            )?;
            flag.store(false, Ordering::SeqCst);
            let (reply, g) =
                stream_reply(&mut gen, files, &prompt, &opts, &a.sampling.stop, &flag)?;
            println!();
            report(a.model.verbose, &g);
            messages.push(Message::new("assistant", reply.trim()));
            Ok(())
        };
        if let Some(p) = &a.prompt {
            return turn(&mut messages, p);
        }
        eprintln!(
            "chat with {} ({}); empty line or Ctrl-D to quit, /reset to forget the conversation",
            files.name(),
            b.device_name()
        );
        let stdin = std::io::stdin();
        loop {
            eprint!("> ");
            let mut line = String::new();
            if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            if line.trim() == "/reset" {
                messages.retain(|m| m.role == "system");
                continue;
            }
            turn(&mut messages, line.trim_end_matches(['\n', '\r']))?;
        }
        Ok(())
    }
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let files = open(&a.model, true)?;
    with_backend(
        a.model.backend.into(),
        a.model.adapter,
        ChatJob { files, args: a },
    )
}

pub fn info(a: InfoArgs) -> Result<()> {
    let m = ModelArgs {
        model: a.model,
        backend: crate::args::BackendArg::Cpu,
        adapter: None,
        ctx_size: None,
        truncate: false,
        kv_dtype: KvDtypeArg::F16,
        verbose: false,
        lora: None,
    };
    let files = open(&m, true)?;
    print!("{}", files.describe());
    Ok(())
}

pub fn devices() -> Result<()> {
    print!("{}", anyllama::backend::select::describe_devices());
    Ok(())
}

fn out_dtype(d: OutDtype) -> DType {
    match d {
        OutDtype::F32 => DType::F32,
        OutDtype::F16 => DType::F16,
        OutDtype::Bf16 => DType::BF16,
        OutDtype::Q8_0 => DType::Q8_0,
        OutDtype::Q4_0 => DType::Q4_0,
        OutDtype::Q4_1 => DType::Q4_1,
    }
}

/// A byte-count progress bar for writing model files, and its callback.
fn bytes_bar(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{bytes}}/{{total_bytes}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let dtype = out_dtype(a.dtype);
    let bar = bytes_bar("converting");
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let input = anyllama::hub::resolve_model_path(&a.input.display().to_string())?;
    if input.is_dir() {
        anyllama::convert::hf_to_gguf(&input, &a.output, dtype, &progress)?;
    } else {
        anyllama::convert::gguf_to_hf(&input, &a.output, dtype, &progress)?;
    }
    bar.finish_and_clear();
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let bar = bytes_bar("merging");
    let progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let base = anyllama::hub::resolve_model_path(&a.model)?;
    let dtype = out_dtype(a.dtype);
    anyllama::train::merge::merge(&base, &a.lora.dir, a.lora.scale, &a.out, dtype, &progress)?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} (adapter {} merged)",
        a.out.display(),
        a.lora.dir.display()
    );
    Ok(())
}
