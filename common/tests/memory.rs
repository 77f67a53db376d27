//! Freed large blocks leave the process's RSS (glibc only). Its own test
//! binary: RSS is per process, and other tests allocating beside it would
//! blur the reading.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

mod support;

use support::rss_kib;

/// Allocates, touches and frees a block of `mib` MiB.
fn churn(mib: usize) {
    let block = vec![1u8; mib << 20];
    std::hint::black_box(&block);
}

#[test]
fn large_blocks_are_returned_after_free() {
    common::memory::return_large_blocks();
    let before = rss_kib();
    // The second and third rounds are the ones glibc would keep without the
    // fixed threshold: the first free raises its threshold past 20 MiB.
    for _ in 0..3 {
        churn(20);
    }
    let after = rss_kib();
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB after freeing 20 MiB blocks"
    );
}
