//! frpc's state files (the token file, the fallback client id): written
//! atomically, readable by their owner only ([`common::private_file`]).

use std::path::Path;

pub use common::private_file::{
    create_private, directory_of, write_private, write_private_durably,
};

/// Largest state file frpc reads (a token file is well under 1 KiB).
pub const MAX_STATE_FILE: u64 = 64 * 1024;

/// Reads a state file as text: only a regular file (a FIFO would block
/// the read for ever, `/dev/zero` never end) of at most
/// [`MAX_STATE_FILE`] bytes. A larger one, one not UTF-8, or a symbolic
/// link another user made is `InvalidData` (damaged, as one holding
/// nothing usable: the next write replaces it); another kind of file is
/// `InvalidInput`.
pub fn read_small(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    // Opened without waiting (a FIFO's open would wait for a writer), then
    // looked at through the handle: what is read is what was checked.
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | flags)
            .open(path)
    };
    // A symbolic link is followed only when this user (or root) made it:
    // one another user planted in a shared directory, to a file root owns
    // that holds a UUID (`/proc/sys/kernel/random/uuid`), passed the owner
    // check below, the file being root's. (frpc's own writes rename a new
    // file over the old: a link is replaced, not written through.)
    let file = match open(libc::O_NOFOLLOW) {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            let link = std::fs::symlink_metadata(path)?;
            if let Some(why) = foreign(&link) {
                return Err(Error::new(
                    ErrorKind::InvalidData,
                    format!("a symbolic link {why} (replaced when frpc next writes it)"),
                ));
            }
            open(0)?
        }
        opened => opened?,
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    // Another user's file is not this frpc's state, however readable: in a
    // directory others may write (the default `token.json` in a shared
    // working directory), it may have been planted, a token of their
    // account taking this box (and its client id, for good) over.
    if let Some(why) = foreign(&meta) {
        return Err(Error::new(ErrorKind::PermissionDenied, why));
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

/// Why a state file with `meta` is not this frpc's: owned by another user
/// than the one frpc runs as, root aside (a `sudo frpc` run wrote it).
fn foreign(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let owner = meta.uid();
    (owner != me && owner != 0).then(|| {
        format!(
            "owned by user {owner}, not by the user frpc runs as ({me}) or root: another user may have put it there; remove it, or run frpc as its owner"
        )
    })
}

/// The lock a running frpc holds on its token file
/// ([`lock_token_file`]): released when dropped (or the process ends).
#[derive(Debug)]
pub struct TokenFileLock {
    _file: Option<std::fs::File>,
}

impl TokenFileLock {
    /// No lock held (tests of several processes' views of one file).
    #[cfg(test)]
    pub fn none() -> Self {
        TokenFileLock { _file: None }
    }
}

/// How long [`lock_token_file`] waits for a token file's lock before it
/// takes its holder for another running frpc.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes `<token file>.lock` for this frpc. Two frpc sharing one token file
/// (the default `token.json` of one working directory) would renew and
/// revoke each other's tokens and race to save them, until one of them
/// holds a revoked token and, without a password, stops for good: the
/// second one to start is refused, with what to change. A lock file that
/// cannot be made (a read-only directory: the token is then not saved
/// either) is only a warning.
pub fn lock_token_file(token_file: &Path) -> anyhow::Result<TokenFileLock> {
    let mut name = token_file.file_name().unwrap_or_default().to_owned();
    name.push(".lock");
    let path = directory_of(token_file).join(name);
    let opened = std::fs::create_dir_all(directory_of(token_file)).and_then(|()| {
        use std::os::unix::fs::OpenOptionsExt;
        // Not through a symlink, nor waiting on a FIFO put in its place.
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
    });
    let file = match opened {
        Ok(file) => file,
        Err(e) => {
            tracing::warn!(
                "cannot create {} ({e}); another frpc given the same --token-file would not be noticed",
                path.display()
            );
            return Ok(TokenFileLock { _file: None });
        }
    };
    // Another user's lock file (made first in a shared directory, open to
    // all, and held) would keep this frpc out, taken for another frpc:
    // said as what it is.
    if let Some(why) = file.metadata().ok().as_ref().and_then(foreign) {
        anyhow::bail!("the token file's lock {} is {why}", path.display());
    }
    // A frpc that just stopped may still be finishing a token write (each
    // holds the lock until done): its turn ends within a moment.
    let waiting_since = std::time::Instant::now();
    let mut tried = file.try_lock();
    while matches!(tried, Err(std::fs::TryLockError::WouldBlock))
        && waiting_since.elapsed() < LOCK_WAIT
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
        tried = file.try_lock();
    }
    match tried {
        Ok(()) => Ok(TokenFileLock { _file: Some(file) }),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another frpc is using the token file {} (it holds {}): give each frpc its own --token-file (and --client-id)",
            token_file.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(
                "cannot lock {} ({e}); another frpc given the same --token-file would not be noticed",
                path.display()
            );
            Ok(TokenFileLock { _file: None })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_frpc_at_a_time_uses_a_token_file() {
        let dir = std::env::temp_dir().join(format!("frpc-lock-{}", uuid::Uuid::new_v4()));
        // Its directory is made if need be.
        let token_file = dir.join("state").join("token.json");
        let first = lock_token_file(&token_file).unwrap();
        let asked = std::time::Instant::now();
        let err = lock_token_file(&token_file).unwrap_err().to_string();
        assert!(
            asked.elapsed() >= LOCK_WAIT,
            "waited for a holder finishing"
        );
        assert!(
            err.contains("another frpc is using the token file"),
            "{err}"
        );
        assert!(err.contains("token.json.lock"), "{err}");
        // Another file is another frpc's.
        let other = lock_token_file(&dir.join("other.json")).unwrap();
        // Released when the first stops, also while the next one waits.
        let releasing = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(first);
        });
        let again = lock_token_file(&token_file).unwrap();
        releasing.join().unwrap();
        drop((again, other));
        // A symlink in the lock file's place is not followed (nor is the
        // file it names made): a warning, no lock.
        let target = dir.join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.join("linked.json.lock")).unwrap();
        let unlocked = lock_token_file(&dir.join("linked.json")).unwrap();
        assert!(unlocked._file.is_none());
        assert!(!target.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

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

    /// Another user's file (planted in a shared directory) is not read as
    /// this frpc's state; root's is (a `sudo frpc` run wrote it).
    #[test]
    fn another_users_file_is_not_read() {
        // Root's files are read by anyone: read one.
        assert!(
            read_small(Path::new("/etc/hostname")).is_ok() || !Path::new("/etc/hostname").exists()
        );
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Only root can give a file to another user to test with.
            return;
        }
        let dir = std::env::temp_dir().join(format!("frpc-owner-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let planted = dir.join("token.json");
        std::fs::write(&planted, "{}").unwrap();
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
        let err = read_small(&planted).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("owned by user 65534"), "{err}");
        std::os::unix::fs::chown(&planted, Some(0), Some(0)).unwrap();
        assert_eq!(read_small(&planted).unwrap(), "{}");
        // Nor is its lock file taken for another frpc's.
        let lock = dir.join("token.json.lock");
        std::fs::write(&lock, "").unwrap();
        std::os::unix::fs::chown(&lock, Some(65534), Some(65534)).unwrap();
        let err = lock_token_file(&planted).unwrap_err().to_string();
        assert!(err.contains("owned by user 65534"), "{err}");
        std::os::unix::fs::chown(&lock, Some(0), Some(0)).unwrap();
        drop(lock_token_file(&planted).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
