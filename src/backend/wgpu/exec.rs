//! Recording and submitting work. Ops append dispatches to ONE pending command encoder and ONE
//! compute pass, kept open across calls; only a read, a sync, an upload behind pending work, a
//! full params ring or a buffer copy (which must sit outside a pass) ends the pass, and only the
//! first four submit. Per-op params go to a host-side image of a uniform ring buffer, one aligned
//! slot per dispatch, written to the GPU with a single write_buffer just before the submit that
//! uses it (queue writes land before the next submit's commands and after earlier ones, so the
//! ring may be reused right after each submit). Bind groups are cached by (layout, buffers bound),
//! so a decode step that reuses its buffers creates none after the first token. Scratch buffers
//! (attention partials, sampling probabilities) grow rarely and are reused; an op that passes
//! data between its dispatches through one holds `exclusive()`, so that threads sharing the
//! backend cannot interleave there. With ANYLLAMA_WGPU_PROFILE set, dispatches, submits and
//! waits also report to the profiler (profile.rs).

use super::device::{ErrorSlot, Gpu};
use super::pipelines::{Pipeline, PARAMS_BIND_BYTES};
use super::profile::Profiler;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most storage bindings of any kernel.
const MAX_STORAGE: usize = 8;
/// Dispatches per submission before the params ring wraps (a decode step needs a few hundred).
const RING_SLOTS: u64 = 4096;
/// Past this many cached bind groups the cache starts over (it also keeps dropped buffers alive).
const MAX_BIND_GROUPS: usize = 8192;
/// A wait longer than this is reported as a hung device instead of blocking forever.
const WAIT_TIMEOUT: Duration = Duration::from_secs(300);

/// A storage buffer range bound to one binding.
#[derive(Clone, Copy)]
pub(super) struct Bind<'a> {
    pub buf: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

/// Internal scratch buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Scratch {
    AttentionPartials,
    SampleProbs,
}

#[derive(PartialEq, Eq, Hash)]
struct BindGroupKey {
    layout: usize,
    binds: [Option<(wgpu::Buffer, u64, u64)>; MAX_STORAGE],
}

struct State {
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    /// Host image of the params ring for the pending submission.
    params: Vec<u8>,
    used_slots: u64,
    bind_groups: HashMap<BindGroupKey, wgpu::BindGroup>,
    scratch: HashMap<Scratch, wgpu::Buffer>,
    last_submit: Option<wgpu::SubmissionIndex>,
    /// Reads started by `read_start`, by ticket, and idle staging buffers for more.
    in_flight: HashMap<u64, InFlight>,
    staging: Vec<wgpu::Buffer>,
    next_ticket: u64,
    profile: Option<Profiler>,
}

/// A staging buffer being mapped after the submission that copies into it.
struct InFlight {
    buf: wgpu::Buffer,
    submission: wgpu::SubmissionIndex,
    mapped: Arc<Mutex<Option<std::result::Result<(), wgpu::BufferAsyncError>>>>,
    /// Bytes mapped, and where the requested bytes start in them.
    size: u64,
    skip: usize,
}

pub(super) struct Exec {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub errors: ErrorSlot,
    pub limits: wgpu::Limits,
    ring: wgpu::Buffer,
    slot: u64,
    state: Mutex<State>,
    /// Held by an op that records several dispatches through a scratch buffer, so that another
    /// thread's op cannot slip in between and overwrite the scratch.
    multi: Mutex<()>,
    /// `State::profile` is set (known without taking the lock).
    profiling: bool,
}

