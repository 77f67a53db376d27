//! TLS on the control, proxy and public ports: certificates from PEM files or
//! a persisted self-signed one, and the accept step the listeners run before
//! their first frame or HTTP request.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::Stream;
use common::stream::TLS_HANDSHAKE_RECORD;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

/// File name of the self-signed certificate (PEM).
pub const SELF_SIGNED_CERT: &str = "frps-tls.pem";
/// File name of the self-signed certificate's private key (PEM, mode 0600).
pub const SELF_SIGNED_KEY: &str = "frps-tls.key";

/// Why TLS could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A self-signed certificate or key could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// rustls refused the certificate or key (e.g. they do not match).
    #[error("invalid TLS certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
    /// rcgen could not generate a certificate.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Why a connection was dropped before its first frame.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// Nothing (or not the whole TLS handshake) arrived in time.
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    /// The peer closed before sending anything.
    #[error("closed before the handshake")]
    Closed,
    /// The TLS handshake failed (bad hello, unknown CA on the client's side...).
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    /// A plaintext client on a TLS port (told so in a plaintext frame).
    #[error("plaintext client on a TLS port")]
    PlaintextOnTls,
    /// A TLS client on a plaintext port (told so in a plaintext frame).
    #[error("TLS client on a plaintext port")]
    TlsOnPlaintext,
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// TLS set-up of the listeners, built once at start.
#[derive(Clone, Default)]
pub struct Tls {
    /// Acceptor of the control and proxy ports; `None` runs them in plaintext.
    pub frames: Option<TlsAcceptor>,
    /// Acceptor of the public port; `None` serves plain HTTP.
    pub public: Option<TlsAcceptor>,
    /// SHA-256 fingerprint (hex) of the control and proxy ports' certificate.
    pub fingerprint: Option<String>,
    /// Where the self-signed certificate lives, when one is used.
    pub self_signed_dir: Option<PathBuf>,
    /// What the certificates' dates warrant saying at start (expired, not
    /// yet valid, expiring soon): every TLS client refuses such a one.
    pub date_warnings: Vec<String>,
    /// The certificates' dates, watched while frps runs ([`watch_dates`]).
    pub dates: Vec<CertDates>,
    /// Operator keys (`--tls-key`, `--public-tls-key`) every user may read,
    /// said at start.
    pub key_warnings: Vec<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("frames", &self.frames.is_some())
            .field("public", &self.public.is_some())
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Tls {
    /// Loads (or, for `--tls-self-signed`, generates once and then reuses)
    /// the certificates `config` names.
    pub fn from_config(config: &Config) -> Result<Self, TlsError> {
        let mut tls = Tls::default();
        let frames = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(load_pem(cert, key)?),
            _ if config.tls_self_signed => {
                let dir = config
                    .tls_dir
                    .clone()
                    .unwrap_or_else(|| default_dir_kept(&config.database_url));
                let pair = self_signed(&dir)?;
                tls.self_signed_dir = Some(dir);
                Some(pair)
            }
            _ => None,
        };
        let now = chrono::Utc::now().timestamp();
        if let Some((certs, key)) = frames {
            let named = match (&config.tls_cert, &tls.self_signed_dir) {
                (Some(cert), _) => cert.display().to_string(),
                (None, Some(dir)) => dir.join(SELF_SIGNED_CERT).display().to_string(),
                (None, None) => "of the control and proxy ports".into(),
            };
            tls.dates.extend(CertDates::of(&certs[0], &named));
            tls.fingerprint = Some(fingerprint(&certs[0]));
            tls.frames = Some(acceptor(certs, key)?);
        }
        for key in [&config.tls_key, &config.public_tls_key]
            .into_iter()
            .flatten()
        {
            if let Some(warning) = world_readable(key)
                && !tls.key_warnings.contains(&warning)
            {
                tls.key_warnings.push(warning);
            }
        }
        if let (Some(cert), Some(key)) = (&config.public_tls_cert, &config.public_tls_key) {
            let (certs, key) = load_pem(cert, key)?;
            tls.dates
                .extend(CertDates::of(&certs[0], &cert.display().to_string()));
            tls.public = Some(acceptor(certs, key)?);
        }
        tls.date_warnings = tls
            .dates
            .iter()
            .filter_map(|d| d.warning(now))
            .map(|(_, said)| said)
            .collect();
        Ok(tls)
    }

