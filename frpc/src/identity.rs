//! Who this client is: its id and machine id, and the facts it announces.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::state_file;

/// Key mixed into the machine-id hash, so frpx ids differ from other apps'.
const MID_KEY: &str = "frpx";

/// The client's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Client id to register with.
    pub client_id: String,
    /// Machine id (hardware-derived, or the persisted fallback UUID).
    pub machine_id: String,
}

/// Resolves the identity: an explicit `--client-id` wins; otherwise the
/// machine id; when that cannot be read, a UUID persisted beside `token_file`.
pub fn resolve(explicit: Option<&str>, token_file: &Path) -> anyhow::Result<Identity> {
    let machine = mid::get(MID_KEY).ok().filter(|id| !id.is_empty());
    resolve_with(machine, explicit, token_file)
}

/// [`resolve`] with the machine id already read (`None`: none to read).
/// With an explicit id and no machine id, a fallback file that cannot be
/// read or written (a read-only directory, a container's mounted secret)
/// is a warning, not an error: the machine id is then `client-id:<id>`,
/// as stable as the id the operator gave (without one, frpc has nothing
/// stable to register as, and stops).
fn resolve_with(
    machine: Option<String>,
    explicit: Option<&str>,
    token_file: &Path,
) -> anyhow::Result<Identity> {
    let machine_id = match machine {
        Some(id) => id,
        None => match (persisted_uuid(&fallback_path(token_file)), explicit) {
            (Ok(id), _) => id,
            (Err(e), Some(id)) => {
                tracing::warn!("{e:#}; the machine id is taken from --client-id instead");
                format!("client-id:{id}")
            }
            (Err(e), None) => return Err(e),
        },
    };
    let client_id = explicit
        .map(str::to_owned)
        .unwrap_or_else(|| machine_id.clone());
    Ok(Identity {
        client_id,
        machine_id,
    })
}

/// Where the fallback id lives: `client-id` beside the token file.
pub fn fallback_path(token_file: &Path) -> PathBuf {
    token_file
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("client-id")
}

/// Reads the UUID stored at `path`, creating it on first use. A file that
/// holds no UUID (damaged) is replaced by a new one, with a warning (this
/// machine then shows up under a new id). One that exists and cannot be
/// read (permissions: written by a `sudo frpc` run, say) is an error, not
/// replaced: the id in it is this machine's, and a new one would register
/// it as another. Written atomically (mode 0600), as the token file is: a
/// crash mid-write leaves the old id, not an empty file that would change
/// the id at the next start. Created only where no file is yet: of two
/// frpc starting together for the first time, one writes its id and the
/// other reads and uses it (each ran under an id of its own, and one of
/// them was lost at the next start).
pub fn persisted_uuid(path: &Path) -> anyhow::Result<String> {
    let mut first = true;
    loop {
        let damaged = match crate::state_file::read_small(path) {
            Ok(existing) => match uuid::Uuid::parse_str(existing.trim()) {
                Ok(_) => return Ok(existing.trim().to_owned()),
                Err(e) => Some(e.to_string()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            // Not text: damaged, as one holding no UUID.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Some(e.to_string()),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot read the client id file {} (this machine's id when it has no machine id to read): make it readable, or pass --client-id",
                        path.display()
                    )
                });
            }
        };
        let id = uuid::Uuid::new_v4().to_string();
        let contents = format!("{id}\n");
        let saving = || format!("cannot save the client id to {}", path.display());
        // The token file's directory may not exist yet on a first start:
        // made by the write.
        match damaged {
            // Another frpc may be creating it this very moment: the first
            // one's id is the machine's.
            None if first => {
                if state_file::create_private(path, contents.as_bytes()).with_context(saving)? {
                    return Ok(id);
                }
                first = false;
                continue;
            }
            Some(e) => tracing::warn!(
                "the client id file {} holds no UUID ({e}); replacing it with a new id",
                path.display()
            ),
            // Gone again after it was there: written, as on a first start.
            None => {}
        }
        state_file::write_private(path, contents.as_bytes()).with_context(saving)?;
        // Replaced by rename: another frpc replacing it at once may have
        // renamed its own over it; the id the file holds now is the
        // machine's.
        return Ok(match crate::state_file::read_small(path) {
            Ok(now) if uuid::Uuid::parse_str(now.trim()).is_ok() => now.trim().to_owned(),
            _ => id,
        });
    }
}

/// Host name of this machine.
pub fn hostname() -> String {
    sysinfo::System::host_name().unwrap_or_else(|_| "unknown".into())
}

/// Operating system name (e.g. `linux`).
pub fn os() -> String {
    std::env::consts::OS.to_owned()
}

