//! Files only their owner may read (frpc's token and client-id files,
//! frps's self-signed TLS key): written atomically, never through a file
//! or a symlink someone else left at the name.

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
    write(path, contents, Place::Replace).map(|_| ())
}

/// [`write_private`], saying whether the write is durable: `false` when
/// the directory could not be synced (a file system refusing `fsync` on a
/// directory: some network and virtual-machine shares), so that a power
/// cut could still bring back the file's previous content.
pub fn write_private_durably(path: &Path, contents: &[u8]) -> anyhow::Result<bool> {
    write(path, contents, Place::Replace).map(|placed| placed.unwrap_or(false))
}

/// As [`write_private`], but only when nothing is at `path` yet: `false`
/// (and nothing written) when something is, also when another writer put
/// it there meanwhile. The temporary file is hard-linked to `path`, which
/// fails when the name exists, so of two processes creating the file at
/// once exactly one does, and the other reads what it wrote (two frpc
/// starting together must not each settle on an id of their own). Where
/// the file system has no hard links, the file is renamed into place when
/// `path` is still free a moment before (the race comes back there only).
pub fn create_private(path: &Path, contents: &[u8]) -> anyhow::Result<bool> {
    write(path, contents, Place::IfAbsent).map(|placed| placed.is_some())
}

#[derive(Clone, Copy)]
enum Place {
    Replace,
    IfAbsent,
}

/// Writes as `place` says: `None` when nothing was placed (something was
/// at `path`), else whether the directory's sync made it durable.
fn write(path: &Path, contents: &[u8], place: Place) -> anyhow::Result<Option<bool>> {
    let dir = directory_of(path);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (tmp, mut file) = create_temporary(|| temporary_name(path))
        .with_context(|| format!("cannot write a temporary file beside {}", path.display()))?;
    let written = (|| -> anyhow::Result<Option<bool>> {
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        let placed = match place {
            Place::Replace => std::fs::rename(&tmp, path).map(|()| true),
            Place::IfAbsent => match std::fs::hard_link(&tmp, path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                // No hard links here (FAT, some network file systems).
                Err(_) if std::fs::symlink_metadata(path).is_ok() => Ok(false),
                Err(_) => std::fs::rename(&tmp, path).map(|()| true),
            },
        }
        .with_context(|| format!("cannot write {}", path.display()))?;
        if !placed {
            return Ok(None);
        }
        // The new name reaches the disk with its directory's sync: without
        // it a power cut could bring back the file it replaced. The file
        // is written either way, so a failure here is only worth a word
        // (and the caller's care: [`write_private_durably`]).
        if let Err(e) = sync_directory(dir) {
            tracing::warn!(
                "saved {}, but cannot sync its directory ({e}); a power cut could bring back its previous content",
                path.display()
            );
            return Ok(Some(false));
        }
        Ok(Some(true))
    })();
    // Linked (or not placed), the temporary name goes; renamed, it is
    // already gone. Failed, no half-written copy (of a token, say) is left
    // beside the file.
    if !matches!((&written, place), (Ok(Some(_)), Place::Replace)) {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Syncs directory `dir`, so a new name in it survives a power cut.
fn sync_directory(dir: &Path) -> std::io::Result<()> {
    #[cfg(feature = "testing")]
    if testing::refuses_sync(dir) {
        return Err(std::io::Error::other(
            "this file system refuses it (a test's)",
        ));
    }
    File::open(dir).and_then(|d| d.sync_all())
}

/// A file system refusing to sync directories, for the binaries' tests
/// (feature `testing`).
#[cfg(feature = "testing")]
pub mod testing {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static REFUSING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// Syncs of directory `dir` fail from now on, as on a file system
    /// that refuses `fsync` on directories.
    pub fn refuse_directory_sync(dir: &Path) {
        REFUSING.lock().expect("refusing lock").push(dir.to_owned());
    }

    pub(super) fn refuses_sync(dir: &Path) -> bool {
        REFUSING
            .lock()
            .expect("refusing lock")
            .iter()
            .any(|d| d == dir)
    }
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

/// The permission bits of the file at `path` when users other than its
/// owner may read or write it (`mode & 0o077` set); `None` otherwise, or
/// when it cannot be looked at.
pub fn open_to_others(path: &Path) -> Option<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then_some(mode)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_file_others_may_read_is_told_apart() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("frpx-mode-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(open_to_others(&path), Some(0o644));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(open_to_others(&path), None);
        assert_eq!(open_to_others(&dir.join("missing")), None);
        std::fs::remove_dir_all(dir).unwrap();
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

    #[cfg(unix)]
    #[test]
    fn a_file_is_created_once_when_many_write_it_at_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("frpx-create-{}", uuid::Uuid::new_v4()));
        let path = dir.join("client-id");
        // Many writers at once, each with its own content: exactly one
        // places its file, every other is told it was there first, and
        // the file holds the winner's content whole.
        let barrier = std::sync::Barrier::new(16);
        let results: Vec<(usize, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let (path, barrier) = (&path, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        (
                            i,
                            create_private(path, format!("{i}\n").as_bytes()).unwrap(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<usize> = results.iter().filter(|r| r.1).map(|r| r.0).collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", winners[0])
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Present: left as it is.
        assert!(!create_private(&path, b"other\n").unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", winners[0])
        );
        // Replaced on request.
        write_private(&path, b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        // No temporary file left behind by any of them.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["client-id"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
