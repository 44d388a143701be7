//! The memory settings of the benchmark examples, chosen when the process starts, so that one
//! binary measures several: soup's (`soup_models::alloc::keep_freed_memory`, as the `soup`
//! binary), or with `SOUP_BENCH_ALLOC=system` glibc's defaults (or whatever `LD_PRELOAD` puts
//! behind malloc: mimalloc, jemalloc).

/// Applies soup's settings unless `SOUP_BENCH_ALLOC=system`.
pub fn init() {
    if std::env::var("SOUP_BENCH_ALLOC").as_deref() != Ok("system") {
        soup_models::alloc::keep_freed_memory();
    }
}