/// CPU architecture (e.g. `x86_64`).
pub fn arch() -> String {
    std::env::consts::ARCH.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_uuid_is_persisted_and_reused() {
        // The token file's directory does not exist yet (a first start).
        let dir = std::env::temp_dir().join(format!("frpc-id-{}", uuid::Uuid::new_v4()));
        let path = fallback_path(&dir.join("state").join("token.json"));
        let first = persisted_uuid(&path).unwrap();
        let second = persisted_uuid(&path).unwrap();
        assert_eq!(first, second);
        assert!(uuid::Uuid::parse_str(&first).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn frpc_starting_together_settle_on_one_id() {
        let dir = std::env::temp_dir().join(format!("frpc-id-{}", uuid::Uuid::new_v4()));
        let path = fallback_path(&dir.join("token.json"));
        let barrier = std::sync::Barrier::new(8);
        let ids: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (path, barrier) = (&path, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        persisted_uuid(path).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), ids[0]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_client_id_file_without_a_uuid_is_replaced_with_a_warning() {
        let dir = std::env::temp_dir().join(format!("frpc-id-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("client-id");
        std::fs::write(&path, "not a uuid\n").unwrap();
        let (id, warning) = common::testing::logged(|| persisted_uuid(&path).unwrap());
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert!(
            warning.contains("holds no UUID") && warning.contains(&path.display().to_string()),
            "{warning}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), id);
        // Not text at all: damaged too.
        std::fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        let (id, warning) = common::testing::logged(|| persisted_uuid(&path).unwrap());
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert!(warning.contains("holds no UUID"), "{warning}");
        // A file that exists and cannot be read (a directory here, as one
        // another user wrote): an error naming it, and left as it is.
        let blocked = dir.join("blocked");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        let err = persisted_uuid(&blocked).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read the client id file"),
            "{err:#}"
        );
        assert!(blocked.join("inside").is_dir(), "left as it was");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn the_client_id_is_written_by_rename_not_through_a_symlink() {
        let dir = std::env::temp_dir().join(format!("frpc-id-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "theirs").unwrap();
        let path = dir.join("client-id");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let id = persisted_uuid(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "theirs");
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(persisted_uuid(&path).unwrap(), id);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A link another user made to a file that holds a UUID (planted, to
    /// `/proc/sys/kernel/random/uuid`: a new id at each read) is not this
    /// machine's id: replaced by a file of frpc's own, which stays. A link
    /// of frpc's own user (a volume's layout) is followed.
    #[test]
    fn a_link_another_user_made_is_not_taken_for_the_client_id() {
        let dir = std::env::temp_dir().join(format!("frpc-id-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let theirs = dir.join("theirs");
        let planted = uuid::Uuid::new_v4().to_string();
        std::fs::write(&theirs, &planted).unwrap();
        let path = dir.join("client-id");
        std::os::unix::fs::symlink(&theirs, &path).unwrap();
        assert_eq!(persisted_uuid(&path).unwrap(), planted, "its own link");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Only root can give a link to another user to test with.
            std::os::unix::fs::lchown(&path, Some(65534), Some(65534)).unwrap();
            let id = persisted_uuid(&path).unwrap();
            assert_ne!(id, planted);
            assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
            assert_eq!(std::fs::read_to_string(&theirs).unwrap(), planted);
            assert_eq!(persisted_uuid(&path).unwrap(), id);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn without_a_machine_id_an_unusable_id_file_stops_only_a_client_without_an_id() {
        let dir = std::env::temp_dir().join(format!("frpc-id-{}", uuid::Uuid::new_v4()));
        // A client-id file that cannot be read (a directory here, as one
        // another user wrote).
        std::fs::create_dir_all(dir.join("client-id").join("inside")).unwrap();
        let token_file = dir.join("token.json");
        let (id, warning) = common::testing::logged(|| {
            resolve_with(None, Some("gpu-1"), &token_file).expect("the id given suffices")
        });
        assert_eq!(id.client_id, "gpu-1");
        assert_eq!(id.machine_id, "client-id:gpu-1");
        assert!(
            warning.contains("cannot read the client id file") && warning.contains("--client-id"),
            "{warning}"
        );
        let err = resolve_with(None, None, &token_file).unwrap_err();
        assert!(format!("{err:#}").contains("pass --client-id"), "{err:#}");
        // A machine id, when there is one, is never replaced.
        let id = resolve_with(Some("abc".into()), Some("gpu-1"), &token_file).unwrap();
        assert_eq!(id.machine_id, "abc");
        // A usable file still gives the persisted id with an explicit one.
        std::fs::remove_dir_all(dir.join("client-id")).unwrap();
        let id = resolve_with(None, Some("gpu-1"), &token_file).unwrap();
        assert!(uuid::Uuid::parse_str(&id.machine_id).is_ok(), "{id:?}");
        assert_eq!(
            id,
            resolve_with(None, None, &token_file)
                .map(|i| Identity {
                    client_id: "gpu-1".into(),
                    ..i
                })
                .unwrap()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn explicit_id_wins() {
        // Its own directory: where the machine has no id, one is kept
        // beside the token file, and other tests use the temp dir too.
        let dir = std::env::temp_dir().join(format!("frpc-explicit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let id = resolve(Some("client_A"), &dir.join("token.json")).unwrap();
        assert_eq!(id.client_id, "client_A");
        assert!(!id.machine_id.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
