//! TLS policies against a local TLS server with certificates made by `openssl` for the test:
//! a CA-signed leaf, a self-signed `CA:TRUE` certificate (as ESXi hosts have), a leaf for another
//! name. The server answers every SOAP call with a fault, so a `Fault` from `connect` means the
//! handshake was accepted, and a `Certificate` error means it was refused.

use sendense_vsphere::{Client, Endpoint, Secret, TlsPolicy, VsphereError};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` with a new P-256 key `<name>.key`, writing `<name>.<out>`; `extra` says what
/// is made (a self-signed certificate or a signing request) and for whom.
fn new_key_request(dir: &Path, name: &str, out: &str, extra: &[&str]) {
    let key = format!("{name}.key");
    let out = format!("{name}.{out}");
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &out,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
}

/// Key and self-signed certificate `name` (CA:TRUE, as `openssl req -x509` makes them).
fn self_signed(dir: &Path, name: &str, subject: &str, san: &str) {
    new_key_request(
        dir,
        name,
        "pem",
        &[
            "-x509",
            "-days",
            "2",
            "-subj",
            subject,
            "-addext",
            &format!("subjectAltName={san}"),
        ],
    );
}

/// Key and leaf certificate `name` for `san`, signed by `ca`.
fn leaf(dir: &Path, name: &str, ca: &str, san: &str) {
    new_key_request(dir, name, "csr", &["-subj", "/CN=vsphere-test"]);
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"),
    )
    .expect("ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

fn der_of(pem: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::from_pem_file(pem)
        .expect("certificate")
        .as_ref()
        .to_vec()
}

fn sha256(der: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(der).into()
}

/// A TLS server on 127.0.0.1 that answers every request with a SOAP fault (404 for the
/// versions file). Returns its URL; the accept loop ends with the runtime.
async fn fault_server(cert: &Path, key: &Path) -> String {
    use rustls::pki_types::pem::PemObject as _;
    let certs = vec![rustls::pki_types::CertificateDer::from_pem_file(cert).expect("cert")];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("https://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A refused handshake is what several tests want.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = tls.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let (status, body) = if text.starts_with("GET /sdk/vimServiceVersions.xml") {
                    ("404 Not Found", String::new())
                } else {
                    (
                        "500 Internal Server Error",
                        concat!(
                            r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#,
                            "<soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>test server</faultstring>",
                            r#"<detail><NotImplementedFault xmlns="urn:vim25" xsi:type="NotImplemented"/></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#
                        )
                        .to_string(),
                    )
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    url
}

async fn connect(url: &str, tls: TlsPolicy) -> VsphereError {
    Client::connect(&Endpoint {
        url: url.to_string(),
        user: "root".into(),
        password: Secret::new("pw".into()),
        tls,
    })
    .await
    .expect_err("the test server faults every call")
}

/// The handshake was accepted: the error is the server's SOAP fault.
fn accepted(err: &VsphereError) {
    assert!(
        matches!(err, VsphereError::Fault { method, fault, .. } if method == "RetrieveServiceContent" && fault == "NotImplemented"),
        "expected the server's fault after a good handshake, got {err:?}"
    );
}

fn refused(err: &VsphereError, seen: &str, policy: &str) {
    assert!(matches!(err, VsphereError::Certificate { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(seen), "names the sha256 seen ({seen}): {msg}");
    assert!(msg.contains(policy), "names the policy ({policy}): {msg}");
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        self_signed(d, "ca", "/CN=test-ca", "DNS:test-ca");
        self_signed(d, "other-ca", "/CN=other-ca", "DNS:other-ca");
        leaf(d, "leaf", "ca", "IP:127.0.0.1");
        leaf(d, "wrong-name", "ca", "IP:127.0.0.2");
        self_signed(d, "esxi", "/CN=127.0.0.1", "IP:127.0.0.1");
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn hex(&self, name: &str) -> String {
        sendense_vsphere::tls::sha256_hex(&der_of(&self.path(&format!("{name}.pem"))))
    }

    async fn server(&self, name: &str) -> String {
        fault_server(
            &self.path(&format!("{name}.pem")),
            &self.path(&format!("{name}.key")),
        )
        .await
    }
}

#[tokio::test]
async fn ca_file_trusts_leaves_it_signed_for_the_right_name() {
    let pki = Pki::new();
    let url = pki.server("leaf").await;
    accepted(&connect(&url, TlsPolicy::CaFile(pki.path("ca.pem"))).await);

    let other = pki.path("other-ca.pem");
    let err = connect(&url, TlsPolicy::CaFile(other.clone())).await;
    refused(&err, &pki.hex("leaf"), &other.display().to_string());

    let url = pki.server("wrong-name").await;
    let err = connect(&url, TlsPolicy::CaFile(pki.path("ca.pem"))).await;
    refused(&err, &pki.hex("wrong-name"), "CA file");
    // A pin does not care about names: it is exactly that certificate.
    let pin = sha256(&der_of(&pki.path("wrong-name.pem")));
    accepted(&connect(&url, TlsPolicy::Pinned(pin)).await);
}

#[tokio::test]
async fn self_signed_ca_certificate_given_as_its_own_ca_file_is_trusted() {
    let pki = Pki::new();
    let url = pki.server("esxi").await;
    accepted(&connect(&url, TlsPolicy::CaFile(pki.path("esxi.pem"))).await);
    // ...but only that one: another CA file refuses it.
    let err = connect(&url, TlsPolicy::CaFile(pki.path("ca.pem"))).await;
    refused(&err, &pki.hex("esxi"), "CA file");
}

#[tokio::test]
async fn system_store_refuses_a_private_ca_and_insecure_accepts_it() {
    let pki = Pki::new();
    let url = pki.server("leaf").await;
    let err = connect(&url, TlsPolicy::System).await;
    refused(&err, &pki.hex("leaf"), "system trust store");
    accepted(&connect(&url, TlsPolicy::Insecure).await);
    let err = connect(&url, TlsPolicy::Pinned([1; 32])).await;
    refused(&err, &pki.hex("leaf"), &"01".repeat(32));
}
