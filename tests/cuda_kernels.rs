//! The CUDA kernel sources: every file in `SOURCES` compiles with NVRTC to a cubin for the
//! architectures the backend targets (no GPU or driver needed, only libnvrtc), and the CUDA
//! kernel files cover every op that has a WGSL shader. Without libnvrtc the compile test prints
//! why and passes, except when ANYLLAMA_REQUIRE_CUDA is set.

#![cfg(feature = "cuda")]

mod common;

use anyllama::backend::cuda::{compile, nvrtc_available, SOURCES};
use std::collections::BTreeSet;
use std::path::Path;

/// Ampere (A100) and Hopper (H100/H200).
const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

#[test]
fn every_kernel_file_compiles_with_nvrtc() {
    if !nvrtc_available() {
        common::skip_or_fail_cuda(
            "cuda kernel compile",
            "no NVRTC (libnvrtc) to compile the CUDA kernels",
        );
        return;
    }
    // Every file for every architecture, then one report of all that failed.
    let mut failures = vec![];
    for arch in ARCHS {
        for &(stem, src) in SOURCES {
            match compile(stem, src, arch) {
                // A cubin is an ELF image; anything else (PTX text, an empty buffer) would make
                // the driver JIT or fail at load time.
                Ok(cubin) if cubin.starts_with(b"\x7fELF") => {}
                Ok(cubin) => failures.push(format!(
                    "{stem}.cu for {arch}: NVRTC returned {} bytes that are not an ELF cubin",
                    cubin.len()
                )),
                Err(e) => failures.push(format!("{stem}.cu for {arch}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// WGSL shaders whose op lives in a CUDA file of another name: wgpu splits these kernels into
/// one file per pipeline (f16 and block-format weights, decode / prefill / split-KV combine),
/// while CUDA keeps all variants of an op in one translation unit.
const WGSL_ONLY: [(&str, &str); 6] = [
    ("matmul_f16", "matmul"),
    ("matmul_quant", "matmul"),
    ("embedding_quant", "embedding"),
    ("attention_decode", "attention"),
    ("attention_prefill", "attention"),
    ("attention_combine", "attention"),
];

fn stems(dir: &Path, ext: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn cuda_kernels_cover_every_wgsl_shader() {
    let shaders = common::root().join("shaders");
    let wgsl = stems(&shaders.join("wgsl"), "wgsl");
    let cuda = stems(&shaders.join("cuda"), "cu");
    assert!(!wgsl.is_empty(), "no shaders under {}", shaders.display());
    for stem in &wgsl {
        let holder = WGSL_ONLY
            .iter()
            .find(|(w, _)| w == stem)
            .map_or(stem.as_str(), |(_, c)| *c);
        assert!(
            cuda.contains(holder),
            "shaders/wgsl/{stem}.wgsl has no CUDA counterpart shaders/cuda/{holder}.cu \
             (add one, or list it in WGSL_ONLY with the file that holds its kernels)"
        );
    }
    for (w, _) in WGSL_ONLY {
        assert!(
            wgsl.contains(w),
            "WGSL_ONLY lists {w}, which is not in shaders/wgsl: drop it from the list"
        );
    }
    // Every .cu file is compiled by the backend: one left out of SOURCES would never run.
    let compiled: BTreeSet<String> = SOURCES.iter().map(|(s, _)| s.to_string()).collect();
    assert_eq!(
        cuda, compiled,
        "shaders/cuda/*.cu and anyllama::backend::cuda::SOURCES differ"
    );
}
