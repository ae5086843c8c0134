//! Every compute pipeline, created once when the backend opens (so that a bad shader or a missing
//! feature shows at load, never mid-generation). Each kernel gets an explicit bind group layout:
//! binding 0 is its params block (uniform, dynamic offset into the params ring), bindings 1.. are
//! storage buffers, outputs first, in the order the shader declares them. Kernels with the same
//! storage signature share one layout, so they can share bind groups.

use super::device::Gpu;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Arc;

/// Bytes bound for a params block; every `Params` struct is at most this big.
pub(super) const PARAMS_BIND_BYTES: u64 = 64;

/// Head dims the attention kernels are built for (largest that fits workgroup memory).
pub(super) const HEAD_DIM_CHOICES: [u32; 3] = [256, 128, 64];

/// Weight storage handled by the float kernels (DTYPE override of matmul / embedding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Float {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

/// GGUF block formats handled by the *_quant kernels (their QTYPE override).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Quant {
    Q8_0 = 0,
    Q4_0 = 1,
    Q4_1 = 2,
    Q4K = 3,
    Q6K = 4,
}

pub(super) const QUANTS: [Quant; 5] = [
    Quant::Q8_0,
    Quant::Q4_0,
    Quant::Q4_1,
    Quant::Q4K,
    Quant::Q6K,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Kernel {
    Embedding(Float),
    EmbeddingQ(Quant),
    RmsNorm,
    MatVec(Float),
    MatTiled(Float),
    /// f16 weights through native f16 (SHADER_F16 only).
    MatVecF16,
    MatTiledF16,
    MatVecQ(Quant),
    MatTiledQ(Quant),
    AddBias,
    Rope,
    KvAppend {
        f16: bool,
    },
    AttentionPrefill {
        f16: bool,
    },
    AttentionDecode {
        f16: bool,
    },
    AttentionCombine,
    Swiglu,
    Add,
    Sample,
    SampleWalk,
}

/// How to build one kernel: file, entry point, override constants, storage bindings (true =
/// read-only).
struct Spec {
    file: &'static str,
    entry: &'static str,
    overrides: Vec<(&'static str, f64)>,
    storage: &'static [bool],
}

/// (stem, source) of every shader file.
macro_rules! shader {
    ($stem:literal) => {
        (
            $stem,
            include_str!(concat!("../../../shaders/wgsl/", $stem, ".wgsl")),
        )
    };
}

const SOURCES: &[(&str, &str)] = &[
    shader!("embedding"),
    shader!("embedding_quant"),
    shader!("rms_norm"),
    shader!("matmul"),
    shader!("matmul_f16"),
    shader!("matmul_quant"),
    shader!("add_bias"),
    shader!("rope"),
    shader!("kv_append"),
    shader!("attention_prefill"),
    shader!("attention_decode"),
    shader!("attention_combine"),
    shader!("swiglu"),
    shader!("add"),
    shader!("sample"),
    shader!("sample_walk"),
];

/// Sizes chosen from the device limits, shared with the host side of the kernels.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tuning {
    /// Largest head_dim the attention kernels take.
    pub head_dim_max: u32,
    /// Threads of the one `sample` workgroup.
    pub sample_threads: u32,
}

impl Tuning {
    pub fn new(limits: &wgpu::Limits) -> Result<Tuning> {
        let mem = limits.max_compute_workgroup_storage_size as u64;
        // Workgroup floats of attention_prefill (q tile, padded KV block, scores, probs) and
        // attention_decode (8 heads of q, 8 x 128 scores, reduction, stats).
        let prefill = |hd: u64| (16 * hd + 16 * (hd + 1) + 512) * 4;
        let decode = |hd: u64| (8 * hd + 8 * 128 + 128 + 16) * 4;
        let head_dim_max = HEAD_DIM_CHOICES
            .into_iter()
            .find(|&hd| prefill(hd as u64) <= mem && decode(hd as u64) <= mem)
            .ok_or_else(|| {
                Error::Device(format!(
                    "the device offers {mem} bytes of workgroup memory; attention needs {}",
                    prefill(64)
                ))
            })?;
        let max_threads = limits
            .max_compute_invocations_per_workgroup
            .min(limits.max_compute_workgroup_size_x)
            .min(1024);
        let sample_threads = 1 << (31 - max_threads.max(64).leading_zeros());
        Ok(Tuning {
            head_dim_max,
            sample_threads,
        })
    }
}

fn spec(k: Kernel, t: Tuning) -> Spec {
    const RW_RO_RO: &[bool] = &[false, true, true];
    const RW_RO: &[bool] = &[false, true];
    let s = |file, entry, overrides, storage| Spec {
        file,
        entry,
        overrides,
        storage,
    };
    let hd = t.head_dim_max as f64;
    let kv = |f16: bool| if f16 { 1.0 } else { 0.0 };
    match k {
        Kernel::Embedding(d) => s(
            "embedding",
            "main",
            vec![("DTYPE", d as u32 as f64)],
            RW_RO_RO,
        ),
        Kernel::EmbeddingQ(q) => s(
            "embedding_quant",
            "main",
            vec![("QTYPE", q as u32 as f64)],
            RW_RO_RO,
        ),
        Kernel::RmsNorm => s("rms_norm", "main", vec![], RW_RO_RO),
        Kernel::MatVec(d) => s(
            "matmul",
            "matvec",
            vec![("DTYPE", d as u32 as f64)],
            RW_RO_RO,
        ),
        Kernel::MatTiled(d) => s(
            "matmul",
            "tiled",
            vec![("DTYPE", d as u32 as f64)],
            RW_RO_RO,
        ),
        Kernel::MatVecF16 => s("matmul_f16", "matvec", vec![], RW_RO_RO),
        Kernel::MatTiledF16 => s("matmul_f16", "tiled", vec![], RW_RO_RO),
        Kernel::MatVecQ(q) => s(
            "matmul_quant",
            "matvec",
            vec![("QTYPE", q as u32 as f64)],
            RW_RO_RO,
        ),
        Kernel::MatTiledQ(q) => s(
            "matmul_quant",
            "tiled",
            vec![("QTYPE", q as u32 as f64)],
            RW_RO_RO,
        ),
        Kernel::AddBias => s("add_bias", "main", vec![], RW_RO),
        Kernel::Rope => s("rope", "main", vec![], &[false, false, true]),
        Kernel::KvAppend { f16 } => s(
            "kv_append",
            "main",
            vec![("KV_F16", kv(f16))],
            &[false, false, true, true, true],
        ),
        Kernel::AttentionPrefill { f16 } => s(
            "attention_prefill",
            "main",
            vec![("KV_F16", kv(f16)), ("HD_MAX", hd)],
            &[false, true, true, true, true],
        ),
        Kernel::AttentionDecode { f16 } => s(
            "attention_decode",
            "main",
            vec![("KV_F16", kv(f16)), ("HD_MAX", hd)],
            &[false, true, true, true, true],
        ),
        Kernel::AttentionCombine => s("attention_combine", "main", vec![], RW_RO),
        Kernel::Swiglu => s("swiglu", "main", vec![], RW_RO_RO),
        Kernel::Add => s("add", "main", vec![], RW_RO),
        Kernel::Sample => s(
            "sample",
            "main",
            vec![("WG", t.sample_threads as f64)],
            &[false, true, false],
        ),
        Kernel::SampleWalk => s(
            "sample_walk",
            "main",
            vec![("WG", t.sample_threads as f64)],
            RW_RO,
        ),
    }
}

/// The weight or KV-cache variant of a kernel, for the profile's kernel names.
fn variant(k: Kernel) -> String {
    match k {
        Kernel::Embedding(d) | Kernel::MatVec(d) | Kernel::MatTiled(d) => {
            format!("{d:?}").to_lowercase()
        }
        Kernel::MatVecF16 | Kernel::MatTiledF16 => "f16 native".into(),
        Kernel::EmbeddingQ(q) | Kernel::MatVecQ(q) | Kernel::MatTiledQ(q) => {
            format!("{q:?}").to_lowercase()
        }
        Kernel::KvAppend { f16 }
        | Kernel::AttentionPrefill { f16 }
        | Kernel::AttentionDecode { f16 } => if f16 { "f16 kv" } else { "f32 kv" }.into(),
        _ => String::new(),
    }
}

fn all_kernels(shader_f16: bool) -> Vec<Kernel> {
    let mut v = vec![
        Kernel::RmsNorm,
        Kernel::AddBias,
        Kernel::Rope,
        Kernel::AttentionCombine,
        Kernel::Swiglu,
        Kernel::Add,
        Kernel::Sample,
        Kernel::SampleWalk,
    ];
    for d in [Float::F32, Float::F16, Float::BF16] {
        v.extend([Kernel::Embedding(d), Kernel::MatVec(d), Kernel::MatTiled(d)]);
    }
    for q in QUANTS {
        v.extend([
            Kernel::EmbeddingQ(q),
            Kernel::MatVecQ(q),
            Kernel::MatTiledQ(q),
        ]);
    }
    for f16 in [false, true] {
        v.extend([
            Kernel::KvAppend { f16 },
            Kernel::AttentionPrefill { f16 },
            Kernel::AttentionDecode { f16 },
        ]);
    }
    if shader_f16 {
        v.extend([Kernel::MatVecF16, Kernel::MatTiledF16]);
    }
    v
}

pub(super) struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    /// Index of `layout` among the distinct layouts (bind group cache key).
    pub layout_id: usize,
    /// Storage bindings the kernel takes.
    pub n_storage: usize,
    /// "file:entry variant", as the profile names it.
    pub name: Arc<str>,
}

