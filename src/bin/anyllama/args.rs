//! Command-line flags (llama.cpp-style names where they exist).

use anyllama::backend::select::BackendChoice;
use anyllama::train::adapter::AdapterSpec;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "anyllama",
    version,
    about = "Llama-family language models on any GPU"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Raw text completion: prints only the generated text on stdout.
    Generate(GenerateArgs),
    /// Chat with the model's chat template (one answer with -p, else interactive).
    Chat(ChatArgs),
    /// Describe a model: config, tensor dtypes and sizes, tokenizer, chat template.
    Info(InfoArgs),
    /// List GPU adapters with their backend, features and limits.
    Devices,
    /// Convert between a GGUF file and an HF folder (direction from the input).
    Convert(ConvertArgs),
    /// Measure speed: decode and prefill tokens/s, time to first token, peak memory and the
    /// fraction of memory bandwidth used, per backend (bench/NOTES.md has the timing rules).
    Bench(BenchArgs),
    /// Fine-tune a model on a JSONL dataset: LoRA adapters (PEFT format) or every weight.
    Train(Box<TrainArgs>),
    /// Merge a LoRA adapter into its base model: an HF folder or, for OUT.gguf, a GGUF file.
    Merge(MergeArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat, completions, streaming).
    Serve(ServeArgs),
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model: an HF folder, a .gguf file, or org/name resolved in the local HF cache.
    /// `chat` without -m uses the default model (SmolLM2-135M-Instruct), fetching it once.
    #[arg(short = 'm', long = "model")]
    pub model: Option<String>,
    /// Where to run: auto picks a GPU adapter, else the CPU.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Index of the GPU adapter to use (see `anyllama devices`).
    #[arg(long)]
    pub adapter: Option<usize>,
    /// Context size in tokens (default: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// A prompt longer than the context keeps its end (and its BOS) instead of failing.
    #[arg(long)]
    pub truncate: bool,
    /// KV cache storage type.
    #[arg(long, value_enum, default_value_t = KvDtypeArg::F16)]
    pub kv_dtype: KvDtypeArg,
    /// Print load details and timings (prompt and decode tokens/s) on stderr.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Apply a LoRA adapter (a PEFT folder, ours or PEFT's) unmerged; SCALE multiplies its
    /// alpha/r scale (default 1).
    #[arg(long, value_name = "DIR[:SCALE]")]
    pub lora: Option<AdapterSpec>,
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Tokens to generate at most (default: generation_config.json's max_new_tokens, else 512).
    #[arg(short = 'n', long = "n-predict")]
    pub n_predict: Option<usize>,
    /// Temperature; 0 means greedy (default: generation_config.json, else 0.8).
    #[arg(long = "temp")]
    pub temp: Option<f32>,
    /// Keep the K most likely tokens, 0 = off (default 40).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling mass, 1.0 = off (default 0.95).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Drop tokens below this fraction of the best token's probability (default 0.05).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Penalise repeated tokens (HF repetition_penalty), 1.0 = off.
    #[arg(long = "repeat-penalty")]
    pub repeat_penalty: Option<f32>,
    /// Tokens the penalties look back over, 0 = all.
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// OpenAI-style presence penalty.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// OpenAI-style frequency penalty.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed: the same seed gives the same output.
    #[arg(short = 's', long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable); it is not printed.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The text to continue.
    #[arg(short = 'p', long)]
    pub prompt: String,
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Answer this one message and exit (only the reply goes to stdout).
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
}

#[derive(Args, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the one taken is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every request but /health.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Sequences generated at once.
    #[arg(long, default_value_t = 16)]
    pub max_seqs: usize,
    /// Context per sequence in tokens (same as -c; default: the model's, at most 4096).
    #[arg(long = "ctx")]
    pub ctx: Option<usize>,
    /// Blocks of 16 positions in the shared KV cache (default: --max-seqs full contexts).
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// Requests that may wait for a free sequence; beyond them the server answers 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Compute every prompt in full instead of sharing the KV blocks of prefixes that earlier
    /// requests computed (system prompts, a chat's earlier turns).
    #[arg(long)]
    pub no_prefix_cache: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    /// Model: an HF folder, a .gguf file, or org/name in the local HF cache.
    #[arg(short = 'm', long = "model")]
    pub model: Option<String>,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// A .gguf file (written out as an HF folder) or an HF folder (written out as a .gguf file).
    pub input: std::path::PathBuf,
    /// The folder or .gguf file to write.
    pub output: std::path::PathBuf,
    /// Storage type of the written weights: f32, f16, bf16 (both directions), q8_0, q4_0, q4_1
    /// (to GGUF only).
    #[arg(long, value_enum, default_value_t = OutDtype::F16)]
    pub dtype: OutDtype,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutDtype {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
}

