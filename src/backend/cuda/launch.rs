//! Device memory and kernel launches. A `DevBuf` is one cudarc allocation plus its raw device
//! address (event tracking is off: one in-order stream orders everything). Kernels are launched
//! with cuLaunchKernel on that stream, arguments passed as pointers to host values.

use super::Cuda;
use crate::error::{Error, Result};
use crate::pool::Buf;
use cudarc::driver::{result, sys, CudaFunction, CudaSlice, DevicePtr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// Most arguments any kernel in shaders/cuda takes.
const MAX_ARGS: usize = 12;

/// One device allocation.
pub struct DevBuf {
    pub(super) ptr: sys::CUdeviceptr,
    pub(super) bytes: usize,
    _slice: CudaSlice<u8>,
}

/// Internal scratch buffers that ops reuse (all ops run in order on one stream).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Scratch {
    /// Split-KV partial outputs and (max, sum) pairs of attention_decode.
    AttnParts,
    AttnMl,
    /// Gathered K and V, Q rounded to f16 (tensor-core path), and the score matrix of the
    /// cuBLAS prefill attention.
    AttnK,
    AttnV,
    AttnQ,
    AttnScores,
    /// Probabilities of `sample` for `sample_walk`.
    SampleProbs,
    /// Widened weights and rounded activations of the prefill GEMM.
    GemmW,
    GemmX,
    /// The decode-step position read by graph replays.
    StepPos,
    /// Training: weights widened to f32 for an SGEMM, one chunk's logits, each row's loss,
    /// block partial sums, rms_norm's per-row rstd, attention's D = rowsum(dout * out).
    TrainW,
    TrainLogits,
    TrainRowLoss,
    TrainPartials,
    TrainRstd,
    TrainDelta,
    /// Training: one chunk's dlogits rounded to bf16 (the loss's tensor-core products).
    TrainHalfLogits,
}

#[derive(Default)]
pub struct ScratchBufs(Mutex<HashMap<Scratch, DevBuf>>);

pub(super) fn cuda_err(what: &str) -> impl Fn(result::DriverError) -> Error + '_ {
    move |e| Error::Device(format!("CUDA {what}: {e}"))
}

/// A kernel argument: a host value that outlives the launch call, and its bytes (which a
/// decode-step trace compares between steps).
pub struct KArg<'a>(&'a [u8]);

pub fn arg<T: bytemuck::NoUninit>(v: &T) -> KArg<'_> {
    KArg(bytemuck::bytes_of(v))
}

impl Cuda {
    pub(super) fn alloc_dev(&self, bytes: usize) -> Result<DevBuf> {
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| {
            let free = self.memory_info().map(|(f, _)| f).unwrap_or(0);
            Error::Device(format!(
                "CUDA out of memory? allocating {bytes} bytes failed ({e}); {} MiB free",
                free >> 20
            ))
        })?;
        let (ptr, _) = slice.device_ptr(&self.stream);
        Ok(DevBuf {
            ptr,
            bytes,
            _slice: slice,
        })
    }

    /// Device address of a buffer, checking that it holds `need` bytes.
    pub(super) fn ptr(&self, b: &Buf<Cuda>, need: usize, what: &str, op: &str) -> Result<u64> {
        let raw = b.raw();
        if need > raw.bytes {
            return Err(Error::Device(format!(
                "{op}: {what} holds {} bytes, the op needs {need}",
                raw.bytes
            )));
        }
        Ok(raw.ptr)
    }

    /// Address of scratch buffer `which`, grown to at least `bytes` (growth drops the old one
    /// stream-ordered, after the ops that use it).
    pub(super) fn scratch(&self, which: Scratch, bytes: usize) -> Result<u64> {
        let mut map = self.scratch.0.lock().unwrap();
        if let Some(b) = map.get(&which) {
            if b.bytes >= bytes {
                return Ok(b.ptr);
            }
        }
        let b = self.alloc_dev(bytes.next_power_of_two().max(256))?;
        let ptr = b.ptr;
        map.insert(which, b);
        Ok(ptr)
    }

    /// Launches `f` on the stream (recorded into the graph while one is being captured).
    pub(super) fn launch(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &[KArg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let _exclusive = self.graphs.exclusive();
        if self.graphs.tracing() {
            self.graphs
                .trace_launch(f, grid, block, shared, args.iter().map(|a| a.0));
            return Ok(());
        }
        // Kernel arguments as cuLaunchKernel wants them, without a per-launch allocation.
        let mut ptrs = [std::ptr::null_mut::<c_void>(); MAX_ARGS];
        if args.len() > MAX_ARGS {
            return Err(Error::Device(format!(
                "a kernel launch with {} arguments",
                args.len()
            )));
        }
        for (p, a) in ptrs.iter_mut().zip(args) {
            *p = a.0.as_ptr() as *mut c_void;
        }
        let ptrs = &mut ptrs[..args.len()];
        let go = move || {
            unsafe {
                result::launch_kernel(
                    f.cu_function(),
                    grid,
                    (block, 1, 1),
                    shared,
                    self.stream.cu_stream(),
                    ptrs,
                )
            }
            .map_err(cuda_err("kernel launch"))
        };
        match &self.profile {
            Some(_) => self.timed(&self.kernels.name_of(f), go),
            None => {
                let mut go = go;
                go()
            }
        }
    }

    /// "`what` `op`" for the profile's table; nothing is formatted when profiling is off.
    pub(super) fn profile_name(&self, what: &str, op: &str) -> String {
        match &self.profile {
            Some(_) => format!("{what} {op}"),
            None => String::new(),
        }
    }

    /// Runs `enqueue`, timed under `name` when profiling (profile.rs).
    pub(super) fn timed<T>(&self, name: &str, enqueue: impl FnOnce() -> T) -> T {
        match &self.profile {
            Some(p) => p.time(&self.ctx, &self.stream, name, enqueue),
            None => enqueue(),
        }
    }

    /// Launches kernel `name` of `stem`.cu over a 1D grid of `threads` threads, `block` per block.
    pub(super) fn launch_1d(
        &self,
        stem: &'static str,
        name: &'static str,
        threads: usize,
        block: u32,
        args: &[KArg],
    ) -> Result<()> {
        let blocks = threads.div_ceil(block as usize);
        if blocks > u32::MAX as usize {
            return Err(Error::Device(format!(
                "{name}: {threads} threads is too many"
            )));
        }
        let f = self.kernels.get(stem, name)?;
        self.launch(&f, (blocks as u32, 1, 1), block, 0, args)
    }
}
