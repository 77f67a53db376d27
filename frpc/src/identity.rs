//! Who this client is: its id and machine id, and the facts it announces.

use std::path::{Path, PathBuf};

use anyhow::Context;

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
    let machine_id = match mid::get(MID_KEY) {
        Ok(id) if !id.is_empty() => id,
        _ => persisted_uuid(&fallback_path(token_file))?,
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

/// Reads the UUID stored at `path`, creating it on first use.
pub fn persisted_uuid(path: &Path) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim();
        if uuid::Uuid::parse_str(existing).is_ok() {
            return Ok(existing.to_owned());
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    // The token file's directory may not exist yet on a first start.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, format!("{id}\n"))
        .with_context(|| format!("cannot save the client id to {}", path.display()))?;
    Ok(id)
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
    fn explicit_id_wins() {
        let dir = std::env::temp_dir();
        let id = resolve(Some("client_A"), &dir.join("token.json")).unwrap();
        assert_eq!(id.client_id, "client_A");
        assert!(!id.machine_id.is_empty());
    }
}