#[derive(Args)]
pub struct BenchArgs {
    /// Model to measure: an HF folder, a .gguf file, or org/name in the local HF cache.
    #[arg(short = 'm', long = "model", conflicts_with = "synthetic")]
    pub model: Option<String>,
    /// Instead of a model file: random weights of a real shape, made on the device
    /// (smollm2-135m, llama-3.2-1b, llama-3.1-8b; tiny for tests).
    #[arg(long)]
    pub synthetic: Option<String>,
    /// Weight storage type of the synthetic model.
    #[arg(long, value_enum, default_value_t = BenchDtype::Bf16, requires = "synthetic")]
    pub dtype: BenchDtype,
    /// Backends to measure, comma-separated (e.g. wgpu,cuda); each gets a row.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "auto")]
    pub backend: Vec<BackendArg>,
    /// Index of the GPU adapter to use (see `anyllama devices`).
    #[arg(long)]
    pub adapter: Option<usize>,
    /// Prompt tokens of the decode measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    /// Tokens generated per decode run (EOS ignored).
    #[arg(long, default_value_t = 256)]
    pub gen: usize,
    /// Timed runs per measurement, after one warm-up; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Prompt lengths of the prefill measurements, comma-separated (0 for none).
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    pub prefill: Vec<usize>,
    /// Prompt length of the long-context decode measurement (0 skips it).
    #[arg(long, default_value_t = 8192)]
    pub long_ctx: usize,
    /// Tokens decoded after the long prompt.
    #[arg(long, default_value_t = 32)]
    pub long_ctx_gen: usize,
    /// Tokens per prefill forward call (the default is `run`'s and `chat`'s).
    #[arg(long, default_value_t = 2048)]
    pub chunk: usize,
    /// KV cache storage type.
    #[arg(long, value_enum, default_value_t = KvDtypeArg::F16)]
    pub kv_dtype: KvDtypeArg,
    /// Memory bandwidth to compare decode against, in GB/s (default: measured with a large
    /// device copy, read + write bytes).
    #[arg(long)]
    pub bandwidth: Option<f64>,
    /// MiB per buffer of the bandwidth copy.
    #[arg(long, default_value_t = 1024)]
    pub copy_mib: usize,
    /// Soft time limit per backend in seconds: repetitions stop and later measurements are
    /// skipped once spent (0: none).
    #[arg(long, default_value_t = 300.0)]
    pub max_seconds: f64,
    /// Seed of the random weights and prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Measure training instead of inference (synthetic shapes; cuda or cpu): tokens/s,
    /// peak memory and MFU of LoRA (or --full) steps over packed random sequences.
    #[arg(long, requires = "synthetic")]
    pub train: bool,
    /// With --train: fine-tune every weight instead of LoRA adapters.
    #[arg(long, requires = "train")]
    pub full: bool,
    /// With --train: LoRA rank on all seven projections (alpha = rank).
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// With --train: sequences per step.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// With --train: tokens per sequence.
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// With --train: gradient checkpointing.
    #[arg(long, value_enum, default_value_t = CheckpointingArg::Layer)]
    pub checkpointing: CheckpointingArg,
    /// With --train: most measured steps (after two warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Apply a LoRA adapter (a PEFT folder) to the -m model, unmerged.
    #[arg(long, value_name = "DIR[:SCALE]", requires = "model")]
    pub lora: Option<AdapterSpec>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointingArg {
    /// Keep every layer's activations.
    Off,
    /// Keep each layer's input; recompute the layer in backward.
    Layer,
    /// As layer, with the inputs in host memory.
    Offload,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BenchDtype {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q6_k")]
    Q6K,
}

#[derive(Clone, Copy, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendArg {
    Auto,
    Wgpu,
    Cpu,
    Cuda,
}

impl From<BackendArg> for BackendChoice {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Wgpu => BackendChoice::Wgpu,
            BackendArg::Cpu => BackendChoice::Cpu,
            BackendArg::Cuda => BackendChoice::Cuda,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KvDtypeArg {
    F16,
    F32,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Base model: an HF folder, a .gguf file (quantized bases train through: QLoRA), or
    /// org/name in the local HF cache.
    #[arg(short = 'm', long = "model")]
    pub model: String,
    /// Training data, JSONL: {"messages": [...]}, {"prompt", "completion"}, Alpaca
    /// {"instruction", "input", "output"} or {"text"}, detected per line.
    #[arg(long)]
    pub data: PathBuf,
    /// Where the adapter (or the fine-tuned model), checkpoints, log.jsonl and loss.png go.
    #[arg(long, default_value = "train-out")]
    pub out: PathBuf,
    /// Continue a run: a checkpoint folder, or a run's --out folder (its latest checkpoint).
    /// The other flags must be the run's own.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Where to train (wgpu does not train yet).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// CUDA device index.
    #[arg(long)]
    pub adapter: Option<usize>,

    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub lora_r: usize,
    /// LoRA alpha (the adapter's output is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f32,
    /// Dropout on the adapters' inputs.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f32,
    /// Projections that get adapters, comma-separated (q,k,v,o,gate,up,down; HF names such as
    /// q_proj work too).
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub targets: Vec<String>,
    /// Rank-stabilized LoRA: scale alpha / sqrt(r).
    #[arg(long)]
    pub rslora: bool,
    /// Fine-tune every weight instead of LoRA adapters (writes an HF folder).
    #[arg(long)]
    pub full: bool,

    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f32,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    pub schedule: ScheduleArg,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Passes over the data (ignored with --max-steps).
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Optimizer steps to run instead of whole epochs.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Sequences per micro-batch (with --packing: batch * seq tokens per micro-batch).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Tokens per sample at most; longer samples are truncated.
    #[arg(long, default_value_t = 2048)]
    pub seq: usize,
    /// Pack samples one after another into each micro-batch (attention stays inside each
    /// sample), instead of batching samples of similar length.
    #[arg(long)]
    pub packing: bool,
    /// Loss on the answers (assistant turns, completions, outputs) or on every token.
    #[arg(long, value_enum, default_value_t = LossOnArg::Answers)]
    pub loss_on: LossOnArg,
    /// Skip and count lines that cannot be used instead of stopping at the first.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Clip the gradient norm to this (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Seed of the adapters' initialization, the data order and dropout.
    #[arg(long, default_value_t = 3407)]
    pub seed: u64,
    /// Gradient checkpointing (default: the least the memory plan needs).
    #[arg(long, value_enum)]
    pub checkpointing: Option<CheckpointingArg>,

    /// Held-out JSONL (same formats) to evaluate on.
    #[arg(long, value_name = "FILE")]
    pub eval: Option<PathBuf>,
    /// Evaluate every N steps (and at the end).
    #[arg(long, default_value_t = 100, requires = "eval")]
    pub eval_every: usize,
    /// Save a checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 500)]
    pub save_every: usize,
    /// Keep only the newest N checkpoints.
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Write a log line (and log.jsonl entry) every N steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Progress: a bar on a terminal, plain lines otherwise.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
    /// Storage type of the fine-tuned model's weights (--full).
    #[arg(long, value_enum, default_value_t = FloatDtype::Bf16)]
    pub save_dtype: FloatDtype,
}

#[derive(Args)]
pub struct MergeArgs {
    /// Base model: an HF folder or a .gguf file.
    #[arg(short = 'm', long = "model")]
    pub model: String,
    /// The adapter to merge (a PEFT folder); SCALE multiplies its alpha/r scale.
    #[arg(long, value_name = "DIR[:SCALE]")]
    pub lora: AdapterSpec,
    /// Output: a folder (HF) or a file ending in .gguf.
    #[arg(long)]
    pub out: PathBuf,
    /// Storage type of the merged weights: f32, f16, bf16, or for GGUF also q8_0, q4_0, q4_1.
    #[arg(long, value_enum, default_value_t = OutDtype::Bf16)]
    pub dtype: OutDtype,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleArg {
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOnArg {
    Answers,
    All,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressArg {
    Auto,
    Bar,
    Lines,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FloatDtype {
    F32,
    F16,
    Bf16,
}
