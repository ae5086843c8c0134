//! The memory cap of the hostile-input catalogue: a global allocator that refuses any single
//! allocation over 64 MiB and any growth of live memory past 512 MiB, and records the peak, so a
//! loader that trusted a size claimed by a file aborts the run instead of passing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

const MAX_ONE_ALLOCATION: usize = 64 << 20;
const MAX_LIVE: usize = 512 << 20;

struct CappedAllocator;

pub static LIVE: AtomicUsize = AtomicUsize::new(0);
pub static PEAK: AtomicUsize = AtomicUsize::new(0);

impl CappedAllocator {
    fn reserve(size: usize) -> bool {
        if size > MAX_ONE_ALLOCATION {
            return false;
        }
        let live = LIVE.fetch_add(size, Ordering::SeqCst) + size;
        if live > MAX_LIVE {
            LIVE.fetch_sub(size, Ordering::SeqCst);
            return false;
        }
        PEAK.fetch_max(live, Ordering::SeqCst);
        true
    }
}

unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() && !Self::reserve(new_size - layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            if new_size > layout.size() {
                LIVE.fetch_sub(new_size - layout.size(), Ordering::SeqCst);
            }
        } else if new_size < layout.size() {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;
