//! `alloc::keep_freed_memory`: after it, glibc's malloc serves a 24 MiB block and a 400 MiB one
//! (a ViT-B/32 gradient's size, above any mmap threshold) from its heap (no mapping of their own)
//! and keeps them when they are freed. A test of its own process, on the main
//! thread (no test harness: `harness = false`), so that the main arena holds the blocks and no
//! earlier large free has raised glibc's dynamic thresholds.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    const BLOCK: usize = 16 << 20;
    // SAFETY: mallinfo2 only reads malloc's statistics.
    let info = || unsafe { libc::mallinfo2() };
    // glibc's defaults, before any large block was freed: blocks above 128 KiB are mappings of
    // their own, and a free heap top above 128 KiB is given back.
    assert!(soup_models::alloc::keep_freed_memory());
    let (mapped, heap) = (info().hblkhd, info().arena);
    // 24 MiB: below the 32 MiB threshold.
    let block = std::hint::black_box(vec![1u8; 3 * BLOCK / 2]);
    let grown = info();
    assert!(
        grown.hblkhd < mapped + BLOCK,
        "a 24 MiB block was mapped on its own"
    );
    assert!(
        grown.arena >= heap + BLOCK,
        "the heap did not hold the block"
    );
    drop(block);
    // Not trimmed: the heap keeps the freed block for the next one.
    let kept = info().arena;
    assert!(
        kept >= grown.arena - BLOCK / 16,
        "the heap was trimmed from {} to {kept} bytes",
        grown.arena
    );
    // 400 MiB: above the largest threshold glibc allows; a mapping of its own unless mappings are
    // off.
    let (mapped, heap) = (info().hblkhd, info().arena);
    let big = std::hint::black_box(vec![1u8; 25 * BLOCK]);
    let grown = info();
    assert!(
        grown.hblkhd < mapped + BLOCK,
        "a 400 MiB block was mapped on its own"
    );
    // (The heap's free 24 MiB at its top is part of it.)
    assert!(
        grown.arena >= 25 * BLOCK,
        "the heap did not hold the 400 MiB block: {heap} -> {} bytes",
        grown.arena
    );
    drop(big);
    let kept = info().arena;
    assert!(
        kept >= grown.arena - BLOCK / 16,
        "the heap was trimmed from {} to {kept} bytes after the 400 MiB block",
        grown.arena
    );
    println!("alloc: freed memory is kept for reuse: ok");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    assert!(!soup_models::alloc::keep_freed_memory());
}
