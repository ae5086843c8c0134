//! Shared test helpers: fixture paths, the GPU backend (or a loud failure in CI), error metrics.
#![allow(dead_code)]

pub mod server;

use std::path::PathBuf;

/// The repo root at run time (CARGO_MANIFEST_DIR is set by cargo and by the device scripts).
pub fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}

pub fn fixtures() -> PathBuf {
    root().join("tests").join("fixtures")
}

/// True when running in CI, where a missing GPU adapter or model is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Skips (prints why) outside CI; panics in CI.
pub fn skip_or_fail(why: &str) {
    if in_ci() {
        panic!("{why} (CI is set, so this is a failure, not a skip)");
    }
    eprintln!("SKIPPED: {why}");
}

/// The wgpu backend on the first adapter (lavapipe in CI), or None after skip_or_fail.
#[cfg(feature = "wgpu")]
pub fn wgpu_backend() -> Option<anyllama::backend::wgpu::Wgpu> {
    match anyllama::backend::wgpu::Wgpu::new(None) {
        Ok(b) => Some(b),
        Err(e) => {
            skip_or_fail(&format!("no wgpu adapter: {e}"));
            None
        }
    }
}

/// Normalised mean squared error: sum((a-b)^2) / sum(b^2). NaN in `a` gives infinity.
pub fn nmse(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b
        .iter()
        .map(|y| (*y as f64).powi(2))
        .sum::<f64>()
        .max(1e-30);
    num / den
}

/// The real SmolLM2-135M-Instruct GGUF: `ANYLLAMA_SMOLLM2_GGUF`, else the default model (fetched
/// into the cache once). None after skip_or_fail when it cannot be had.
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ANYLLAMA_SMOLLM2_GGUF").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    match anyllama::default_model::ensure_default_model() {
        Ok(p) => Some(p),
        Err(e) => {
            skip_or_fail(&format!("SmolLM2 GGUF unavailable: {e}"));
            None
        }
    }
}

/// True when ANYLLAMA_REQUIRE_CUDA is set (the NVIDIA test machine sets it): there a CUDA test
/// that cannot run is a failure, not a skip. CI (no NVIDIA GPU) leaves it unset.
pub fn require_cuda() -> bool {
    std::env::var("ANYLLAMA_REQUIRE_CUDA").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Skips (prints `SKIPPED <what>: <why>`) unless ANYLLAMA_REQUIRE_CUDA is set; then panics.
pub fn skip_or_fail_cuda(what: &str, why: &str) {
    if require_cuda() {
        panic!("{what}: {why} (ANYLLAMA_REQUIRE_CUDA is set, so this is a failure, not a skip)");
    }
    eprintln!("SKIPPED {what}: {why}");
}

/// The CUDA backend on device 0 with `options`, or None after skip_or_fail_cuda when this
/// machine has no usable CUDA driver. Where the driver sees a device, failing to open is a bug:
/// it panics rather than letting a test pass without running.
#[cfg(feature = "cuda")]
pub fn cuda_backend_with(
    what: &str,
    options: anyllama::backend::cuda::CudaOptions,
) -> Option<anyllama::backend::cuda::Cuda> {
    use anyllama::backend::cuda::{unavailable_reason, Cuda};
    if let Some(why) = unavailable_reason() {
        skip_or_fail_cuda(what, &why);
        return None;
    }
    match Cuda::with_options(options.clone()) {
        Ok(c) => Some(c),
        Err(e) => {
            panic!("{what}: the CUDA driver sees a device but {options:?} failed to open: {e}")
        }
    }
}

/// The CUDA backend with `options` for model-level tests, or None after a skip.
#[cfg(feature = "cuda")]
pub fn cuda_with(
    options: anyllama::backend::cuda::CudaOptions,
) -> Option<anyllama::backend::cuda::Cuda> {
    cuda_backend_with("cuda", options)
}
