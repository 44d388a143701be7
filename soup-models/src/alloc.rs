//! A global allocator for soup's binaries: the system allocator, with large blocks on transparent
//! huge pages (own 2 MiB-aligned mappings, `madvise(MADV_HUGEPAGE)`).
//!
//! Why: model-sized buffers (weights, gradients, activations, checkpoint loads) are allocated
//! fresh all the time, and with 4 KiB pages their first touch costs one page fault per 4 KiB
//! (most of the time of loading a checkpoint from the page cache, ~10 % of a training step on the
//! 2-core development machine: BENCHMARKS.md). Where transparent huge pages are `never`, the
//! advice is ignored; where they are `always`, it changes nothing.
//!
//! Use: `#[global_allocator] static ALLOC: soup_models::alloc::HugePages = soup_models::alloc::HugePages;`

use std::alloc::{GlobalAlloc, Layout, System};

/// Huge-page size (x86-64 and aarch64 with 4 KiB base pages).
const HUGE: usize = 2 << 20;

/// Blocks of at least this many bytes get their own 2 MiB-aligned mapping.
pub const THRESHOLD: usize = HUGE;

/// The system allocator for small blocks; blocks of [`THRESHOLD`] bytes or more are their own
/// anonymous mappings, 2 MiB-aligned and advised for huge pages (Linux; elsewhere `System`).
pub struct HugePages;

fn is_big(layout: Layout) -> bool {
    cfg!(target_os = "linux") && layout.size() >= THRESHOLD && layout.align() <= HUGE
}

fn mapped_len(size: usize) -> usize {
    size.div_ceil(HUGE) * HUGE
}

// SAFETY (callers): `size` > 0; the block returned (or null) is released only by `unmap` with
// the same `size`.
#[cfg(target_os = "linux")]
unsafe fn map(size: usize) -> *mut u8 {
    let len = mapped_len(size);
    // Over-map by one huge page, then trim to a 2 MiB-aligned range of `len` bytes.
    let base = libc::mmap(
        std::ptr::null_mut(),
        len + HUGE,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    if base == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    let start = (base as usize).div_ceil(HUGE) * HUGE;
    let head = start - base as usize;
    if head > 0 {
        libc::munmap(base, head);
    }
    let tail = HUGE - head;
    if tail > 0 {
        libc::munmap((start + len) as *mut libc::c_void, tail);
    }
    // Advice only: where THP is off this fails or does nothing, both harmless.
    libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    start as *mut u8
}

// SAFETY (callers): `ptr` came from `map(size)` with the same `size` and is not used after.
#[cfg(target_os = "linux")]
unsafe fn unmap(ptr: *mut u8, size: usize) {
    libc::munmap(ptr.cast(), mapped_len(size));
}

// SAFETY (callers): none; off Linux no block is big (`is_big`), so this is never called, and an
// allocator must not panic: it reports failure with null.
#[cfg(not(target_os = "linux"))]
unsafe fn map(_: usize) -> *mut u8 {
    std::ptr::null_mut()
}

// SAFETY (callers): none; never called off Linux (`map` hands out no block to release).
#[cfg(not(target_os = "linux"))]
unsafe fn unmap(_: *mut u8, _: usize) {}

// SAFETY: small blocks are `System`'s; a big block is a private anonymous mapping of at least its
// size, aligned to 2 MiB (≥ its alignment), zero-filled by the kernel, unmapped on dealloc.
unsafe impl GlobalAlloc for HugePages {
    // SAFETY: big blocks come from `map` (a fresh mapping or null), small ones from `System`.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_big(layout) {
            map(layout.size())
        } else {
            System.alloc(layout)
        }
    }

    // SAFETY: as `alloc`; a fresh anonymous mapping is already zero-filled by the kernel.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_big(layout) {
            map(layout.size())
        } else {
            System.alloc_zeroed(layout)
        }
    }

    // SAFETY: `ptr` came from `alloc` with this `layout` (GlobalAlloc's contract), so `is_big`
    // sends it back to whoever made it: the mapping of its size, or `System`.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_big(layout) {
            unmap(ptr, layout.size())
        } else {
            System.dealloc(ptr, layout)
        }
    }

    // SAFETY: `ptr`/`layout` came from this allocator; the copy covers the smaller of the two
    // sizes, both blocks valid for it, and the old block is released only after the copy.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align_unchecked(new_size, layout.align());
        if !is_big(layout) && !is_big(new) {
            return System.realloc(ptr, layout, new_size);
        }
        if is_big(layout) && is_big(new) && mapped_len(new_size) == mapped_len(layout.size()) {
            return ptr;
        }
        let p = self.alloc(new);
        if !p.is_null() {
            std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a pattern over a block, then checks it (the block is usable memory of its size).
    ///
    /// # Safety
    /// `p` points to `len` ≥ 1 writable bytes.
    unsafe fn fill_and_check(p: *mut u8, len: usize, seed: u8) {
        for i in (0..len).step_by(4093) {
            *p.add(i) = seed.wrapping_add(i as u8);
        }
        *p.add(len - 1) = seed;
        for i in (0..len).step_by(4093) {
            if i != len - 1 {
                assert_eq!(*p.add(i), seed.wrapping_add(i as u8));
            }
        }
    }

    #[test]
    fn big_and_small_blocks_are_usable_aligned_and_zeroed() {
        let a = HugePages;
        for (size, align) in [
            (16, 8),
            (THRESHOLD - 1, 64),
            (THRESHOLD, 8),
            (9 << 20, 4096),
        ] {
            // SAFETY: every block is used within its layout and released with that layout.
            unsafe {
                let layout = Layout::from_size_align(size, align).unwrap();
                let z = a.alloc_zeroed(layout);
                assert!(!z.is_null() && (z as usize).is_multiple_of(align));
                assert!((0..size).step_by(1009).all(|i| *z.add(i) == 0));
                fill_and_check(z, size, 3);
                a.dealloc(z, layout);
                let p = a.alloc(layout);
                if is_big(layout) {
                    assert!((p as usize).is_multiple_of(HUGE));
                }
                fill_and_check(p, size, 7);
                a.dealloc(p, layout);
            }
        }
    }

    #[test]
    fn realloc_keeps_contents_across_small_and_big() {
        let a = HugePages;
        // SAFETY: the block is read and written within its current size, reallocated with the
        // layout it has, and released with its last layout.
        unsafe {
            let mut layout = Layout::from_size_align(1000, 8).unwrap();
            let mut p = a.alloc(layout);
            for i in 0..1000 {
                *p.add(i) = i as u8;
            }
            // small → big → bigger → same huge-page count → small
            for size in [3 << 20, 7 << 20, (7 << 20) + 5, 500] {
                p = a.realloc(p, layout, size);
                assert!(!p.is_null());
                for i in 0..500 {
                    assert_eq!(*p.add(i), i as u8, "byte {i} after realloc to {size}");
                }
                layout = Layout::from_size_align(size, 8).unwrap();
            }
            a.dealloc(p, layout);
        }
    }
}
