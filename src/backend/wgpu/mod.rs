//! The wgpu backend: every op is a WGSL compute kernel (shaders/wgsl/<op>.wgsl) recorded into one
//! pending compute pass; reads and syncs submit and wait. Runs on Vulkan, Metal, DX12 (and GL
//! where it has compute), on any GPU, and on Mesa's lavapipe (a CPU Vulkan driver) in CI.
//!
//! Files: device.rs (adapter choice, limits, error routing), pipelines.rs (shaders and
//! pipelines, all built at load), exec.rs (encoder / pass / params ring / bind group cache),
//! ops.rs (the `Backend` impl: sizes, checks, dispatch shapes), fused.rs (the fused decode ops:
//! norm + q/k/v, norm + gate/up + swiglu, rope + KV append), profile.rs (per-kernel GPU times,
//! `ANYLLAMA_WGPU_PROFILE=1`).

mod device;
mod exec;
mod fused;
mod ops;
mod pipelines;
mod profile;
mod rows;

pub use device::{list_adapters, AdapterSummary};

use crate::error::Result;
use crate::pool::Pool;
use exec::Exec;
use pipelines::Pipelines;
use std::sync::Arc;

/// How to open the backend.
#[derive(Clone, Debug, Default)]
pub struct WgpuOptions {
    /// Index into `list_adapters()`; None picks the best (discrete > integrated > virtual > CPU).
    pub adapter_index: Option<usize>,
    /// Use only the portable kernels: no SHADER_F16 / SUBGROUP even where the adapter has them.
    /// Tests use it to cover both paths on one device; `ANYLLAMA_WGPU_PORTABLE=1` sets it for
    /// `Wgpu::new`.
    pub portable: bool,
    /// Caps the bytes bound to one storage binding below the device limit, so that tests can
    /// exercise the row-chunked weight path with small tensors. None: the device limit.
    pub max_storage_binding: Option<u64>,
    /// Time every dispatch on the GPU (where the adapter can write timestamps inside compute
    /// passes) and the host's recording and waiting; the table goes to stderr when the backend
    /// is dropped. `ANYLLAMA_WGPU_PROFILE=1` sets it for `Wgpu::new`.
    pub profile: bool,
}

pub struct Wgpu {
    exec: Exec,
    pipelines: Pipelines,
    pool: Arc<Pool<Wgpu>>,
    adapter: AdapterSummary,
    native_f16: bool,
    /// Bytes bound to one storage binding at most (16-byte multiple).
    max_binding: u64,
}

impl Wgpu {
    /// Opens adapter `adapter_index` of `list_adapters()` (the best one when None) and builds
    /// every pipeline.
    pub fn new(adapter_index: Option<usize>) -> Result<Wgpu> {
        let flag = |name| std::env::var(name).is_ok_and(|v| v != "0" && !v.is_empty());
        Wgpu::with_options(WgpuOptions {
            adapter_index,
            portable: flag("ANYLLAMA_WGPU_PORTABLE"),
            max_storage_binding: None,
            profile: flag("ANYLLAMA_WGPU_PROFILE"),
        })
    }

    pub fn with_options(options: WgpuOptions) -> Result<Wgpu> {
        let gpu = device::open(options.adapter_index, options.portable, options.profile)?;
        let pipelines = Pipelines::new(&gpu)?;
        Ok(Wgpu {
            exec: Exec::new(&gpu, options.profile),
            pipelines,
            pool: Arc::new(Pool::default()),
            native_f16: gpu.shader_f16,
            max_binding: gpu
                .limits
                .max_storage_buffer_binding_size
                .min(options.max_storage_binding.unwrap_or(u64::MAX))
                & !15,
            adapter: gpu.summary,
        })
    }

    /// The adapter in use.
    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    /// Whether the adapter is a software renderer (lavapipe, SwiftShader, WARP): correct, but
    /// slower than the CPU backend.
    pub fn is_software(&self) -> bool {
        self.adapter.device_type == format!("{:?}", ::wgpu::DeviceType::Cpu)
    }

    /// Whether f16 weights go through the SHADER_F16 kernels (else the portable ones).
    pub fn uses_native_f16(&self) -> bool {
        self.native_f16
    }

    /// The profile so far, as printed on drop (waits for the enqueued work first); None unless
    /// the backend was opened with `profile`.
    pub fn profile_report(&self) -> Option<String> {
        self.exec.profile_report()
    }

    /// Splits of the decode attention kernel for `rows` query rows at positions pos0..; 1
    /// means the kernel writes the output itself (no combine pass); None when `rows` take the
    /// prefill kernel instead.
    pub fn attention_decode_splits(
        &self,
        rows: usize,
        pos0: usize,
        heads: crate::backend::Heads,
    ) -> Option<usize> {
        (rows <= ops::DECODE_MAX_ROWS).then(|| ops::decode_plan(rows, pos0 + rows, heads).1)
    }

    /// Largest head_dim the attention kernels take on this device.
    pub fn max_head_dim(&self) -> usize {
        self.pipelines.tuning.head_dim_max as usize
    }

    /// Drops cached bind groups and pooled buffers (e.g. after unloading a model: the caches
    /// keep the buffers they refer to alive).
    pub fn trim(&self) {
        self.exec.clear_bind_groups();
        self.pool.trim();
    }
}

impl Drop for Wgpu {
    fn drop(&mut self) {
        if let Some(report) = self.exec.profile_report() {
            eprint!("{report}");
        }
    }
}
