//! Reads that do not wait: `read_start` copies device bytes into page-locked host memory on the
//! stream and records an event behind the copy; `read_finish` waits for that event only, so
//! the host can enqueue (and the device run) the next decode step meanwhile. Page-locked
//! buffers are kept for reuse: a decode loop has at most two reads in flight.

use super::Cuda;
use crate::backend::PendingRead;
use crate::error::{Error, Result};
use cudarc::driver::{result, CudaEvent, PinnedHostSlice};
use std::collections::HashMap;

/// Smallest page-locked buffer allocated (a token id needs 4 bytes).
const MIN_STAGING: usize = 4096;
/// Idle page-locked buffers kept for reuse.
const KEEP_IDLE: usize = 4;

struct InFlight {
    host: PinnedHostSlice<u8>,
    done: CudaEvent,
    bytes: usize,
}

#[derive(Default)]
pub(super) struct Readbacks {
    in_flight: HashMap<u64, InFlight>,
    /// Page-locked buffers with the event that marks their copy done, reused read after read.
    idle: Vec<(PinnedHostSlice<u8>, CudaEvent)>,
    next_ticket: u64,
}

fn cuda_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| {
        Error::Device(format!(
            "CUDA {what} (a kernel failed or the device was lost): {e}"
        ))
    }
}

impl Cuda {
    /// Enqueues a copy of `bytes` (> 0) bytes at device address `src` to page-locked memory.
    pub(super) fn read_start_raw(&self, src: u64, bytes: usize) -> Result<PendingRead> {
        let mut rb = self.readbacks.lock().unwrap_or_else(|e| e.into_inner());
        let (mut host, done) = match rb.idle.iter().position(|(h, _)| h.len() >= bytes) {
            Some(i) => rb.idle.swap_remove(i),
            None => (
                // Plain page-locked memory: write-combined memory is slow for the host to read.
                unsafe {
                    self.ctx
                        .alloc_pinned_with_flags::<u8>(bytes.max(MIN_STAGING), 0)
                }
                .map_err(cuda_err("page-locked allocation"))?,
                self.ctx.new_event(None).map_err(cuda_err("event"))?,
            ),
        };
        let dst = host.as_mut_slice().map_err(cuda_err("readback"))?;
        {
            let _exclusive = self.graphs.exclusive();
            unsafe { result::memcpy_dtoh_async(&mut dst[..bytes], src, self.stream.cu_stream()) }
                .map_err(cuda_err("read"))?;
            done.record(&self.stream)
                .map_err(cuda_err("event record"))?;
        }
        let ticket = rb.next_ticket;
        rb.next_ticket += 1;
        rb.in_flight.insert(ticket, InFlight { host, done, bytes });
        Ok(PendingRead::InFlight { ticket, bytes })
    }

    /// Waits for the read `ticket` and copies its bytes to `out`.
    pub(super) fn read_finish_raw(&self, ticket: u64, out: &mut [u8]) -> Result<()> {
        let r = self
            .readbacks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .in_flight
            .remove(&ticket)
            .ok_or_else(|| Error::Device(format!("no read in flight with ticket {ticket}")))?;
        r.done.synchronize().map_err(cuda_err("read"))?;
        if out.len() != r.bytes {
            return Err(Error::Device(format!(
                "a read of {} bytes finished into {} bytes",
                r.bytes,
                out.len()
            )));
        }
        out.copy_from_slice(&r.host.as_slice().map_err(cuda_err("readback"))?[..r.bytes]);
        let mut rb = self.readbacks.lock().unwrap_or_else(|e| e.into_inner());
        if rb.idle.len() < KEEP_IDLE {
            rb.idle.push((r.host, r.done));
        }
        Ok(())
    }
}
