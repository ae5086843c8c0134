//! Picking a backend at run time. Model code is generic over `B: Backend`; this is the one place
//! that turns the user's `--backend` choice into a concrete type, so no caller outside
//! src/backend/ needs to know which backends were compiled in.

use super::cpu::Cpu;
use super::Backend;
#[cfg(not(feature = "cuda"))]
use crate::error::Error;
use crate::error::Result;

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
        BackendChoice::Cuda => run_cuda(adapter, work),
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

#[cfg(feature = "cuda")]
fn run_cuda<W: WithBackend>(device: Option<usize>, work: W) -> Result<W::Output> {
    work.run(super::cuda::Cuda::new(device)?)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda<W: WithBackend>(_device: Option<usize>, _work: W) -> Result<W::Output> {
    Err(Error::Device(
        "this build has no CUDA backend (build with `--features cuda`); use --backend wgpu \
         (Vulkan/Metal/DX12) or cpu"
            .into(),
    ))
}

/// Auto: CUDA first where it was built in and a driver is present, then a GPU adapter
/// through wgpu, then the CPU.
fn auto<W: WithBackend>(adapter: Option<usize>, work: W) -> Result<W::Output> {
    #[cfg(feature = "cuda")]
    match super::cuda::unavailable_reason() {
        None => match super::cuda::Cuda::new(adapter) {
            Ok(b) => {
                eprintln!("backend: cuda on {}", b.device_name());
                return work.run(b);
            }
            Err(e) => eprintln!("backend: not cuda ({e})"),
        },
        Some(why) => eprintln!("backend: not cuda ({why})"),
    }
    auto_wgpu(adapter, work)
}

#[cfg(feature = "wgpu")]
fn auto_wgpu<W: WithBackend>(adapter: Option<usize>, work: W) -> Result<W::Output> {
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
fn auto_wgpu<W: WithBackend>(_adapter: Option<usize>, work: W) -> Result<W::Output> {
    eprintln!("backend: cpu (built without GPU backends)");
    work.run(Cpu::new())
}

/// Training work to run on whichever training backend gets picked.
pub trait WithTrainBackend {
    type Output;
    fn run<B: super::train::TrainBackend>(self, b: B) -> Result<Self::Output>;
}

/// Builds the chosen training backend (CUDA or the CPU) and runs `work` on it; auto prefers
/// CUDA where it was built in and a driver is present.
pub fn with_train_backend<W: WithTrainBackend>(
    choice: BackendChoice,
    device: Option<usize>,
    work: W,
) -> Result<W::Output> {
    match choice {
        BackendChoice::Cpu => work.run(Cpu::new()),
        BackendChoice::Wgpu => Err(crate::error::Error::Usage(
            "training runs on --backend cuda or cpu; the wgpu backend does not train yet".into(),
        )),
        #[cfg(feature = "cuda")]
        BackendChoice::Cuda => work.run(super::cuda::Cuda::new(device)?),
        #[cfg(feature = "cuda")]
        BackendChoice::Auto => match super::cuda::unavailable_reason() {
            None => {
                let b = super::cuda::Cuda::new(device)?;
                eprintln!("backend: cuda on {}", b.device_name());
                work.run(b)
            }
            Some(why) => {
                eprintln!("backend: cpu (not cuda: {why})");
                work.run(Cpu::new())
            }
        },
        #[cfg(not(feature = "cuda"))]
        BackendChoice::Cuda => {
            let _ = device;
            Err(crate::error::Error::Device(
                "this build has no CUDA backend (build with `--features cuda`); use --backend \
                 cpu to train on the CPU"
                    .into(),
            ))
        }
        #[cfg(not(feature = "cuda"))]
        BackendChoice::Auto => {
            eprintln!("backend: cpu (built without CUDA)");
            work.run(Cpu::new())
        }
    }
}

/// What `anyllama devices` prints: every GPU adapter, then the CPU backend.
pub fn describe_devices() -> String {
    #[cfg_attr(not(feature = "wgpu"), allow(unused_mut))]
    let mut s = String::new();
    #[cfg(feature = "cuda")]
    match super::cuda::Cuda::new(None) {
        Ok(b) => s += &format!("cuda 0: {}\n", b.device_name()),
        Err(e) => s += &format!("cuda: unavailable ({e})\n"),
    }
    #[cfg(feature = "wgpu")]
    for a in super::wgpu::list_adapters() {
        s += &format!("wgpu {a}\n");
    }
    s + &format!("cpu: {}\n", Cpu::new().device_name())
}
