//! `anyllama bench`: speed of a model (a file, or a synthetic model of a real shape with random
//! weights made on the device) on one backend, generic over `B: Backend`.
//!
//! Measurements, in this order (bench/NOTES.md has the timing rules):
//! 1. decode: prompt of `prompt_tokens` random ids, `gen_tokens` generated greedily ignoring
//!    EOS; tokens/s over the tokens after the first; time to first token from the same runs;
//!    peak device memory over this measurement;
//! 2. prefill: prompts of each `prefill` length, tokens / time to first token;
//! 3. long context: `long_ctx_gen` tokens decoded after a prompt of `long_ctx` tokens;
//! 4. copy bandwidth of the device (unless given), for the fraction the decode achieves.
//!
//! Files: synthetic.rs (shapes, on-device random weights), measure.rs (timings),
//! report.rs (table, JSON fields).

pub mod measure;
pub mod report;
pub mod synthetic;
pub mod train;

use crate::backend::select::WithBackend;
use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::Result;
use crate::loader::ModelFiles;
use crate::model::Model;
use measure::{median, Budget, RunSettings};
use report::Row;
use synthetic::Shape;

/// Which model to measure.
pub enum ModelSpec {
    /// Random weights of a real shape, all matrices in `dtype`.
    Synthetic { shape: &'static Shape, dtype: DType },
    /// A model folder or GGUF file, loaded as `anyllama run` loads it.
    Files(Box<ModelFiles>),
}

impl ModelSpec {
    pub fn name(&self) -> String {
        match self {
            ModelSpec::Synthetic { shape, .. } => shape.name.to_string(),
            ModelSpec::Files(f) => f.name(),
        }
    }

    /// The weight dtype for the report: the synthetic one, or the file's most common.
    fn dtype_label<B: Backend>(&self, model: &Model<B>) -> String {
        match self {
            ModelSpec::Synthetic { dtype, .. } => dtype.to_string(),
            ModelSpec::Files(_) => model
                .w
                .layers
                .first()
                .map_or(model.w.tok_embeddings.dtype, |l| l.w1.dtype)
                .to_string(),
        }
    }
}

/// What to measure and how often.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Timed runs of each measurement after its warm-up.
    pub runs: usize,
    /// Prompt lengths of the prefill measurements.
    pub prefill: Vec<usize>,
    /// Prompt length of the long-context decode measurement; 0 skips it.
    pub long_ctx: usize,
    pub long_ctx_gen: usize,
    /// Tokens per prefill forward call.
    pub chunk: usize,
    pub kv_dtype: DType,
    /// Bandwidth to compare against in GB/s; None measures a device copy of `copy_bytes`.
    pub bandwidth_gbps: Option<f64>,
    pub copy_bytes: usize,
    /// Soft limit per backend: repetitions stop, and later measurements are skipped, once it
    /// is spent. 0: no limit.
    pub max_seconds: f64,
    pub seed: u64,
    /// A LoRA adapter applied unmerged to a model from files (its cost is measured with it).
    pub lora: Option<crate::train::adapter::AdapterSpec>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            prompt_tokens: 128,
            gen_tokens: 256,
            runs: 5,
            prefill: vec![512, 2048],
            long_ctx: 8192,
            long_ctx_gen: 32,
            chunk: 2048,
            kv_dtype: DType::F16,
            bandwidth_gbps: None,
            copy_bytes: 1 << 30,
            max_seconds: 300.0,
            seed: 0,
            lora: None,
        }
    }
}

