//! Picking a backend at run time. Model code is generic over `B: Backend`; this is the one place
//! that turns the user's `--backend` choice into a concrete type, so no caller outside
//! src/backend/ needs to know which backends were compiled in.

use super::cpu::Cpu;
use super::Backend;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// A GPU adapter if there is one, else the CPU (says which on stderr).
    Auto,
    Wgpu,
    Cpu,
    Cuda,
}

/// Work to run on whichever backend gets picked.
pub trait WithBackend {
    type Output;
    fn run<B: Backend>(self, b: B) -> Result<Self::Output>;
}

/// Builds the chosen backend and runs `work` on it. `adapter` selects a GPU adapter by index.
pub fn with_backend<W: WithBackend>(
    choice: BackendChoice,
    adapter: Option<usize>,
    work: W,
) -> Result<W::Output> {
    match choice {
        BackendChoice::Cpu => work.run(Cpu::new()),
        BackendChoice::Cuda => Err(Error::Device(
            "this build has no CUDA backend; use --backend wgpu (Vulkan/Metal/DX12) or cpu".into(),
        )),
        BackendChoice::Wgpu => run_wgpu(adapter, work),
        BackendChoice::Auto => auto(adapter, work),
    }
}

#[cfg(feature = "wgpu")]
fn run_wgpu<W: WithBackend>(adapter: Option<usize>, work: W) -> Result<W::Output> {
    work.run(super::wgpu::Wgpu::new(adapter)?)
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu<W: WithBackend>(_adapter: Option<usize>, _work: W) -> Result<W::Output> {
    Err(Error::Device(
        "this build has no wgpu backend (built without the `wgpu` feature)".into(),
    ))
}

#[cfg(feature = "wgpu")]
fn auto<W: WithBackend>(adapter: Option<usize>, work: W) -> Result<W::Output> {
    match super::wgpu::Wgpu::new(adapter) {
        // A software rasteriser (lavapipe, SwiftShader) is slower than the CPU backend.
        Ok(b) if adapter.is_some() || !b.is_software() => {
            eprintln!("backend: wgpu on {}", b.device_name());
            work.run(b)
        }
        Ok(b) => {
            eprintln!(
                "backend: cpu (the only GPU adapter, {}, is a software renderer)",
                b.device_name()
            );
            work.run(Cpu::new())
        }
        Err(e) => {
            eprintln!("backend: cpu (no usable GPU adapter: {e})");
            work.run(Cpu::new())
        }
    }
}

#[cfg(not(feature = "wgpu"))]
fn auto<W: WithBackend>(_adapter: Option<usize>, work: W) -> Result<W::Output> {
    eprintln!("backend: cpu (built without GPU backends)");
    work.run(Cpu::new())
}

/// What `anyllama devices` prints: every GPU adapter, then the CPU backend.
pub fn describe_devices() -> String {
    #[cfg_attr(not(feature = "wgpu"), allow(unused_mut))]
    let mut s = String::new();
    #[cfg(feature = "wgpu")]
    for a in super::wgpu::list_adapters() {
        s += &format!("wgpu {a}\n");
    }
    s + &format!("cpu: {}\n", Cpu::new().device_name())
}
