//! Adapter choice and device creation: ranks the adapters wgpu finds (discrete > integrated >
//! virtual > CPU, native APIs before GL), opens the chosen one with its real limits and the
//! optional features the kernels use (SHADER_F16, SUBGROUP; timestamp queries when profiling),
//! and routes every asynchronous device error (validation, out of memory, device lost) into one
//! sticky error slot.

use crate::error::{Error, Result};
use std::fmt;
use std::sync::{Arc, Mutex};

/// What `anyllama devices` prints for one adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// Position in the ranked list; pass it as `adapter_index` to pick this adapter.
    pub index: usize,
    pub backend: String,
    pub name: String,
    pub device_type: String,
    pub driver: String,
    pub shader_f16: bool,
    pub subgroup: bool,
    pub subgroup_sizes: (u32, u32),
    pub max_buffer_size: u64,
    pub max_storage_buffer_binding_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b / (1 << 20);
        write!(
            f,
            "[{}] {} ({}, {}) driver: {}\n    f16: {}, subgroups: {} (size {}..{}), max buffer {} MiB, \
             max storage binding {} MiB, workgroup memory {} KiB, {} invocations/workgroup",
            self.index,
            self.name,
            self.backend,
            self.device_type,
            if self.driver.is_empty() { "?" } else { &self.driver },
            if self.shader_f16 { "yes" } else { "no" },
            if self.subgroup { "yes" } else { "no" },
            self.subgroup_sizes.0,
            self.subgroup_sizes.1,
            mib(self.max_buffer_size),
            mib(self.max_storage_buffer_binding_size),
            self.max_compute_workgroup_storage_size / 1024,
            self.max_compute_invocations_per_workgroup,
        )
    }
}

fn instance() -> wgpu::Instance {
    // WGPU_BACKEND and friends can narrow the search from the environment. Without it, only the
    // native compute APIs (Vulkan, Metal, DX12): probing OpenGL/EGL on a headless machine prints
    // driver errors and its adapters cannot run these kernels anyway.
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    if std::env::var_os("WGPU_BACKEND").is_none() {
        desc.backends = wgpu::Backends::PRIMARY;
    }
    wgpu::Instance::new(desc)
}

fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::Gl => 1,
        _ => 2,
    }
}

/// Every adapter, best first (the order `adapter_index` refers to). GL is only searched when
/// no native API (Vulkan, Metal, DX12) has an adapter: it is the weakest compute path.
fn ranked_adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let mut adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    if adapters.is_empty() {
        adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::SECONDARY));
    }
    adapters.sort_by_key(|a| {
        let info = a.get_info();
        (type_rank(info.device_type), backend_rank(info.backend))
    });
    adapters
}

fn summary(index: usize, adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    let features = adapter.features();
    let limits = adapter.limits();
    AdapterSummary {
        index,
        backend: info.backend.to_string(),
        name: info.name,
        device_type: format!("{:?}", info.device_type),
        driver: [info.driver, info.driver_info]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
        subgroup: features.contains(wgpu::Features::SUBGROUP),
        subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        max_buffer_size: limits.max_buffer_size,
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
    }
}

/// The adapters this machine offers, best first.
pub fn list_adapters() -> Vec<AdapterSummary> {
    ranked_adapters(&instance())
        .iter()
        .enumerate()
        .map(|(i, a)| summary(i, a))
        .collect()
}

/// The first device error, kept until the backend is dropped (errors are sticky).
#[derive(Clone, Default)]
pub(super) struct ErrorSlot(Arc<Mutex<Option<String>>>);

impl ErrorSlot {
    pub fn set(&self, msg: String) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            tracing::error!("wgpu device error: {msg}");
            *slot = Some(msg);
        }
    }

    pub fn check(&self) -> Result<()> {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(msg) => Err(Error::Device(msg.clone())),
            None => Ok(()),
        }
    }
}

/// An open device and what the kernels may rely on.
pub(super) struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub summary: AdapterSummary,
    pub limits: wgpu::Limits,
    /// SHADER_F16 is enabled (and not disabled by the portable option).
    pub shader_f16: bool,
    /// Timestamps can be written inside compute passes (asked for only when profiling), or
    /// why not.
    pub timestamps: std::result::Result<(), String>,
    pub errors: ErrorSlot,
}

/// Opens adapter `adapter_index` of `list_adapters()` (the best one when None). `portable`
/// requests no optional kernel feature, so that the portable kernels run even where better ones
/// exist. `profile` asks for the timestamp queries of the profile (profile.rs).
pub(super) fn open(adapter_index: Option<usize>, portable: bool, profile: bool) -> Result<Gpu> {
    let instance = instance();
    let mut adapters = ranked_adapters(&instance);
    if adapters.is_empty() {
        return Err(Error::Device(
            "no GPU adapter found (no Vulkan, Metal, DX12 or GL driver answered; on Linux \
             without a GPU, Mesa's lavapipe provides one: apt-get install mesa-vulkan-drivers)"
                .into(),
        ));
    }
    let index = adapter_index.unwrap_or(0);
    if index >= adapters.len() {
        return Err(Error::Device(format!(
            "adapter {index} does not exist: this machine has {} (see `anyllama devices`)",
            adapters.len()
        )));
    }
    let adapter = adapters.swap_remove(index);
    let summary = summary(index, &adapter);
    let mut wanted = if portable {
        wgpu::Features::empty()
    } else {
        wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP
    };
    // Both: TIMESTAMP_QUERY_INSIDE_PASSES is what lets every dispatch of the one long compute
    // pass be timed, and it is usable only together with TIMESTAMP_QUERY.
    let stamps = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
    if profile {
        wanted |= stamps;
    }
    let features = adapter.features() & wanted;
    let timestamps = if !profile {
        Err("not asked for".to_string())
    } else if features.contains(stamps) {
        Ok(())
    } else {
        let missing: Vec<_> = [
            (wgpu::Features::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
            (
                wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES,
                "TIMESTAMP_QUERY_INSIDE_PASSES",
            ),
        ]
        .into_iter()
        .filter(|(f, _)| !features.contains(*f))
        .map(|(_, name)| name)
        .collect();
        Err(format!(
            "{} ({}) lacks {}",
            summary.name,
            summary.backend,
            missing.join(" and ")
        ))
    };
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("anyllama"),
        required_features: features,
        required_limits: limits.clone(),
        ..Default::default()
    }))
    .map_err(|e| Error::Device(format!("opening {}: {e}", summary.name)))?;
    let errors = ErrorSlot::default();
    let sink = errors.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        let kind = match e {
            wgpu::Error::OutOfMemory { .. } => "out of device memory",
            wgpu::Error::Validation { .. } => "validation error",
            wgpu::Error::Internal { .. } => "internal error",
        };
        sink.set(format!("{kind}: {e}"));
    }));
    let sink = errors.clone();
    let name = summary.name.clone();
    device.set_device_lost_callback(move |reason, msg| {
        if reason != wgpu::DeviceLostReason::Destroyed {
            sink.set(format!("device {name} lost ({reason:?}): {msg}"));
        }
    });
    tracing::info!("wgpu adapter: {summary}");
    Ok(Gpu {
        device,
        queue,
        limits,
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
        timestamps,
        summary,
        errors,
    })
}
