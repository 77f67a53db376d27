//! System metrics of the GPU box: CPU, memory, disks, load, uptime (sysinfo),
//! and GPUs through NVIDIA's management library when the machine has it
//! (loaded at run time: no hard dependency, nothing reported without it).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{DiskInfo, GpuInfo, SystemInfo};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use sysinfo::{Disks, System};

use crate::identity;

/// Most disks reported.
const MAX_DISKS: usize = 16;

/// Keeps what sysinfo needs between samples (CPU usage is a difference).
pub struct Collector {
    system: Option<System>,
    /// When the CPU times were last read: usage is their difference over
    /// the interval since.
    cpu_read_at: std::time::Instant,
    /// The disks, read on a thread of their own within part of the read's
    /// deadline ([`Collector::collect_within`]): a network mount that does
    /// not answer (a stale NFS share) stops the disk figures, not the others.
    disks: Hanging<DiskList>,
    /// The GPUs, the same way: a driver that hangs (a card fallen off the
    /// bus), when started or when read, stops the GPU figures only.
    gpu: Hanging<Gpus>,
}

/// A part of the sample whose read can hang in the kernel or a driver:
/// read on a thread of its own and left out past its deadline; at most one
/// thread ever waits on it (a read finds the one before still holding the
/// state and gives up at once).
struct Hanging<S> {
    state: Arc<Mutex<S>>,
    /// What is read, for the log ("the GPUs (NVIDIA's management library)").
    what: &'static str,
    /// Whether a read past its deadline was said (once until one succeeds
    /// again).
    stuck_said: bool,
    /// No read has ended yet: the first one may start a driver (NVML's
    /// start takes seconds on a box of several GPUs without persistence
    /// mode), and is not said late unless the next one finds it still
    /// going.
    starting: bool,
}

/// A read started by [`Hanging::start`].
type Reading<T> = Option<std::sync::mpsc::Receiver<Option<Vec<T>>>>;

impl<S: Send + 'static> Hanging<S> {
    fn new(what: &'static str, state: S) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
            what,
            stuck_said: false,
            starting: true,
        }
    }

    /// Starts `read` on a thread of its own (`thread` names it).
    fn start<T: Send + 'static>(&self, thread: &str, read: fn(&mut S) -> Vec<T>) -> Reading<T> {
        let state = self.state.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                let read = match state.try_lock() {
                    Ok(mut s) => Some(read(&mut s)),
                    Err(std::sync::TryLockError::Poisoned(p)) => Some(read(&mut p.into_inner())),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                };
                let _ = tx.send(read);
            })
            .ok()
            .map(|_| rx)
    }

    /// What the read `reading` gave by `deadline`; nothing past it (said
    /// once while it hangs).
    fn finish<T>(&mut self, reading: Reading<T>, deadline: std::time::Instant) -> Vec<T> {
        let Some(rx) = reading else {
            return Vec::new();
        };
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Some(read)) => {
                self.starting = false;
                if std::mem::take(&mut self.stuck_said) {
                    tracing::info!("{} answer again: they are reported", self.what);
                }
                read
            }
            Err(_) if std::mem::take(&mut self.starting) => {
                tracing::debug!(
                    "reading {} took over {wait:?} the first time; left out of this report",
                    self.what
                );
                Vec::new()
            }
            Ok(None) | Err(_) => {
                self.starting = false;
                if !std::mem::replace(&mut self.stuck_said, true) {
                    tracing::warn!(
                        "reading {} took over {wait:?}: they are not reported while it hangs; the other figures are",
                        self.what
                    );
                }
                Vec::new()
            }
        }
    }
}

/// The disks sysinfo lists, listed at the first read (which can hang too).
#[derive(Default)]
struct DiskList(Option<Disks>);

