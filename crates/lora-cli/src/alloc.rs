//! The process allocator: mimalloc, told to keep the memory that training frees.
#![allow(unsafe_code)]

// Training allocates and frees activation-sized buffers every step; mimalloc reuses them
// without the page faults glibc's mmap threshold causes (measured: docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (libmimalloc-sys names no
/// constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Never hand freed pages back to the OS: by default mimalloc returns them after 10 ms,
/// and the next step's buffers of the same size then fault in zeroed pages again (a
/// quarter of a decoder training step on ndarray, measured with `perf`). The peak RSS is
/// unchanged: the pages are reused, not added to.
pub fn keep_freed_memory() {
    // SAFETY: sets one integer option of the allocator; valid at any time, from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}
