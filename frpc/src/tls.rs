//! Dialing frps: plain TCP, or TLS verified against a CA bundle (the public
//! web roots by default) or pinned to one certificate's SHA-256 fingerprint.
//! The control connection and every data connection go through [`Dialer`].

use std::sync::Arc;
use std::time::Duration;

use common::Stream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsConnector;

use crate::config::Config;

/// Why TLS could not be set up from the flags.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The `--tls-ca` bundle could not be read.
    #[error("cannot read the CA bundle {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The server name is not a DNS name or IP address.
    #[error("`{0}` is not a valid TLS server name: set --tls-server-name")]
    ServerName(String),
    /// rustls refused the configuration.
    #[error("TLS set-up failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a connection to frps could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect (or connect and handshake) did not finish in time.
    #[error("frps at {addr} did not accept within {limit:?}")]
    Timeout {
        /// The address dialed.
        addr: String,
        /// The deadline.
        limit: Duration,
    },
    /// TCP connect failed.
    #[error("cannot reach frps at {addr}: {source}")]
    Connect {
        /// The address dialed.
        addr: String,
        /// The failure.
        source: std::io::Error,
    },
    /// frps's certificate was refused: retrying cannot help.
    #[error("refusing frps at {addr}: {reason}")]
    Certificate {
        /// The address dialed.
        addr: String,
        /// Which check failed and what to pass instead.
        reason: String,
    },
    /// frps's certificate is outside its validity period: a renewal that is
    /// late or this machine's clock (before NTP set it) - both pass, so
    /// frpc keeps retrying.
    #[error(
        "frps at {addr} presented a certificate {reason}: check frps's certificate renewal and this machine's clock (retrying)"
    )]
    CertificateTime {
        /// The address dialed.
        addr: String,
        /// Which bound was passed, with the times.
        reason: String,
    },
    /// frps answered the TLS handshake with something that is not TLS.
    #[error(
        "frps at {addr} does not speak TLS on this port (it probably runs without TLS): drop --tls, or start frps with --tls-cert/--tls-key or --tls-self-signed"
    )]
    NotTls {
        /// The address dialed.
        addr: String,
    },
    /// The handshake failed otherwise (connection dropped...).
    #[error("TLS handshake with frps at {addr} failed: {source}")]
    Handshake {
        /// The address dialed.
        addr: String,
        /// The failure.
        source: std::io::Error,
    },
}

impl DialError {
    /// Whether the failure comes from configuration (certificate, protocol
    /// mismatch), which reconnecting cannot fix.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DialError::Certificate { .. } | DialError::NotTls { .. }
        )
    }
}

/// Opens connections to frps, with TLS when configured.
#[derive(Clone)]
pub struct Dialer {
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .finish()
    }
}

impl Dialer {
    /// A dialer for `config`'s `--tls*` flags.
    pub fn from_config(config: &Config) -> Result<Self, TlsSetupError> {
        if !config.uses_tls() {
            return Ok(Dialer { tls: None });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let client = match (&config.tls_fingerprint, &config.tls_ca) {
            (Some(pin), _) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned::new(*pin, &provider)))
                .with_no_client_auth(),
            (None, ca) => builder
                .with_root_certificates(roots(ca.as_deref())?)
                .with_no_client_auth(),
        };
        let name = config
            .tls_server_name
            .clone()
            .unwrap_or_else(|| config.server_addr.trim_matches(['[', ']']).to_owned());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| TlsSetupError::ServerName(name))?;
        Ok(Dialer {
            tls: Some((TlsConnector::from(Arc::new(client)), server_name)),
        })
    }

    /// Whether connections are encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects to `addr` (and completes the TLS handshake) within `limit`,
    /// with TCP_NODELAY and TCP keepalive set (`common::stream::tune_link`);
    /// a name's addresses are tried as `common::stream::connect_any` says.
    pub async fn connect(&self, addr: &str, limit: Duration) -> Result<Stream, DialError> {
        let dial = async {
            let tcp =
                common::stream::connect_any(addr)
                    .await
                    .map_err(|source| DialError::Connect {
                        addr: addr.to_owned(),
                        source,
                    })?;
            // Best effort: a socket that refuses an option still works.
            let _ = common::stream::tune_link(&tcp);
            let Some((connector, name)) = &self.tls else {
                return Ok(Stream::from(tcp));
            };
            match connector.connect(name.clone(), tcp).await {
                Ok(tls) => Ok(Stream::from(tls)),
                Err(e) => Err(classify(addr, e)),
            }
        };
        tokio::time::timeout(limit, dial)
            .await
            .map_err(|_| DialError::Timeout {
                addr: addr.to_owned(),
                limit,
            })?
    }
}