impl DiskList {
    fn read(&mut self) -> Vec<DiskInfo> {
        let disks = match &mut self.0 {
            Some(disks) => {
                disks.refresh(true);
                disks
            }
            None => match Disks::new_with_refreshed_list() {
                Ok(disks) => self.0.insert(disks),
                // No mount table to read (a bare container): tried again
                // by the next read.
                Err(_) => return Vec::new(),
            },
        };
        pick_disks(disks.iter().map(|d| MountedDisk {
            mount: d.mount_point(),
            file_system: d.file_system(),
            device: d.name(),
            total: d.total_space(),
            available: d.available_space(),
        }))
    }
}

/// NVIDIA's management library, when the machine has it.
struct Gpus {
    nvml: Option<Nvml>,
    /// How NVML is started (the library; a test's own).
    init: fn() -> Result<Nvml, NvmlError>,
    /// When to try starting NVML (again, after a failure other than its
    /// absence: the driver may be loaded later, a module rebuilt at boot
    /// after a kernel update, or the permissions fixed); `None`: never.
    retry_at: Option<std::time::Instant>,
    /// Whether a failure to start NVML, or to list its GPUs, was said
    /// (once until GPUs are reported again).
    failure_said: bool,
}

/// How long after a failure to start NVML it is tried again.
pub const NVML_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

impl Default for Collector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector {
    /// A collector; NVML is loaded by the first read (again every
    /// [`NVML_RETRY`] while it is there but fails to start).
    pub fn new() -> Self {
        Self::starting_nvml_with(Nvml::init)
    }

    fn starting_nvml_with(init: fn() -> Result<Nvml, NvmlError>) -> Self {
        let mut system = System::new().ok();
        if let Some(s) = system.as_mut() {
            s.refresh_cpu_usage();
        }
        Self {
            system,
            cpu_read_at: std::time::Instant::now(),
            disks: Hanging::new("the disks", DiskList::default()),
            gpu: Hanging::new(
                "the GPUs (NVIDIA's management library)",
                Gpus::unstarted(init),
            ),
        }
    }

    /// Takes one sample (blocking: run it off the async threads), the
    /// disks' and the GPUs' within `limit` / 2 (none reported past it).
    pub fn collect_within(&mut self, limit: std::time::Duration) -> SystemInfo {
        let deadline = std::time::Instant::now() + limit / 2;
        let disks = self.disks.start("frpc-disks", DiskList::read);
        let gpus = self.gpu.start("frpc-gpus", Gpus::gpus);
        if let Some(s) = self.system.as_mut() {
            // The first sample is taken right after the collector is made:
            // over a near-zero interval the usage is noise (0 or 100 %).
            // sysinfo's shortest meaningful interval is waited out (off the
            // async threads, well within the read's deadline of 1 s or more).
            let since = self.cpu_read_at.elapsed();
            if let Some(rest) = sysinfo::MINIMUM_CPU_UPDATE_INTERVAL.checked_sub(since) {
                std::thread::sleep(rest);
            }
            self.cpu_read_at = std::time::Instant::now();
            s.refresh_cpu_usage();
            s.refresh_memory();
        }
        let sys = self.system.as_ref();
        let load = System::load_average().unwrap_or(sysinfo::LoadAvg {
            one: 0.0,
            five: 0.0,
            fifteen: 0.0,
        });
        SystemInfo {
            hostname: identity::hostname(),
            os: System::long_os_version().unwrap_or_else(|_| identity::os()),
            arch: identity::arch(),
            cpu_usage: sys.map_or(0.0, System::global_cpu_usage),
            cpu_count: sys.map_or(0, |s| s.cpus().len() as u32),
            memory_used: sys.map_or(0, System::used_memory),
            memory_total: sys.map_or(0, System::total_memory),
            disks: self.disks.finish(disks, deadline),
            load_average: [load.one, load.five, load.fifteen],
            uptime_secs: System::uptime().unwrap_or(0),
            gpus: self.gpu.finish(gpus, deadline),
        }
    }
}

impl Gpus {
    /// NVML, started with `init` (the library; a test's own) by the first
    /// read.
    fn unstarted(init: fn() -> Result<Nvml, NvmlError>) -> Self {
        Self {
            nvml: None,
            init,
            retry_at: Some(std::time::Instant::now()),
            failure_said: false,
        }
    }