impl Exec {
    /// `profile`: time every dispatch and the host's work (profile.rs).
    pub fn new(gpu: &Gpu, profile: bool) -> Exec {
        let slot = PARAMS_BIND_BYTES
            .next_multiple_of(gpu.limits.min_uniform_buffer_offset_alignment as u64);
        let ring = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params ring"),
            size: slot * RING_SLOTS,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Exec {
            device: gpu.device.clone(),
            queue: gpu.queue.clone(),
            errors: gpu.errors.clone(),
            limits: gpu.limits.clone(),
            ring,
            slot,
            state: Mutex::new(State {
                encoder: None,
                pass: None,
                params: vec![0; (slot * RING_SLOTS) as usize],
                used_slots: 0,
                bind_groups: HashMap::new(),
                scratch: HashMap::new(),
                last_submit: None,
                in_flight: HashMap::new(),
                staging: Vec::new(),
                next_ticket: 0,
                profile: profile
                    .then(|| Profiler::new(&gpu.device, &gpu.queue, gpu.timestamps.clone())),
            }),
            multi: Mutex::new(()),
            profiling: profile,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps other threads' ops out until the guard drops.
    pub fn exclusive(&self) -> MutexGuard<'_, ()> {
        self.multi.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one dispatch of `p` with `params` (its Params block) and storage `binds`.
    pub fn dispatch(
        &self,
        p: &Pipeline,
        params: &[u8],
        binds: &[Bind],
        groups: [u32; 3],
    ) -> Result<()> {
        self.errors.check()?;
        if binds.len() != p.bindings.len() || binds.len() > MAX_STORAGE {
            return Err(Error::Device(format!(
                "{}: {} buffers bound, the kernel takes {}",
                p.name,
                binds.len(),
                p.bindings.len()
            )));
        }
        debug_assert!(params.len() as u64 <= PARAMS_BIND_BYTES);
        if groups.contains(&0) {
            return Ok(());
        }
        let max = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::Device(format!(
                "dispatch of {groups:?} workgroups exceeds the device limit of {max} per dimension"
            )));
        }
        let started = self.profiling.then(Instant::now);
        let mut st = self.lock();
        if st.used_slots == RING_SLOTS || st.profile.as_ref().is_some_and(Profiler::full) {
            self.submit(&mut st);
        }
        let offset = st.used_slots * self.slot;
        st.params[offset as usize..offset as usize + params.len()].copy_from_slice(params);
        st.used_slots += 1;

        let mut key = BindGroupKey {
            layout: p.layout_id,
            binds: Default::default(),
        };
        for (k, b) in key.binds.iter_mut().zip(binds) {
            *k = Some((b.buf.clone(), b.offset, b.size));
        }
        if st.bind_groups.len() >= MAX_BIND_GROUPS && !st.bind_groups.contains_key(&key) {
            st.bind_groups.clear();
        }
        self.ensure_pass(&mut st);
        let State {
            pass,
            bind_groups,
            profile,
            ..
        } = &mut *st;
        let bind_group = bind_groups
            .entry(key)
            .or_insert_with(|| self.make_bind_group(p, binds));
        let pass = pass.as_mut().expect("pass just opened");
        pass.set_pipeline(&p.pipeline);
        pass.set_bind_group(0, &*bind_group, &[offset as u32]);
        let [x, y, z] = groups;
        match profile {
            None => pass.dispatch_workgroups(x, y, z),
            Some(prof) => {
                prof.timed(pass, &p.name, |pass| pass.dispatch_workgroups(x, y, z));
                if let Some(t0) = started {
                    prof.recorded(t0.elapsed());
                }
            }
        }
        Ok(())
    }

