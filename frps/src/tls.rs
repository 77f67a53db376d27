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
                    .unwrap_or_else(|| default_dir(&config.database_url));
                let pair = self_signed(&dir)?;
                tls.self_signed_dir = Some(dir);
                Some(pair)
            }
            _ => None,
        };
        if let Some((certs, key)) = frames {
            tls.fingerprint = Some(fingerprint(&certs[0]));
            tls.frames = Some(acceptor(certs, key)?);
        }
        if let (Some(cert), Some(key)) = (&config.public_tls_cert, &config.public_tls_key) {
            let (certs, key) = load_pem(cert, key)?;
            tls.public = Some(acceptor(certs, key)?);
        }
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
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The default directory of the self-signed certificate: beside the SQLite
/// database, else the working directory.
pub fn default_dir(database_url: &str) -> PathBuf {
    let file = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .map(|rest| rest.split('?').next().unwrap_or_default())
        .filter(|f| !f.is_empty() && !f.starts_with(':'));
    file.and_then(|f| Path::new(f).parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
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
    if cert_path.exists() && key_path.exists() {
        return load_pem(&cert_path, &key_path);
    }
    let names = vec!["frps".to_owned(), "localhost".to_owned()];
    let generated = rcgen::generate_simple_self_signed(names)?;
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    write_private(&key_path, generated.signing_key.serialize_pem().as_bytes())
        .map_err(write_err(&key_path))?;
    std::fs::write(&cert_path, generated.cert.pem()).map_err(write_err(&cert_path))?;
    load_pem(&cert_path, &key_path)
}

/// Writes `bytes` to `path`, readable by its owner only (0600).
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
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
