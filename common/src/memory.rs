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

/// Defines the C function `pow` in the binary that invokes it (at its
/// crate root: frps's and frpc's `main.rs`), computed by the `libm` crate
/// (Rust's port of musl's math library): within one unit in the last
/// place of glibc's result, which it equals in most cases.
///
/// `pow` was the one function frps and frpc took from the C math library
/// (tokio's multi-threaded scheduler weighs its task poll times with it;
/// the bundled SQLite's full-text search, built without, took `log`). For
/// it the loader mapped `libm.so.6` and ran its start-up work, about
/// 0.5 MiB of the process's RSS for good. Defined in the executable, it
/// serves every caller, and the linker (`--as-needed`) leaves libm out.
#[macro_export]
macro_rules! define_pow {
    () => {
        /// `x` to the power `y`, as C's `pow` (see `common::define_pow`).
        /// On glibc only: elsewhere the C library's own is linked as before
        /// (a static or two-level-namespace C library could clash with it).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        #[unsafe(no_mangle)]
        pub extern "C" fn pow(x: f64, y: f64) -> f64 {
            $crate::memory::libm_pow(x, y)
        }
    };
}

/// The `pow` that [`define_pow`] defines.
#[doc(hidden)]
pub fn libm_pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
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
    let runtime = builder.enable_all().build()?;
    let out = runtime.block_on(main);
    // A blocking task still running (a metrics read stuck in a driver, a
    // password prompt nobody answers) must not hold up the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(out)
}

/// Hands the free memory inside the allocator's heaps back to the system.
///
/// glibc returns a heap's free top on its own, but free pages below a block
/// still in use stay in the process's RSS until `malloc_trim`. After a burst
/// (a load of connections, a fleet reconnecting) that is most of what the
/// burst allocated. Takes time in proportion to the heaps' size: call it off
/// the async workers (`spawn_blocking`), and only when [`Watch`] says so.
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

/// Tells when a spell of traffic worth trimming after has stopped: fed the
/// running totals of requests and bytes moved now and then, it answers true
/// the first time they have not moved since the last look after they had,
/// provided at least [`TrafficStop::MIN_REQUESTS`] requests or
/// [`TrafficStop::MIN_BYTES`] bytes went by since the last true. A large
/// transfer's buffers are freed when it ends, which no count of connections
/// shows (one download is one connection); a trickle of requests does not
/// trim after each one.
#[derive(Debug, Default, Clone)]
pub struct TrafficStop {
    last: (u64, u64),
    moving: bool,
    /// The totals at the last true.
    base: (u64, u64),
}

impl TrafficStop {
    /// Requests since the last trim that make a stop worth trimming after.
    pub const MIN_REQUESTS: u64 = 1_000;
    /// Bytes since the last trim that make a stop worth trimming after.
    pub const MIN_BYTES: u64 = 64 << 20;

    /// Records the totals; true when enough traffic just stopped (time to
    /// [`trim`]).
    pub fn observe(&mut self, requests: u64, bytes: u64) -> bool {
        let moved = (requests, bytes) != self.last;
        self.last = (requests, bytes);
        let stopped = self.moving && !moved;
        self.moving = moved;
        let enough = requests.wrapping_sub(self.base.0) >= Self::MIN_REQUESTS
            || bytes.wrapping_sub(self.base.1) >= Self::MIN_BYTES;
        if stopped && enough {
            self.base = (requests, bytes);
        }
        stopped && enough
    }
}

/// One look at a server's load, for [`Watch`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Sample {
    /// Public connections open now.
    pub public: u64,
    /// Most public connections open at once since the last look.
    pub public_peak: u64,
    /// Clients registered now.
    pub clients: u64,
    /// Requests served so far.
    pub requests: u64,
    /// Body bytes moved so far.
    pub bytes: u64,
}

/// What a [`Watch`] says to do after a look.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// A burst of public connections ended: let go of the connections kept
    /// for it.
    pub shrink_pools: bool,
    /// Hand the free heap back ([`trim`]).
    pub trim: bool,
}

/// Decides, from periodic [`Sample`]s, when a server should give memory
/// back: a burst of public connections ending shrinks the pools, and the
/// heap is trimmed a look later (the connections closed by the shrink have
/// freed their buffers by then); a burst of clients leaving, or enough
/// traffic stopping, trims at once. Public connections and clients are
/// separate bursts: a fleet of many clients does not hide a burst of
/// callers, and clients leaving does not empty the pools of those staying.
#[derive(Debug, Default, Clone)]
pub struct Watch {
    public: BurstEnd,
    clients: BurstEnd,
    traffic: TrafficStop,
    trim_next: bool,
}

