//! `anyllama serve`: loads the model on an engine thread (which owns the backend), then serves
//! the OpenAI-compatible API from tokio on the main thread until Ctrl-C or SIGTERM.

use crate::args::{SamplingArgs, ServeArgs};
use crate::run::{ctx_len, kv_dtype, open, sampling, PREFILL_CHUNK};
use anyllama::backend::params::KV_BLOCK;
use anyllama::backend::select::{with_backend, WithBackend};
use anyllama::backend::Backend;
use anyllama::loader::ModelFiles;
use anyllama::sample::SamplingParams;
use anyllama::serve::engine::{self, Engine, EngineConfig, Inbox};
use anyllama::serve::http::{router, ServerState};
use anyllama::tokenizer::Tokenizer;
use anyllama::{Error, Result};
use std::sync::{mpsc, Arc};

/// Tokens of a waiting prompt prefilled per step: long enough for GEMM-speed prefill, short
/// enough that running streams are not held up for long.
const SERVE_PREFILL_CHUNK: usize = 512;

/// What the HTTP side needs to know of the loaded model.
struct Ready {
    tokenizer: Tokenizer,
    name: String,
    defaults: SamplingParams,
    ctx: usize,
    kv_blocks: usize,
}

struct EngineJob {
    files: ModelFiles,
    args: ServeArgs,
    inbox: Inbox,
    ready: mpsc::Sender<Ready>,
}

impl WithBackend for EngineJob {
    type Output = ();
    fn run<B: Backend>(self, b: B) -> Result<()> {
        let (files, a) = (&self.files, &self.args);
        let ctx = ctx_len(files, &a.model);
        if ctx == 0 || a.max_seqs == 0 {
            return Err(Error::Usage("--ctx and --max-seqs must be positive".into()));
        }
        files.cfg.check_context(ctx)?;
        let kv_blocks = a
            .kv_blocks
            .unwrap_or(a.max_seqs.saturating_mul(ctx.div_ceil(KV_BLOCK)));
        let chunk = SERVE_PREFILL_CHUNK.min(PREFILL_CHUNK);
        // The shared cache is as large as one context of kv_blocks * KV_BLOCK positions.
        // A step's activations cover the prompt chunk plus one decode row per sequence.
        let rows = chunk + a.max_seqs;
        files.check_fits(&b, kv_blocks * KV_BLOCK, kv_dtype(&a.model), rows)?;
        let mut model = files.load(&b, a.model.verbose)?;
        if let Some(adapter) = &a.model.lora {
            adapter.apply(&b, &mut model)?;
            eprintln!("adapter: {}", adapter.describe(&model));
        }
        let cfg = EngineConfig {
            max_seqs: a.max_seqs,
            ctx_len: ctx,
            kv_blocks,
            kv_dtype: kv_dtype(&a.model),
            prefill_chunk: chunk,
            eos_ids: files.eos_ids(),
            tokenizer: files.tokenizer.clone(),
            prefix_cache: !a.no_prefix_cache,
        };
        let engine = Engine::new(&b, &mut model, cfg)?;
        eprintln!(
            "model: {} on {} ({} sequences, {} KV blocks of {KV_BLOCK})",
            files.name(),
            b.device_name(),
            a.max_seqs,
            kv_blocks
        );
        let ready = Ready {
            tokenizer: files.tokenizer.clone(),
            name: files.name(),
            defaults: defaults(files),
            ctx,
            kv_blocks,
        };
        engine.run(self.inbox, || {
            let _ = self.ready.send(ready);
        })
    }
}

/// The defaults a request's fields override: generation_config.json's, as for `chat`.
fn defaults(files: &ModelFiles) -> SamplingParams {
    let none = SamplingArgs {
        n_predict: None,
        temp: None,
        top_k: None,
        top_p: None,
        min_p: None,
        repeat_penalty: None,
        repeat_last_n: 64,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        seed: 0,
        stop: Vec::new(),
        ignore_eos: false,
    };
    sampling(files, &none)
}

pub fn serve(mut a: ServeArgs) -> Result<()> {
    if a.ctx.is_some() {
        a.model.ctx_size = a.ctx;
    }
    let (handle, inbox) = engine::channel(a.max_queue);
    let (ready_tx, ready_rx) = mpsc::channel();
    let (backend, adapter) = (a.model.backend.into(), a.model.adapter);
    let args = a.clone();
    // The model files are opened on the engine thread: the backend and everything loaded on it
    // stay there.
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let files = open(&args.model, true)?;
            let job = EngineJob {
                files,
                args,
                inbox,
                ready: ready_tx,
            };
            with_backend(backend, adapter, job)
        })?;
    let Ok(ready) = ready_rx.recv() else {
        // The engine ended before it was ready: its error says why.
        return thread
            .join()
            .unwrap_or_else(|p| Err(Error::Generation(Error::panic_message(p.as_ref()))));
    };

    let state = Arc::new(ServerState::new(
        handle.clone(),
        ready.tokenizer,
        ready.name,
        ready.ctx,
        ready.kv_blocks,
        a.api_key.clone(),
        ready.defaults,
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served: Result<()> = rt.block_on(async {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::Usage(format!("cannot listen on {addr}: {e}")))?;
        let local = listener.local_addr()?;
        eprintln!("listening on http://{local}");
        let stop = handle.clone();
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("shutting down: cancelling running requests");
                // The engine ends every stream, so that the open connections can close.
                stop.shutdown();
            })
            .await?;
        Ok(())
    });
    handle.shutdown();
    drop(handle);
    let engine = thread
        .join()
        .unwrap_or_else(|p| Err(Error::Generation(Error::panic_message(p.as_ref()))));
    served.and(engine)
}

/// Ctrl-C, or SIGTERM where there is one.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