    fn make_bind_group(&self, p: &Pipeline, binds: &[Bind]) -> wgpu::BindGroup {
        let mut entries = Vec::with_capacity(binds.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.ring,
                offset: 0,
                size: wgpu::BufferSize::new(PARAMS_BIND_BYTES),
            }),
        });
        for (&binding, b) in p.bindings.iter().zip(binds) {
            entries.push(wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buf,
                    offset: b.offset,
                    size: wgpu::BufferSize::new(b.size),
                }),
            });
        }
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &p.layout,
            entries: &entries,
        })
    }

    fn ensure_pass(&self, st: &mut State) {
        if st.pass.is_some() {
            return;
        }
        let encoder = st.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        });
        let pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        st.pass = Some(pass.forget_lifetime());
    }

    /// Ends the open pass and returns the pending encoder (a new one if none is pending).
    fn encoder<'s>(&self, st: &'s mut State) -> &'s mut wgpu::CommandEncoder {
        st.pass = None;
        st.encoder.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None })
        })
    }

    /// Submits the pending encoder with its params (no wait).
    fn submit(&self, st: &mut State) {
        st.pass = None;
        let Some(mut encoder) = st.encoder.take() else {
            return;
        };
        let started = self.profiling.then(Instant::now);
        if let Some(prof) = &mut st.profile {
            prof.resolve(&mut encoder);
        }
        if st.used_slots > 0 {
            let used = (st.used_slots * self.slot) as usize;
            self.queue.write_buffer(&self.ring, 0, &st.params[..used]);
            st.used_slots = 0;
        }
        st.last_submit = Some(self.queue.submit([encoder.finish()]));
        if let (Some(prof), Some(t0)) = (&mut st.profile, started) {
            prof.submitted(t0.elapsed());
        }
    }

    fn wait(&self, st: &mut State) -> Result<()> {
        let started = self.profiling.then(Instant::now);
        let waited = self.wait_for(st.last_submit.take());
        if let (Some(prof), Some(t0)) = (&mut st.profile, started) {
            prof.waited(t0.elapsed());
        }
        waited
    }

    /// Waits for submission `index` (every submission when None); a timeout or a lost device
    /// becomes the sticky error.
    fn wait_for(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: Some(WAIT_TIMEOUT),
            })
            .map_err(|e| {
                let msg = format!("waiting for the device: {e}");
                self.errors.set(msg.clone());
                Error::Device(msg)
            })?;
        self.errors.check()
    }

    /// Waits for everything enqueued.
    pub fn sync(&self) -> Result<()> {
        self.errors.check()?;
        let mut st = self.lock();
        self.submit(&mut st);
        self.wait(&mut st)
    }

    /// Writes `data` at `offset` of `dst` after every op enqueued so far.
    pub fn upload(&self, dst: &wgpu::Buffer, offset: u64, data: &[u8]) -> Result<()> {
        self.errors.check()?;
        if data.is_empty() {
            return Ok(());
        }
        if offset % 4 != 0 {
            return Err(Error::Device(format!(
                "upload at byte offset {offset}: wgpu writes start on 4-byte boundaries"
            )));
        }
        let end = offset + (data.len() as u64).next_multiple_of(4);
        if end > dst.size() {
            return Err(Error::Device(format!(
                "upload of {} bytes at offset {offset} past a {}-byte buffer",
                data.len(),
                dst.size()
            )));
        }
        let mut st = self.lock();
        // Queue writes run before the next submit: pending ops must be submitted first.
        if st.encoder.is_some() {
            self.submit(&mut st);
        }
        if data.len() % 4 == 0 {
            self.queue.write_buffer(dst, offset, data);
        } else {
            // The last word is completed with zeros.
            let mut padded = data.to_vec();
            padded.resize(data.len().next_multiple_of(4), 0);
            self.queue.write_buffer(dst, offset, &padded);
        }
        Ok(())
    }

    pub fn copy(
        &self,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        src: &wgpu::Buffer,
        src_offset: u64,
        bytes: u64,
    ) -> Result<()> {
        self.errors.check()?;
        if bytes == 0 {
            return Ok(());
        }
        if dst_offset % 4 != 0 || src_offset % 4 != 0 || bytes % 4 != 0 {
            return Err(Error::Device(format!(
                "copy of {bytes} bytes from offset {src_offset} to {dst_offset}: wgpu copies \
                 whole 4-byte words"
            )));
        }
        if src_offset + bytes > src.size() || dst_offset + bytes > dst.size() {
            return Err(Error::Device(format!(
                "copy of {bytes} bytes from offset {src_offset} of a {}-byte buffer to offset \
                 {dst_offset} of a {}-byte buffer is out of range",
                src.size(),
                dst.size()
            )));
        }
        if src == dst && src_offset < dst_offset + bytes && dst_offset < src_offset + bytes {
            return Err(Error::Device(
                "copy between overlapping ranges of one buffer".into(),
            ));
        }
        let mut st = self.lock();
        self.encoder(&mut st)
            .copy_buffer_to_buffer(src, src_offset, dst, dst_offset, bytes);
        Ok(())
    }

    /// Waits for every enqueued op, then reads `out.len()` bytes at `offset` of `src`.
    pub fn read(&self, src: &wgpu::Buffer, offset: u64, out: &mut [u8]) -> Result<()> {
        if out.is_empty() {
            self.check_range(src, offset, 0)?;
            return self.sync();
        }
        let ticket = self.read_start(src, offset, out.len() as u64)?;
        self.read_finish(ticket, out)
    }

    fn check_range(&self, src: &wgpu::Buffer, offset: u64, len: u64) -> Result<()> {
        self.errors.check()?;
        if offset.checked_add(len).is_none_or(|end| end > src.size()) {
            return Err(Error::Device(format!(
                "read of {len} bytes at offset {offset} past a {}-byte buffer",
                src.size()
            )));
        }
        Ok(())
    }

    /// Submits everything enqueued plus a copy of `len` (> 0) bytes at `offset` of `src` to a
    /// staging buffer, and starts mapping it; returns the read's ticket. No wait.
    pub fn read_start(&self, src: &wgpu::Buffer, offset: u64, len: u64) -> Result<u64> {
        self.check_range(src, offset, len)?;
        // Copies move whole words: read the enclosing word-aligned range.
        let start = offset & !3;
        let size = (offset + len).next_multiple_of(4) - start;
        let mut st = self.lock();
        let buf = match st.staging.iter().position(|b| b.size() >= size) {
            Some(i) => st.staging.swap_remove(i),
            None => self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: size.next_power_of_two().max(256),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        };
        self.encoder(&mut st)
            .copy_buffer_to_buffer(src, start, &buf, 0, size);
        self.submit(&mut st);
        let submission = st.last_submit.clone().expect("just submitted");
        let mapped = Arc::new(Mutex::new(None));
        let slot = mapped.clone();
        buf.map_async(wgpu::MapMode::Read, 0..size, move |r| {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        });
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let skip = (offset - start) as usize;
        st.in_flight.insert(
            ticket,
            InFlight {
                buf,
                submission,
                mapped,
                size,
                skip,
            },
        );
        Ok(ticket)
    }

    /// Waits for the read `ticket` (only: later submissions may still run) and copies it out.
    pub fn read_finish(&self, ticket: u64, out: &mut [u8]) -> Result<()> {
        let r = {
            let mut st = self.lock();
            st.in_flight
                .remove(&ticket)
                .ok_or_else(|| Error::Device(format!("no read in flight with ticket {ticket}")))?
        };
        // Polling without the state lock lets other threads keep recording meanwhile. Another
        // thread's poll may be the one that runs this buffer's map callback, and only after our
        // poll returned: poll again until the callback has run.
        let start = Instant::now();
        let result = loop {
            self.wait_for(Some(r.submission.clone()))?;
            if let Some(done) = r.mapped.lock().unwrap_or_else(|e| e.into_inner()).take() {
                break done;
            }
            if start.elapsed() > WAIT_TIMEOUT {
                return Err(Error::Device("the readback buffer was never mapped".into()));
            }
            std::thread::yield_now();
        };
        if self.profiling {
            // The profile batches of the submissions waited for are mapped by now: count them.
            if let Some(prof) = &mut self.lock().profile {
                prof.waited(start.elapsed());
            }
        }
        if let Err(e) = result {
            return Err(Error::Device(format!("mapping the readback buffer: {e}")));
        }
        {
            let view = r
                .buf
                .get_mapped_range(0..r.size)
                .map_err(|e| Error::Device(format!("reading the readback buffer: {e}")))?;
            let want = r.skip + out.len();
            if want as u64 > r.size {
                return Err(Error::Device(format!(
                    "a read of {} bytes finished into {} bytes",
                    r.size as usize - r.skip,
                    out.len()
                )));
            }
            out.copy_from_slice(&view[r.skip..want]);
        }
        r.buf.unmap();
        let mut st = self.lock();
        // A few idle staging buffers cover a decode loop; more are dropped.
        if st.staging.len() < 4 {
            st.staging.push(r.buf);
        }
        Ok(())
    }

    /// A scratch buffer of at least `bytes` (contents undefined), grown by half when too small.
    pub fn scratch(&self, which: Scratch, bytes: u64) -> Result<wgpu::Buffer> {
        let mut st = self.lock();
        if let Some(b) = st.scratch.get(&which) {
            if b.size() >= bytes {
                return Ok(b.clone());
            }
        }
        let size = (bytes + bytes / 2).next_multiple_of(256);
        let buf = self.create_buffer(size, "scratch")?;
        st.scratch.insert(which, buf.clone());
        Ok(buf)
    }

    /// A storage buffer; out-of-memory and limit errors are caught here, not left sticky.
    pub fn create_buffer(&self, bytes: u64, label: &str) -> Result<wgpu::Buffer> {
        if bytes > self.limits.max_buffer_size {
            return Err(Error::Device(format!(
                "a {label} buffer of {bytes} bytes exceeds the device's largest buffer ({} bytes)",
                self.limits.max_buffer_size
            )));
        }
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(16).next_multiple_of(16),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let invalid = pollster::block_on(invalid.pop());
        let oom = pollster::block_on(oom.pop());
        match oom.or(invalid) {
            None => Ok(buf),
            Some(e) => Err(Error::Device(format!("allocating {bytes} bytes: {e}"))),
        }
    }

    /// The profile so far (after waiting for every enqueued op); None when not profiling.
    pub fn profile_report(&self) -> Option<String> {
        if !self.profiling {
            return None;
        }
        // A failed device still reports what was timed before it failed.
        let _ = self.sync();
        self.lock().profile.as_ref().map(Profiler::report)
    }

    /// Forgets cached bind groups (they keep their buffers alive).
    pub fn clear_bind_groups(&self) {
        self.lock().bind_groups.clear();
    }
}
