//! frpc's state files (the token file, the fallback client id): written
//! atomically, readable by their owner only ([`common::private_file`]).

use std::path::Path;

pub use common::private_file::{directory_of, write_private};

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
}
