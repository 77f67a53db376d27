//! Credentials: the saved token file and email/password (flags or prompt).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state_file;

/// What `token.json` holds. Its `Debug` leaves the token out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedToken {
    /// The client token issued by frps.
    pub token: String,
    /// Its expiry (RFC 3339), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The frps control address it was issued by.
    #[serde(default)]
    pub server: String,
    /// The account it belongs to.
    #[serde(default)]
    pub email: String,
    /// It was issued over TLS: frpc sends it in plaintext only with
    /// `--insecure-plaintext`, as it would the password (a configuration
    /// that lost its TLS settings must not hand the token to the path).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
}

impl std::fmt::Debug for SavedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SavedToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("server", &self.server)
            .field("email", &self.email)
            .field("tls", &self.tls)
            .finish()
    }
}

impl SavedToken {
    /// Whether its expiry has passed at `now` (a token without one, or with
    /// one that does not parse, is left for frps to judge).
    pub fn expired_at(&self, now: chrono::DateTime<chrono::Utc>) -> bool {
        self.expires_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .is_some_and(|at| at <= now)
    }
}

/// A token file that exists but cannot be read (permissions, an I/O error,
/// a directory at its path): possibly only for now, unlike a file that is
/// absent or holds no token.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the token file {}: {source}", path.display())]
pub struct ReadError {
    /// The token file.
    pub path: PathBuf,
    /// Why it cannot be read.
    #[source]
    pub source: std::io::Error,
}

/// Reads the token file: `Ok(None)` when there is none, or when it holds no
/// token (logged: a login replaces it); an error when it cannot be read.
pub fn read(path: &Path) -> Result<Option<SavedToken>, ReadError> {
    let text = match crate::state_file::read_small(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // Not text: damaged, holding no token (reading it again will not
        // help).
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            tracing::warn!("ignoring unreadable token file {}: {e}", path.display());
            return Ok(None);
        }
        Err(source) => {
            return Err(ReadError {
                path: path.to_owned(),
                source,
            });
        }
    };
    match serde_json::from_str::<SavedToken>(&text) {
        Ok(t) if !t.token.is_empty() => {
            if let Some(warning) = exposed(path) {
                tracing::warn!("{warning}");
            }
            Ok(Some(t))
        }
        _ => {
            tracing::warn!("ignoring unreadable token file {}", path.display());
            Ok(None)
        }
    }
}

/// What to say of a token file other users may read (frpc writes it 0600;
/// a copy or an edit may not keep that): its token logs in as this client.
fn exposed(path: &Path) -> Option<String> {
    let mode = common::private_file::open_to_others(path)?;
    Some(format!(
        "the token file {} may be read by other users (mode {mode:o}): anyone who reads it can log in as this client; chmod 600 it (or revoke its token with `frps token revoke` and log in again)",
        path.display()
    ))
}

/// As [`read`], with a file that cannot be read logged (naming the file
/// and the error) and taken as no token.
pub fn load(path: &Path) -> Option<SavedToken> {
    read(path).unwrap_or_else(|e| {
        tracing::warn!("{e}");
        None
    })
}

/// Writes the token file atomically, readable by its owner only (0600), as
/// [`state_file::write_private`] does. Saves may overlap (one running on a
/// blocking thread while the next session's login writes another): the
/// last rename wins.
pub fn save(path: &Path, token: &SavedToken) -> anyhow::Result<()> {
    save_durably(path, token).map(|_| ())
}

/// [`save`], saying whether the save is durable (its directory synced:
/// [`state_file::write_private_durably`]).
pub fn save_durably(path: &Path, token: &SavedToken) -> anyhow::Result<bool> {
    state_file::write_private_durably(path, serde_json::to_string_pretty(token)?.as_bytes())
}

/// Email and password for a login.
#[derive(Clone)]
pub struct Credentials {
    /// Account email.
    pub email: String,
    /// Account password.
    pub password: String,
}

