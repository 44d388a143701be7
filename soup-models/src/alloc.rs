//! How soup's binaries use memory: the system allocator, told to keep what is freed for reuse.
//!
//! Model-sized buffers (weights, gradients, activations, checkpoint loads) are allocated and freed
//! all the time. By default glibc's malloc serves blocks above a (dynamic) threshold by fresh
//! mappings, unmaps them when they are freed, and gives the top of its heap back to the system,
//! so the next buffer pays a page fault, and the kernel's zeroing of the page, per 4 KiB it
//! touches. soup's binaries serve every block of the main thread from the heap (no mappings of
//! their own, whatever their size) and turn trimming off, so freed memory is reused without
//! faults: the gradient buffer and θ are each one model's size, above any mmap threshold, and are
//! freed and allocated again at every step (BENCHMARKS.md, "Allocators" and "The first step of a
//! model batch"). Memory freed after the peak stays with the process.
//!
//! Use: `soup_models::alloc::keep_freed_memory()` first thing in `main`.

/// glibc's largest mmap threshold on 64-bit targets (`DEFAULT_MMAP_THRESHOLD_MAX`): blocks up to
/// this size come from the heap.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Sets glibc's malloc to keep freed memory: the main thread's blocks all come from the heap (no
/// mappings of their own; the mmap threshold at [`MMAP_THRESHOLD`] for the other threads' arenas,
/// which map larger blocks whatever the settings), no trimming. Returns whether it applied: false
/// with another C library.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's parameters; all are documented values (a
        // threshold within glibc's limit, -1: "disables trimming completely", and 0 mappings:
        // "disables the use of mmap", with the heap's own fallback to mmap when it cannot grow,
        // mallopt(3)).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, -1) == 1
                && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
