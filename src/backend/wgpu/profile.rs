//! `ANYLLAMA_WGPU_PROFILE=1`: the GPU time of every dispatch, added up per kernel, and the host's
//! time recording dispatches, submitting them and waiting for the device (which tells whether a
//! decode step is bound by the CPU or by the GPU), printed when the backend is dropped.
//!
//! Each dispatch is bracketed by two timestamps written inside the compute pass (this needs
//! TIMESTAMP_QUERY_INSIDE_PASSES: every dispatch of a step shares one long pass). The timestamps
//! of one submission go to one query set (a batch); at submit the batch is resolved into a
//! buffer and copied to a mappable one, which is mapped once the submission is queued and read
//! at the next wait, when the submission has completed. Batches are then reused. Without the
//! features, only the host times are kept.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Dispatches timed per batch: two timestamps each, in a query set of the largest size.
pub(super) const BATCH_DISPATCHES: usize = wgpu::QUERY_SET_MAX_QUERIES as usize / 2;
const BATCH_BYTES: u64 = wgpu::QUERY_SET_MAX_QUERIES as u64 * 8;

type MapSlot = Arc<Mutex<Option<Result<(), wgpu::BufferAsyncError>>>>;

/// The timestamps of one submission.
struct Batch {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// The kernel of each timed dispatch, in order: dispatch i wrote queries 2i and 2i + 1.
    kernels: Vec<Arc<str>>,
    mapped: MapSlot,
}

#[derive(Default)]
struct HostTimes {
    record: Duration,
    dispatches: u64,
    submit: Duration,
    submits: u64,
    wait: Duration,
    waits: u64,
}

pub(super) struct Profiler {
    device: wgpu::Device,
    /// Nanoseconds per timestamp tick, or why the GPU times are missing.
    tick_ns: Result<f64, String>,
    /// The batch the pending encoder writes into.
    recording: Option<Batch>,
    /// Submitted batches, mapped or being mapped.
    submitted: Vec<Batch>,
    spare: Vec<Batch>,
    /// Per kernel: GPU milliseconds and launches.
    totals: HashMap<Arc<str>, (f64, u64)>,
    host: HostTimes,
}

impl Profiler {
    /// `timestamps`: whether the device was opened with the timestamp features, or why not.
    pub fn new(
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        timestamps: Result<(), String>,
    ) -> Profiler {
        Profiler {
            device: device.clone(),
            tick_ns: timestamps.map(|()| queue.get_timestamp_period() as f64),
            recording: None,
            submitted: Vec::new(),
            spare: Vec::new(),
            totals: HashMap::new(),
            host: HostTimes::default(),
        }
    }

    /// The recording batch has no room for another dispatch: submit before the next one.
    pub fn full(&self) -> bool {
        self.recording
            .as_ref()
            .is_some_and(|b| b.kernels.len() == BATCH_DISPATCHES)
    }

