//! System metrics of the GPU box: CPU, memory, disks, load, uptime (sysinfo),
//! and GPUs through NVIDIA's management library when the machine has it
//! (loaded at run time: no hard dependency, nothing reported without it).

use std::collections::HashSet;
use std::path::Path;

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
    disks: Option<Disks>,
    nvml: Option<Nvml>,
}

impl Default for Collector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector {
    /// A collector; tries to load NVML once.
    pub fn new() -> Self {
        // Made once per process: each message is logged once.
        let nvml = match Nvml::init() {
            Ok(nvml) => Some(nvml),
            Err(e) if nvml_missing(&e) => {
                tracing::debug!("no NVIDIA management library ({e}); GPUs will not be reported");
                None
            }
            Err(e) => {
                tracing::warn!(
                    "cannot use NVIDIA's management library ({e}); GPUs will not be reported (after a driver update, a reboot usually fixes a version mismatch)"
                );
                None
            }
        };
        let mut system = System::new().ok();
        if let Some(s) = system.as_mut() {
            s.refresh_cpu_usage();
        }
        Self {
            system,
            disks: Disks::new_with_refreshed_list().ok(),
            nvml,
        }
    }

    /// Takes one sample (blocking: run it off the async threads).
    pub fn collect(&mut self) -> SystemInfo {
        if let Some(s) = self.system.as_mut() {
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
            disks: self.disks(),
            load_average: [load.one, load.five, load.fifteen],
            uptime_secs: System::uptime().unwrap_or(0),
            gpus: self.gpus(),
        }
    }

    fn disks(&mut self) -> Vec<DiskInfo> {
        let Some(disks) = self.disks.as_mut() else {
            return Vec::new();
        };
        disks.refresh(true);
        let mut seen = HashSet::new();
        disks
            .iter()
            .filter(|d| relevant_mount(d.mount_point()) && d.total_space() > 0)
            .filter(|d| seen.insert(d.mount_point().to_path_buf()))
            .take(MAX_DISKS)
            .map(|d| DiskInfo {
                mount: d.mount_point().display().to_string(),
                used: d.total_space().saturating_sub(d.available_space()),
                total: d.total_space(),
            })
            .collect()
    }

    fn gpus(&self) -> Vec<GpuInfo> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        let count = nvml.device_count().unwrap_or(0);
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
    ]
    .iter()
    .any(|p| m == *p || m.starts_with(&format!("{p}/")))
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
        let mut c = Collector::new();
        let info = c.collect();
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
    fn pseudo_mounts_are_skipped() {
        assert!(relevant_mount(Path::new("/")));
        assert!(relevant_mount(Path::new("/home")));
        assert!(!relevant_mount(Path::new("/proc")));
        assert!(!relevant_mount(Path::new("/run/user/0")));
        assert!(!relevant_mount(Path::new("/boot/efi")));
    }
}
