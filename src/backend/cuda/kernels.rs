//! The CUDA kernels: every shaders/cuda/<op>.cu compiled by NVRTC for this device's architecture
//! (a cubin, so the driver does no JIT), all files in parallel on first use. Each cubin is kept
//! on disk under `<cache>/cuda/`, named by stem, architecture, NVRTC version and a hash of the
//! source (with common.cuh), so the second start loads them instead of compiling.

use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{sys, Ptx};
use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const COMMON: &str = include_str!("../../../shaders/cuda/common.cuh");

/// Every kernel file: (stem, source).
pub const SOURCES: &[(&str, &str)] = &[
    ("adamw", include_str!("../../../shaders/cuda/adamw.cu")),
    ("add", include_str!("../../../shaders/cuda/add.cu")),
    (
        "add_bias",
        include_str!("../../../shaders/cuda/add_bias.cu"),
    ),
    (
        "attention",
        include_str!("../../../shaders/cuda/attention.cu"),
    ),
    (
        "attention_flash",
        include_str!("../../../shaders/cuda/attention_flash.cu"),
    ),
    (
        "attention_train",
        include_str!("../../../shaders/cuda/attention_train.cu"),
    ),
    (
        "attention_train_mma",
        include_str!("../../../shaders/cuda/attention_train_mma.cu"),
    ),
    (
        "cross_entropy",
        include_str!("../../../shaders/cuda/cross_entropy.cu"),
    ),
    (
        "embedding",
        include_str!("../../../shaders/cuda/embedding.cu"),
    ),
    (
        "kv_append",
        include_str!("../../../shaders/cuda/kv_append.cu"),
    ),
    ("matmul", include_str!("../../../shaders/cuda/matmul.cu")),
    (
        "rms_norm",
        include_str!("../../../shaders/cuda/rms_norm.cu"),
    ),
    ("rope", include_str!("../../../shaders/cuda/rope.cu")),
    (
        "rope_kv_append",
        include_str!("../../../shaders/cuda/rope_kv_append.cu"),
    ),
    ("sample", include_str!("../../../shaders/cuda/sample.cu")),
    (
        "sample_walk",
        include_str!("../../../shaders/cuda/sample_walk.cu"),
    ),
    ("swiglu", include_str!("../../../shaders/cuda/swiglu.cu")),
];

/// The loaded modules, one per kernel file, and the functions looked up so far.
pub struct Kernels {
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl Kernels {
    /// Compiles (or loads from the disk cache) every kernel file for `arch` (e.g. "sm_90").
    pub fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Kernels> {
        let version = nvrtc_version()?;
        let cubins: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
            let jobs: Vec<_> = SOURCES
                .iter()
                .map(|&(stem, src)| s.spawn(|| cached_cubin(stem, src, arch, &version)))
                .collect();
            jobs.into_iter()
                .map(|j| {
                    j.join()
                        .unwrap_or_else(|_| Err(Error::Device("NVRTC compile panicked".into())))
                })
                .collect()
        });
        let mut modules = HashMap::new();
        for (&(stem, _), cubin) in SOURCES.iter().zip(cubins) {
            let module = ctx
                .load_module(Ptx::from_binary(cubin?))
                .map_err(|e| Error::Device(format!("loading CUDA module {stem}.cu: {e}")))?;
            modules.insert(stem, module);
        }
        Ok(Kernels {
            modules,
            functions: Mutex::new(HashMap::new()),
        })
    }

    /// The name a loaded kernel was looked up by (for the profile).
    pub fn name_of(&self, f: &CudaFunction) -> String {
        let functions = self.functions.lock().unwrap();
        functions
            .iter()
            .find(|(_, g)| g.cu_function() == f.cu_function())
            .map_or_else(|| "?".to_string(), |(n, _)| n.to_string())
    }

    /// Kernel `name` of shaders/cuda/`stem`.cu.
    pub fn get(&self, stem: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap();
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let module = self
            .modules
            .get(stem)
            .ok_or_else(|| Error::Device(format!("no CUDA kernel file {stem}.cu")))?;
        let f = module
            .load_function(name)
            .map_err(|e| Error::Device(format!("CUDA kernel {name} in {stem}.cu: {e}")))?;
        functions.insert(name, f.clone());
        Ok(f)
    }
}

fn nvrtc_version() -> Result<String> {
    let (mut major, mut minor) = (0, 0);
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    if r != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(Error::Device(format!("nvrtcVersion failed: {r:?}")));
    }
    Ok(format!("{major}.{minor}"))
}

/// FNV-1a: a stable hash for cache file names (std's hasher may change between releases).
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn cache_path(stem: &str, src: &str, arch: &str, version: &str) -> Option<PathBuf> {
    let dir = crate::default_model::cache_dir().ok()?.join("cuda");
    let hash = fnv1a(&[COMMON, src, arch, version]);
    Some(dir.join(format!("{stem}-{arch}-nvrtc{version}-{hash:016x}.cubin")))
}

fn cached_cubin(stem: &str, src: &str, arch: &str, version: &str) -> Result<Vec<u8>> {
    let path = cache_path(stem, src, arch, version);
    if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        if !bytes.is_empty() {
            return Ok(bytes);
        }
    }
    let cubin = compile(stem, src, arch)?;
    if let Some(p) = path {
        // Best effort: a read-only cache only costs the next start a compile.
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    Ok(cubin)
}

/// Compiles one .cu (with common.cuh as its only header) to a cubin for `arch`.
pub fn compile(stem: &str, src: &str, arch: &str) -> Result<Vec<u8>> {
    let cstr = |s: &str| CString::new(s).map_err(|_| Error::Device(format!("{stem}.cu: NUL")));
    let (source, name) = (cstr(src)?, cstr(&format!("{stem}.cu"))?);
    let (header, header_name) = (cstr(COMMON)?, cstr("common.cuh")?);
    let headers = [header.as_ptr()];
    let include_names = [header_name.as_ptr()];
    let fail = |what: &str, r: sys::nvrtcResult| {
        Error::Device(format!("NVRTC {what} of {stem}.cu: {r:?}"))
    };
    unsafe {
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        let r = sys::nvrtcCreateProgram(
            &mut prog,
            source.as_ptr(),
            name.as_ptr(),
            1,
            headers.as_ptr(),
            include_names.as_ptr(),
        );
        if r != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(fail("create", r));
        }
        let opts: Vec<CString> = [
            format!("--gpu-architecture={arch}"),
            "--std=c++17".into(),
            "-default-device".into(),
        ]
        .iter()
        .map(|o| CString::new(o.as_str()).unwrap())
        .collect();
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let r = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let result = if r != sys::nvrtcResult::NVRTC_SUCCESS {
            Err(Error::Device(format!(
                "NVRTC failed to compile {stem}.cu for {arch}:\n{}",
                program_log(prog)
            )))
        } else {
            let mut size = 0usize;
            let r = sys::nvrtcGetCUBINSize(prog, &mut size);
            if r != sys::nvrtcResult::NVRTC_SUCCESS {
                Err(fail("cubin size", r))
            } else {
                let mut bytes = vec![0u8; size];
                let r = sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr() as *mut c_char);
                if r != sys::nvrtcResult::NVRTC_SUCCESS {
                    Err(fail("cubin", r))
                } else {
                    Ok(bytes)
                }
            }
        };
        sys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

unsafe fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    if sys::nvrtcGetProgramLogSize(prog, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS {
        return String::new();
    }
    let mut log = vec![0u8; size];
    sys::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut c_char);
    String::from_utf8_lossy(&log)
        .trim_end_matches('\0')
        .to_string()
}