    /// Starts NVML: a library that is not installed is the normal case on
    /// a box without an NVIDIA driver (a debug line, never tried again);
    /// any other failure is said once and tried again later.
    fn start_nvml(&mut self) {
        match (self.init)() {
            // Said working (and a failure said again) once it lists the
            // GPUs: one that starts and still cannot list them is not
            // "back" every minute.
            Ok(nvml) => {
                self.nvml = Some(nvml);
                self.retry_at = None;
            }
            Err(e) if nvml_missing(&e) => {
                tracing::debug!("no NVIDIA management library ({e}); GPUs will not be reported");
                self.retry_at = None;
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failure_said, true) {
                    tracing::warn!(
                        "cannot use NVIDIA's management library ({e}); GPUs are not reported until it starts, tried again every {}s (after a driver update, a reboot usually fixes a version mismatch)",
                        NVML_RETRY.as_secs()
                    );
                }
                self.retry_at = Some(std::time::Instant::now() + NVML_RETRY);
            }
        }
    }

    /// NVML started but cannot list the GPUs (`e`): said once; the
    /// library is shut down and started again after [`NVML_RETRY`] (a
    /// driver reloaded meanwhile answers a new start, never the old one).
    fn unlisted(&mut self, e: &NvmlError) {
        if !std::mem::replace(&mut self.failure_said, true) {
            tracing::warn!(
                "NVIDIA's management library cannot list the GPUs ({e}); they are not reported until it can, tried again every {}s (after a driver update, a reboot usually fixes it)",
                NVML_RETRY.as_secs()
            );
        }
        self.nvml = None;
        self.retry_at = Some(std::time::Instant::now() + NVML_RETRY);
    }

    fn gpus(&mut self) -> Vec<GpuInfo> {
        if self.nvml.is_none()
            && self
                .retry_at
                .is_some_and(|at| std::time::Instant::now() >= at)
        {
            self.start_nvml();
        }
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = match nvml.device_count() {
            Ok(count) => {
                if std::mem::take(&mut self.failure_said) {
                    tracing::info!("NVIDIA's management library works again: GPUs are reported");
                }
                count
            }
            Err(e) => {
                self.unlisted(&e);
                return Vec::new();
            }
        };
        (0..count)
            .filter_map(|i| Some((i, nvml.device_by_index(i).ok()?)))
            .map(|(i, dev)| {
                let memory = dev.memory_info().ok();
                GpuInfo {
                    index: Some(i),
                    name: dev.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                    utilization: dev.utilization_rates().map(|u| u.gpu as f32).unwrap_or(0.0),
                    memory_used: memory.as_ref().map_or(0, |m| m.used),
                    memory_total: memory.as_ref().map_or(0, |m| m.total),
                    temperature: dev
                        .temperature(TemperatureSensor::Gpu)
                        .ok()
                        .map(|t| t as f32),
                }
            })
            .collect()
    }
}

/// Most GPUs and disks a report keeps when the whole of it would not fit
/// in a control frame.
const TRIMMED: usize = 8;

/// `info` as a report that fits in a control frame: whole when it does;
/// else with its first [`TRIMMED`] GPUs and disks (names cut to 256
/// characters), else without either; `None` when even that does not fit.
/// Whether it was trimmed comes with it. frps would refuse a larger frame,
/// and frpc's session ended on it.
pub fn fit_in_frame(info: SystemInfo) -> Option<(SystemInfo, bool)> {
    let fits = |info: &SystemInfo| {
        common::codec::encode(
            &common::Command::SystemInfo(info.clone()),
            common::MAX_FRAME,
        )
        .is_ok()
    };
    if fits(&info) {
        return Some((info, false));
    }
    let mut trimmed = info;
    trimmed.gpus.truncate(TRIMMED);
    trimmed.disks.truncate(TRIMMED);
    for gpu in &mut trimmed.gpus {
        gpu.name = common::text::shorten(&gpu.name, 256).into_owned();
    }
    for disk in &mut trimmed.disks {
        disk.mount = common::text::shorten(&disk.mount, 256).into_owned();
    }
    if fits(&trimmed) {
        return Some((trimmed, true));
    }
    trimmed.gpus.clear();
    trimmed.disks.clear();
    fits(&trimmed).then_some((trimmed, true))
}

