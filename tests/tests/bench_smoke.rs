//! The benchmark's smoke mode: `bench/run.sh --smoke` runs every case of the
//! benchmark with tiny numbers (and the Rust stand-ins where nginx, wrk or
//! curl are missing), so the benchmark cannot silently rot. No target is
//! asserted: only that every case ran and produced a figure.

#![cfg(target_os = "linux")]

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest the script may run (its build included) before it is stopped:
/// a guard against a hang, far above the few seconds a run takes.
const LIMIT: Duration = Duration::from_secs(600);

/// Variables cargo sets for a test process, besides `CARGO_PKG_*` and
/// `CARGO_BIN_EXE_*`.
const CARGO_TEST_VARS: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

#[test]
fn bench_smoke_runs_every_case() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/run.sh");
    let dir = std::env::temp_dir().join(format!("frpx-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (stdout_path, stderr_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut command = Command::new("bash");
    // Variables cargo sets for this test would reach the script's nested
    // `cargo build` and make it rebuild crates whose build scripts track
    // them (ring tracks CARGO_MANIFEST_DIR): drop them.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if CARGO_TEST_VARS.contains(&name.as_ref())
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
        {
            command.env_remove(name.as_ref());
        }
    }
    let mut child = command
        .arg(&script)
        .arg("--smoke")
        .arg("--out")
        .arg(dir.join("smoke.md"))
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("stdout file"))
        .stderr(File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("bash runs");

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            stop(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);

    let status = status.unwrap_or_else(|| {
        panic!("bench/run.sh --smoke still running after {LIMIT:?}:\n{stdout}\n{stderr}")
    });
    assert!(
        status.success(),
        "bench/run.sh --smoke failed ({status}):\n{stdout}\n{stderr}"
    );
    for case in ["a", "b", "c", "d", "e", "f"] {
        let prefix = format!("| {case}. ");
        assert!(
            stdout.lines().any(|line| line.starts_with(&prefix)),
            "no row for case {case} in the table:\n{stdout}"
        );
    }
    assert!(
        !stdout
            .lines()
            .any(|line| line.starts_with('|') && line.contains("error")),
        "a case produced no figure:\n{stdout}"
    );
    if std::path::Path::new("/proc/stat").exists() {
        let stolen = stdout
            .lines()
            .find(|l| l.starts_with("- CPU stolen by the hypervisor while measuring"))
            .unwrap_or_else(|| panic!("no line on stolen CPU:\n{stdout}"));
        for case in ["a ", "b ", "c "] {
            assert!(stolen.contains(case), "{case}: {stolen}");
        }
        assert!(!stolen.contains('?'), "a side without a figure: {stolen}");
    }
}

/// Stops the script: SIGTERM first, so its trap stops what it started, then
/// SIGKILL if it has not exited within 15 s.
fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}
