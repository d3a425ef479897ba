//! TLS configuration for the client side: one shared rustls `ClientConfig` per process so that
//! TLS sessions resume across the many connections of a forward, trusting the OS store plus
//! any `--ca-file`, with no way to switch verification off.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// The `--ca-file` could not be read at all.
    #[error("cannot read CA file {path}: {cause}; pass a readable PEM file to --ca-file")]
    CaFileUnreadable {
        /// The file named by the user.
        path: PathBuf,
        /// What the OS said.
        cause: io::Error,
    },
    /// The file was read but holds no usable PEM certificate.
    #[error(
        "CA file {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----){detail}"
    )]
    CaFileNotPem {
        /// The file named by the user.
        path: PathBuf,
        /// Parser detail, if any.
        detail: String,
    },
    /// A certificate parsed as PEM but is not a usable trust anchor.
    #[error("CA file {path}: certificate {index} is not a usable trust anchor: {cause}")]
    CaFileBadCert {
        /// The file named by the user.
        path: PathBuf,
        /// Position of the certificate in the file, from 1.
        index: usize,
        /// What rustls said.
        cause: rustls::Error,
    },
    /// Neither the OS store nor `--ca-file` gave a single root, so nothing could ever verify.
    #[error("no trusted root certificates: the OS store is empty and no --ca-file was given")]
    NoRoots,
    /// The server certificate or key file is missing, unreadable or not PEM.
    #[error("cannot load {what} from {path}: {detail}; pass a PEM file")]
    ServerFile {
        /// "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// `--tls-key` is not the key of `--tls-cert`.
    #[error("the private key in {key} does not belong to the certificate in {cert}; pass the key the certificate was issued for")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the protocol configuration (should not happen with the ring provider).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every config in forward uses. ring only: quinn and rcgen would otherwise
/// bring a second provider and rustls would refuse to pick one implicitly.
///
/// AES-128-GCM comes first (rustls lists AES-256 first), as browsers and Go order them. A
/// server that honours the client's order (rustls does by default) then picks it: fewer AES
/// rounds per byte; through the local edge one direct download went from 8.8-9.7 to 9.3-10.3
/// Gbit/s (the kernel's loopback TCP, not the cipher, is most of the remaining CPU).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// What is wrong with a PEM file, in words: the parser's own text shows the expected end line
/// as a list of byte values.
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => {
            "a -----BEGIN----- section has no -----END----- line (is the file cut short?)".into()
        }
        E::IllegalSectionStart { .. } => "a -----BEGIN----- line is malformed".into(),
        E::Base64Decode(_) => {
            "the text between -----BEGIN----- and -----END----- is not base64".into()
        }
        other => other.to_string(),
    }
}

/// The most of a certificate or key file forward reads. A whole CA bundle (every root a
/// distribution trusts) is about 250 KiB; `--ca-file /dev/zero` or a disk image named by
/// mistake must get an error, not every byte of memory.
pub const MAX_PEM_FILE: u64 = 8 << 20;

/// Reads a PEM file of at most [`MAX_PEM_FILE`] bytes. Not only regular files: a pipe from
/// the shell (`<(vault read ...)`) works.
pub fn read_pem_file(path: &Path) -> io::Result<Vec<u8>> {
    let bytes = crate::read_at_most(path, MAX_PEM_FILE)?;
    if bytes.len() as u64 > MAX_PEM_FILE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "it holds more than {} MiB, far more than PEM certificates or keys take: is it the right file?",
                MAX_PEM_FILE >> 20
            ),
        ));
    }
    Ok(bytes)
}

/// Reads every certificate from a PEM file, with errors a user can act on.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let bytes = read_pem_file(path).map_err(|cause| TlsConfigError::CaFileUnreadable {
        path: path.to_owned(),
        cause,
    })?;
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(&bytes) {
        match item {
            Ok(cert) => certs.push(cert),
            Err(e) => {
                return Err(TlsConfigError::CaFileNotPem {
                    path: path.to_owned(),
                    detail: format!(": {}", pem_problem(&e)),
                })
            }
        }
    }
    if certs.is_empty() {
        return Err(TlsConfigError::CaFileNotPem {
            path: path.to_owned(),
            detail: String::new(),
        });
    }
    Ok(certs)
}

/// Builds the root store: the OS trust store (errors in it are logged, not fatal, as long as
/// something is trusted) plus the extra CA file.
pub fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::debug!(error = %err, "skipping part of the OS trust store");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "loaded OS trust store");
    if let Some(path) = ca_file {
        for (i, cert) in load_ca_file(path)?.into_iter().enumerate() {
            roots
                .add(cert)
                .map_err(|cause| TlsConfigError::CaFileBadCert {
                    path: path.to_owned(),
                    index: i + 1,
                    cause,
                })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoRoots);
    }
    Ok(roots)
}

