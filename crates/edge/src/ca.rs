//! The certificate authority of the local edge: generated at start or kept in a directory.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use crate::EdgeError;

/// File names inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA's private key (PKCS#8 PEM), written with mode 0600.
pub const CA_KEY_FILE: &str = "ca.key";

/// The subject of every CA made here is this name plus an id derived from the CA's key: a CA is
/// loaded back by rebuilding its issuer from the stored key alone, and two CAs never share a
/// subject (so a client trusting the wrong one is told "unknown issuer", not "bad signature").
const CA_COMMON_NAME: &str = "forward local edge CA";
const CA_ORGANIZATION: &str = "forward";

/// Where the edge gets its certificate authority.
#[derive(Clone, Default)]
pub enum CaSource {
    /// A fresh CA in memory, gone when the process ends.
    #[default]
    Ephemeral,
    /// `ca.pem` + `ca.key` in this directory, created there if absent, so clients can keep
    /// trusting the same CA across runs.
    Dir(PathBuf),
    /// A CA the caller already holds (tests that also build clients from it).
    Provided(Arc<TestCa>),
}

impl fmt::Debug for CaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaSource::Ephemeral => f.write_str("Ephemeral"),
            CaSource::Dir(p) => f.debug_tuple("Dir").field(p).finish(),
            CaSource::Provided(_) => f.write_str("Provided(..)"),
        }
    }
}

/// A certificate authority for tests, demos and the bench: issues leaf certificates on demand.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// Generate a new CA (ECDSA P-256).
    ///
    /// # Panics
    /// Only if the ring provider cannot generate a key, which does not happen in practice; use
    /// [`TestCa::generate`] to get that as an error.
    pub fn new() -> Self {
        Self::generate().expect("generating a CA key with ring")
    }

    /// Generate a new CA (ECDSA P-256), reporting failure as an error.
    pub fn generate() -> Result<Self, EdgeError> {
        let key = KeyPair::generate().map_err(EdgeError::Certificate)?;
        let params = ca_params(&key);
        let cert = params.self_signed(&key).map_err(EdgeError::Certificate)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate in PEM, for clients' trust stores (`forward --ca-file`).
    pub fn ca_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA certificate in DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// A root store holding only this CA.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        // A certificate this type just made always parses.
        let _ = roots.add(self.cert_der.clone());
        roots
    }

    /// A rustls client configuration (ring provider) that trusts only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(self.root_store())
            .with_no_client_auth();
        Arc::new(config)
    }

    /// Issue a server certificate for `names` (DNS names, wildcards such as `*.vm.vers.sh`, or IP
    /// addresses). Returns the chain (the leaf alone) and its private key.
    ///
    /// # Panics
    /// If a name is not a valid DNS name or IP address; [`TestCa::try_issue`] reports that instead.
    pub fn issue(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        self.try_issue(names)
            .unwrap_or_else(|e| panic!("issuing a certificate for {names:?}: {e}"))
    }

    /// Issue a server certificate for `names`, reporting a bad name as an error.
    pub fn try_issue(
        &self,
        names: &[&str],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), EdgeError> {
        let key = KeyPair::generate().map_err(EdgeError::Certificate)?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .map_err(EdgeError::Certificate)?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().copied().unwrap_or("edge"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(EdgeError::Certificate)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone()], key))
    }

    /// Write the CA certificate (public part only) to `path`.
    pub fn write_ca_pem(&self, path: impl AsRef<Path>) -> Result<(), EdgeError> {
        let path = path.as_ref();
        fs::write(path, &self.cert_pem).map_err(|error| EdgeError::CaFile {
            path: path.to_path_buf(),
            action: "write",
            error,
        })
    }

    /// Load the CA kept in `dir` (`ca.pem` + `ca.key`), or generate one and write it there if
    /// neither file exists. The directory is created if needed.
    pub fn load_or_create(dir: impl AsRef<Path>) -> Result<Self, EdgeError> {
        let dir = dir.as_ref();
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => {
                fs::create_dir_all(dir).map_err(|error| EdgeError::CaFile {
                    path: dir.to_path_buf(),
                    action: "create directory",
                    error,
                })?;
                let ca = Self::generate()?;
                write_private(&key_path, &ca.issuer.key().serialize_pem())?;
                ca.write_ca_pem(&cert_path)?;
                tracing::info!(dir = %dir.display(), "generated a new edge CA");
                Ok(ca)
            }
            (cert, _) => Err(EdgeError::CaInvalid {
                path: dir.to_path_buf(),
                reason: format!(
                    "only {} is there; put back the missing file or remove both to make a new CA",
                    if cert { CA_CERT_FILE } else { CA_KEY_FILE }
                ),
            }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, EdgeError> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|error| EdgeError::CaFile {
                path: path.to_path_buf(),
                action: "read",
                error,
            })
        };
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let invalid = |path: &Path, reason: String| EdgeError::CaInvalid {
            path: path.to_path_buf(),
            reason,
        };
        use rustls_pki_types::pem::PemObject;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(cert_path, format!("not a PEM certificate ({e})")))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(key_path, format!("not a PEM private key ({e})")))?;
        let ca = Self {
            issuer: Issuer::new(ca_params(&key), key),
            cert_der,
            cert_pem,
        };
        // The issuer is rebuilt from our fixed subject, so a CA made elsewhere (or a key that
        // belongs to another certificate) yields leaves that do not chain: catch that now.
        ca.check_chain().map_err(|e| {
            invalid(
                cert_path,
                format!(
                    "{CA_CERT_FILE} and {CA_KEY_FILE} do not form a CA made by forward-edge \
                     ({e}); remove both to generate a new one"
                ),
            )
        })?;
        Ok(ca)
    }

    fn check_chain(&self) -> Result<(), String> {
        let name = "check.forward-edge.invalid";
        let (chain, _) = self.try_issue(&[name]).map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(self.root_store()),
            provider,
        )
        .build()
        .map_err(|e| e.to_string())?;
        use rustls::client::danger::ServerCertVerifier;
        let server_name = ServerName::try_from(name).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(&chain[0], &[], &server_name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let id: String = params
        .key_identifier(key)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{CA_COMMON_NAME} {id}"));
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Write a secret readable by its owner only.
fn write_private(path: &Path, contents: &str) -> Result<(), EdgeError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|error| EdgeError::CaFile {
            path: path.to_path_buf(),
            action: "write",
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        std::env::temp_dir().join(format!("forward-edge-{tag}-{}-{nanos}", std::process::id()))
    }

    #[test]
    fn a_ca_dir_is_created_then_reused() {
        let dir = temp_dir("ca");
        let first = TestCa::load_or_create(&dir).unwrap();
        let second = TestCa::load_or_create(&dir).unwrap();
        assert_eq!(first.ca_pem(), second.ca_pem());
        // Leaves issued by the reloaded CA chain to the first one's certificate.
        second.check_chain().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the CA key must not be readable by others");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_from_another_ca_is_refused() {
        let dir = temp_dir("mismatch");
        TestCa::load_or_create(&dir).unwrap();
        let other = KeyPair::generate().unwrap();
        fs::write(dir.join(CA_KEY_FILE), other.serialize_pem()).unwrap();
        let err = TestCa::load_or_create(&dir).unwrap_err().to_string();
        assert!(err.contains("do not form a CA"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_half_present_ca_dir_is_refused() {
        let dir = temp_dir("half");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(CA_CERT_FILE), "x").unwrap();
        let err = TestCa::load_or_create(&dir).unwrap_err().to_string();
        assert!(err.contains("only ca.pem is there"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
