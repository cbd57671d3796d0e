//! TLS for the vSphere client: one `rustls::ClientConfig` per [`TlsPolicy`], always with the
//! `ring` provider, and a verifier wrapper that remembers the leaf certificate of the last
//! handshake and why a certificate was refused.
//!
//! Why a wrapper around every policy: nbdkit's curl plugin needs the server's certificate as a
//! CA file when the policy is a pin, and an error message must name the SHA-256 the server
//! actually showed; both are only known inside the handshake.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::Digest as _;

use super::TlsPolicy;

/// What the handshakes of one client saw: the last leaf certificate, and the last refusal.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    leaf: Mutex<Option<Vec<u8>>>,
    refusal: Mutex<Option<String>>,
}

impl Observed {
    /// The DER of the last leaf certificate a handshake presented.
    pub(crate) fn leaf_der(&self) -> Option<Vec<u8>> {
        self.leaf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The reason of the last refusal, consumed so that a later unrelated error does not reuse it.
    pub(crate) fn take_refusal(&self) -> Option<String> {
        self.refusal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn saw(&self, der: &[u8]) {
        *self.leaf.lock().unwrap_or_else(PoisonError::into_inner) = Some(der.to_vec());
    }

    fn refused(&self, why: String) {
        *self.refusal.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
    }
}

/// Hex of the SHA-256 of a certificate's DER, the form operators compare with
/// `openssl x509 -fingerprint -sha256` (without the colons).
pub fn sha256_hex(der: &[u8]) -> String {
    hex(&sha256(der))
}

pub(crate) fn sha256(der: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(der).into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A DER certificate as PEM text.
pub(crate) fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// How a policy is named in errors and logs.
pub(crate) fn describe(policy: &TlsPolicy) -> String {
    match policy {
        TlsPolicy::System => "the system trust store".to_string(),
        TlsPolicy::CaFile(path) => format!("the CA file {}", path.display()),
        TlsPolicy::Pinned(pin) => format!("the pin sha256 {}", hex(pin)),
        TlsPolicy::Insecure => "insecure (no verification)".to_string(),
    }
}

/// The rustls configuration for `policy`, and where its handshakes report what they saw.
/// Errors are ready for `VsphereError::Certificate`'s detail.
pub(crate) fn client_config(
    policy: &TlsPolicy,
) -> Result<(rustls::ClientConfig, Arc<Observed>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner: Arc<dyn ServerCertVerifier> = match policy {
        TlsPolicy::System => Arc::new(
            rustls_platform_verifier::Verifier::new(provider.clone())
                .map_err(|e| format!("cannot load the system trust store: {e}"))?,
        ),
        TlsPolicy::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let mut exact = Vec::new();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| format!("bad PEM in CA file {}: {e}", path.display()))?;
                exact.push(cert.as_ref().to_vec());
                roots
                    .add(cert)
                    .map_err(|e| format!("bad certificate in CA file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("CA file {} holds no certificate", path.display()));
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("CA file {}: {e}", path.display()))?;
            Arc::new(CaFile { webpki, exact })
        }
        TlsPolicy::Pinned(pin) => Arc::new(Pin {
            sha256: Some(*pin),
            algorithms: provider.signature_verification_algorithms,
        }),
        TlsPolicy::Insecure => Arc::new(Pin {
            sha256: None,
            algorithms: provider.signature_verification_algorithms,
        }),
    };
    let observed = Arc::new(Observed::default());
    let verifier = Arc::new(Recording {
        inner,
        policy: describe(policy),
        observed: observed.clone(),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((config, observed))
}

/// The [`ServerCertVerifier`] methods other than `verify_server_cert`, handed to the verifier in
/// `$field`: the wrappers below only change which leaf certificates are accepted, never how the
/// handshake signature is checked or what is offered to the server.
macro_rules! delegate_handshake_checks {
    ($field:ident) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.$field.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.$field.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.$field.supported_verify_schemes()
        }

        fn requires_raw_public_keys(&self) -> bool {
            self.$field.requires_raw_public_keys()
        }

        fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
            self.$field.root_hint_subjects()
        }
    };
}

/// The CA file's chains, and also a server certificate that is itself in the CA file.
///
/// Why the second: self-signed server certificates often carry `CA:TRUE` (ESXi hosts, Go's test
/// servers such as the simulator), which webpki refuses as an end entity (`CaUsedAsEndEntity`),
/// while operators hand exactly that certificate over as "the CA file" and curl/OpenSSL accept
/// it. Trusting a byte-identical certificate is a pin, no weaker than [`TlsPolicy::Pinned`].
#[derive(Debug)]
struct CaFile {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    exact: Vec<Vec<u8>>,
}

impl ServerCertVerifier for CaFile {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(_)
                if self
                    .exact
                    .iter()
                    .any(|c| c.as_slice() == end_entity.as_ref()) =>
            {
                Ok(ServerCertVerified::assertion())
            }
            verdict => verdict,
        }
    }

    delegate_handshake_checks!(webpki);
}