/// The shared client config: verified, TLS 1.2 and 1.3, in-memory session resumption (rustls'
/// default cache), no early data (replayable).
pub fn client_config(
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let roots = root_store(ca_file)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

/// Turns a handshake failure into a sentence naming the host and what to do. rustls reports
/// certificate problems as `io::Error`s wrapping `rustls::Error`.
pub fn describe_handshake_error(host: &str, err: &io::Error) -> String {
    use rustls::{CertificateError, Error as E};
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    match inner {
        Some(E::InvalidCertificate(CertificateError::UnknownIssuer)) => format!(
            "certificate of {host} is not trusted (unknown issuer); if it comes from a private CA (a local edge, an agent's own --tls-cert), pass that CA with --ca-file"
        ),
        Some(E::InvalidCertificate(CertificateError::NotValidForName))
        | Some(E::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => format!(
            "certificate presented for {host} is not valid for that name (is --domain or the host right?)"
        ),
        Some(E::InvalidCertificate(CertificateError::BadSignature)) => format!(
            "certificate of {host} is not trusted (its signature does not verify: issued by another CA with the same name?); --ca-file must hold the CA that issued it"
        ),
        Some(E::InvalidCertificate(CertificateError::Expired))
        | Some(E::InvalidCertificate(CertificateError::ExpiredContext { .. })) => {
            format!("certificate of {host} has expired (or this machine's clock is ahead)")
        }
        // Not the --ca-file hint of the other rejections: the CA is fine, a date is not.
        Some(E::InvalidCertificate(
            e @ (CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }),
        )) => format!(
            "certificate of {host} is not valid yet ({e}); check this machine's clock, or the certificate's start date"
        ),
        Some(E::InvalidCertificate(other)) => {
            // rustls prints `Other` as Rust debug output; its inner error reads as words.
            let why = match other {
                CertificateError::Other(rustls::OtherError(inner)) => inner.to_string(),
                other => other.to_string(),
            };
            format!(
                "certificate of {host} rejected ({why}); --ca-file must hold the CA that issued it, not the certificate itself"
            )
        }
        Some(E::AlertReceived(alert)) => format!(
            "TLS handshake with {host} refused by the peer ({alert:?}); is {host} a name the edge serves?"
        ),
        Some(E::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => format!(
            "TLS handshake with {host} failed: the other side does not speak TLS (a plain-TCP agent wants --transport tcp)"
        ),
        Some(other) => format!("TLS handshake with {host} failed: {other}"),
        None if err.kind() == io::ErrorKind::UnexpectedEof => {
            format!("TLS handshake with {host} failed: the connection was closed during the handshake")
        }
        None => format!("TLS handshake with {host} failed: {err}"),
    }
}

/// A server config from PEM files (`forward agent --tls-cert/--tls-key`).
pub fn server_config_from_files(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    use rustls::pki_types::PrivateKeyDer;
    let bad = |what, path: &Path, detail: String| TlsConfigError::ServerFile {
        what,
        path: path.to_owned(),
        detail,
    };
    let read = |what, path: &Path| read_pem_file(path).map_err(|e| bad(what, path, e.to_string()));
    let cert_pem = read("certificate", cert)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad("certificate", cert, pem_problem(&e)))?;
    if certs.is_empty() {
        return Err(bad("certificate", cert, "no CERTIFICATE block".into()));
    }
    let key_der =
        PrivateKeyDer::from_pem_slice(&read("private key", key)?).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => bad(
                "private key",
                key,
                "no PRIVATE KEY block (is it the certificate?)".into(),
            ),
            other => bad("private key", key, pem_problem(&other)),
        })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsConfigError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            },
            other => TlsConfigError::Rustls(other),
        })?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Certificate errors without a sentence of their own read as words, not as Rust debug
    /// output (a review got `Other(OtherError(CaUsedAsEndEntity))`).
    #[test]
    fn other_certificate_errors_read_as_a_sentence() {
        #[derive(Debug)]
        struct CaUsedAsEndEntity;
        impl std::fmt::Display for CaUsedAsEndEntity {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("CaUsedAsEndEntity")
            }
        }
        impl std::error::Error for CaUsedAsEndEntity {}
        let err = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(CaUsedAsEndEntity),
            ))),
        );
        let text = describe_handshake_error("vm1.vm.vers.sh", &err);
        assert!(
            text.starts_with("certificate of vm1.vm.vers.sh rejected ("),
            "{text}"
        );
        assert!(text.contains("not the certificate itself"), "{text}");
        assert!(!text.contains("OtherError("), "{text}");
    }

    /// A certificate whose dates exclude now points at the clock, not at --ca-file (a tester
    /// got the --ca-file hint for a certificate valid from tomorrow).
    #[test]
    fn a_certificate_not_valid_yet_points_at_the_clock() {
        let now = rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            1_796_196_448,
        ));
        let err = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYetContext {
                time: now,
                not_before: rustls::pki_types::UnixTime::since_unix_epoch(
                    std::time::Duration::from_secs(1_796_282_848),
                ),
            }),
        );
        let text = describe_handshake_error("vm1.vm.vers.sh", &err);
        assert!(
            text.starts_with("certificate of vm1.vm.vers.sh is not valid yet ("),
            "{text}"
        );
        assert!(text.contains("check this machine's clock"), "{text}");
        assert!(!text.contains("--ca-file"), "{text}");
    }

    #[test]
    fn a_key_of_another_certificate_is_named_as_such() {
        let dir = std::env::temp_dir().join(format!("forward-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["agent.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let (cert_path, key_path, other_path) =
            (dir.join("c.pem"), dir.join("k.pem"), dir.join("o.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::write(&other_path, other.serialize_pem()).unwrap();

        assert!(server_config_from_files(&cert_path, &key_path).is_ok());
        let e = server_config_from_files(&cert_path, &other_path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not belong to the certificate") && e.contains("o.pem"),
            "{e}"
        );
        assert_eq!(e.matches("KeyMismatch").count(), 0, "{e}");

        // An endless key file is cut off with a reason, not read into memory for ever.
        let zero = Path::new("/dev/zero");
        let e = server_config_from_files(&cert_path, zero)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot load private key from /dev/zero: it holds more than 8 MiB"),
            "{e}"
        );
        let e = crate::quic::QuicCert::load(&cert_path, zero)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/dev/zero") && e.contains("more than 8 MiB"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
