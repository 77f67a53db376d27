//! Release builds of `frps` lay out the code the server runs side by side.
//!
//! The kernel maps an executable's code 64 KiB around each page it faults
//! in, so code that runs is resident together with whatever the linker put
//! next to it. `link-order.txt` lists the functions one benchmark run
//! executed (`bench/link-order.sh` writes it from a callgrind profile);
//! LLD's `--symbol-ordering-file` puts them first, one after another. frps's
//! resident code after the benchmark's load fell from 7.8 to 3.4 MiB
//! (bench/README.md). Symbols the file names but the build lacks (after a
//! change to frps or a dependency or toolchain update changed their hashes)
//! are skipped: the binary is the same as without the file, only larger in
//! memory; `bench/run.sh` reports how many are found. The names also depend on the
//! set of packages built together (Cargo's hashes cover the features unified
//! across them): the list is made for the benchmark's build, `cargo build
//! --release -p frps -p frpc -p frpx-bench`; `-p frps` alone renames about
//! half of it (generic code instantiated from clap, tokio and the like).
//!
//! Release builds also pack their relocations (`-z pack-relative-relocs`,
//! `DT_RELR`): the loader reads the 13,000 pointers it adjusts at start from
//! 8 KiB instead of 314 KiB, and those pages stay mapped (frps's resident
//! read-only data 1.06–1.14 → 0.78–0.80 MiB). glibc reads packed
//! relocations from 2.36 on (the binary names `GLIBC_ABI_DT_RELR`, so an
//! older glibc refuses it at start with that name), so only when the
//! building machine's glibc is 2.36 or later; `FRPX_PACK_RELOCS=0` turns it
//! off for a binary meant for older systems (which then needs glibc 2.34).
//!
//! Both only where the linker is known to be LLD: Rust 1.90 and later link
//! x86_64 Linux (glibc) binaries with its bundled LLD, unless the linker is
//! overridden. `FRPX_LINK_ORDER=0` turns the link order off.

use std::env;
use std::process::Command;

const ORDER_FILE: &str = "link-order.txt";

fn main() {
    println!("cargo:rerun-if-changed={ORDER_FILE}");
    // `sqlx::migrate!` embeds the migrations at compile time; with a build
    // script cargo watches only what it names, and a new migration file
    // would not rebuild frps (sqlx's documented advice).
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rerun-if-env-changed=FRPX_LINK_ORDER");
    println!("cargo:rerun-if-env-changed=FRPX_PACK_RELOCS");
    if env::var("PROFILE").as_deref() != Ok("release") || !links_with_bundled_lld() {
        return;
    }
    if !env::var("FRPX_LINK_ORDER").is_ok_and(|v| v == "0") {
        let dir = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        println!("cargo:rustc-link-arg-bin=frps=-Wl,--symbol-ordering-file={dir}/{ORDER_FILE}");
        println!("cargo:rustc-link-arg-bin=frps=-Wl,--no-warn-symbol-ordering");
    }
    if !env::var("FRPX_PACK_RELOCS").is_ok_and(|v| v == "0") && glibc_reads_packed_relocs() {
        println!("cargo:rustc-link-arg-bin=frps=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether this machine's glibc (`getconf GNU_LIBC_VERSION`: `glibc 2.36`)
/// reads `DT_RELR`, which it does from 2.36 on. Unknown counts as no.
fn glibc_reads_packed_relocs() -> bool {
    let Ok(out) = Command::new("getconf").arg("GNU_LIBC_VERSION").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(version) = text.trim().strip_prefix("glibc ") else {
        return false;
    };
    let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
    matches!(
        (parts.next().flatten(), parts.next().flatten()),
        (Some(2), Some(36..)) | (Some(3..), _)
    )
}

/// Whether rustc links this target with its own LLD: x86_64 Linux with
/// glibc, Rust 1.90 or later, and no linker chosen by the user.
fn links_with_bundled_lld() -> bool {
    let target = env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-linux-gnu" {
        return false;
    }
    if env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some() {
        return false;
    }
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("link-self-contained") {
        return false;
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = Command::new(rustc).arg("-vV").output() else {
        return false;
    };
    let info = String::from_utf8_lossy(&out.stdout);
    let version = info.lines().find_map(|l| l.strip_prefix("release: "));
    let mut parts = version.unwrap_or_default().split(['.', '-']);
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    matches!((major, minor), (Some(1), Some(90..)) | (Some(2..), _))
}