/// Whether `mount` is a file mounted over a file, not a file system's
/// directory: in a container, `/etc/hosts`, `/etc/resolv.conf` and the
/// NVIDIA toolkit's libraries and tools are bound in one by one, each
/// listed as a mount of the host's disk.
fn is_file_mount(mount: &Path) -> bool {
    std::fs::metadata(mount).is_ok_and(|m| !m.is_dir())
}

/// A mounted file system as sysinfo lists it.
struct MountedDisk<'a> {
    mount: &'a Path,
    file_system: &'a std::ffi::OsStr,
    /// The device (`/dev/sda1`), or the pool's dataset (`tank/data`).
    device: &'a std::ffi::OsStr,
    total: u64,
    available: u64,
}

/// The disks worth reporting, each once, at most [`MAX_DISKS`]: a device
/// mounted again elsewhere (a bind mount: a Docker volume, a directory of
/// the root disk bound into a chroot) is the first mount's disk, not one
/// more (its size counted twice in the fleet's totals).
fn pick_disks<'a>(listed: impl Iterator<Item = MountedDisk<'a>>) -> Vec<DiskInfo> {
    let (mut mounts, mut devices) = (HashSet::new(), HashSet::new());
    listed
        .filter(|d| {
            relevant_mount(d.mount)
                && relevant_file_system(d.mount, d.file_system)
                && d.total > 0
                && !is_file_mount(d.mount)
        })
        .filter(|d| mounts.insert(d.mount.to_path_buf()))
        .filter(|d| d.device.is_empty() || devices.insert(d.device.to_owned()))
        .take(MAX_DISKS)
        .map(|d| DiskInfo {
            mount: d.mount.display().to_string(),
            used: d.total.saturating_sub(d.available),
            total: d.total,
        })
        .collect()
}

/// Mounts worth reporting: the root, home and data mounts, not the
/// kernel's pseudo and boot file systems.
fn relevant_mount(mount: &Path) -> bool {
    let m = mount.to_string_lossy();
    ![
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "/boot",
        "/snap",
        "/var/lib/docker",
        "/var/lib/containerd",
        "/var/lib/kubelet",
    ]
    .iter()
    .any(|p| m == *p || m.starts_with(&format!("{p}/")))
}

/// Whether a mount of `fs` at `mount` is a disk worth reporting: not memory
/// (tmpfs, a container's secrets), not a read-only image (squashfs: snaps,
/// always full), not a container's overlay other than the root of the
/// container frpc runs in. On a host running containers or pods such
/// mounts filled the [`MAX_DISKS`] slots before the disks that matter.
fn relevant_file_system(mount: &Path, fs: &std::ffi::OsStr) -> bool {
    let fs = fs.to_string_lossy();
    match fs.as_ref() {
        "tmpfs" | "devtmpfs" | "ramfs" | "squashfs" | "nsfs" | "fuse.lxcfs" => false,
        "overlay" | "overlayfs" | "aufs" => mount == Path::new("/"),
        _ => true,
    }
}

