//! `NBD_OPT_STARTTLS` with rustls: the hub's qemu-nbd exports are served with x509 client
//! certificates (`tls-creds-x509,verify-peer=on` plus a `tls-authz` naming the job's client).
//! The client trusts only the CA given with the export (the hub's private CA), presents the
//! client certificate issued for the job, and names the server [`SERVER_NAME`], which every
//! server certificate of that CA carries: the host a node reaches the export by (a tunnel
//! forward, an address) says nothing about who is serving.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::NbdError;
use crate::api::NbdTls;

/// The DNS name in every NBD server certificate of a Sendense hub's CA, and the name the client
/// verifies.
pub const SERVER_NAME: &str = "sendense-nbd";

/// Builds the rustls client configuration: the export's CA as the only root, the client
/// certificate (chain) and key, TLS 1.2 or 1.3 with the ring provider.
pub fn client_config(tls: &NbdTls) -> Result<Arc<rustls::ClientConfig>, NbdError> {
    let bad = |what: &str, e: String| NbdError::Tls {
        reason: format!("{what}: {e}"),
    };
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(tls.ca_pem.as_bytes()) {
        let c = c.map_err(|e| bad("CA certificate PEM", e.to_string()))?;
        roots
            .add(c)
            .map_err(|e| bad("CA certificate", e.to_string()))?;
        n += 1;
    }
    if n == 0 {
        return Err(bad("CA certificate PEM", "no certificate".into()));
    }
    let chain = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("client certificate PEM", e.to_string()))?;
    if chain.is_empty() {
        return Err(bad("client certificate PEM", "no certificate".into()));
    }
    // The parser's error names no key bytes, so it may be shown.
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes())
        .map_err(|e| bad("client key PEM", e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad("client certificate and key", e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// Runs the TLS client handshake over a stream on which STARTTLS was just acknowledged.
pub(crate) async fn wrap<S>(stream: S, tls: &NbdTls) -> Result<TlsStream<S>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = client_config(tls)?;
    let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
    TlsConnector::from(cfg)
        .connect(name, stream)
        .await
        .map_err(|e| NbdError::Tls {
            reason: format!("TLS handshake with the NBD server failed: {e}"),
        })
}

/// Greeting in the clear, `NBD_OPT_STARTTLS`, the TLS handshake, then the rest of the
/// negotiation and all transmission inside TLS. The TLS stream is one object, so its halves
/// share a lock (`tokio::io::split`); both tasks hold it only while polling.
pub(crate) async fn connect_over<S>(
    mut s: S,
    export: &str,
    opts: &super::ConnectOptions,
) -> Result<super::NbdClient, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tls = opts.tls.as_ref().expect("called with TLS material");
    super::handshake::greet(&mut s).await?;
    super::handshake::starttls(&mut s).await?;
    let t = wrap(s, tls).await?;
    let (rd, wr) = tokio::io::split(t);
    super::NbdClient::after_greeting(rd, wr, export, opts)
        .await
        .map_err(|e| match e {
            // With TLS 1.3 the client's handshake ends before the server has judged the
            // client certificate; a refusal (unknown issuer, authz) is a close right after.
            NbdError::Handshake { reason } if reason.contains("closed the connection") => {
                NbdError::Tls {
                    reason: "the server closed the connection right after the TLS handshake: \
                             it did not accept this client certificate (another CA, or an \
                             identity its authz does not allow)"
                        .into(),
                }
            }
            e => e,
        })
}