    /// Logs how each port is protected; a warning when control and proxy run
    /// in plaintext.
    pub fn log_at_start(&self) {
        match (&self.fingerprint, &self.self_signed_dir) {
            (Some(fp), Some(dir)) => tracing::info!(
                "TLS on the control and proxy ports with the self-signed certificate in {}; SHA-256 fingerprint {fp} (run frpc with --tls --tls-fingerprint {fp})",
                dir.display()
            ),
            (Some(fp), None) => {
                tracing::info!(
                    "TLS on the control and proxy ports; certificate SHA-256 fingerprint {fp}"
                )
            }
            _ => tracing::warn!(
                "the control and proxy ports run WITHOUT TLS: passwords, tokens and prompts cross the network in clear. Set --tls-cert/--tls-key or --tls-self-signed"
            ),
        }
        if self.public.is_some() {
            tracing::info!("TLS on the public port");
        }
        for warning in self.date_warnings.iter().chain(&self.key_warnings) {
            tracing::warn!("{warning}");
        }
    }

    /// Completes the transport of a control or proxy connection within
    /// `limit`: TLS when configured, plaintext otherwise. A client speaking
    /// the other one gets a plaintext `Error` frame saying what to change
    /// (a TLS client sees it as a non-TLS answer) and is dropped.
    pub async fn accept_frames(
        &self,
        tcp: TcpStream,
        limit: Duration,
    ) -> Result<Stream, AcceptError> {
        // Best effort: a socket that refuses an option still works.
        let _ = common::stream::tune_link(&tcp);
        let accept = async {
            let mut first = [0u8; 1];
            if tcp.peek(&mut first).await? == 0 {
                return Err(AcceptError::Closed);
            }
            let hello = first[0] == TLS_HANDSHAKE_RECORD;
            match (&self.frames, hello) {
                (Some(acceptor), true) => Ok(acceptor
                    .accept(tcp)
                    .await
                    .map_err(AcceptError::Handshake)?
                    .into()),
                (None, false) => Ok(tcp.into()),
                (Some(_), false) => {
                    refuse(tcp, "this frps requires TLS on its control and proxy ports: run frpc with --tls (and --tls-ca or --tls-fingerprint)").await;
                    Err(AcceptError::PlaintextOnTls)
                }
                (None, true) => {
                    refuse(tcp, "this frps does not use TLS on its control and proxy ports: run frpc without --tls, or start frps with --tls-cert/--tls-key or --tls-self-signed").await;
                    Err(AcceptError::TlsOnPlaintext)
                }
            }
        };
        tokio::time::timeout(limit, accept)
            .await
            .map_err(|_| AcceptError::Timeout(limit))?
    }

    /// Completes the transport of a public connection within `limit`
    /// (`TCP_NODELAY` set here unless `has_nodelay`: taken from the
    /// listener, [`common::stream::listen_with_nodelay`]).
    pub async fn accept_public(
        &self,
        tcp: TcpStream,
        limit: Duration,
        has_nodelay: bool,
    ) -> Result<Stream, AcceptError> {
        if !has_nodelay {
            let _ = tcp.set_nodelay(true);
        }
        debug_assert!(
            tcp.nodelay().unwrap_or(true),
            "a public connection without TCP_NODELAY"
        );
        let Some(acceptor) = &self.public else {
            return Ok(tcp.into());
        };
        match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
            Err(_) => Err(AcceptError::Timeout(limit)),
            Ok(Err(e)) => Err(AcceptError::Handshake(e)),
            Ok(Ok(s)) => Ok(s.into()),
        }
    }
}