/// Runs every measurement of `opts` for `spec` on `b`.
pub fn bench_backend<B: Backend>(b: &B, spec: &ModelSpec, opts: &BenchOptions) -> Result<Row> {
    let budget = Budget::new(opts.max_seconds);
    let mut model = match spec {
        ModelSpec::Synthetic { shape, dtype } => {
            synthetic::synthetic_model(b, shape, *dtype, opts.seed)?
        }
        ModelSpec::Files(f) => f.load(b, true)?,
    };
    if let Some(adapter) = &opts.lora {
        adapter.apply(b, &mut model)?;
    }
    b.sync()?;
    let mut row = Row {
        harness: "anyllama".into(),
        backend: b.name().into(),
        device: b.device_name(),
        model: match &opts.lora {
            Some(a) => format!("{} + LoRA {}", spec.name(), a.dir.display()),
            None => spec.name(),
        },
        dtype: spec.dtype_label(&model),
        kv_dtype: opts.kv_dtype.to_string(),
        weights_bytes: Some(model.w.bytes() as u64),
        bytes_per_token: Some(measure::weight_bytes_per_token(&model.w) as u64),
        prompt_tokens: opts.prompt_tokens,
        gen_tokens: opts.gen_tokens,
        ..Default::default()
    };
    let settings = RunSettings {
        kv_dtype: opts.kv_dtype,
        chunk: opts.chunk,
        runs: opts.runs,
        seed: opts.seed,
    };
    let say = |what: &str| eprintln!("bench: {} {}: {what}", b.name(), spec.name());

    // 1. decode at batch 1, with the peak memory of a request of this size
    say("decode");
    b.pool().reset_peak();
    let runs = measure::decode_runs(
        b,
        &mut model,
        opts.prompt_tokens,
        opts.gen_tokens,
        true,
        settings,
        &budget,
    )?;
    row.peak_mem_bytes = Some(b.pool().peak_bytes() as u64);
    row.decode_runs = runs.len();
    row.decode_tok_s_all = runs.iter().map(|r| r.tok_s).collect();
    row.decode_tok_s = median(&row.decode_tok_s_all);
    row.ttft_ms = median(&runs.iter().map(|r| r.ttft_s * 1e3).collect::<Vec<_>>());

    // 2. prefill
    for &n in &opts.prefill {
        if budget.exhausted() {
            row.notes
                .push(format!("prefill {n} skipped: time budget spent"));
            continue;
        }
        say(&format!("prefill {n}"));
        match measure::prefill_runs(b, &mut model, n, settings, &budget) {
            Ok(tok_s) => {
                if let Some(m) = median(&tok_s) {
                    row.prefill_tok_s.insert(n.to_string(), m);
                }
            }
            Err(e) => row.notes.push(format!("prefill {n} failed: {e}")),
        }
    }

    // 3. decode after a long prompt (one run: the kernels are warm by now)
    if opts.long_ctx > 0 {
        // A long prefill cannot be cut short: skip it when the prefill speed measured so far
        // (halved, as attention grows with the context) says it would overrun the budget.
        let slowest_prefill = row
            .prefill_tok_s
            .values()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let estimate = 2.0 * opts.long_ctx as f64 / slowest_prefill;
        if budget.exhausted() || budget.remaining().is_some_and(|left| estimate > left) {
            let why = if budget.exhausted() {
                "time budget spent".to_string()
            } else {
                format!("its prefill would take about {estimate:.0} s, more than the budget left")
            };
            row.notes.push(format!(
                "long-context decode at {} skipped: {why}",
                opts.long_ctx
            ));
        } else {
            say(&format!("decode after {} tokens", opts.long_ctx));
            let once = RunSettings {
                runs: 1,
                ..settings
            };
            let gen = opts.long_ctx_gen.max(2);
            row.long_ctx_tokens = Some(opts.long_ctx);
            row.long_ctx_gen_tokens = Some(gen);
            match measure::decode_runs(b, &mut model, opts.long_ctx, gen, false, once, &budget) {
                Ok(runs) => {
                    row.long_ctx_decode_tok_s =
                        median(&runs.iter().map(|r| r.tok_s).collect::<Vec<_>>())
                }
                Err(e) => row.notes.push(format!(
                    "long-context decode at {} failed: {e}",
                    opts.long_ctx
                )),
            }
        }
    }

    // 4. the bandwidth to compare with, measured with the model's memory given back
    drop(model);
    b.pool().trim();
    match opts.bandwidth_gbps {
        Some(g) => {
            row.bandwidth_gbps = Some(g);
            row.bandwidth_source = Some("given".into());
        }
        None => {
            say("copy bandwidth");
            match measure::copy_bandwidth(b, opts.copy_bytes, 5) {
                Ok(g) => {
                    row.bandwidth_gbps = Some(g);
                    row.bandwidth_source = Some("copy".into());
                }
                Err(e) => row.notes.push(format!("copy bandwidth failed: {e}")),
            }
        }
    }
    row.derive_bandwidth();
    Ok(row)
}

/// `bench_backend` as work for `select::with_backend`.
pub struct BenchJob<'a> {
    pub spec: &'a ModelSpec,
    pub opts: &'a BenchOptions,
}

impl WithBackend for BenchJob<'_> {
    type Output = Row;
    fn run<B: Backend>(self, b: B) -> Result<Row> {
        bench_backend(&b, self.spec, self.opts)
    }
}

/// The row reported for a backend that could not run (`error` says why).
pub fn failed_row(backend: &str, spec: &ModelSpec, dtype: &str, error: String) -> Row {
    Row {
        harness: "anyllama".into(),
        backend: backend.into(),
        model: spec.name(),
        dtype: dtype.into(),
        error: Some(error),
        ..Default::default()
    }
}
