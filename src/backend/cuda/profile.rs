//! `ANYLLAMA_CUDA_PROFILE=1`: time every kernel with a pair of CUDA events (graphs off, so each
//! launch is its own), add the times up per kernel at each sync, and print the table when the
//! backend is dropped: where a decode or prefill step spends its GPU time, kernel by kernel.
//! cuBLAS calls are timed the same way under the name `cublas`.

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct Profile {
    pending: Mutex<Vec<(String, CudaEvent, CudaEvent)>>,
    totals: Mutex<HashMap<String, (f64, u64)>>,
}

impl Profile {
    /// Events around one enqueue (`run` enqueues it).
    pub fn time<T>(
        &self,
        ctx: &Arc<CudaContext>,
        stream: &CudaStream,
        name: &str,
        run: impl FnOnce() -> T,
    ) -> T {
        let event = || {
            ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .ok()
        };
        let (start, end) = (event(), event());
        if let Some(s) = &start {
            let _ = s.record(stream);
        }
        let out = run();
        if let (Some(s), Some(e)) = (start, end) {
            if e.record(stream).is_ok() {
                self.pending.lock().unwrap().push((name.to_string(), s, e));
            }
        }
        out
    }

    /// Adds up the timed launches (after a sync, when every event has completed).
    pub fn collect(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        let mut totals = self.totals.lock().unwrap();
        for (name, s, e) in pending {
            if let Ok(ms) = s.elapsed_ms(&e) {
                let t = totals.entry(name).or_default();
                t.0 += ms as f64;
                t.1 += 1;
            }
        }
    }

    pub fn report(&self) -> String {
        self.collect();
        let totals = self.totals.lock().unwrap();
        let all: f64 = totals.values().map(|t| t.0).sum();
        let mut rows: Vec<_> = totals.iter().collect();
        rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        let mut s = format!(
            "cuda profile: {all:.1} ms of GPU time in timed launches\n{:<28} {:>9} {:>10} {:>9} {:>6}\n",
            "kernel", "launches", "total ms", "us/launch", "share"
        );
        for (name, (ms, n)) in rows {
            s += &format!(
                "{name:<28} {n:>9} {ms:>10.2} {:>9.2} {:>5.1}%\n",
                ms * 1000.0 / *n as f64,
                100.0 * ms / all.max(1e-9)
            );
        }
        s
    }
}