/// Writes an `Error` frame in plaintext, then drains what the peer sent
/// ([`common::stream::drain`]; the caller's deadline bounds this).
async fn refuse(mut tcp: TcpStream, message: &str) {
    use tokio::io::AsyncWriteExt;
    let error = common::Command::Error {
        message: message.to_owned(),
    };
    if common::write_command(&mut tcp, &error).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    let _ = common::stream::drain(&mut tcp).await;
}

/// SHA-256 of a DER certificate, lowercase hex (what `--tls-fingerprint` takes).
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    common::hex::encode(&Sha256::digest(cert.as_ref()))
}

/// The default directory of the self-signed certificate: beside the SQLite
/// database, else the working directory.
pub fn default_dir(database_url: &str) -> PathBuf {
    // The file as SQLite opens it (percent-decoded), not the URL's text.
    crate::store::sqlite_file(database_url)
        .and_then(|f| f.parent().map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."))
}

/// [`default_dir`], unless the pair is only where frps before 2026-12-04
/// kept it: in the SQLite URL's directory as written, not percent-decoded
/// (`my%20data` for `my data`). Made anew elsewhere, the pair would change
/// the fingerprint every frpc pins.
fn default_dir_kept(database_url: &str) -> PathBuf {
    let dir = default_dir(database_url);
    let has_pair = |d: &Path| d.join(SELF_SIGNED_CERT).exists() && d.join(SELF_SIGNED_KEY).exists();
    let written = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or_default())
        .and_then(|f| Path::new(f).parent())
        .filter(|p| !p.as_os_str().is_empty());
    match written {
        Some(old) if old != dir && !has_pair(&dir) && has_pair(old) => {
            tracing::warn!(
                "using the self-signed pair in {} (the database URL's directory as written); move it to {} or pass --tls-dir",
                old.display(),
                dir.display()
            );
            old.to_path_buf()
        }
        _ => dir,
    }
}

/// How long before a certificate's end frps starts saying so at start.
const EXPIRY_NOTICE_SECS: i64 = 14 * 86400;

/// A certificate's validity, as read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertDates {
    /// Where it was read from (or which ports it serves).
    named: String,
    /// Valid from, Unix seconds.
    from: i64,
    /// Valid until, Unix seconds.
    until: i64,
}

/// What a certificate's dates say at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateState {
    /// Within [`EXPIRY_NOTICE_SECS`] of its end.
    Ending,
    /// Past its end, or before its start: every TLS client refuses it.
    Refused,
}

impl CertDates {
    /// The dates of `cert` (read from `named`); `None` when they cannot be
    /// read (rustls accepted the certificate, and the clients will judge).
    fn of(cert: &CertificateDer<'_>, named: &str) -> Option<Self> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let validity = parsed.validity();
        Some(Self {
            named: named.to_owned(),
            from: validity.not_before.timestamp(),
            until: validity.not_after.timestamp(),
        })
    }

    /// What an operator should hear about these dates at `now` (Unix
    /// seconds): expired, not valid yet, or ending within
    /// [`EXPIRY_NOTICE_SECS`]. rustls checks neither its own certificate's
    /// dates nor lets frps see them, and every TLS client refuses a
    /// certificate outside them: frpc retries for ever, each time with a
    /// certificate error. `None` when the dates are fine.
    pub fn warning(&self, now: i64) -> Option<(DateState, String)> {
        let (from, until, named) = (self.from, self.until, &self.named);
        let date = |t: i64| {
            chrono::DateTime::from_timestamp(t, 0)
                .map(|d| d.format("%Y-%m-%d %H:%M UTC").to_string())
                .unwrap_or_else(|| format!("{t} (Unix time)"))
        };
        if until < now {
            Some((
                DateState::Refused,
                format!(
                    "the TLS certificate {named} expired on {}: every TLS client refuses it; renew it and restart frps",
                    date(until)
                ),
            ))
        } else if from > now {
            Some((
                DateState::Refused,
                format!(
                    "the TLS certificate {named} is not valid before {}: every TLS client refuses it until then (is this machine's clock right?)",
                    date(from)
                ),
            ))
        } else if until - now < EXPIRY_NOTICE_SECS {
            Some((
                DateState::Ending,
                format!(
                    "the TLS certificate {named} expires on {} (in {} days): renew it and restart frps",
                    date(until),
                    (until - now) / 86400
                ),
            ))
        } else {
            None
        }
    }
}

