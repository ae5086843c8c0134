//! Every compute pipeline, created once: every shader module is compiled when the backend opens
//! (so that a bad shader or a missing feature shows at load, never mid-generation), and so are
//! the pipelines, except the matmul kernels of each weight storage, which are built on first
//! use (a model uses a few of their ~100 variants). Each kernel gets an explicit bind group layout:
//! binding 0 is its params block (uniform, dynamic offset into the params ring), bindings 1.. are
//! storage buffers in the order the shader declares them, outputs first except where a kernel
//! part extends the bindings of the file it is appended to; a kernel may skip binding numbers
//! (`Slot`). Kernels with the same storage signature share one layout, so they can share bind
//! groups. The matmul kernels are two
//! files: a weight-storage file (matmul, matmul_f16, matmul_quant: the weight reader) with a
//! kernel part appended (matmul_plain: mat-vec, residual mat-vec, tiled GEMM over one matrix;
//! matmul_norm: the mat-vecs with RMSNorm folded in, over up to three matrices).

use super::device::Gpu;
use crate::error::{Error, Result};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroU64;
use std::sync::{Arc, RwLock};

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

/// How a matmul kernel reads its weights: the weight-storage file and its override.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Store {
    /// matmul.wgsl (portable; f16 through unpack2x16float).
    Float(Float),
    /// matmul_f16.wgsl: f16 weights through native f16 (SHADER_F16 only).
    NativeF16,
    /// matmul_quant.wgsl.
    Quant(Quant),
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
    MatVec(Store),
    MatTiled(Store),
    /// The mat-vec adding into its output (the residual stream), with or without a bias.
    MatVecAdd {
        store: Store,
        bias: bool,
    },
    /// RMSNorm + q, k, v projections; `stage`: floats of staged input (one of Tuning's classes).
    NormQkv {
        store: Store,
        stage: u32,
    },
    /// RMSNorm + gate and up projections (+ biases) + swiglu.
    NormGateUp {
        store: Store,
        bias: bool,
        stage: u32,
    },
    AddBias,
    Rope,
    RopeRows,
    /// `rows`: the rows of many sequences (RowsView's layout in the table binding).
    KvAppend {
        f16: bool,
        rows: bool,
    },
    RopeKvAppend {
        f16: bool,
    },
    AttentionPrefill {
        f16: bool,
    },
    /// `direct`: one split, writing the output (no combine pass); `rows` as for KvAppend.
    AttentionDecode {
        f16: bool,
        direct: bool,
        rows: bool,
    },
    AttentionCombine {
        rows: bool,
    },
    Swiglu,
    Add,
    Sample,
    SampleWalk,
}

/// A storage binding slot of a kernel: read-write, read-only, or a binding number it skips.
type Slot = Option<bool>;
const RW: Slot = Some(false);
const RO: Slot = Some(true);
const GAP: Slot = None;

/// How to build one kernel: file (and the part appended to it), entry point, override
/// constants, storage bindings from binding 1 on.
struct Spec {
    file: &'static str,
    part: Option<&'static str>,
    entry: &'static str,
    overrides: Vec<(&'static str, f64)>,
    storage: &'static [Slot],
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
    shader!("matmul_plain"),
    shader!("matmul_norm"),
    shader!("add_bias"),
    shader!("rope"),
    shader!("rope_rows"),
    shader!("kv_append"),
    shader!("rope_kv_append"),
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
    /// Sizes (floats, ascending) of the staged input of the norm-folded mat-vecs
    /// (matmul_norm.wgsl); one pipeline per size, so that a workgroup reserves little more
    /// workgroup memory than it uses. Unused entries are 0; none at all disables those kernels.
    pub norm_stages: [u32; 3],
}

/// Floats of workgroup memory the norm-folded mat-vecs stage at most (the three sizes of
/// `Tuning::norm_stages`, where the device has room).
const NORM_STAGES: [u32; 3] = [2048, 4096, 8192];
/// Bytes of workgroup memory those kernels use besides the staged input (their reductions).
const NORM_OTHER_BYTES: u64 = 256 * 16 + 64;

impl Tuning {
    pub fn new(limits: &wgpu::Limits) -> Result<Tuning> {
        let mem = limits.max_compute_workgroup_storage_size as u64;
        // Workgroup floats of attention_prefill (q tile, padded KV block, scores, probs) and
        // attention_decode (8 heads of q, 8 x 128 scores, 2 x 128 partial vec4s, reduction,
        // stats, block ids).
        let prefill = |hd: u64| (16 * hd + 16 * (hd + 1) + 512) * 4;
        let decode = |hd: u64| (8 * hd + 8 * 128 + 8 * 128 + 128 + 16 + 8) * 4;
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
        // Staged floats that fit beside the reductions, in whole octets.
        let fit = (mem.saturating_sub(NORM_OTHER_BYTES) / 4 / 8 * 8).min(u32::MAX as u64) as u32;
        let mut norm_stages = [0; 3];
        let mut n = 0;
        for size in NORM_STAGES.map(|c| c.min(fit)) {
            if size >= 8 && (n == 0 || norm_stages[n - 1] < size) {
                norm_stages[n] = size;
                n += 1;
            }
        }
        Ok(Tuning {
            head_dim_max,
            sample_threads,
            norm_stages,
        })
    }
}

/// The weight-storage file of a matmul kernel and its override constant.
fn store_file(store: Store) -> (&'static str, Vec<(&'static str, f64)>) {
    match store {
        Store::Float(d) => ("matmul", vec![("DTYPE", d as u32 as f64)]),
        Store::NativeF16 => ("matmul_f16", vec![]),
        Store::Quant(q) => ("matmul_quant", vec![("QTYPE", q as u32 as f64)]),
    }
}

