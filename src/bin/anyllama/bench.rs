//! `anyllama bench`: the flags turned into `anyllama::bench` options, one row per backend.

use crate::args::{BackendArg, BenchArgs, BenchDtype, CheckpointingArg, KvDtypeArg};
use anyllama::backend::select::with_backend;
use anyllama::bench::report::Report;
use anyllama::bench::{failed_row, BenchJob, BenchOptions, ModelSpec};
use anyllama::dtype::DType;
use anyllama::loader::ModelFiles;
use anyllama::{Error, Result};

fn dtype(d: BenchDtype) -> DType {
    match d {
        BenchDtype::F32 => DType::F32,
        BenchDtype::F16 => DType::F16,
        BenchDtype::Bf16 => DType::BF16,
        BenchDtype::Q8_0 => DType::Q8_0,
        BenchDtype::Q4_0 => DType::Q4_0,
        BenchDtype::Q4_1 => DType::Q4_1,
        BenchDtype::Q4K => DType::Q4K,
        BenchDtype::Q6K => DType::Q6K,
    }
}

fn backend_name(b: BackendArg) -> &'static str {
    match b {
        BackendArg::Auto => "auto",
        BackendArg::Wgpu => "wgpu",
        BackendArg::Cpu => "cpu",
        BackendArg::Cuda => "cuda",
    }
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.train {
        return bench_train(a);
    }
    let spec =
        match (&a.synthetic, &a.model) {
            (Some(name), None) => ModelSpec::Synthetic {
                shape: anyllama::bench::synthetic::shape(name)?,
                dtype: dtype(a.dtype),
            },
            (None, Some(m)) => {
                let path = anyllama::hub::resolve_model_path(m)?;
                ModelSpec::Files(Box::new(ModelFiles::open(&path)?))
            }
            _ => return Err(Error::Usage(
                "bench needs a model: -m <folder | file.gguf | org/name> or --synthetic <shape>"
                    .into(),
            )),
        };
    if a.prompt == 0 || a.gen == 0 {
        return Err(Error::Usage("--prompt and --gen must be positive".into()));
    }
    let opts = BenchOptions {
        prompt_tokens: a.prompt,
        gen_tokens: a.gen,
        runs: a.runs.max(1),
        prefill: a.prefill.iter().copied().filter(|&n| n > 0).collect(),
        long_ctx: a.long_ctx,
        long_ctx_gen: a.long_ctx_gen,
        chunk: a.chunk.max(1),
        kv_dtype: match a.kv_dtype {
            KvDtypeArg::F16 => DType::F16,
            KvDtypeArg::F32 => DType::F32,
        },
        bandwidth_gbps: a.bandwidth,
        copy_bytes: a.copy_mib.max(1) << 20,
        max_seconds: a.max_seconds,
        seed: a.seed,
        lora: a.lora.clone(),
    };
    let dtype_label = match &spec {
        ModelSpec::Synthetic { dtype, .. } => dtype.to_string(),
        ModelSpec::Files(_) => String::new(),
    };
    let mut rows = Vec::new();
    for &backend in &a.backend {
        let job = BenchJob {
            spec: &spec,
            opts: &opts,
        };
        match with_backend(backend.into(), a.adapter, job) {
            Ok(row) => rows.push(row),
            Err(e) => {
                eprintln!("bench: {}: {e}", backend_name(backend));
                rows.push(failed_row(
                    backend_name(backend),
                    &spec,
                    &dtype_label,
                    e.to_string(),
                ))
            }
        }
    }
    let all_failed = rows.iter().all(|r| r.error.is_some());
    let report = Report::new(rows);
    if a.json {
        eprint!("{}", report.table());
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    if all_failed {
        return Err(Error::Device("no backend could run the benchmark".into()));
    }
    Ok(())
}

/// `bench --train`: one row per backend, JSON rows on stdout with --json.
fn bench_train(a: BenchArgs) -> Result<()> {
    use anyllama::backend::select::with_train_backend;
    use anyllama::bench::train::{describe, TrainBenchJob, TrainBenchOptions, TrainRow};
    use anyllama::train::params::Trained;
    use anyllama::train::step::Checkpointing;
    let name = a
        .synthetic
        .as_deref()
        .expect("clap requires --synthetic with --train");
    let o = TrainBenchOptions {
        shape: anyllama::bench::synthetic::shape(name)?,
        dtype: dtype(a.dtype),
        trained: if a.full { Trained::Full } else { Trained::Lora },
        lora_r: a.lora_r,
        batch: a.batch,
        seq: a.seq,
        ckpt: match a.checkpointing {
            CheckpointingArg::Off => Checkpointing::Off,
            CheckpointingArg::Layer => Checkpointing::Layer,
            CheckpointingArg::Offload => Checkpointing::Offload,
        },
        steps: a.steps.max(1),
        max_seconds: a.max_seconds,
        seed: a.seed,
    };
    let mut rows = Vec::new();
    for &backend in &a.backend {
        let row =
            with_train_backend(backend.into(), a.adapter, TrainBenchJob(&o)).unwrap_or_else(|e| {
                let mut r = TrainRow::new(backend_name(backend), &o);
                r.error = Some(e.to_string());
                r
            });
        eprintln!("{}", describe(&row));
        rows.push(row);
    }
    if a.json {
        let text = if rows.len() == 1 {
            serde_json::to_string_pretty(&rows[0])
        } else {
            serde_json::to_string_pretty(&rows)
        };
        println!("{}", text.expect("plain data serialises"));
    }
    if rows.iter().all(|r| r.error.is_some()) {
        return Err(Error::Device(
            "no backend could run the training benchmark".into(),
        ));
    }
    Ok(())
}
