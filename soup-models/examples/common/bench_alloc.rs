//! The global allocator of the benchmark examples, chosen when the process starts, so that one
//! binary measures several: `SOUP_BENCH_ALLOC=system` is the system allocator (glibc's malloc,
//! or whatever `LD_PRELOAD` puts behind it: mimalloc, jemalloc), anything else soup's
//! `HugePages`, the allocator of the `soup` binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use soup_models::alloc::HugePages;

pub struct BenchAlloc;

/// 0: not read yet; 1: HugePages; 2: System. Fixed by the first allocation, so every block is
/// freed by the allocator that made it.
static MODE: AtomicU8 = AtomicU8::new(0);

fn system() -> bool {
    let mode = match MODE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: getenv reads the environment without allocating; the name is a valid C
            // string; the result is only read before any thread could change the environment.
            let v = unsafe { libc::getenv(c"SOUP_BENCH_ALLOC".as_ptr()) };
            // SAFETY: a non-null result of getenv is a NUL-terminated string.
            let is_system = !v.is_null() && unsafe { std::ffi::CStr::from_ptr(v) } == c"system";
            let m = if is_system { 2 } else { 1 };
            MODE.store(m, Ordering::Relaxed);
            m
        }
        m => m,
    };
    mode == 2
}

// SAFETY: both allocators uphold GlobalAlloc's contract, and a block always goes back to the
// one that allocated it (the choice never changes once made).
unsafe impl GlobalAlloc for BenchAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if system() {
            System.alloc(layout)
        } else {
            HugePages.alloc(layout)
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if system() {
            System.dealloc(ptr, layout)
        } else {
            HugePages.dealloc(ptr, layout)
        }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if system() {
            System.alloc_zeroed(layout)
        } else {
            HugePages.alloc_zeroed(layout)
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if system() {
            System.realloc(ptr, layout, new_size)
        } else {
            HugePages.realloc(ptr, layout, new_size)
        }
    }
}