/// Turns a failed handshake into an error that says what to change.
fn classify(addr: &str, e: std::io::Error) -> DialError {
    let addr = addr.to_owned();
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return DialError::Handshake { addr, source: e };
    };
    let reason = match tls {
        rustls::Error::InvalidMessage(_) => return DialError::NotTls { addr },
        rustls::Error::InvalidCertificate(e @ (CertificateError::Expired | CertificateError::ExpiredContext { .. } | CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. })) => {
            let at = |t: &rustls_pki_types::UnixTime| {
                chrono::DateTime::from_timestamp(t.as_secs() as i64, 0)
                    .map_or_else(|| "?".into(), |t| t.to_rfc3339())
            };
            let reason = match e {
                CertificateError::ExpiredContext { time, not_after } => format!(
                    "that expired at {} (this machine's time is {})",
                    at(not_after),
                    at(time)
                ),
                CertificateError::NotValidYetContext { time, not_before } => format!(
                    "that is valid from {} (this machine's time is {})",
                    at(not_before),
                    at(time)
                ),
                CertificateError::Expired => "that has expired".into(),
                _ => "that is not valid yet".into(),
            };
            return DialError::CertificateTime { addr, reason };
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "its certificate is signed by an unknown CA: pass --tls-ca with the CA's PEM bundle, or pin it with --tls-fingerprint".to_owned()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "its certificate is not valid for the name we expect ({tls}): pass --tls-server-name with a name the certificate holds"
        ),
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            "its certificate does not verify against the trusted CAs: check --tls-ca".to_owned()
        }
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other.to_string(),
        rustls::Error::InvalidCertificate(other) => {
            format!("its certificate was refused: {other:?}")
        }
        _ => return DialError::Handshake { addr, source: e },
    };
    DialError::Certificate { addr, reason }
}

/// The trust anchors: the `--tls-ca` bundle, else the public web roots.
fn roots(ca: Option<&std::path::Path>) -> Result<RootCertStore, TlsSetupError> {
    let Some(path) = ca else {
        return Ok(RootCertStore::from_iter(
            webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
        ));
    };
    let ca_err = |reason: String| TlsSetupError::Ca {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| ca_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(ca_err("no PEM certificate in the file".into()));
    }
    let mut store = RootCertStore::empty();
    for cert in certs {
        store.add(cert).map_err(|e| ca_err(e.to_string()))?;
    }
    Ok(store)
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// Accepts exactly one certificate, by SHA-256; the handshake signature is
/// still verified against that certificate's key.
#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

/// The pinned fingerprint did not match.
#[derive(Debug, thiserror::Error)]
#[error(
    "certificate fingerprint {got} does not match --tls-fingerprint {want} (frps logs its fingerprint at start)"
)]
struct FingerprintMismatch {
    got: String,
    want: String,
}

impl Pinned {
    fn new(sha256: [u8; 32], provider: &CryptoProvider) -> Self {
        Pinned {
            sha256,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if got == self.sha256 {
            return Ok(ServerCertVerified::assertion());
        }
        let mismatch = FingerprintMismatch {
            got: common::hex::encode(&got),
            want: common::hex::encode(&self.sha256),
        };
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(mismatch)),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_fingerprint;

    #[test]
    fn a_certificate_out_of_its_dates_is_retried_and_an_untrusted_one_is_not() {
        let refused = |e: CertificateError| {
            let io = std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(e),
            );
            classify("frps.example:17000", io)
        };
        let t = |secs| rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(secs));
        let expired = refused(CertificateError::ExpiredContext {
            time: t(1_780_000_000),
            not_after: t(1_779_990_000),
        });
        assert!(matches!(expired, DialError::CertificateTime { .. }));
        assert!(!expired.is_fatal());
        let text = expired.to_string();
        assert!(
            text.contains("expired at 2026-05-28T") && text.contains("clock"),
            "{text}"
        );
        let early = refused(CertificateError::NotValidYet);
        assert!(!early.is_fatal());
        assert!(early.to_string().contains("not valid yet"), "{early}");
        let untrusted = refused(CertificateError::UnknownIssuer);
        assert!(untrusted.is_fatal());
    }

    #[tokio::test]
    async fn dialed_links_get_keepalive_and_nodelay() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stream = Dialer { tls: None }
            .connect(&addr, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(common::stream::link_is_tuned(stream.tcp()).unwrap());
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let plain = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&plain).unwrap(), [0xab; 32]);
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
        assert!(parse_fingerprint(&"+a".repeat(32)).is_err());
    }

    #[test]
    fn the_pinned_verifier_accepts_only_its_certificate() {
        let provider = rustls::crypto::ring::default_provider();
        let cert = CertificateDer::from(vec![1u8, 2, 3]);
        let other = CertificateDer::from(vec![4u8, 5, 6]);
        let pinned = Pinned::new(fingerprint(&cert), &provider);
        let name = ServerName::try_from("frps").unwrap();
        let now = UnixTime::now();
        assert!(
            pinned
                .verify_server_cert(&cert, &[], &name, &[], now)
                .is_ok()
        );
        let err = pinned
            .verify_server_cert(&other, &[], &name, &[], now)
            .unwrap_err();
        let rustls::Error::InvalidCertificate(CertificateError::Other(inner)) = err else {
            panic!("unexpected error {err:?}");
        };
        assert!(
            inner
                .to_string()
                .contains("does not match --tls-fingerprint"),
            "{inner}"
        );
    }
}
