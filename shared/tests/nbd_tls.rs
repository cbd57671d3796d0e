//! `NBD_OPT_STARTTLS` against a real `qemu-nbd` with `tls-creds-x509` (`verify-peer=on`) and a
//! `tls-authz` naming one client: the client with its certificate reads and writes; without a
//! certificate, with one the authz does not name, with one from another CA, or against a
//! server of another CA, nothing gets through.

use bytes::Bytes;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use sendense_shared::api::NbdTls;
use sendense_shared::nbd::{ConnectOptions, NbdClient, NbdError, tls::SERVER_NAME};
use sendense_tests::nbd::QemuNbd;
use std::path::Path;
use std::process::Command;

/// A CA: its PEM and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn params(cn: &str, sans: Vec<String>) -> CertificateParams {
    let mut p = CertificateParams::new(sans).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p
}

fn new_ca(cn: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = params(cn, vec![]);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(p, key),
    }
}

/// A leaf certificate and key (PEM) for a server or a client.
fn leaf(ca: &Ca, cn: &str, server: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let sans = if server {
        vec![SERVER_NAME.to_string()]
    } else {
        vec![]
    };
    let mut p = params(cn, sans);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    (
        p.signed_by(&key, &ca.issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

fn client(ca: &Ca, cn: &str) -> NbdTls {
    let (cert_pem, key_pem) = leaf(ca, cn, false);
    NbdTls {
        ca_pem: ca.pem.clone(),
        cert_pem,
        key_pem,
    }
}

/// qemu-nbd's x509 directory for a server certificate of `ca`.
fn server_dir(dir: &Path, ca: &Ca) -> std::path::PathBuf {
    let d = dir.join("tls");
    std::fs::create_dir(&d).unwrap();
    let (cert, key) = leaf(ca, SERVER_NAME, true);
    std::fs::write(d.join("ca-cert.pem"), &ca.pem).unwrap();
    std::fs::write(d.join("server-cert.pem"), cert).unwrap();
    std::fs::write(d.join("server-key.pem"), key).unwrap();
    d
}

fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("a.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    p
}

/// qemu-nbd serving `img` over TLS, allowing only the client DNs `CN=<allowed>` and
/// `CN=second` (qemu 7.2 takes `--object` as JSON, which `authz-list` needs for its rules).
async fn serve(img: &Path, tls_dir: &Path, allowed: &str) -> QemuNbd {
    QemuNbd::builder(img, "disk")
        .args(&[
            "--object".to_string(),
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                tls_dir.display()
            ),
            // Two identities, as the hub serves its exports: the job's writer and the hub.
            "--object".to_string(),
            format!(
                r#"{{"qom-type":"authz-list","id":"auth0","policy":"deny","rules":[{{"match":"CN={allowed}","policy":"allow"}},{{"match":"CN=second","policy":"allow"}}]}}"#
            ),
            "--tls-creds=tls0".to_string(),
            "--tls-authz=auth0".to_string(),
        ])
        .start_async()
        .await
}

fn opts(tls: Option<NbdTls>) -> ConnectOptions {
    ConnectOptions {
        tls,
        ..Default::default()
    }
}

#[tokio::test]
async fn client_with_its_certificate_reads_and_writes_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("test CA");
    let srv = serve(
        &image(dir.path()),
        &server_dir(dir.path(), &ca),
        "sendense-job-1",
    )
    .await;
    let c = NbdClient::connect(&srv.addr, &opts(Some(client(&ca, "sendense-job-1"))))
        .await
        .unwrap();
    assert_eq!(c.size(), 16 << 20);
    let data = Bytes::from(vec![0x5a; 1 << 20]);
    c.write(4096, data.clone()).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.read(4096, 1 << 20).await.unwrap(), data);
    c.disconnect().await.unwrap();
    // A second connection sees the write: it reached the image, not a buffer.
    let c = NbdClient::connect(&srv.addr, &opts(Some(client(&ca, "sendense-job-1"))))
        .await
        .unwrap();
    assert_eq!(c.read(4096, 1 << 20).await.unwrap(), data);
    // The authz's second identity too.
    let c = NbdClient::connect(&srv.addr, &opts(Some(client(&ca, "second"))))
        .await
        .unwrap();
    assert_eq!(c.read(4096, 1 << 20).await.unwrap(), data);
}

#[tokio::test]
async fn without_a_certificate_nothing_gets_through() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("test CA");
    let srv = serve(
        &image(dir.path()),
        &server_dir(dir.path(), &ca),
        "sendense-job-1",
    )
    .await;
    let e = NbdClient::connect(&srv.addr, &opts(None))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, NbdError::Tls { reason } if reason.contains("requires TLS")),
        "{e}"
    );
    // The stock tools are refused too (qemu-img speaks NBD without TLS by default).
    let out = Command::new("qemu-img")
        .args(["info", &srv.uri()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "qemu-img info without TLS: {out:?}");
}

#[tokio::test]
async fn a_certificate_the_authz_does_not_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("test CA");
    let srv = serve(
        &image(dir.path()),
        &server_dir(dir.path(), &ca),
        "sendense-job-1",
    )
    .await;
    // Same CA, another job's identity.
    let e = NbdClient::connect(&srv.addr, &opts(Some(client(&ca, "sendense-job-2"))))
        .await
        .unwrap_err();
    eprintln!("other job: {e}");
    assert!(
        matches!(&e, NbdError::Tls { reason } if reason.contains("did not accept this client certificate")),
        "{e}"
    );
    // Another CA's certificate with the allowed name.
    let other = new_ca("other CA");
    let mut t = client(&other, "sendense-job-1");
    t.ca_pem = ca.pem.clone();
    let e = NbdClient::connect(&srv.addr, &opts(Some(t)))
        .await
        .unwrap_err();
    eprintln!("other CA: {e}");
    assert!(
        matches!(&e, NbdError::Tls { reason } if reason.contains("did not accept this client certificate")),
        "{e}"
    );
    // The allowed client still gets in afterwards.
    NbdClient::connect(&srv.addr, &opts(Some(client(&ca, "sendense-job-1"))))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_server_of_another_ca_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca("test CA");
    let impostor = new_ca("impostor CA");
    let srv = serve(
        &image(dir.path()),
        &server_dir(dir.path(), &impostor),
        "sendense-job-1",
    )
    .await;
    let e = NbdClient::connect(&srv.addr, &opts(Some(client(&ca, "sendense-job-1"))))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, NbdError::Tls { reason } if reason.contains("certificate")),
        "{e}"
    );
}
