//! Memory handed back to the system after a large block is freed.
//!
//! glibc serves blocks over its mmap threshold (128 KiB at start) with their
//! own mappings, returned on free, but after the first such free it raises
//! the threshold to that block's size (up to 32 MiB). From then on a block
//! of that size (frps's Argon2 verification takes 19 MiB per login; a burst
//! of connections frees many buffers) lands in a heap arena and stays in the
//! process's RSS after it is freed. Fixing the threshold stops that.

/// Keeps large blocks in their own mappings, so freeing them returns the
/// memory. Call once at start. A no-op where the C library is not glibc.
pub fn return_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning, under the allocator's
    // own lock; M_MMAP_THRESHOLD with a value under its 32 MiB maximum is
    // valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