/// How often the certificates' dates are looked at while frps runs.
pub const DATE_CHECK: std::time::Duration = std::time::Duration::from_secs(3600);

/// How often a certificate's dates that still warrant a word are said
/// again (a change, such as its expiry, is said at once).
const DATE_REPEAT_SECS: i64 = 86400;

/// What has been said of each certificate's dates, and when.
#[derive(Debug, Default)]
pub struct DateWatch {
    said: Vec<Option<(DateState, i64)>>,
}

impl DateWatch {
    /// A watch of `dates` that knows what was said of them at `start`.
    pub fn from_start(dates: &[CertDates], start: i64) -> Self {
        Self {
            said: dates
                .iter()
                .map(|d| d.warning(start).map(|(state, _)| (state, start)))
                .collect(),
        }
    }

    /// What is to be said of `dates` at `now`: a certificate whose state
    /// changed since it was last said (ending, then expired), or that has
    /// not been said of for [`DATE_REPEAT_SECS`]; with whether every TLS
    /// client refuses it now.
    pub fn check(&mut self, dates: &[CertDates], now: i64) -> Vec<(DateState, String)> {
        self.said.resize(dates.len(), None);
        let mut out = Vec::new();
        for (d, said) in dates.iter().zip(&mut self.said) {
            match d.warning(now) {
                None => *said = None,
                Some((state, text)) => {
                    let due =
                        said.is_none_or(|(was, at)| was != state || now - at >= DATE_REPEAT_SECS);
                    if due {
                        *said = Some((state, now));
                        out.push((state, text));
                    }
                }
            }
        }
        out
    }
}

/// Every [`DATE_CHECK`] until `stop`, says what the certificates' dates
/// warrant: a certificate that expires while frps runs fails every new
/// TLS handshake, which frps logs at debug only (a scan or a stray client
/// fails them too).
pub async fn watch_dates(dates: Vec<CertDates>, stop: tokio_util::sync::CancellationToken) {
    if dates.is_empty() {
        return;
    }
    let mut watch = DateWatch::from_start(&dates, chrono::Utc::now().timestamp());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + DATE_CHECK, DATE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for (state, said) in watch.check(&dates, chrono::Utc::now().timestamp()) {
            match state {
                DateState::Refused => tracing::error!("{said}"),
                DateState::Ending => tracing::warn!("{said}"),
            }
        }
    }
}