impl Watch {
    /// Records a look; what to do now.
    pub fn observe(&mut self, s: Sample) -> Verdict {
        // The peak between two looks first: a burst shorter than the period
        // counts too.
        let public_ended =
            self.public.observe(s.public_peak.max(s.public)) | self.public.observe(s.public);
        let clients_ended = self.clients.observe(s.clients);
        let stopped = self.traffic.observe(s.requests, s.bytes);
        let trim = std::mem::replace(&mut self.trim_next, public_ended) || clients_ended || stopped;
        Verdict {
            shrink_pools: public_ended,
            trim,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `pow` frps and frpc define answers as the C library's (this
    /// test binary does not define it: `powf` here is glibc's) within one
    /// unit in the last place, for tokio's use (0.9ⁿ for task counts) and
    /// across magnitudes, and exactly in the special cases C defines.
    #[test]
    fn libm_pow_is_the_c_librarys() {
        let mut xs = vec![0.9, 1.25, 2.5, 0.5, 3.0, 1e-9, 7.25e8, 0.999_999, 123.456];
        xs.extend(xs.clone().iter().map(|x| -x));
        let ys = [
            0.0, 1.0, 2.0, 3.0, 0.5, -0.5, -1.0, 10.0, 63.0, 1.5e2, 1e3, -17.25, 0.333,
        ];
        for &x in &xs {
            for &y in &ys {
                let (ours, theirs) = (libm_pow(x, y), x.powf(y));
                assert!(
                    ulps_apart(ours, theirs) <= 1 || (ours.is_nan() && theirs.is_nan()),
                    "pow({x}, {y}): {ours} against {theirs}"
                );
            }
        }
        for n in 1..=10_000 {
            let n = f64::from(n);
            let (ours, theirs) = (libm_pow(0.9, n), 0.9f64.powf(n));
            assert!(
                ulps_apart(ours, theirs) <= 1,
                "0.9^{n}: {ours} against {theirs}"
            );
        }
        assert_eq!(libm_pow(f64::NAN, 0.0), 1.0);
        assert_eq!(libm_pow(1.0, f64::NAN), 1.0);
        assert!(libm_pow(-2.0, 0.5).is_nan());
        assert_eq!(libm_pow(0.0, -1.0), f64::INFINITY);
        assert_eq!(libm_pow(-8.0, 3.0), -512.0);
        assert_eq!(libm_pow(2.0, 1024.0), f64::INFINITY);
        assert_eq!(libm_pow(2.0, -1075.0), 0.0);
    }

    /// How many representable values lie between `a` and `b` (same sign).
    fn ulps_apart(a: f64, b: f64) -> u64 {
        if a.is_sign_negative() != b.is_sign_negative() {
            return if a == b { 0 } else { u64::MAX };
        }
        a.to_bits().abs_diff(b.to_bits())
    }

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
    fn traffic_stops_count_once_enough_went_by() {
        let mut stop = TrafficStop::default();
        let mb = 1 << 20;
        let seen: Vec<bool> = [
            (0, 0),
            (0, 0),
            (5, 10 * mb),
            (5, 10 * mb), // a pause after too little: no
            (6, 70 * mb),
            (6, 70 * mb), // 70 MiB since the start: yes
            (6, 70 * mb), // the same pause
            (900, 71 * mb),
            (900, 71 * mb), // 894 requests, 1 MiB since: no
            (1_006, 72 * mb),
            (1_006, 72 * mb), // 1,000 requests since the last yes
        ]
        .into_iter()
        .map(|(requests, bytes)| stop.observe(requests, bytes))
        .collect();
        assert_eq!(
            seen,
            [
                false, false, false, false, false, true, false, false, false, false, true
            ]
        );
    }

    fn look(public: u64, peak: u64, clients: u64) -> Sample {
        Sample {
            public,
            public_peak: peak,
            clients,
            ..Sample::default()
        }
    }

    #[test]
    fn a_burst_of_callers_shows_among_many_clients() {
        let mut watch = Watch::default();
        assert_eq!(watch.observe(look(0, 0, 100)), Verdict::default());
        // 60 callers come and go between two looks of a fleet of 100.
        let ended = watch.observe(look(0, 60, 100));
        assert_eq!(
            ended,
            Verdict {
                shrink_pools: true,
                trim: false
            }
        );
        // The trim comes a look later, once the closed connections are gone.
        assert_eq!(
            watch.observe(look(0, 0, 100)),
            Verdict {
                shrink_pools: false,
                trim: true
            }
        );
        assert_eq!(watch.observe(look(0, 0, 100)), Verdict::default());
    }

    #[test]
    fn clients_leaving_trim_without_emptying_the_pools() {
        let mut watch = Watch::default();
        watch.observe(look(30, 30, 100));
        assert_eq!(
            watch.observe(look(30, 30, 40)),
            Verdict {
                shrink_pools: false,
                trim: true
            }
        );
    }

    #[test]
    fn a_large_transfer_ending_trims() {
        let mut watch = Watch::default();
        let moving = |bytes| Sample {
            public: 1,
            public_peak: 1,
            clients: 1,
            requests: 1,
            bytes,
        };
        assert!(!watch.observe(moving(0)).trim);
        assert!(!watch.observe(moving(1 << 30)).trim);
        assert!(watch.observe(moving(1 << 30)).trim);
    }

    #[test]
    fn steady_or_small_loads_never_trim() {
        let mut end = BurstEnd::default();
        for open in [8, 0, 8, 0, 15, 0, 100, 90, 80, 70, 60, 51] {
            assert!(!end.observe(open), "at {open}");
        }
    }
}
