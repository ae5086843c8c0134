//! Every WGSL kernel under shaders/wgsl parses and validates with naga (the compiler wgpu uses),
//! and the `Params` struct at the top of each one has the size of the Rust block it mirrors
//! (src/backend/params.rs). The folder is enumerated, so a new shader is covered automatically;
//! a shader with no entry in the size table fails until one is added. The matmul kernels are a
//! weight-storage file with a kernel part appended (src/backend/wgpu/pipelines.rs): each
//! storage file is validated with each part appended, against the part's params block.

use anyllama::backend::params::*;
use std::mem::size_of;
use std::path::Path;

/// Weight-storage files, not shaders on their own: each is completed by every one of PARTS.
const STORAGES: [&str; 3] = ["matmul", "matmul_f16", "matmul_quant"];
const PARTS: [&str; 2] = ["matmul_plain", "matmul_norm"];

/// Rust params block size for each shader stem (longest matching prefix wins).
fn params_size(stem: &str) -> Option<usize> {
    let table: &[(&str, usize)] = &[
        ("embedding", size_of::<EmbeddingParams>()),
        ("rms_norm", size_of::<RmsNormParams>()),
        ("matmul_plain", size_of::<MatmulParams>()),
        ("matmul_norm", size_of::<NormMatvecParams>()),
        ("add_bias", size_of::<AddBiasParams>()),
        ("rope", size_of::<RopeParams>()),
        ("kv_append", size_of::<KvAppendParams>()),
        ("attention", size_of::<AttentionParams>()),
        ("swiglu", size_of::<ElementwiseParams>()),
        ("add", size_of::<AddParams>()),
        ("sample", size_of::<SampleParams>()),
    ];
    table
        .iter()
        .filter(|(prefix, _)| stem.starts_with(prefix))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|&(_, size)| size)
}

fn read(dir: &Path, stem: &str) -> String {
    let path = dir.join(format!("{stem}.wgsl"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Parses and validates one shader; returns the byte size of its `Params` struct.
fn check(src: &str) -> Result<u32, String> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| e.emit_to_string(src))?;
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string(src))?;
    let size = module
        .types
        .iter()
        .find_map(|(_, ty)| match (&ty.name, &ty.inner) {
            (Some(name), naga::TypeInner::Struct { span, .. }) if name == "Params" => Some(*span),
            _ => None,
        })
        .ok_or_else(|| "no `struct Params`".to_string());
    size
}

#[test]
fn every_shader_validates_and_mirrors_its_params_block() {
    let dir = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("shaders/wgsl");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wgsl"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no shaders in {}", dir.display());
    let mut failures = Vec::new();
    let mut check_against = |what: String, src: &str, stem: &str| match check(src) {
        Err(e) => failures.push(format!("{what}: {e}")),
        Ok(size) => match params_size(stem) {
            None => failures.push(format!("{stem}: no params block in the size table")),
            Some(want) if want != size as usize => failures.push(format!(
                "{what}: WGSL Params is {size} bytes, the Rust block {want}"
            )),
            Some(_) => {}
        },
    };
    for path in &paths {
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        if PARTS.contains(&stem.as_str()) {
            continue;
        }
        let src = read(&dir, &stem);
        if STORAGES.contains(&stem.as_str()) {
            for part in PARTS {
                let combined = src.clone() + &read(&dir, part);
                check_against(format!("{stem}.wgsl + {part}.wgsl"), &combined, part);
            }
        } else {
            check_against(path.display().to_string(), &src, &stem);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