/// Reads a certificate chain and its private key from PEM files.
pub fn load_pem(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let read_err = |path: &Path, reason: String| TlsError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_err(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(read_err(cert, "no PEM certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| read_err(key, e.to_string()))?;
    Ok((certs, key))
}

/// Loads the self-signed certificate in `dir`, generating and saving it on
/// first use.
fn self_signed(
    dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let cert_path = dir.join(SELF_SIGNED_CERT);
    let key_path = dir.join(SELF_SIGNED_KEY);
    // Whether a file is there (a dangling symlink is not); one that cannot
    // be told (no permission on the directory) stops frps, rather than be
    // taken for missing and replaced.
    let there = |path: &Path| {
        path.try_exists().map_err(|e| TlsError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    };
    match (there(&cert_path)?, there(&key_path)?) {
        (true, true) => {
            warn_if_readable(&key_path);
            return load_pem(&cert_path, &key_path);
        }
        // Never left by frps (the key is written first): a key lost or not
        // mounted yet. A new pair would change the fingerprint every frpc
        // pins, and each would stop at its next connection.
        (true, false) => {
            return Err(TlsError::Read {
                path: key_path.clone(),
                reason: format!(
                    "missing, though its certificate {} is there: frps makes no new pair over it (every frpc pinning its fingerprint would stop); restore the key, or delete the certificate to have a new pair made and pin the new fingerprint",
                    cert_path.display()
                ),
            });
        }
        (false, true) => tracing::warn!(
            "{} has no certificate beside it (a start stopped while making the pair): a new pair is made; frpc must pin its new fingerprint",
            key_path.display()
        ),
        (false, false) => {}
    }
    let names = vec!["frps".to_owned(), "localhost".to_owned()];
    let generated = rcgen::generate_simple_self_signed(names)?;
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: anyhow::Error| TlsError::Write {
            path,
            source: io::Error::other(format!("{e:#}")),
        }
    };
    // Each written whole under a new name, then renamed over its own: a
    // file or symlink someone left at a name (a dangling one counts as
    // missing) is replaced, never written through, and a crash between
    // the two leaves a key with no certificate, both made again at the
    // next start, never a new key beside an old certificate. The
    // certificate is public; the same owner-only mode does it no harm.
    common::private_file::write_private(
        &key_path,
        generated.signing_key.serialize_pem().as_bytes(),
    )
    .map_err(write_err(&key_path))?;
    common::private_file::write_private(&cert_path, generated.cert.pem().as_bytes())
        .map_err(write_err(&cert_path))?;
    load_pem(&cert_path, &key_path)
}

/// Warns when the self-signed key others may read: anyone who reads it
/// can pose as this frps to every frpc that pins its fingerprint.
fn warn_if_readable(key: &Path) {
    if let Some(mode) = common::private_file::open_to_others(key) {
        tracing::warn!(
            "{} may be read by other users (mode {mode:o}): anyone who reads it can pose as this frps; chmod 600 it, or delete the pair to have a new one made (and pin the new fingerprint)",
            key.display(),
        );
    }
}

/// What to say of an operator's private key every user may read (a group
/// may: Debian's `ssl-cert` convention is 0640): anyone on the machine
/// could pose as this frps.
fn world_readable(key: &Path) -> Option<String> {
    let mode = common::private_file::open_to_others(key)?;
    (mode & 0o004 != 0).then(|| {
        format!(
            "{} may be read by every user (mode {mode:o}): anyone who reads it can pose as this frps; chmod o-rwx it",
            key.display()
        )
    })
}

/// A rustls acceptor (ring provider, TLS 1.2 and 1.3) for one certificate.
fn acceptor(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_links_get_keepalive_and_nodelay() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut dialed = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut dialed, b"\0")
            .await
            .unwrap();
        let (tcp, _) = l.accept().await.unwrap();
        let stream = Tls::default()
            .accept_frames(tcp, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(common::stream::link_is_tuned(stream.tcp()).unwrap());
    }

    #[test]
    fn the_default_directory_is_beside_the_sqlite_database() {
        assert_eq!(
            default_dir("sqlite:///var/lib/frpx/frpx.db"),
            PathBuf::from("/var/lib/frpx")
        );
        assert_eq!(
            default_dir("sqlite://data/frpx.db?mode=rwc"),
            PathBuf::from("data")
        );
        assert_eq!(default_dir("sqlite://frpx.db"), PathBuf::from("."));
        // Decoded as SQLite decodes it: where the database is.
        assert_eq!(
            default_dir("sqlite:///srv/my%20data/frpx.db"),
            PathBuf::from("/srv/my data")
        );
        // Unless the pair is only where the URL's text put it before.
        let root = std::env::temp_dir().join(format!("frps-tls-{}", uuid::Uuid::new_v4()));
        let url = format!("sqlite://{}/my%20data/frpx.db", root.display());
        assert_eq!(default_dir_kept(&url), root.join("my data"));
        let (old, new) = (root.join("my%20data"), root.join("my data"));
        self_signed(&old).unwrap();
        assert_eq!(default_dir_kept(&url), old);
        self_signed(&new).unwrap();
        assert_eq!(default_dir_kept(&url), new);
        std::fs::remove_dir_all(root).unwrap();
        assert_eq!(default_dir("sqlite::memory:"), PathBuf::from("."));
        assert_eq!(default_dir("postgres://db/frpx"), PathBuf::from("."));
    }

    #[test]
    fn a_self_signed_certificate_is_generated_once_then_reused() {
        let dir = std::env::temp_dir().join(format!("frps-tls-{}", uuid::Uuid::new_v4()));
        let (first, _) = self_signed(&dir).unwrap();
        let (again, _) = self_signed(&dir).unwrap();
        assert_eq!(fingerprint(&first[0]), fingerprint(&again[0]));
        assert_eq!(fingerprint(&first[0]).len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(SELF_SIGNED_KEY))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn the_pair_is_written_beside_what_others_left_never_through_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("frps-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        // Dangling symlinks at both names (missing files: a pair is made),
        // pointing where someone wants frps to write.
        let (planted_cert, planted_key) = (dir.join("planted.pem"), dir.join("planted.key"));
        std::os::unix::fs::symlink(&planted_cert, dir.join(SELF_SIGNED_CERT)).unwrap();
        std::os::unix::fs::symlink(&planted_key, dir.join(SELF_SIGNED_KEY)).unwrap();
        let (made, _) = self_signed(&dir).unwrap();
        assert!(
            !planted_cert.exists(),
            "no certificate written through the symlink"
        );
        assert!(!planted_key.exists(), "no key written through the symlink");
        for name in [SELF_SIGNED_CERT, SELF_SIGNED_KEY] {
            let meta = std::fs::symlink_metadata(dir.join(name)).unwrap();
            assert!(meta.file_type().is_file(), "{name}");
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        }
        // A key whose certificate never got written (a crash between the
        // two): both made again, never the new key beside an old one.
        std::fs::remove_file(dir.join(SELF_SIGNED_CERT)).unwrap();
        let (again, _) = self_signed(&dir).unwrap();
        assert_ne!(fingerprint(&made[0]), fingerprint(&again[0]));
        let (kept, _) = self_signed(&dir).unwrap();
        assert_eq!(fingerprint(&again[0]), fingerprint(&kept[0]));
        // A certificate without its key (lost, a mount not there yet):
        // frps stops, and the certificate every frpc pins is left as it is.
        let cert = std::fs::read(dir.join(SELF_SIGNED_CERT)).unwrap();
        std::fs::remove_file(dir.join(SELF_SIGNED_KEY)).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "theirs").unwrap();
        std::os::unix::fs::symlink(dir.join("not-mounted.key"), dir.join(SELF_SIGNED_KEY)).unwrap();
        let err = self_signed(&dir).unwrap_err().to_string();
        assert!(err.contains("makes no new pair"), "{err}");
        assert_eq!(std::fs::read(dir.join(SELF_SIGNED_CERT)).unwrap(), cert);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A certificate valid from `from` to `until` (year, month, day).
    fn dated(from: (i32, u8, u8), until: (i32, u8, u8)) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        let mut params = rcgen::CertificateParams::new(vec!["frps".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        let signing_key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&signing_key).unwrap();
        rcgen::CertifiedKey { cert, signing_key }
    }

    fn unix(y: i32, m: u32, d: u32) -> i64 {
        chrono::NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp()
    }

    #[test]
    fn certificate_dates_outside_or_near_their_end_are_announced() {
        let cert = dated((2026, 1, 1), (2027, 1, 1));
        let dates = CertDates::of(cert.cert.der(), "c.pem").unwrap();
        let at = |y, m, d| dates.warning(unix(y, m, d)).map(|(_, said)| said);
        assert_eq!(at(2026, 6, 1), None, "well within");
        let expired = at(2027, 1, 2).unwrap();
        assert!(
            expired.contains("c.pem expired on 2027-01-01 00:00 UTC"),
            "{expired}"
        );
        let early = at(2025, 12, 1).unwrap();
        assert!(early.contains("not valid before 2026-01-01"), "{early}");
        let soon = at(2026, 12, 22).unwrap();
        assert!(
            soon.contains("expires on 2027-01-01") && soon.contains("in 10 days"),
            "{soon}"
        );
        assert_eq!(at(2026, 12, 17), None, "15 days left: not yet");
        // Not a certificate at all: nothing to say (rustls judged it).
        assert_eq!(
            CertDates::of(&CertificateDer::from(vec![1, 2, 3]), "x"),
            None
        );
    }

    /// While frps runs, a certificate's end is said as it nears (once a
    /// day) and at once when it passes: a certificate expiring after start
    /// failed every handshake with nothing said above debug.
    #[test]
    fn certificate_dates_are_watched_while_frps_runs() {
        let cert = dated((2026, 1, 1), (2027, 1, 1));
        let dates = vec![CertDates::of(cert.cert.der(), "c.pem").unwrap()];
        let start = unix(2026, 6, 1);
        let mut watch = DateWatch::from_start(&dates, start);
        let hour = 3600;
        assert!(watch.check(&dates, start + hour).is_empty(), "well within");
        // 14 days before the end: said, then not again for a day.
        let near = unix(2026, 12, 19);
        let said = watch.check(&dates, near);
        assert_eq!(said.len(), 1);
        assert_eq!(said[0].0, DateState::Ending);
        assert!(said[0].1.contains("expires on 2027-01-01"), "{}", said[0].1);
        assert!(watch.check(&dates, near + hour).is_empty());
        assert_eq!(watch.check(&dates, near + 24 * hour).len(), 1);
        // Past its end: said at once, as refused.
        let gone = unix(2027, 1, 1) + hour;
        let said = watch.check(&dates, gone);
        assert_eq!(said.len(), 1);
        assert_eq!(said[0].0, DateState::Refused);
        assert!(said[0].1.contains("expired on 2027-01-01"), "{}", said[0].1);
        assert!(watch.check(&dates, gone + hour).is_empty());
        // What was said at start is not said again within the day.
        let mut late = DateWatch::from_start(&dates, gone);
        assert!(late.check(&dates, gone + hour).is_empty());
        assert_eq!(late.check(&dates, gone + 24 * hour).len(), 1);
    }

    #[test]
    fn an_expired_certificate_is_loaded_with_a_warning() {
        let dir = std::env::temp_dir().join(format!("frps-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = dated((2020, 1, 1), (2021, 1, 1));
        let (cert, key) = (dir.join("old.pem"), dir.join("old.key"));
        std::fs::write(&cert, old.cert.pem()).unwrap();
        std::fs::write(&key, old.signing_key.serialize_pem()).unwrap();
        let mut config = Config::ephemeral("k", "sqlite::memory:");
        config.tls_cert = Some(cert.clone());
        config.tls_key = Some(key.clone());
        config.public_tls_cert = Some(cert.clone());
        config.public_tls_key = Some(key);
        let tls = Tls::from_config(&config).unwrap();
        assert!(tls.frames.is_some() && tls.public.is_some());
        assert_eq!(tls.date_warnings.len(), 2, "{:?}", tls.date_warnings);
        // Written with the umask's 0644: every user may read the key (one
        // warning for the one file both flags name).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let key = config.tls_key.clone().unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
            let tls = Tls::from_config(&config).unwrap();
            assert_eq!(tls.key_warnings.len(), 1, "{:?}", tls.key_warnings);
            assert!(
                tls.key_warnings[0].contains("mode 644"),
                "{:?}",
                tls.key_warnings
            );
            // A group may read it (ssl-cert); others not: nothing to say.
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
            assert!(Tls::from_config(&config).unwrap().key_warnings.is_empty());
        }
        for warning in &tls.date_warnings {
            assert!(warning.contains(&cert.display().to_string()), "{warning}");
            assert!(warning.contains("expired on 2021-01-01"), "{warning}");
        }
        // The self-signed one lasts: nothing to say.
        let mut config = Config::ephemeral("k", "sqlite::memory:");
        config.tls_self_signed = true;
        config.tls_dir = Some(dir.join("self"));
        assert!(Tls::from_config(&config).unwrap().date_warnings.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_key_file_is_reported_with_its_path() {
        let err = load_pem(
            Path::new("/nonexistent/c.pem"),
            Path::new("/nonexistent/k.pem"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/c.pem"), "{err}");
    }
}