/// The password never shows (a debug log line, a panic message).
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("email", &self.email)
            .field("password", &"***")
            .finish()
    }
}

/// Where to get credentials when no valid token is saved.
pub enum Source {
    /// Given on the command line or in the environment.
    Given(Credentials),
    /// Ask on the terminal.
    Prompt,
    /// Nothing available.
    None,
}

/// A credential as given, unless it is blank (an `FRPC_PASSWORD=` left
/// empty by a compose file): not given, as every other blank variable.
fn given(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.trim().is_empty())
}

/// Decides where credentials come from.
pub fn source(email: Option<&str>, password: Option<&str>, may_prompt: bool) -> Source {
    match (given(email), given(password)) {
        // An email never has spaces around it (a stray one in a compose
        // file would read as a wrong password); a password may.
        (Some(e), Some(p)) => Source::Given(Credentials {
            email: e.trim().to_owned(),
            password: p.to_owned(),
        }),
        _ if may_prompt && std::io::stdin().is_terminal() => Source::Prompt,
        _ => Source::None,
    }
}

/// Asks on the terminal for the email and the password, each unless
/// known; the password is not echoed.
pub fn prompt(email: Option<&str>, password: Option<&str>) -> anyhow::Result<Credentials> {
    ask(
        given(email),
        given(password),
        || {
            print!("Email: ");
            std::io::stdout().flush()?;
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            Ok(line)
        },
        || {
            // If frpc ends while this waits (SIGTERM), its exit puts the
            // terminal's echo back (rpassword does so itself on Enter and
            // Ctrl-C).
            let _saved = common::process::save_terminal(std::path::Path::new("/dev/tty"));
            rpassword::prompt_password("Password: ")
        },
    )
}

