//! Buffer pool, written once for every backend over its raw allocator.
//!
//! Activation buffers are rounded up to a size class (four classes per power of two, so at most
//! 25% is wasted) and go back to their class's free list when dropped; the next request of that
//! class reuses them. This is safe because every backend executes its ops in order on one
//! queue: a buffer dropped after op N was enqueued can only be written again by an op enqueued
//! after N. Weights and the KV cache are allocated exactly and never pooled.
//! `ANYLLAMA_POOL_DEBUG=1` disables reuse to flush out use-after-release bugs.
//!
//! The pool also counts the bytes held in raw allocations (pooled ones, in use or free, and exact
//! ones) and the peak of that count: `anyllama bench` reports the peak as the model's device
//! memory. Backend-internal allocations (staging buffers, pipelines, the driver's own) are not
//! counted.

use crate::backend::Backend;
use crate::error::Result;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Smallest allocation: keeps every buffer bindable and 16-byte aligned in size.
const MIN_BYTES: usize = 256;

pub struct Pool<B: Backend> {
    free: Mutex<HashMap<usize, Vec<B::Raw>>>,
    reuse: bool,
    /// Bytes in raw allocations made through this pool or `Buf::exact`, and their peak.
    held: AtomicUsize,
    peak: AtomicUsize,
}

impl<B: Backend> Default for Pool<B> {
    fn default() -> Self {
        let debug = std::env::var("ANYLLAMA_POOL_DEBUG").is_ok_and(|v| v != "0" && !v.is_empty());
        Pool {
            free: Mutex::new(HashMap::new()),
            reuse: !debug,
            held: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }
}

/// Rounds `bytes` up to its size class: 4 classes per power of two.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(MIN_BYTES);
    let pow = bytes.next_power_of_two();
    let step = (pow / 8).max(1); // classes at 5/8, 6/8, 7/8, 8/8 of the power of two
    bytes.div_ceil(step) * step
}

impl<B: Backend> Pool<B> {
    /// A pooled buffer of at least `bytes` bytes (contents undefined).
    pub fn alloc(self: &Arc<Self>, backend: &B, bytes: usize) -> Result<Buf<B>> {
        let class = size_class(bytes);
        let reused = if self.reuse {
            self.free
                .lock()
                .unwrap()
                .get_mut(&class)
                .and_then(|v| v.pop())
        } else {
            None
        };
        let raw = match reused {
            Some(raw) => raw,
            None => self.alloc_counted(backend, class)?,
        };
        Ok(Buf {
            raw: Some(raw),
            bytes,
            class,
            pool: self.clone(),
            pooled: true,
        })
    }

    /// Drops every cached free buffer (e.g. before loading another model).
    pub fn trim(&self) {
        let mut free = self.free.lock().unwrap();
        let freed: usize = free.iter().map(|(class, v)| class * v.len()).sum();
        free.clear();
        self.held.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Bytes now held in raw device allocations (in use or cached free).
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The most bytes held at once since the pool was made or `reset_peak` was called.
    pub fn peak_bytes(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak measurement from what is held now.
    pub fn reset_peak(&self) {
        self.peak.store(self.held_bytes(), Ordering::Relaxed);
    }

    fn alloc_counted(&self, backend: &B, bytes: usize) -> Result<B::Raw> {
        let raw = backend.alloc_raw(bytes)?;
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Ok(raw)
    }
}

/// A device buffer. `bytes` is the size the caller asked for; the allocation may be larger.
pub struct Buf<B: Backend> {
    raw: Option<B::Raw>,
    bytes: usize,
    class: usize,
    /// The pool that counts this allocation (and takes it back when `pooled`).
    pool: Arc<Pool<B>>,
    pooled: bool,
}

impl<B: Backend> Buf<B> {
    /// An exact, unpooled buffer (weights, KV cache).
    pub fn exact(backend: &B, bytes: usize) -> Result<Self> {
        let size = bytes.max(16).next_multiple_of(16);
        let pool = backend.pool().clone();
        Ok(Buf {
            raw: Some(pool.alloc_counted(backend, size)?),
            bytes,
            class: size,
            pool,
            pooled: false,
        })
    }

    pub fn raw(&self) -> &B::Raw {
        self.raw.as_ref().expect("buffer used after release")
    }

    pub fn raw_mut(&mut self) -> &mut B::Raw {
        self.raw.as_mut().expect("buffer used after release")
    }

    /// Bytes requested by the caller.
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Bytes actually allocated (>= len).
    pub fn capacity(&self) -> usize {
        self.class
    }
}

impl<B: Backend> Drop for Buf<B> {
    fn drop(&mut self) {
        let Some(raw) = self.raw.take() else { return };
        if self.pooled && self.pool.reuse {
            self.pool
                .free
                .lock()
                .unwrap()
                .entry(self.class)
                .or_default()
                .push(raw);
        } else {
            drop(raw);
            self.pool.held.fetch_sub(self.class, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{size_class, Buf};
    use crate::backend::{cpu::Cpu, Backend};

    #[test]
    fn held_and_peak_bytes_follow_allocations() {
        let b = Cpu::new();
        let pool = b.pool().clone();
        if !pool.reuse {
            return; // ANYLLAMA_POOL_DEBUG: nothing is cached, the counts below differ
        }
        let exact = Buf::exact(&b, 1000).unwrap(); // rounded to 1008
        assert_eq!(pool.held_bytes(), 1008);
        let scratch = b.alloc(4096).unwrap();
        assert_eq!(pool.held_bytes(), 1008 + 4096);
        drop(exact);
        assert_eq!(pool.held_bytes(), 4096);
        drop(scratch); // back to the free list: still held
        assert_eq!(pool.held_bytes(), 4096);
        let again = b.alloc(4000).unwrap(); // same class, reused
        assert_eq!(pool.held_bytes(), 4096);
        drop(again);
        pool.trim();
        assert_eq!(pool.held_bytes(), 0);
        assert_eq!(pool.peak_bytes(), 1008 + 4096);
        pool.reset_peak();
        assert_eq!(pool.peak_bytes(), 0);
    }

    #[test]
    fn size_classes_round_up_by_at_most_a_quarter() {
        for bytes in [1, 255, 256, 257, 1000, 4096, 4097, 100_000, 3 << 20] {
            let c = size_class(bytes);
            assert!(c >= bytes && c >= 256, "{bytes} -> {c}");
            assert!(c <= bytes.max(256) * 5 / 4 + 1, "{bytes} -> {c}");
        }
        assert_eq!(size_class(4096), 4096);
    }
}
