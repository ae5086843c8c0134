//! Decode steps as CUDA graphs. `Backend::decode_step` hands the backend the closure that
//! enqueues one step's ops. The closure first runs in trace mode: ops check their arguments and
//! record each launch (kernel, grid, argument bytes) instead of launching. Positions are not in
//! that record: while a step is traced or captured, position-dependent kernels read the position
//! from a device word (`StepPos`) and attention sizes its splits for a bucket of positions, so
//! consecutive steps trace the same. A trace seen before replays its graph (after writing the
//! position word); a new one is captured by running the closure again under stream capture.
//! Any buffer that moved changes the trace, so a stale graph is never replayed.

use super::launch::{cuda_err, Scratch};
use super::Cuda;
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaFunction, CudaGraph};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Mutex;

/// Graphs kept at once (one per trace: context buckets x scratch layouts).
const MAX_GRAPHS: usize = 32;
/// Positions per attention bucket: a decode graph serves this many consecutive steps.
pub const POS_BUCKET: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Off,
    Trace,
    Capture,
}

pub struct Graphs {
    enabled: bool,
    mode: Mutex<Mode>,
    state: Mutex<Trace>,
    graphs: Mutex<HashMap<u64, Graph>>,
    /// Held for a whole step by the thread running it, and by any other thread for each of
    /// its enqueues, so that no other thread's op lands inside a capture.
    exclusive: Mutex<()>,
    /// Steps captured, replayed, and run without a graph (`ANYLLAMA_CUDA_DEBUG=1` prints them
    /// when the backend is dropped).
    pub(super) counts: Mutex<[u64; 3]>,
}

/// An instantiated graph. cudarc's handle holds raw pointers; it is only launched or dropped
/// under the `graphs` lock, by the thread that holds `exclusive`.
struct Graph(CudaGraph);
unsafe impl Send for Graph {}

#[derive(Default)]
struct Trace {
    hash: u64,
    graphable: bool,
    pos: Option<u32>,
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h = (*h ^ b as u64).wrapping_mul(0x100000001b3);
    }
}

thread_local! {
    static IN_STEP: Cell<bool> = const { Cell::new(false) };
}

impl Graphs {
    pub fn new(enabled: bool) -> Graphs {
        Graphs {
            enabled,
            mode: Mutex::new(Mode::Off),
            state: Mutex::new(Trace::default()),
            graphs: Mutex::new(HashMap::new()),
            exclusive: Mutex::new(()),
            counts: Mutex::new([0; 3]),
        }
    }

    /// Whether this thread is tracing a step (launches are recorded, not made).
    pub fn tracing(&self) -> bool {
        IN_STEP.with(|s| s.get()) && *self.mode.lock().unwrap() == Mode::Trace
    }

    /// Whether this thread is tracing or capturing a step (positions come from the device).
    pub fn recording(&self) -> bool {
        IN_STEP.with(|s| s.get()) && *self.mode.lock().unwrap() != Mode::Off
    }

    /// Serialises an enqueue from a thread that is not running a step against a step's
    /// capture on another thread (None on the step's own thread, which holds the lock).
    pub fn exclusive(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        if IN_STEP.with(|s| s.get()) {
            None
        } else {
            Some(self.exclusive.lock().unwrap_or_else(|e| e.into_inner()))
        }
    }

    pub fn trace_launch<'a>(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: impl Iterator<Item = &'a [u8]>,
    ) {
        let mut t = self.state.lock().unwrap();
        let mut h = t.hash;
        fnv(&mut h, &(f.cu_function() as usize).to_le_bytes());
        for v in [grid.0, grid.1, grid.2, block, shared] {
            fnv(&mut h, &v.to_le_bytes());
        }
        for a in args {
            fnv(&mut h, a);
        }
        t.hash = h;
    }

    /// An op that cannot be part of a graph (upload, copy, cuBLAS) ran in the step.
    pub fn not_graphable(&self) {
        self.state.lock().unwrap().graphable = false;
    }

    /// Notes the step's position (every position-dependent op of a step must agree).
    pub fn note_pos(&self, pos: usize) {
        let mut t = self.state.lock().unwrap();
        match (t.pos, u32::try_from(pos)) {
            (None, Ok(p)) => t.pos = Some(p),
            (Some(p), Ok(q)) if p == q => {}
            _ => t.graphable = false,
        }
    }

    fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }
}

impl Cuda {
    /// Position argument of a position-dependent kernel: while a step is recorded, the device
    /// word (and 0 in the params, so traces match across steps), else the value itself.
    pub(super) fn step_pos(&self, pos0: usize) -> Result<(u32, u64)> {
        if self.graphs.recording() {
            self.graphs.note_pos(pos0);
            return Ok((0, self.scratch(Scratch::StepPos, 4)?));
        }
        Ok((pos0 as u32, 0))
    }

    pub(super) fn run_step(&self, ops: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        if !self.graphs.enabled || IN_STEP.with(|s| s.get()) {
            return ops();
        }
        let _exclusive = self
            .graphs
            .exclusive
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        IN_STEP.with(|s| s.set(true));
        let r = self.run_step_inner(ops);
        IN_STEP.with(|s| s.set(false));
        self.graphs.set_mode(Mode::Off);
        r
    }

    fn run_step_inner(&self, ops: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        *self.graphs.state.lock().unwrap() = Trace {
            hash: 0xcbf29ce484222325,
            graphable: true,
            pos: None,
        };
        self.graphs.set_mode(Mode::Trace);
        let traced = ops();
        self.graphs.set_mode(Mode::Off);
        traced?;
        let (hash, graphable, pos) = {
            let t = self.graphs.state.lock().unwrap();
            (t.hash, t.graphable, t.pos)
        };
        if !graphable {
            self.graphs.counts.lock().unwrap()[2] += 1;
            return ops();
        }
        let err = cuda_err("graph");
        let mut graphs = self.graphs.graphs.lock().unwrap();
        if !graphs.contains_key(&hash) {
            self.graphs.counts.lock().unwrap()[0] += 1;
            if graphs.len() >= MAX_GRAPHS {
                graphs.clear();
            }
            self.scratch(Scratch::StepPos, 4)?;
            self.stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(&err)?;
            self.graphs.set_mode(Mode::Capture);
            let captured = ops();
            self.graphs.set_mode(Mode::Off);
            let graph = self.stream.end_capture(
                sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            );
            captured?;
            match graph.map_err(&err)? {
                Some(g) => graphs.insert(hash, Graph(g)),
                None => return Err(Error::Device("CUDA graph capture recorded nothing".into())),
            };
        }
        // A step of many sequences' rows reads every position from its batch layout instead.
        if let Some(pos) = pos {
            let pos_ptr = self.scratch(Scratch::StepPos, 4)?;
            self.upload_raw(pos_ptr, bytemuck::bytes_of(&pos))?;
        }
        graphs[&hash].0.launch().map_err(&err)?;
        self.graphs.counts.lock().unwrap()[1] += 1;
        Ok(())
    }
}
