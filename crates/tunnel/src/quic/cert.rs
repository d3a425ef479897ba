//! The agent's certificate and the SPKI pin clients use to trust it without a CA.
//!
//! The pin is `sha256:` + base64 of SHA-256 over the certificate's SubjectPublicKeyInfo DER
//! (the same value as HPKP / `openssl x509 -pubkey | openssl pkey -pubin -outform der |
//! openssl dgst -sha256 -binary | base64`), so it survives re-issuing a certificate for the same
//! key.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use super::QuicError;

/// A certificate chain and its private key, for the agent.
#[derive(Debug)]
pub struct QuicCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for QuicCert {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl QuicCert {
    /// Loads a PEM certificate chain (leaf first) and its PEM private key.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, QuicError> {
        let read = |p: &Path| {
            crate::tls::read_pem_file(p)
                .map_err(|e| QuicError::CertFile(format!("cannot read {}: {e}", p.display())))
        };
        let bytes = read(cert_file)?;
        let chain = CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| QuicError::CertFile(format!("{}: bad PEM: {e}", cert_file.display())))?;
        if chain.is_empty() {
            return Err(QuicError::CertFile(format!(
                "{} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
                cert_file.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(key_file)?).map_err(|e| {
            QuicError::CertFile(format!(
                "{} holds no usable PEM private key ({e})",
                key_file.display()
            ))
        })?;
        let cert = Self { chain, key };
        cert.pin()?;
        // Checked here, where the files are known: QUIC's TLS set-up later saw only rustls's
        // `KeyMismatch` (a state directory holding one agent's certificate beside another's key).
        let provider = crate::tls::provider();
        let signing = provider
            .key_provider
            .load_private_key(cert.key.clone_key())
            .map_err(|e| {
                QuicError::CertFile(format!(
                    "{} holds a private key that cannot sign ({e})",
                    key_file.display()
                ))
            })?;
        // `Unknown` (a key that does not tell its public half) passes, as in rustls's own
        // `with_single_cert`.
        let checked = rustls::sign::CertifiedKey::new(cert.chain.clone(), signing).keys_match();
        if let Err(e) = checked {
            if e == rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown) {
                return Ok(cert);
            }
            return Err(QuicError::CertFile(match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "the private key in {} does not belong to the certificate in {}",
                    key_file.display(),
                    cert_file.display()
                ),
                other => format!(
                    "{} and {} do not go together: {other}",
                    cert_file.display(),
                    key_file.display()
                ),
            }));
        }
        Ok(cert)
    }

    /// A fresh self-signed certificate for `names` (`localhost` when empty). Clients trust it
    /// through its pin.
    pub fn generate(names: &[String]) -> Result<Self, QuicError> {
        let names = if names.is_empty() {
            vec!["localhost".to_owned()]
        } else {
            names.to_vec()
        };
        let ck = rcgen::generate_simple_self_signed(names)
            .map_err(|e| QuicError::Generate(e.to_string()))?;
        Ok(Self {
            chain: vec![ck.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        })
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key.
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The leaf's SPKI pin.
    pub fn pin(&self) -> Result<SpkiPin, QuicError> {
        let leaf = self
            .chain
            .first()
            .ok_or_else(|| QuicError::CertFile("empty certificate chain".into()))?;
        SpkiPin::of_cert(leaf).ok_or_else(|| {
            QuicError::CertFile("the agent certificate is not a valid X.509 certificate".into())
        })
    }

    /// The chain and key as PEM text, e.g. to keep a generated certificate (and its pin) across
    /// restarts. The key text is secret.
    pub fn to_pem(&self) -> (String, String) {
        let certs = self
            .chain
            .iter()
            .map(|c| pem("CERTIFICATE", c.as_ref()))
            .collect();
        let (label, der) = match &self.key {
            PrivateKeyDer::Pkcs1(k) => ("RSA PRIVATE KEY", k.secret_pkcs1_der()),
            PrivateKeyDer::Sec1(k) => ("EC PRIVATE KEY", k.secret_sec1_der()),
            PrivateKeyDer::Pkcs8(k) => ("PRIVATE KEY", k.secret_pkcs8_der()),
            _ => ("PRIVATE KEY", &[][..]),
        };
        (certs, pem(label, der))
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64_encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpkiPin([u8; 32]);

impl SpkiPin {
    /// The pin of a DER certificate, or `None` if it does not parse.
    pub fn of_cert(cert: &[u8]) -> Option<Self> {
        let spki = spki_der(cert)?;
        let d = ring::digest::digest(&ring::digest::SHA256, spki);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Some(Self(out))
    }

    /// The pin of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, spki);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }
}

impl fmt::Display for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", base64_encode(&self.0))
    }
}

impl fmt::Debug for SpkiPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for SpkiPin {
    type Err = QuicError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || QuicError::BadPin(s.to_owned());
        // Any case of the prefix: ssh-keygen prints fingerprints as `SHA256:...`.
        let (scheme, b64) = s.trim().split_once(':').ok_or_else(bad)?;
        if !scheme.eq_ignore_ascii_case("sha256") {
            return Err(bad());
        }
        let bytes = base64_decode(b64).ok_or_else(bad)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        Ok(Self(arr))
    }
}

/// One DER TLV: `(tag, content, total length)`. Short and long lengths up to 4 bytes.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], usize)> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*input.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(header..end)?, end))
}

