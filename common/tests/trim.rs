//! Free pages inside the heap leave the process's RSS on `trim` (glibc
//! only). Its own test binary: RSS is per process, and other tests
//! allocating beside it would blur the reading.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

mod support;

use support::rss_kib;

#[test]
fn trim_returns_free_pages_below_live_blocks() {
    common::memory::return_large_blocks();
    // 24 MiB of 64 KiB blocks (under the mmap threshold: they live in the
    // heap), each followed by a small block that stays: freeing the big ones
    // leaves holes glibc cannot give back by shrinking the heap.
    let mut big = Vec::new();
    let mut keep = Vec::new();
    for i in 0..384u32 {
        big.push(vec![i as u8; 64 * 1024]);
        keep.push(Box::new(i));
    }
    drop(big);
    let freed = rss_kib();
    common::memory::trim();
    let trimmed = rss_kib();
    assert!(
        trimmed + 12 * 1024 < freed,
        "RSS went from {freed} KiB only to {trimmed} KiB after trim"
    );
    std::hint::black_box(&keep);
}