/// Accepts exactly the leaf whose SHA-256 is `sha256` and checks that the server holds the
/// certificate's key (the handshake signature). With `None` (insecure) it accepts anything, even
/// keys ring refuses (RSA under 2048 bits, as on old ESXi hosts and Go's test servers).
#[derive(Debug)]
struct Pin {
    sha256: Option<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pin {
    /// The handshake signature checked by `verify` (rustls' check for the protocol version),
    /// unless insecure.
    fn signature(
        &self,
        verify: impl FnOnce(
            &WebPkiSupportedAlgorithms,
        ) -> Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self.sha256 {
            None => Ok(HandshakeSignatureValid::assertion()),
            Some(_) => verify(&self.algorithms),
        }
    }
}

/// Carries our own refusal reason through rustls' error type.
#[derive(Debug)]
struct PinMismatch(String);

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for Pin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.sha256 {
            None => Ok(ServerCertVerified::assertion()),
            Some(pin) if sha256(end_entity) == pin => Ok(ServerCertVerified::assertion()),
            Some(pin) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(PinMismatch(format!(
                    "the certificate does not match the pin sha256 {}",
                    hex(&pin)
                )))),
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(|algorithms| {
            rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
        })
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(|algorithms| {
            rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
        })
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Delegates to the policy's verifier and records the leaf and any refusal.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn ServerCertVerifier>,
    policy: String,
    observed: Arc<Observed>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.observed.saw(end_entity);
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if let Err(e) = &verdict {
            self.observed.refused(format!(
                "{} refused the server certificate sha256 {}: {}",
                self.policy,
                sha256_hex(end_entity),
                refusal_reason(e)
            ));
        }
        verdict
    }

    delegate_handshake_checks!(inner);
}

fn refusal_reason(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => other.0.to_string(),
        rustls::Error::InvalidCertificate(reason) => format!("{reason:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips_through_the_parser() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let pem = der_to_pem(&der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        let back = CertificateDer::from_pem_slice(pem.as_bytes()).expect("parses");
        assert_eq!(back.as_ref(), der.as_slice());
    }

    #[test]
    fn sha256_is_lowercase_hex_of_the_der() {
        // SHA-256 of the empty string, a published test vector.
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn pin_accepts_only_its_certificate_and_says_why() {
        let provider = rustls::crypto::ring::default_provider();
        let cert = CertificateDer::from(b"not really a certificate".to_vec());
        let good = Pin {
            sha256: Some(sha256(cert.as_ref())),
            algorithms: provider.signature_verification_algorithms,
        };
        let name = ServerName::try_from("127.0.0.1").expect("ip");
        assert!(
            good.verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        let observed = Arc::new(Observed::default());
        let bad = Recording {
            inner: Arc::new(Pin {
                sha256: Some([7; 32]),
                algorithms: provider.signature_verification_algorithms,
            }),
            policy: describe(&TlsPolicy::Pinned([7; 32])),
            observed: observed.clone(),
        };
        assert!(
            bad.verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
                .is_err()
        );
        let why = observed.take_refusal().expect("refusal recorded");
        assert!(why.contains(&sha256_hex(cert.as_ref())), "{why}");
        assert!(why.contains(&hex(&[7; 32])), "{why}");
        assert_eq!(observed.leaf_der().as_deref(), Some(cert.as_ref()));
        assert!(observed.take_refusal().is_none(), "consumed once");
    }

    #[test]
    fn ca_file_without_certificates_is_refused_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "no pem here\n").expect("write");
        let err = client_config(&TlsPolicy::CaFile(path.clone())).expect_err("no roots");
        assert!(err.contains(&path.display().to_string()), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = client_config(&TlsPolicy::CaFile(missing.clone())).expect_err("missing");
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }
}