/// The SubjectPublicKeyInfo (tag and length included) of a DER X.509 certificate: the seventh
/// field of tbsCertificate (after the optional version). Every tag is checked, so anything
/// rustls' verifier would parse differently is refused here rather than misread.
fn spki_der(cert: &[u8]) -> Option<&[u8]> {
    let (tag, body, _) = tlv(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = tlv(body)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = rest.get(tlv(rest)?.2..)?;
    }
    // serialNumber, signature, issuer, validity, subject
    for expected in [0x02, 0x30, 0x30, 0x30, 0x30] {
        let (tag, _, n) = tlv(rest)?;
        if tag != expected {
            return None;
        }
        rest = rest.get(n..)?;
    }
    let (tag, _, n) = tlv(rest)?;
    if tag != 0x30 {
        return None;
    }
    rest.get(..n)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padding optional.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Leftover bits must be zero padding, and a single leftover character is impossible.
    if bits >= 6 || acc != 0 {
        return None;
    }
    Some(out)
}

/// Accepts exactly the certificate whose SPKI matches the pin; names and dates are not
/// checked (the pin is the trust), handshake signatures are.
#[derive(Debug)]
pub(super) struct PinVerifier {
    pin: SpkiPin,
    provider: Arc<CryptoProvider>,
    /// The pin of the last mismatching certificate, to word the error.
    pub(super) seen: Seen,
}

/// Why a verifier refused the agent's certificate: quinn passes on only the TLS alert and
/// rustls' debug text, so the verifier keeps the cause for the client's error message.
#[derive(Debug, Clone)]
pub(super) enum Rejection {
    /// The certificate's pin, which is not `--agent-pin`.
    Pin(String),
    /// What CA verification (`--ca-file`, the OS store) said.
    Cert(rustls::Error),
}

/// The last [`Rejection`] of a client's verifier.
pub(super) type Seen = Arc<Mutex<Option<Rejection>>>;

impl PinVerifier {
    pub(super) fn new(pin: SpkiPin, provider: Arc<CryptoProvider>) -> Self {
        Self {
            pin,
            provider,
            seen: Arc::default(),
        }
    }
}

/// rustls' own verification against roots, keeping its error for the message.
#[derive(Debug)]
pub(super) struct CaVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    pub(super) seen: Seen,
}

impl CaVerifier {
    pub(super) fn new(
        roots: rustls::RootCertStore,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, QuicError> {
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| QuicError::Tls(e.to_string()))?;
        Ok(Self {
            inner,
            seen: Arc::default(),
        })
    }
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                if let Ok(mut seen) = self.seen.lock() {
                    *seen = Some(Rejection::Cert(e.clone()));
                }
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(got) = SpkiPin::of_cert(end_entity) else {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ));
        };
        if got == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(Rejection::Pin(got.to_string()));
        }
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    #[test]
    fn spki_matches_the_generated_key() {
        let ck = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        let from_cert = SpkiPin::of_cert(ck.cert.der()).unwrap();
        let from_key = SpkiPin::of_spki(&ck.signing_key.subject_public_key_info());
        assert_eq!(from_cert, from_key);
        let text = from_cert.to_string();
        assert!(
            text.starts_with("sha256:") && text.len() == 7 + 44,
            "{text}"
        );
        assert_eq!(text.parse::<SpkiPin>().unwrap(), from_cert);
        assert_eq!(
            text.trim_end_matches('=').parse::<SpkiPin>().unwrap(),
            from_cert
        );
        let shouted = text.replacen("sha256:", "SHA256:", 1);
        assert_eq!(shouted.parse::<SpkiPin>().unwrap(), from_cert);
    }

    #[test]
    fn bad_pins_are_refused_with_the_expected_form() {
        for bad in [
            "",
            "sha256:",
            "md5:AAAA",
            "sha256:!!!!",
            "sha256:AAAA",
            "sha256:A",
        ] {
            let e = bad.parse::<SpkiPin>().unwrap_err().to_string();
            assert!(e.contains("sha256:<base64 of 32 bytes>"), "{e}");
        }
    }

    #[test]
    fn base64_known_values() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            assert_eq!(
                base64_decode(&base64_encode(s.as_bytes())).unwrap(),
                s.as_bytes()
            );
        }
        assert!(base64_decode("Zh==").is_none(), "non-zero padding bits");
    }

    #[test]
    fn garbage_certificates_do_not_parse() {
        assert!(SpkiPin::of_cert(b"").is_none());
        assert!(SpkiPin::of_cert(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(SpkiPin::of_cert(&[0x30, 0x03, 0x30, 0x01, 0x02]).is_none());
    }

    #[test]
    fn pem_round_trip_keeps_the_pin() {
        let cert = QuicCert::generate(&[]).unwrap();
        let (c, k) = cert.to_pem();
        let dir = std::env::temp_dir().join(format!("fwd-quic-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("c.pem"), c).unwrap();
        std::fs::write(dir.join("k.pem"), k).unwrap();
        let loaded = QuicCert::load(&dir.join("c.pem"), &dir.join("k.pem")).unwrap();
        assert_eq!(loaded.pin().unwrap(), cert.pin().unwrap());
        let e = QuicCert::load(&dir.join("k.pem"), &dir.join("k.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        // Another certificate's key.
        let (_, other_key) = QuicCert::generate(&[]).unwrap().to_pem();
        std::fs::write(dir.join("other.pem"), other_key).unwrap();
        let e = QuicCert::load(&dir.join("c.pem"), &dir.join("other.pem"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not belong to the certificate") && e.contains("other.pem"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
