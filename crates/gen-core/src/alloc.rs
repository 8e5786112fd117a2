//! Allocator tuning for the CPU backend.
//!
//! candle allocates a fresh buffer for every op's output. With glibc's defaults, buffers above
//! a dynamic threshold are `mmap`ed and returned to the kernel on free, and the heap top is
//! trimmed, so each training step page-faults (and zero-fills) the same memory again: on the
//! tiny UNet's training step that was 20–30% of the time (`perf`: `clear_page_erms`,
//! `exc_page_fault`). [`tune_allocator`] keeps freed memory in the process instead.

/// Makes glibc's `malloc` reuse freed memory: buffers up to 32 MiB come from the heap (not
/// `mmap`), and the heap is never trimmed. Call once at the start of `main`. A no-op on other
/// platforms and C libraries. Memory freed by the process stays reserved for it (RSS does not
/// shrink after a peak), which is what a long-running job wants.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is safe to call at any time.
    unsafe {
        // the largest value glibc accepts for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