    /// Records `dispatch` into `pass` between two timestamps, under `kernel`'s name.
    pub fn timed(
        &mut self,
        pass: &mut wgpu::ComputePass<'static>,
        kernel: &Arc<str>,
        dispatch: impl FnOnce(&mut wgpu::ComputePass<'static>),
    ) {
        if self.tick_ns.is_err() {
            return dispatch(pass);
        }
        if self.recording.is_none() {
            self.recording = Some(self.spare.pop().unwrap_or_else(|| self.new_batch()));
        }
        let batch = self.recording.as_mut().expect("just set");
        debug_assert!(batch.kernels.len() < BATCH_DISPATCHES);
        let first = 2 * batch.kernels.len() as u32;
        pass.write_timestamp(&batch.queries, first);
        dispatch(pass);
        pass.write_timestamp(&batch.queries, first + 1);
        batch.kernels.push(kernel.clone());
    }

    fn new_batch(&self) -> Batch {
        let buffer = |label, usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: BATCH_BYTES,
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        Batch {
            queries: self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profile timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: wgpu::QUERY_SET_MAX_QUERIES,
            }),
            resolved: buffer("profile resolve", U::QUERY_RESOLVE | U::COPY_SRC),
            readback: buffer("profile readback", U::MAP_READ | U::COPY_DST),
            kernels: Vec::new(),
            mapped: MapSlot::default(),
        }
    }

    /// Before the pending encoder is finished (no pass open): resolves its timestamps into the
    /// batch's mappable buffer.
    pub fn resolve(&mut self, encoder: &mut wgpu::CommandEncoder) {
        let Some(batch) = self.recording.as_ref().filter(|b| !b.kernels.is_empty()) else {
            return;
        };
        let queries = 2 * batch.kernels.len() as u32;
        encoder.resolve_query_set(&batch.queries, 0..queries, &batch.resolved, 0);
        encoder.copy_buffer_to_buffer(&batch.resolved, 0, &batch.readback, 0, queries as u64 * 8);
    }

    /// After the encoder that `resolve` saw was submitted: maps its batch for `collect`.
    pub fn submitted(&mut self, took: Duration) {
        self.host.submit += took;
        self.host.submits += 1;
        let Some(batch) = self.recording.take() else {
            return;
        };
        let slot = batch.mapped.clone();
        let bytes = 16 * batch.kernels.len() as u64;
        batch
            .readback
            .map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            });
        self.submitted.push(batch);
    }

    pub fn recorded(&mut self, took: Duration) {
        self.host.record += took;
        self.host.dispatches += 1;
    }

    /// After a wait for every submission: adds up the mapped batches' times.
    pub fn waited(&mut self, took: Duration) {
        self.host.wait += took;
        self.host.waits += 1;
        let Ok(tick_ns) = self.tick_ns else {
            return;
        };
        for mut batch in std::mem::take(&mut self.submitted) {
            let mapped = batch
                .mapped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            match mapped {
                // Not mapped yet (the wait ended early): try again at the next wait.
                None => {
                    self.submitted.push(batch);
                    continue;
                }
                Some(Ok(())) => {
                    let bytes = 16 * batch.kernels.len() as u64;
                    if let Ok(view) = batch.readback.get_mapped_range(0..bytes) {
                        let stamp = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
                        for (kernel, pair) in batch.kernels.iter().zip(view.chunks_exact(16)) {
                            let ticks = stamp(&pair[8..]).saturating_sub(stamp(&pair[..8]));
                            let ms = ticks as f64 * tick_ns * 1e-6;
                            let t = self.totals.entry(kernel.clone()).or_default();
                            t.0 += ms;
                            t.1 += 1;
                        }
                    }
                    batch.readback.unmap();
                }
                // A failed map (device lost): the batch's times are lost.
                Some(Err(_)) => {}
            }
            batch.kernels.clear();
            self.spare.push(batch);
        }
    }

    pub fn report(&self) -> String {
        let mut s = String::new();
        match &self.tick_ns {
            Err(why) => {
                let _ = writeln!(s, "wgpu profile: no GPU times: {why}");
            }
            Ok(_) => {
                let all: f64 = self.totals.values().map(|t| t.0).sum();
                let launches: u64 = self.totals.values().map(|t| t.1).sum();
                let mut rows: Vec<_> = self.totals.iter().collect();
                rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
                let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(6);
                let _ = writeln!(
                    s,
                    "wgpu profile: {all:.1} ms of GPU time in {launches} timed dispatches\n\
                     {:<width$} {:>9} {:>10} {:>9} {:>6}",
                    "kernel", "launches", "total ms", "us/launch", "share"
                );
                for (name, (ms, n)) in rows {
                    let _ = writeln!(
                        s,
                        "{name:<width$} {n:>9} {ms:>10.2} {:>9.2} {:>5.1}%",
                        ms * 1000.0 / *n as f64,
                        100.0 * ms / all.max(1e-9)
                    );
                }
            }
        }
        let h = &self.host;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let _ = writeln!(
            s,
            "wgpu host: {:.1} ms recording {} dispatches ({:.1} us each), {:.1} ms submitting {} \
             command buffers, {:.1} ms waiting for the device in {} waits",
            ms(h.record),
            h.dispatches,
            ms(h.record) * 1e3 / h.dispatches.max(1) as f64,
            ms(h.submit),
            h.submits,
            ms(h.wait),
            h.waits
        );
        s
    }
}
