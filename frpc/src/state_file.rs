//! frpc's state files (the token file, the fallback client id): written
//! atomically, readable by their owner only.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Names tried for the temporary file before giving up: another writer
/// holding the same random name is all but impossible, a name planted by
/// someone else is refused and another drawn.
const TEMPORARY_NAMES: usize = 8;

/// Writes `contents` to `path` atomically, mode 0600: a temporary file
/// beside it (a new one, never an existing file or a symlink), synced, then
/// renamed over `path`, and the directory synced so the rename survives a
/// power cut. Writes may overlap: each has its own temporary file, and the
/// last rename wins. A failed write leaves `path` as it was and no
/// temporary file behind.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = directory_of(path);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (tmp, mut file) = create_temporary(|| temporary_name(path))
        .with_context(|| format!("cannot write a temporary file beside {}", path.display()))?;
    let written = (|| -> anyhow::Result<()> {
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        // The rename reaches the disk with its directory's sync: without
        // it a power cut could bring back the file it replaced. The file
        // is written either way, so a failure here is only worth a word.
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(
                "saved {}, but cannot sync its directory ({e}); a power cut could bring back its previous content",
                path.display()
            );
        }
        Ok(())
    })();
    if written.is_err() {
        // No half-written copy (of a token, say) left beside the file.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Largest state file frpc reads (a token file is well under 1 KiB).
pub const MAX_STATE_FILE: u64 = 64 * 1024;

/// Reads a state file as text: only a regular file (a FIFO would block
/// the read for ever, `/dev/zero` never end) of at most
/// [`MAX_STATE_FILE`] bytes. A larger one, or one not UTF-8, is
/// `InvalidData` (damaged, as one holding nothing usable); another kind
/// of file is `InvalidInput`.
pub fn read_small(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    // Opened without waiting (a FIFO's open would wait for a writer), then
    // looked at through the handle: what is read is what was checked.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {} KiB", MAX_STATE_FILE / 1024),
        ));
    }
    String::from_utf8(bytes).map_err(|e| Error::new(ErrorKind::InvalidData, e))
}

/// The directory `path` is in: `.` for a bare file name (`token.json`).
pub fn directory_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// A fresh name beside `path`: `NAME.<16 random hex digits>.tmp`.
fn temporary_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    path.with_file_name(name)
}

/// Creates a new file, mode 0600, at the first name from `names` that does
/// not exist. `create_new` (`O_CREAT | O_EXCL`) refuses any existing entry,
/// a symlink included, so a file planted at the name can neither keep its
/// owner and mode nor redirect the write.
fn create_temporary(mut names: impl FnMut() -> PathBuf) -> std::io::Result<(PathBuf, File)> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut taken = None;
    for _ in 0..TEMPORARY_NAMES {
        let tmp = names();
        match opts.open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => taken = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(taken.expect("at least one name was tried"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_regular_files_are_read() {
        let dir = std::env::temp_dir().join(format!("frpc-read-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("token.json");
        std::fs::write(&small, "{}").unwrap();
        assert_eq!(read_small(&small).unwrap(), "{}");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; MAX_STATE_FILE as usize + 1]).unwrap();
        assert_eq!(
            read_small(&big).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        let not_text = dir.join("not-text");
        std::fs::write(&not_text, [0xff, 0xfe]).unwrap();
        assert_eq!(
            read_small(&not_text).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        // A device that never ends, a directory and a FIFO (whose open
        // would wait for a writer): refused, not read.
        let fifo = dir.join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        for odd in [Path::new("/dev/zero"), dir.as_path(), fifo.as_path()] {
            assert_eq!(
                read_small(odd).unwrap_err().kind(),
                std::io::ErrorKind::InvalidInput,
                "{}",
                odd.display()
            );
        }
        assert_eq!(
            read_small(&dir.join("missing")).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bare_file_name_is_in_the_current_directory() {
        assert_eq!(directory_of(Path::new("token.json")), Path::new("."));
        assert_eq!(directory_of(Path::new("./token.json")), Path::new("."));
        assert_eq!(
            directory_of(Path::new("/etc/frpc/t.json")),
            Path::new("/etc/frpc")
        );
        assert_eq!(
            directory_of(Path::new("state/token.json")),
            Path::new("state")
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_planted_temporary_name_is_passed_over_not_written_through() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("frpc-state-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        // Someone else's file, a symlink to it and a world-readable file,
        // all at names the writer draws first.
        let victim = dir.join("victim");
        std::fs::write(&victim, "theirs").unwrap();
        let link = dir.join("link.tmp");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let open = dir.join("open.tmp");
        std::fs::write(&open, "").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o666)).unwrap();
        let fresh = dir.join("fresh.tmp");
        let mut names = [link.clone(), open.clone(), fresh.clone()].into_iter();
        let (tmp, mut file) = create_temporary(|| names.next().unwrap()).unwrap();
        assert_eq!(tmp, fresh);
        file.write_all(b"secret").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "theirs");
        assert_eq!(std::fs::read_to_string(&open).unwrap(), "");
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing but taken names: an error, not a write through one.
        let err = create_temporary(|| link.clone()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "theirs");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
