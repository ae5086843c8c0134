//! `anyllama bench`: the flags turned into `anyllama::bench` options, one row per backend.

use crate::args::{BackendArg, BenchArgs, BenchDtype, KvDtypeArg};
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
