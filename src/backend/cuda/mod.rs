//! The CUDA backend: the same `Backend` ops as wgpu, as NVRTC-compiled kernels
//! (shaders/cuda/<op>.cu, same stems as shaders/wgsl/) on one cudarc stream, with cuBLAS for
//! prefill GEMMs and CUDA graphs for decode steps. cudarc loads libcuda, libnvrtc and libcublas
//! at run time, so the crate builds without the CUDA toolkit; `Cuda::new` checks the libraries
//! are there before touching them (cudarc panics on a missing library) and returns an error.
//!
//! Files: kernels.rs (NVRTC compile + disk cache), launch.rs (device pointers, launches,
//! scratch buffers), fused.rs (mat-vecs with the RMSNorm folded in), gemm.rs (cuBLAS GEMMs), attention_gemm.rs (long prefills'
//! attention on cuBLAS), graph.rs (decode-step capture and replay), readback.rs (reads that
//! do not wait), profile.rs (per-kernel GPU times), ops.rs (the `Backend` impl: sizes,
//! checks, launch shapes); training: train.rs (the `TrainBackend` impl), train_attention.rs
//! (packed-batch rope and attention, forward and backward), train_loss.rs (cross_entropy),
//! train_params.rs (the training kernels' params blocks).

/// Name of the kernel for weight dtype `d` (the `<prefix><dtype><suffix>` names that the .cu
/// macros stamp out, e.g. `matvec_bf16`, `widen_q4k_f16`).
macro_rules! by_dtype {
    ($prefix:literal, $d:expr) => {
        by_dtype!($prefix, $d, "")
    };
    ($prefix:literal, $d:expr, $suffix:literal) => {
        match $d {
            DType::F32 => concat!($prefix, "f32", $suffix),
            DType::F16 => concat!($prefix, "f16", $suffix),
            DType::BF16 => concat!($prefix, "bf16", $suffix),
            DType::Q8_0 => concat!($prefix, "q8_0", $suffix),
            DType::Q4_0 => concat!($prefix, "q4_0", $suffix),
            DType::Q4_1 => concat!($prefix, "q4_1", $suffix),
            DType::Q4K => concat!($prefix, "q4k", $suffix),
            DType::Q6K => concat!($prefix, "q6k", $suffix),
        }
    };
}

mod attention_gemm;
mod fused;
mod gemm;
mod graph;
mod kernels;
mod launch;
mod ops;
mod profile;
mod readback;
mod rows;
mod train;
mod train_attention;
mod train_loss;
mod train_params;

pub use kernels::{compile, SOURCES};
pub use launch::DevBuf;

use crate::error::{Error, Result};
use crate::pool::Pool;
use cudarc::driver::{CudaContext, CudaStream};
use std::sync::Arc;

/// How to open the backend.
#[derive(Clone, Debug, Default)]
pub struct CudaOptions {
    /// CUDA device ordinal (0 when None).
    pub device: Option<usize>,
    /// Prefill GEMMs in f32 from weights widened exactly (as the CPU reference computes) instead
    /// of on tensor cores with activations rounded to the weights' f16/bf16, and long-prefill
    /// attention in f32 instead of on tensor cores with Q, K, V and the softmax weights in f16.
    /// Tests use it for exact parity; `ANYLLAMA_CUDA_EXACT=1` sets it for `Cuda::new`.
    pub exact: bool,
    /// Never record decode steps as CUDA graphs (`ANYLLAMA_CUDA_GRAPHS=0` for `Cuda::new`).
    pub no_graphs: bool,
    /// Contexts (positions) up to which decode attention runs one block per query head instead
    /// of split-KV plus a combine pass; None: the built-in default, 0: always split.
    /// `ANYLLAMA_CUDA_SHORT_ATTN=<positions>` sets it for `Cuda::new`.
    pub short_decode_positions: Option<usize>,
}

pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: kernels::Kernels,
    blas: gemm::Blas,
    scratch: launch::ScratchBufs,
    graphs: graph::Graphs,
    /// Reads in flight (read_start / read_finish).
    readbacks: std::sync::Mutex<readback::Readbacks>,
    /// Per-kernel GPU times (`ANYLLAMA_CUDA_PROFILE=1`), else None.
    profile: Option<profile::Profile>,
    pool: Arc<Pool<Cuda>>,
    name: String,
    arch: String,
    exact: bool,
    /// CudaOptions::short_decode_positions, resolved.
    short_decode: usize,
}

/// Why CUDA cannot be used here, or None when the driver library is present and sees a device.
pub fn unavailable_reason() -> Option<String> {
    // cudarc panics inside its loaders when a library is missing: ask first.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no CUDA driver (libcuda) found".into());
    }
    match CudaContext::device_count() {
        Ok(0) => Some("the CUDA driver sees no device".into()),
        Ok(_) => None,
        Err(e) => Some(format!("the CUDA driver failed to start: {e}")),
    }
}

/// Whether NVRTC (the runtime CUDA compiler) can be loaded here.
pub fn nvrtc_available() -> bool {
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn flag(name: &str) -> Option<bool> {
    std::env::var(name).ok().map(|v| v != "0" && !v.is_empty())
}

fn positions(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| Error::Device(format!("{name}={v:?}: expected a number of positions"))),
    }
}

impl Cuda {
    /// Opens device `device` (0 when None); options from the environment (see CudaOptions).
    pub fn new(device: Option<usize>) -> Result<Cuda> {
        Cuda::with_options(CudaOptions {
            device,
            exact: flag("ANYLLAMA_CUDA_EXACT").unwrap_or(false),
            no_graphs: !flag("ANYLLAMA_CUDA_GRAPHS").unwrap_or(true),
            short_decode_positions: positions("ANYLLAMA_CUDA_SHORT_ATTN")?,
        })
    }

    pub fn with_options(o: CudaOptions) -> Result<Cuda> {
        if let Some(why) = unavailable_reason() {
            return Err(Error::Device(why));
        }
        if !nvrtc_available() {
            return Err(Error::Device(
                "CUDA driver found but not NVRTC (libnvrtc), which compiles the kernels".into(),
            ));
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device(
                "CUDA driver found but not cuBLAS (libcublas)".into(),
            ));
        }
        let dev = |e: cudarc::driver::DriverError| Error::Device(format!("CUDA: {e}"));
        let ordinal = o.device.unwrap_or(0);
        let ctx = CudaContext::new(ordinal).map_err(dev)?;
        // One in-order stream: the Backend contract needs no cross-stream events. Not the
        // legacy default stream, which cannot be captured into a graph.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(dev)?;
        let (major, minor) = ctx.compute_capability().map_err(dev)?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name().map_err(dev)?;
        let kernels = kernels::Kernels::load(&ctx, &arch)?;
        let blas = gemm::Blas::new(&stream)?;
        let profile = flag("ANYLLAMA_CUDA_PROFILE").unwrap_or(false);
        Ok(Cuda {
            scratch: launch::ScratchBufs::default(),
            readbacks: Default::default(),
            // Profiling times each launch on its own: no graphs then.
            graphs: graph::Graphs::new(!o.no_graphs && !profile),
            profile: profile.then(profile::Profile::default),
            pool: Arc::new(Pool::default()),
            ctx,
            stream,
            kernels,
            blas,
            name,
            arch,
            exact: o.exact,
            short_decode: o
                .short_decode_positions
                .unwrap_or(ops::SHORT_DECODE_DEFAULT),
        })
    }

    /// Compute capability as NVRTC names it ("sm_90").
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| Error::Device(format!("CUDA: {e}")))
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            let _ = self.stream.synchronize();
            eprint!("{}", p.report());
        }
        if flag("ANYLLAMA_CUDA_DEBUG").unwrap_or(false) {
            let [captured, replayed, plain] = *self.graphs.counts.lock().unwrap();
            eprintln!(
                "cuda: decode steps: {captured} captured as graphs, {replayed} replayed, {plain} \
                 without a graph"
            );
        }
    }
}

/// Tests and applications share one backend across threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Cuda>()
};
