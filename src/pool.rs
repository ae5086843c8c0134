//! Buffer pool, written once for every backend over its raw allocator.
//!
//! Activation buffers are rounded up to a size class (four classes per power of two, so at most
//! 25% is wasted) and go back to their class's free list when dropped; the next request of that
//! class reuses them. This is safe because every backend executes its ops in order on one
//! queue: a buffer dropped after op N was enqueued can only be written again by an op enqueued
//! after N. Weights and the KV cache are allocated exactly and never pooled.
//! `ANYLLAMA_POOL_DEBUG=1` disables reuse to flush out use-after-release bugs.

use crate::backend::Backend;
use crate::error::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Smallest allocation: keeps every buffer bindable and 16-byte aligned in size.
const MIN_BYTES: usize = 256;

pub struct Pool<B: Backend> {
    free: Mutex<HashMap<usize, Vec<B::Raw>>>,
    reuse: bool,
}

impl<B: Backend> Default for Pool<B> {
    fn default() -> Self {
        let debug = std::env::var("ANYLLAMA_POOL_DEBUG").is_ok_and(|v| v != "0" && !v.is_empty());
        Pool {
            free: Mutex::new(HashMap::new()),
            reuse: !debug,
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
            None => backend.alloc_raw(class)?,
        };
        Ok(Buf {
            raw: Some(raw),
            bytes,
            class,
            pool: Some(self.clone()),
        })
    }

    /// Drops every cached free buffer (e.g. before loading another model).
    pub fn trim(&self) {
        self.free.lock().unwrap().clear();
    }
}

/// A device buffer. `bytes` is the size the caller asked for; the allocation may be larger.
pub struct Buf<B: Backend> {
    raw: Option<B::Raw>,
    bytes: usize,
    class: usize,
    pool: Option<Arc<Pool<B>>>,
}

impl<B: Backend> Buf<B> {
    /// An exact, unpooled buffer (weights, KV cache).
    pub fn exact(backend: &B, bytes: usize) -> Result<Self> {
        let size = bytes.max(16).next_multiple_of(16);
        Ok(Buf {
            raw: Some(backend.alloc_raw(size)?),
            bytes,
            class: size,
            pool: None,
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
        if let (Some(pool), Some(raw)) = (&self.pool, self.raw.take()) {
            if pool.reuse {
                pool.free
                    .lock()
                    .unwrap()
                    .entry(self.class)
                    .or_default()
                    .push(raw);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

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
