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

/// Makes every thread allocate from the one main heap. glibc gives a thread
/// that finds the heaps busy a heap of its own (up to eight per core), and
/// each keeps its own free pages: frps's two workers and blocking threads
/// held 1.2-1.5 MiB more after the benchmark's load that way, for no
/// throughput the benchmark could see (bench/README.md). Call before any
/// other thread starts. A no-op where the C library is not glibc.
pub fn one_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: as above, a tuning value under the allocator's own lock; a
    // limit of one arena is valid (the main arena always exists).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Runs a binary's `main` on a runtime from `builder` (I/O and time
/// enabled), after tuning the allocator ([`return_large_blocks`],
/// [`one_heap`]). The tuning has to come first: the runtime starts its
/// threads when it is built.
pub fn run<F: std::future::Future>(
    mut builder: tokio::runtime::Builder,
    main: F,
) -> std::io::Result<F::Output> {
    return_large_blocks();
    one_heap();
    Ok(builder.enable_all().build()?.block_on(main))
}

/// Hands the free memory inside the allocator's heaps back to the system.
///
/// glibc returns a heap's free top on its own, but free pages below a block
/// still in use stay in the process's RSS until `malloc_trim`. After a burst
/// (a load of connections, a fleet reconnecting) that is most of what the
/// burst allocated. Takes time in proportion to the heaps' size: call it off
/// the async workers (`spawn_blocking`), and only when [`BurstEnd`] says so.
/// A no-op where the C library is not glibc.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes the allocator's own locks; 0 keeps no pad.
    // Its result is not used: it reports only some arenas' releases.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tells when a burst has ended: fed the number of open connections (or
/// any measure of live work) now and then, it answers true once that number
/// has fallen to half its peak since the last answer, by at least
/// [`BurstEnd::MIN_DROP`]. Steady load never trims; each burst's end trims
/// once.
#[derive(Debug, Default, Clone)]
pub struct BurstEnd {
    peak: u64,
}

impl BurstEnd {
    /// Smallest fall in open connections counted as a burst's end.
    pub const MIN_DROP: u64 = 16;

    /// Records `open`; true when a burst just ended (time to [`trim`]).
    pub fn observe(&mut self, open: u64) -> bool {
        self.peak = self.peak.max(open);
        if self.peak - open >= Self::MIN_DROP && open <= self.peak / 2 {
            self.peak = open;
            true
        } else {
            false
        }
    }
}

/// Tells when traffic has stopped: fed a running total of work done
/// (requests, bytes moved) now and then, it answers true the first time the
/// total has not moved since the last look after it had. A transfer's
/// buffers are freed when it ends, which no count of connections shows (one
/// large download is one connection).
#[derive(Debug, Default, Clone)]
pub struct TrafficStop {
    last: u64,
    moving: bool,
}

impl TrafficStop {
    /// Records `total`; true when traffic just stopped (time to [`trim`]).
    pub fn observe(&mut self, total: u64) -> bool {
        let moved = total != self.last;
        self.last = total;
        let stopped = self.moving && !moved;
        self.moving = moved;
        stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_ends_once_when_connections_halve() {
        let mut end = BurstEnd::default();
        let seen: Vec<bool> = [0, 10, 50, 40, 26, 25, 24, 3, 2, 0]
            .into_iter()
            .map(|open| end.observe(open))
            .collect();
        // 50 -> 25: half the peak and 25 fewer; then the new peak is 25 and
        // the fall to 2 is only 23 but still counts; 2 -> 0 is too small.
        assert_eq!(
            seen,
            [
                false, false, false, false, false, true, false, true, false, false
            ]
        );
    }

    #[test]
    fn traffic_stops_once_per_pause() {
        let mut stop = TrafficStop::default();
        let seen: Vec<bool> = [0, 0, 5, 9, 9, 9, 10, 10, 30, 31, 31]
            .into_iter()
            .map(|total| stop.observe(total))
            .collect();
        // Nothing moved at first: no stop. 9 -> 9 is the first pause, the
        // next look at 9 is the same pause; then 10 and 31 pause again.
        assert_eq!(
            seen,
            [
                false, false, false, false, true, false, false, true, false, false, true
            ]
        );
    }

    #[test]
    fn steady_or_small_loads_never_trim() {
        let mut end = BurstEnd::default();
        for open in [8, 0, 8, 0, 15, 0, 100, 90, 80, 70, 60, 51] {
            assert!(!end.observe(open), "at {open}");
        }
    }
}
