//! A global allocator that refuses any single allocation over 256 MiB, so that a parser trusting
//! a size claimed by its input aborts the run ("memory allocation of N bytes failed") and is
//! reported as a crash, even where the memory would never be touched (overcommit hides such an
//! allocation from libFuzzer's RSS limit). The inputs are a few KB: nothing honest needs more.

use std::alloc::{GlobalAlloc, Layout, System};

const MAX_ONE_ALLOCATION: usize = 256 << 20;

pub struct Capped;

unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ONE_ALLOCATION {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ONE_ALLOCATION {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ONE_ALLOCATION {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;