fn spec(k: Kernel, t: Tuning) -> Spec {
    const RW_RO_RO: &[Slot] = &[RW, RO, RO];
    const RW_RO: &[Slot] = &[RW, RO];
    let s = |file, entry, overrides, storage| Spec {
        file,
        part: None,
        entry,
        overrides,
        storage,
    };
    // A matmul kernel: the storage file of `store` with `part` appended.
    let mm = |store, part, entry, extra: &[(&'static str, f64)], storage| {
        let (file, mut overrides) = store_file(store);
        overrides.extend_from_slice(extra);
        Spec {
            file,
            part: Some(part),
            entry,
            overrides,
            storage,
        }
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
        Kernel::MatVec(store) => mm(store, "matmul_plain", "matvec", &[], RW_RO_RO),
        Kernel::MatTiled(store) => mm(store, "matmul_plain", "tiled", &[], RW_RO_RO),
        Kernel::MatVecAdd { store, bias } => match bias {
            false => mm(store, "matmul_plain", "matvec_add", &[], RW_RO_RO),
            true => mm(
                store,
                "matmul_plain",
                "matvec_add_bias",
                &[],
                &[RW, RO, RO, RO],
            ),
        },
        // out, x, w, w_b, w_c, norm, out_b, out_c (matmul_norm.wgsl's bindings 1-8).
        Kernel::NormQkv { store, stage } => mm(
            store,
            "matmul_norm",
            "matvec_qkv",
            &[("STAGE", stage as f64)],
            &[RW, RO, RO, RO, RO, RO, RW, RW],
        ),
        // out, x, w, w_b, w_c, norm (, bias_a, bias_b at 9 and 10).
        Kernel::NormGateUp { store, bias, stage } => {
            let stage = [("STAGE", stage as f64)];
            match bias {
                false => mm(
                    store,
                    "matmul_norm",
                    "matvec_gate_up",
                    &stage,
                    &[RW, RO, RO, RO, RO, RO],
                ),
                true => mm(
                    store,
                    "matmul_norm",
                    "matvec_gate_up_bias",
                    &stage,
                    &[RW, RO, RO, RO, RO, RO, GAP, GAP, RO, RO],
                ),
            }
        }
        Kernel::AddBias => s("add_bias", "main", vec![], RW_RO),
        Kernel::Rope => s("rope", "main", vec![], &[RW, RW, RO]),
        Kernel::RopeRows => s("rope_rows", "main", vec![], &[RW, RO, RO]),
        Kernel::KvAppend { f16, rows } => s(
            "kv_append",
            "main",
            vec![("KV_F16", kv(f16)), ("ROWS", kv(rows))],
            &[RW, RW, RO, RO, RO],
        ),
        Kernel::RopeKvAppend { f16 } => s(
            "rope_kv_append",
            "main",
            vec![("KV_F16", kv(f16))],
            &[RW, RW, RW, RW, RO, RO, RO],
        ),
        Kernel::AttentionPrefill { f16 } => s(
            "attention_prefill",
            "main",
            vec![("KV_F16", kv(f16)), ("HD_MAX", hd)],
            &[RW, RO, RO, RO, RO],
        ),
        Kernel::AttentionDecode { f16, direct, rows } => s(
            "attention_decode",
            "main",
            vec![
                ("KV_F16", kv(f16)),
                ("HD_MAX", hd),
                ("DIRECT", kv(direct)),
                ("ROWS", kv(rows)),
            ],
            &[RW, RO, RO, RO, RO],
        ),
        Kernel::AttentionCombine { rows } => {
            s("attention_combine", "main", vec![("ROWS", kv(rows))], RW_RO)
        }
        Kernel::Swiglu => s("swiglu", "main", vec![], RW_RO_RO),
        Kernel::Add => s("add", "main", vec![], RW_RO),
        Kernel::Sample => s(
            "sample",
            "main",
            vec![("WG", t.sample_threads as f64)],
            &[RW, RO, RW],
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
    let store = |s: Store| match s {
        Store::Float(d) => format!("{d:?}").to_lowercase(),
        Store::NativeF16 => "f16 native".into(),
        Store::Quant(q) => format!("{q:?}").to_lowercase(),
    };
    let kv = |f16: bool| if f16 { "f16 kv" } else { "f32 kv" }.to_string();
    match k {
        Kernel::Embedding(d) => format!("{d:?}").to_lowercase(),
        Kernel::EmbeddingQ(q) => format!("{q:?}").to_lowercase(),
        Kernel::MatVec(s) | Kernel::MatTiled(s) | Kernel::MatVecAdd { store: s, .. } => store(s),
        Kernel::NormQkv { store: s, stage }
        | Kernel::NormGateUp {
            store: s, stage, ..
        } => {
            format!("{} stage {stage}", store(s))
        }
        Kernel::KvAppend { f16, rows: false } | Kernel::RopeKvAppend { f16 } => kv(f16),
        Kernel::KvAppend { f16, rows: true } => format!("{} rows", kv(f16)),
        Kernel::AttentionCombine { rows: true } => "rows".into(),
        Kernel::AttentionPrefill { f16 } => kv(f16),
        Kernel::AttentionDecode { f16, direct, rows } => {
            let direct = if direct { " direct" } else { "" };
            let rows = if rows { " rows" } else { "" };
            format!("{}{direct}{rows}", kv(f16))
        }
        _ => String::new(),
    }
}

/// Every kernel to build: each matmul kernel for every weight storage ops.rs may pick (f16
/// through matmul_f16 where the adapter has SHADER_F16, else through matmul.wgsl).
fn all_kernels(shader_f16: bool, t: Tuning) -> Vec<Kernel> {
    let mut v = vec![
        Kernel::RmsNorm,
        Kernel::AddBias,
        Kernel::Rope,
        Kernel::RopeRows,
        Kernel::AttentionCombine { rows: false },
        Kernel::AttentionCombine { rows: true },
        Kernel::Swiglu,
        Kernel::Add,
        Kernel::Sample,
        Kernel::SampleWalk,
    ];
    let mut stores = vec![Store::Float(Float::F32), Store::Float(Float::BF16)];
    stores.push(match shader_f16 {
        true => Store::NativeF16,
        false => Store::Float(Float::F16),
    });
    stores.extend(QUANTS.map(Store::Quant));
    for d in [Float::F32, Float::F16, Float::BF16] {
        v.push(Kernel::Embedding(d));
    }
    for q in QUANTS {
        v.push(Kernel::EmbeddingQ(q));
    }
    for store in stores {
        v.extend([Kernel::MatVec(store), Kernel::MatTiled(store)]);
        for bias in [false, true] {
            v.push(Kernel::MatVecAdd { store, bias });
        }
        for stage in t.norm_stages.into_iter().filter(|&s| s > 0) {
            v.push(Kernel::NormQkv { store, stage });
            for bias in [false, true] {
                v.push(Kernel::NormGateUp { store, bias, stage });
            }
        }
    }
    for f16 in [false, true] {
        v.extend([
            Kernel::RopeKvAppend { f16 },
            Kernel::AttentionPrefill { f16 },
        ]);
        for rows in [false, true] {
            v.extend([
                Kernel::KvAppend { f16, rows },
                Kernel::AttentionDecode {
                    f16,
                    direct: false,
                    rows,
                },
                Kernel::AttentionDecode {
                    f16,
                    direct: true,
                    rows,
                },
            ]);
        }
    }
    v
}

pub(super) struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    /// Index of `layout` among the distinct layouts (bind group cache key).
    pub layout_id: usize,
    /// Binding numbers of the storage buffers the kernel takes, in the order ops pass them.
    pub bindings: Vec<u32>,
    /// "file:entry variant", as the profile names it.
    pub name: Arc<str>,
}

pub(super) struct Pipelines {
    device: wgpu::Device,
    adapter: String,
    /// Every module, compiled (and so validated) at load.
    modules: HashMap<(&'static str, Option<&'static str>), wgpu::ShaderModule>,
    /// The kernels this device has.
    available: HashSet<Kernel>,
    built: RwLock<Built>,
    pub tuning: Tuning,
}

/// The pipelines built so far and the distinct layouts they use.
#[derive(Default)]
struct Built {
    map: HashMap<Kernel, Arc<Pipeline>>,
    layouts: Vec<(&'static [Slot], wgpu::BindGroupLayout, wgpu::PipelineLayout)>,
}

/// Kernels built on first use: those of one weight storage (dozens of variants, of which a
/// model uses a few). The others are built at load.
fn built_on_use(k: Kernel) -> bool {
    matches!(
        k,
        Kernel::MatVec(_)
            | Kernel::MatTiled(_)
            | Kernel::MatVecAdd { .. }
            | Kernel::NormQkv { .. }
            | Kernel::NormGateUp { .. }
    )
}

impl Pipelines {
    /// The pipeline of kernel `k` (built now if it is one of those built on first use).
    pub fn get(&self, k: Kernel) -> Result<Arc<Pipeline>> {
        let read = |b: &Built| b.map.get(&k).cloned();
        if let Some(p) = read(&self.built.read().unwrap_or_else(|e| e.into_inner())) {
            return Ok(p);
        }
        if !self.available.contains(&k) {
            return Err(Error::Device(format!(
                "kernel {k:?} is not available on this device"
            )));
        }
        let mut built = self.built.write().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = read(&built) {
            return Ok(p);
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let p = self.build(&mut built, k);
        if let Some(e) = pollster::block_on(scope.pop()) {
            built.map.remove(&k);
            return Err(Error::Device(format!(
                "building the compute pipeline {} on {}: {e}",
                p.name, self.adapter
            )));
        }
        Ok(p)
    }

    /// Compiles every shader and builds the pipelines that are not built on first use.
    pub fn new(gpu: &Gpu) -> Result<Pipelines> {
        let device = &gpu.device;
        let tuning = Tuning::new(&gpu.limits)?;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernels = all_kernels(gpu.shader_f16, tuning);
        let mut modules = HashMap::new();
        for k in &kernels {
            let sp = spec(*k, tuning);
            if let Entry::Vacant(slot) = modules.entry((sp.file, sp.part)) {
                slot.insert(device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(sp.part.unwrap_or(sp.file)),
                    source: wgpu::ShaderSource::Wgsl(module_source(sp.file, sp.part)?.into()),
                }));
            }
        }
        let pipelines = Pipelines {
            device: device.clone(),
            adapter: gpu.summary.name.clone(),
            modules,
            available: kernels.iter().copied().collect(),
            built: RwLock::new(Built::default()),
            tuning,
        };
        {
            let mut built = pipelines.built.write().unwrap_or_else(|e| e.into_inner());
            for k in kernels.into_iter().filter(|&k| !built_on_use(k)) {
                pipelines.build(&mut built, k);
            }
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Device(format!(
                "building the compute pipelines on {}: {e}",
                gpu.summary.name
            )));
        }
        gpu.errors.check()?;
        Ok(pipelines)
    }

    /// Builds kernel `k`'s pipeline into `built` (errors go to the caller's error scope).
    fn build(&self, built: &mut Built, k: Kernel) -> Arc<Pipeline> {
        let sp = spec(k, self.tuning);
        let layouts = &mut built.layouts;
        let layout_id = match layouts.iter().position(|(s, _, _)| *s == sp.storage) {
            Some(i) => i,
            None => {
                let (bgl, pl) = make_layout(&self.device, sp.storage);
                layouts.push((sp.storage, bgl, pl));
                layouts.len() - 1
            }
        };
        let file = sp.part.unwrap_or(sp.file);
        let name = match variant(k) {
            v if v.is_empty() => format!("{file}:{}", sp.entry),
            v => format!("{file}:{} {v}", sp.entry),
        };
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&name),
                layout: Some(&layouts[layout_id].2),
                module: &self.modules[&(sp.file, sp.part)],
                entry_point: Some(sp.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &sp.overrides,
                    // Every kernel writes its workgroup memory before reading it.
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        let p = Arc::new(Pipeline {
            pipeline,
            layout: layouts[layout_id].1.clone(),
            layout_id,
            bindings: (1..)
                .zip(sp.storage)
                .filter(|(_, slot)| slot.is_some())
                .map(|(b, _)| b)
                .collect(),
            name: name.into(),
        });
        built.map.insert(k, p.clone());
        p
    }
}

/// The WGSL of a module: `file`, with `part` appended.
fn module_source(file: &str, part: Option<&str>) -> Result<String> {
    let source = |stem: &str| {
        SOURCES
            .iter()
            .find(|(f, _)| *f == stem)
            .map(|(_, src)| *src)
            .ok_or_else(|| Error::Device(format!("no shader source {stem}.wgsl")))
    };
    let mut src = source(file)?.to_string();
    if let Some(part) = part {
        src += source(part)?;
    }
    Ok(src)
}

fn make_layout(
    device: &wgpu::Device,
    storage: &[Slot],
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
    for (i, read_only) in storage.iter().enumerate() {
        let Some(read_only) = *read_only else {
            continue;
        };
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