pub(super) struct Pipelines {
    map: HashMap<Kernel, Pipeline>,
    pub tuning: Tuning,
}

impl Pipelines {
    pub fn get(&self, k: Kernel) -> Result<&Pipeline> {
        self.map
            .get(&k)
            .ok_or_else(|| Error::Device(format!("kernel {k:?} is not available on this device")))
    }

    /// Compiles every shader and builds every pipeline.
    pub fn new(gpu: &Gpu) -> Result<Pipelines> {
        let device = &gpu.device;
        let tuning = Tuning::new(&gpu.limits)?;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernels = all_kernels(gpu.shader_f16);
        let mut modules = HashMap::new();
        for k in &kernels {
            let file = spec(*k, tuning).file;
            if !modules.contains_key(file) {
                let (_, src) = SOURCES
                    .iter()
                    .find(|(f, _)| *f == file)
                    .ok_or_else(|| Error::Device(format!("no shader source {file}.wgsl")))?;
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(file),
                    source: wgpu::ShaderSource::Wgsl((*src).into()),
                });
                modules.insert(file, module);
            }
        }
        let mut layouts: Vec<(&'static [bool], wgpu::BindGroupLayout, wgpu::PipelineLayout)> =
            Vec::new();
        let mut map = HashMap::new();
        for k in kernels {
            let sp = spec(k, tuning);
            let layout_id = match layouts.iter().position(|(s, _, _)| *s == sp.storage) {
                Some(i) => i,
                None => {
                    let (bgl, pl) = make_layout(device, sp.storage);
                    layouts.push((sp.storage, bgl, pl));
                    layouts.len() - 1
                }
            };
            let name = match variant(k) {
                v if v.is_empty() => format!("{}:{}", sp.file, sp.entry),
                v => format!("{}:{} {v}", sp.file, sp.entry),
            };
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&name),
                layout: Some(&layouts[layout_id].2),
                module: &modules[sp.file],
                entry_point: Some(sp.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &sp.overrides,
                    // Every kernel writes its workgroup memory before reading it.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
            map.insert(
                k,
                Pipeline {
                    pipeline,
                    layout: layouts[layout_id].1.clone(),
                    layout_id,
                    n_storage: sp.storage.len(),
                    name: name.into(),
                },
            );
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Device(format!(
                "building the compute pipelines on {}: {e}",
                gpu.summary.name
            )));
        }
        gpu.errors.check()?;
        Ok(Pipelines { map, tuning })
    }
}

fn make_layout(
    device: &wgpu::Device,
    storage: &[bool],
) -> (wgpu::BindGroupLayout, wgpu::PipelineLayout) {
    let mut entries = vec![wgpu::BindGroupLayoutEntry {
        binding: 0,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            has_dynamic_offset: true,
            min_binding_size: NonZeroU64::new(PARAMS_BIND_BYTES),
        },
        count: None,
    }];
    for (i, &read_only) in storage.iter().enumerate() {
        entries.push(wgpu::BindGroupLayoutEntry {
            binding: i as u32 + 1,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        });
    }
    let bgl = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: None,
        entries: &entries,
    });
    let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: None,
        bind_group_layouts: &[Some(&bgl)],
        immediate_size: 0,
    });
    (bgl, pl)
}