/// Whether NVML failed to start only because it is not installed: the
/// normal case on a box without an NVIDIA driver, not worth a warning. Any
/// other failure (a driver and library of different versions, a driver not
/// loaded, no permission on the device) means a GPU box whose GPUs go
/// unreported.
fn nvml_missing(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_has_real_figures() {
        let made = std::time::Instant::now();
        let mut c = Collector::new();
        let info = c.collect_within(std::time::Duration::from_secs(4));
        // The CPU usage covers an interval long enough to mean something,
        // the first one too.
        assert!(made.elapsed() >= sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        assert!(info.memory_total > 0);
        assert!(info.memory_used <= info.memory_total);
        assert!(info.cpu_count > 0);
        assert!(info.uptime_secs > 0);
        assert!(!info.hostname.is_empty());
        assert!((0.0..=100.0).contains(&info.cpu_usage));
        for d in &info.disks {
            assert!(d.used <= d.total, "{d:?}");
        }
    }

    #[test]
    fn only_a_missing_nvidia_library_is_quiet() {
        // What a box without the driver gets: the library cannot be opened.
        let missing = Nvml::builder()
            .lib_path(std::ffi::OsStr::new("/nonexistent/libnvidia-ml.so.1"))
            .init()
            .expect_err("no library at that path");
        assert!(nvml_missing(&missing), "{missing}");
        assert!(nvml_missing(&NvmlError::LibraryNotFound));
        for broken in [
            NvmlError::LibRmVersionMismatch,
            NvmlError::DriverNotLoaded,
            NvmlError::NoPermission,
            NvmlError::FailedToLoadSymbol("nvmlInit_v2".into()),
            NvmlError::Unknown,
        ] {
            assert!(!nvml_missing(&broken), "{broken}");
        }
    }

    #[test]
    fn nvml_failing_to_start_is_said_once_and_tried_again_later() {
        static TRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn unloaded() -> Result<Nvml, NvmlError> {
            TRIES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(NvmlError::DriverNotLoaded)
        }
        let tries = || TRIES.load(std::sync::atomic::Ordering::SeqCst);
        let mut c = Gpus::unstarted(unloaded);
        assert_eq!(
            tries(),
            0,
            "started by the first read, off the caller's thread"
        );
        let (gpus, said) = common::testing::logged(|| c.gpus());
        assert!(gpus.is_empty());
        assert!(said.contains("tried again every 60s"), "{said}");
        assert_eq!(tries(), 1);
        // Not before its time.
        let (gpus, said) = common::testing::logged(|| c.gpus());
        assert!(gpus.is_empty());
        assert_eq!((tries(), said.as_str()), (1, ""));
        // Then again, without saying it twice.
        c.retry_at = Some(std::time::Instant::now());
        let (gpus, said) = common::testing::logged(|| c.gpus());
        assert!(gpus.is_empty());
        assert_eq!((tries(), said.as_str()), (2, ""));
        assert!(c.retry_at.is_some(), "and again later");
        // Not installed: never tried again.
        fn absent() -> Result<Nvml, NvmlError> {
            Err(NvmlError::LibraryNotFound)
        }
        let mut c = Gpus::unstarted(absent);
        c.gpus();
        assert!(c.retry_at.is_none());
    }

    #[test]
    fn nvml_failing_to_list_the_gpus_is_said_once_and_started_again_later() {
        static TRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        fn unloaded() -> Result<Nvml, NvmlError> {
            TRIES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(NvmlError::DriverNotLoaded)
        }
        let tries = || TRIES.load(std::sync::atomic::Ordering::SeqCst);
        let mut c = Gpus::unstarted(unloaded);
        c.gpus();
        c.retry_at = None;
        c.failure_said = false;
        let ((), said) = common::testing::logged(|| c.unlisted(&NvmlError::Unknown));
        assert!(said.contains("cannot list the GPUs"), "{said}");
        assert!(c.nvml.is_none(), "the handle that failed is let go");
        let ((), said) = common::testing::logged(|| c.unlisted(&NvmlError::Unknown));
        assert_eq!(said, "", "said once");
        // Started again at its time.
        let before = tries();
        c.gpus();
        assert_eq!(tries(), before, "not before its time");
        c.retry_at = Some(std::time::Instant::now());
        c.gpus();
        assert_eq!(tries(), before + 1);
    }

    #[test]
    fn pseudo_mounts_are_skipped() {
        assert!(relevant_mount(Path::new("/")));
        assert!(relevant_mount(Path::new("/home")));
        assert!(!relevant_mount(Path::new("/proc")));
        assert!(!relevant_mount(Path::new("/run/user/0")));
        assert!(!relevant_mount(Path::new("/boot/efi")));
        assert!(!relevant_mount(Path::new(
            "/var/lib/kubelet/pods/x/volumes/kubernetes.io~secret/token"
        )));
        let fs = |mount: &str, fs: &str| {
            relevant_file_system(Path::new(mount), std::ffi::OsStr::new(fs))
        };
        assert!(fs("/", "ext4") && fs("/data", "xfs") && fs("/models", "nfs4"));
        assert!(!fs("/mnt/ram", "tmpfs") && !fs("/snap/core/1", "squashfs"));
        // A container's own root is its disk; other overlays are not.
        assert!(fs("/", "overlay"));
        assert!(!fs("/srv/merged", "overlay"));
    }

    #[test]
    fn a_file_bound_in_a_container_is_no_disk() {
        let dir = std::env::temp_dir().join(format!("frpc-mount-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts");
        std::fs::write(&file, "127.0.0.1 localhost\n").unwrap();
        assert!(is_file_mount(&file));
        assert!(!is_file_mount(&dir));
        assert!(!is_file_mount(Path::new("/")));
        // Gone meanwhile: left to the other checks.
        assert!(!is_file_mount(&dir.join("missing")));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_disk_mounted_again_elsewhere_is_reported_once() {
        let disk =
            |mount: &'static str, fs: &'static str, device: &'static str, total| MountedDisk {
                mount: Path::new(mount),
                file_system: std::ffi::OsStr::new(fs),
                device: std::ffi::OsStr::new(device),
                total,
                available: total / 2,
            };
        let picked = pick_disks(
            [
                disk("/", "ext4", "/dev/sda1", 100),
                // Docker volumes and a chroot's bind mounts of the root disk.
                disk("/srv/volume-a", "ext4", "/dev/sda1", 100),
                disk("/var/chroot/home", "ext4", "/dev/sda1", 100),
                disk("/models", "xfs", "/dev/nvme0n1p1", 2000),
                disk("/models", "xfs", "/dev/nvme0n1p1", 2000),
                // ZFS datasets of one pool are each their own.
                disk("/tank/a", "zfs", "tank/a", 50),
                disk("/tank/b", "zfs", "tank/b", 50),
                // No device name given: judged by its mount alone.
                disk("/x", "ext4", "", 10),
                disk("/y", "ext4", "", 10),
            ]
            .into_iter(),
        );
        let mounts: Vec<&str> = picked.iter().map(|d| d.mount.as_str()).collect();
        assert_eq!(mounts, ["/", "/models", "/tank/a", "/tank/b", "/x", "/y"]);
        assert_eq!(picked[0].used, 50);
        // At most MAX_DISKS.
        let many: Vec<String> = (0..40).map(|i| format!("/d{i}")).collect();
        let devices: Vec<String> = (0..40).map(|i| format!("/dev/sd{i}")).collect();
        let listed = many.iter().zip(&devices).map(|(m, d)| MountedDisk {
            mount: Path::new(m.as_str()),
            file_system: std::ffi::OsStr::new("ext4"),
            device: std::ffi::OsStr::new(d.as_str()),
            total: 1,
            available: 0,
        });
        assert_eq!(pick_disks(listed).len(), MAX_DISKS);
    }

    /// A report too large for a control frame is trimmed (GPUs and disks
    /// first), or left out when even its host name does not fit.
    #[test]
    fn a_report_too_large_for_a_frame_is_trimmed() {
        let small = SystemInfo {
            hostname: "gpu-box".into(),
            ..Default::default()
        };
        assert_eq!(fit_in_frame(small.clone()), Some((small.clone(), false)));
        let mut many = small.clone();
        many.gpus = (0..5_000)
            .map(|i| GpuInfo {
                index: Some(i),
                name: "NVIDIA H100 80GB HBM3 ".repeat(20),
                ..Default::default()
            })
            .collect();
        many.disks = (0..2_000)
            .map(|i| DiskInfo {
                mount: format!("/mnt/{i}/{}", "d".repeat(500)),
                ..Default::default()
            })
            .collect();
        let (fitted, trimmed) = fit_in_frame(many).expect("fits once trimmed");
        assert!(trimmed);
        assert_eq!((fitted.gpus.len(), fitted.disks.len()), (TRIMMED, TRIMMED));
        assert!(fitted.gpus.iter().all(|g| g.name.chars().count() <= 257));
        let mut huge = small;
        huge.hostname = "h".repeat(common::MAX_FRAME);
        assert_eq!(fit_in_frame(huge), None);
    }

    /// Holds `state`'s lock until the returned sender is used or dropped:
    /// a read stuck in a driver or on a mount.
    fn hang<S: Send + 'static>(
        state: &Arc<Mutex<S>>,
    ) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let state = state.clone();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let stuck = std::thread::spawn(move || {
            let _held = state.lock().unwrap();
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        held_rx.recv().unwrap();
        (release_tx, stuck)
    }

    /// A GPU driver that hangs (a read stuck in it holds the GPUs' lock)
    /// stops the GPU figures only: the others come within the deadline,
    /// said once, and the GPUs are read again once the stuck read ends.
    /// A disk read hanging (a stale network mount) likewise.
    #[test]
    fn a_hung_gpu_or_disk_read_leaves_the_other_figures() {
        fn absent() -> Result<Nvml, NvmlError> {
            Err(NvmlError::LibraryNotFound)
        }
        let mut c = Collector::starting_nvml_with(absent);
        let limit = std::time::Duration::from_secs(2);
        let mounts = |disks: &[DiskInfo]| disks.iter().map(|d| d.mount.clone()).collect::<Vec<_>>();
        let disks = mounts(&c.collect_within(limit).disks);
        for gpus in [true, false] {
            let (release, stuck) = if gpus {
                hang(&c.gpu.state)
            } else {
                hang(&c.disks.state)
            };
            let started = std::time::Instant::now();
            let (info, said) = common::testing::logged(|| c.collect_within(limit));
            assert!(started.elapsed() < limit, "{:?}", started.elapsed());
            assert!(info.memory_total > 0 && info.cpu_count > 0);
            let what = if gpus {
                assert!(info.gpus.is_empty());
                assert_eq!(mounts(&info.disks), disks, "the disks still come");
                "reading the GPUs"
            } else {
                assert!(info.disks.is_empty());
                "reading the disks"
            };
            assert!(said.contains(what), "{said}");
            // Still stuck: said once, and no second thread waits on it.
            let (_, said) = common::testing::logged(|| c.collect_within(limit));
            assert_eq!(said, "");
            release.send(()).unwrap();
            stuck.join().unwrap();
            let info = c.collect_within(limit);
            assert!(!c.gpu.stuck_said && !c.disks.stuck_said, "read again");
            assert_eq!(mounts(&info.disks), disks);
        }
    }

    /// A first read slow to end (NVML starting on a box of several GPUs)
    /// is not said late; the next one, finding it still going, is.
    #[test]
    fn a_slow_start_is_said_only_when_it_outlasts_the_next_read() {
        fn slow() -> Result<Nvml, NvmlError> {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            Err(NvmlError::LibraryNotFound)
        }
        let mut c = Collector::starting_nvml_with(slow);
        let limit = std::time::Duration::from_secs(1);
        let (info, said) = common::testing::logged(|| c.collect_within(limit));
        assert!(info.gpus.is_empty());
        assert_eq!(said, "", "a slow start is not said");
        let (_, said) = common::testing::logged(|| c.collect_within(limit));
        assert!(said.contains("reading the GPUs"), "{said}");
    }

    /// NVML is started by the first read, on the GPUs' own thread: a
    /// driver hanging in its start leaves the collector made and the other
    /// figures read.
    #[test]
    fn nvml_is_started_off_the_callers_thread() {
        static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        fn starting() -> Result<Nvml, NvmlError> {
            STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
            Err(NvmlError::LibraryNotFound)
        }
        let mut c = Collector::starting_nvml_with(starting);
        assert!(!STARTED.load(std::sync::atomic::Ordering::SeqCst));
        c.collect_within(std::time::Duration::from_secs(2));
        assert!(STARTED.load(std::sync::atomic::Ordering::SeqCst));
    }
}