/// [`prompt`] with its two questions given: each asked only for what is
/// not known already.
fn ask(
    email: Option<&str>,
    password: Option<&str>,
    ask_email: impl FnOnce() -> std::io::Result<String>,
    ask_password: impl FnOnce() -> std::io::Result<String>,
) -> anyhow::Result<Credentials> {
    let email = match email {
        Some(e) => e.trim().to_owned(),
        None => ask_email()?.trim().to_owned(),
    };
    let password = match password {
        Some(p) => p.to_owned(),
        None => ask_password()?,
    };
    Ok(Credentials { email, password })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows_in_debug_output() {
        let c = Credentials {
            email: "me@example.com".into(),
            password: "hunter2-secret".into(),
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("me@example.com") && !shown.contains("hunter2"),
            "{shown}"
        );
        // Nor a saved token.
        let saved = SavedToken {
            token: "frpxc_secret-token-value".into(),
            expires_at: None,
            server: "vps:17000".into(),
            email: "me@example.com".into(),
            tls: true,
        };
        let shown = format!("{saved:?}");
        assert!(
            shown.contains("vps:17000") && !shown.contains("secret-token"),
            "{shown}"
        );
    }

    #[test]
    fn blank_credentials_are_not_given() {
        let from = |e, p| match source(e, p, false) {
            Source::Given(c) => Some((c.email, c.password)),
            _ => None,
        };
        assert!(from(Some(""), Some("pw")).is_none());
        assert!(from(Some("me@example.com"), Some("")).is_none());
        assert!(from(Some("  "), Some("pw")).is_none());
        assert_eq!(
            from(Some("me@example.com"), Some(" pw ")),
            Some(("me@example.com".into(), " pw ".into()))
        );
        assert_eq!(
            from(Some(" me@example.com \n"), Some("pw")),
            Some(("me@example.com".into(), "pw".into()))
        );
        let c = ask(
            Some(" me@example.com "),
            Some("pw"),
            || panic!(),
            || panic!(),
        )
        .unwrap();
        assert_eq!(c.email, "me@example.com");
    }

    #[test]
    fn the_prompt_asks_only_for_what_was_not_given() {
        let never = || -> std::io::Result<String> { panic!("asked for what was given") };
        let line = || Ok("  me@example.com\n".to_owned());
        let secret = || Ok("s3cret".to_owned());
        let c = ask(None, Some("given"), line, never).unwrap();
        assert_eq!(
            (c.email.as_str(), c.password.as_str()),
            ("me@example.com", "given")
        );
        let c = ask(Some("a@b.c"), None, never, secret).unwrap();
        assert_eq!((c.email.as_str(), c.password.as_str()), ("a@b.c", "s3cret"));
        let c = ask(None, None, line, secret).unwrap();
        assert_eq!(
            (c.email.as_str(), c.password.as_str()),
            ("me@example.com", "s3cret")
        );
        let closed = || Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert!(ask(None, Some("given"), closed, never).is_err());
    }

    #[test]
    fn token_file_is_private_and_round_trips() {
        let dir = std::env::temp_dir().join(format!("frpc-login-{}", uuid::Uuid::new_v4()));
        let path = dir.join("token.json");
        assert!(load(&path).is_none());
        let t = SavedToken {
            token: "frpxc_abc".into(),
            expires_at: Some("2026-12-01T00:00:00Z".into()),
            server: "127.0.0.1:17000".into(),
            email: "a@b.c".into(),
            tls: true,
        };
        save(&path, &t).unwrap();
        assert_eq!(load(&path), Some(t.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            assert_eq!(exposed(&path), None);
            // Copied with other users' read permission: still read, and
            // said, with the way out.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let (read, said) = common::testing::logged(|| load(&path));
            assert_eq!(read, Some(t));
            assert!(said.contains("chmod 600"), "said at the read: {said}");
            let said = exposed(&path).expect("others may read it");
            assert!(
                said.contains("token.json may be read by other users (mode 644)")
                    && said.contains("chmod 600"),
                "{said}"
            );
        }
        std::fs::write(&path, "garbage").unwrap();
        assert!(load(&path).is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_token_file_that_cannot_be_read_is_an_error_not_an_absent_token() {
        let dir = std::env::temp_dir().join(format!("frpc-login-{}", uuid::Uuid::new_v4()));
        let path = dir.join("token.json");
        assert!(read(&path).unwrap().is_none(), "absent: no token");
        // A directory at the path: reading it fails (as a file frpc may not
        // read would, for a user other than root), whoever runs the test.
        std::fs::create_dir_all(&path).unwrap();
        let err = read(&path).unwrap_err();
        assert_eq!(err.path, path);
        assert_ne!(err.source.kind(), std::io::ErrorKind::NotFound);
        let message = err.to_string();
        assert!(
            message.contains("cannot read the token file") && message.contains("token.json"),
            "{message}"
        );
        let (loaded, warning) = common::testing::logged(|| load(&path));
        assert!(loaded.is_none());
        assert!(warning.contains(&message), "{warning}");
        // A file that is not text is damaged, not unreadable: no token
        // (a login replaces it), never retried as if it could change.
        let damaged = dir.join("damaged.json");
        std::fs::write(&damaged, [0xff, 0xfe, b'{']).unwrap();
        let (read_back, warning) = common::testing::logged(|| read(&damaged));
        assert!(read_back.unwrap().is_none());
        assert!(
            warning.contains("ignoring unreadable token file"),
            "{warning}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_token_past_its_expiry_is_expired() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .unwrap()
            .to_utc();
        let with = |expires_at: Option<&str>| SavedToken {
            token: "t".into(),
            expires_at: expires_at.map(Into::into),
            server: String::new(),
            email: String::new(),
            tls: false,
        };
        assert!(with(Some("2026-12-01T11:59:59Z")).expired_at(now));
        assert!(with(Some("2026-12-01T12:00:00+00:00")).expired_at(now));
        assert!(!with(Some("2026-12-01T12:00:01Z")).expired_at(now));
        assert!(!with(Some("2026-12-01T14:00:00+01:00")).expired_at(now));
        assert!(!with(None).expired_at(now));
        assert!(!with(Some("next tuesday")).expired_at(now));
    }
}
