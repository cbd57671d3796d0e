//! The hub's private CA for the NBD data path. Every TCP export qemu-nbd serves for a job runs
//! TLS with x509 client certificates (`tls-creds-x509,verify-peer=on`) and an authz that names
//! exactly two client identities: the job's writer and the hub itself. The writer gets its
//! certificate and key in the start request (over the authenticated API), so another local user
//! on the hub, or another job's writer, cannot open the export: no certificate fails the TLS
//! handshake, a certificate of another job fails the authz.
//!
//! Kept in `<data>/nbd-ca/` (0700, every file 0600), created at the first start:
//! `ca-cert.pem`/`ca-key.pem` (the CA), `hub-cert.pem`/`hub-key.pem` (the hub's own client
//! certificate, for the readiness probe and the FLUSH at the end), and `server/` — the directory
//! qemu-nbd's `tls-creds-x509` reads (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`). One
//! server certificate serves every export: it proves "the hub's qemu-nbd", and which client may
//! open which export is the authz's job, not the server's.
//!
//! Identities are the subject DN as qemu 7.2 prints it for the authz check (`CN=...`, tried:
//! qemu-nbd logs "TLS x509 authz check for CN=sendense-job-2 is denied").
//!
//! Client certificates do not expire before the CA does: a writer's certificate opens only
//! exports whose authz names its job, and those exist only while the job runs.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The Diffie-Hellman group qemu-nbd's `tls-creds-x509` loads from `dh-params.pem`: RFC 7919's
/// ffdhe2048, a fixed, public group (`openssl genpkey -genparam -algorithm DH -pkeyopt
/// group:ffdhe2048`). Without the file, every qemu-nbd start generates 2048-bit parameters of
/// its own, which takes seconds of CPU before the export answers (bench/job.sh: 4-9 s of a job's
/// preparation on a loaded 2-core machine, against 20-40 ms with the file).
const DH_PARAMS_PEM: &str = "\
-----BEGIN DH PARAMETERS-----\n\
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz\n\
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a\n\
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7\n\
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi\n\
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD\n\
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==\n\
-----END DH PARAMETERS-----\n";

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use sendense_shared::api::NbdTls;
use sendense_shared::fsmode::{PrivateError, private_dir};
use sendense_shared::nbd::tls::SERVER_NAME;
use thiserror::Error;

/// CN of the hub's own client certificate.
pub const HUB_CN: &str = "sendense-hub";

#[derive(Debug, Error)]
pub enum NbdCaError {
    #[error("NBD CA directory")]
    Dir(#[source] PrivateError),
    #[error("{}: {what}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Pem {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("issuing the NBD client certificate for {cn}")]
    Issue {
        cn: String,
        #[source]
        source: rcgen::Error,
    },
}

/// The loaded CA; cheap to clone.
#[derive(Clone)]
pub struct NbdCa {
    inner: Arc<Inner>,
}

struct Inner {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    server_dir: PathBuf,
    hub: NbdTls,
}

impl std::fmt::Debug for NbdCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdCa")
            .field("server_dir", &self.inner.server_dir)
            .finish_non_exhaustive()
    }
}

/// Equal when it is the same CA (a config compares its parts).
impl PartialEq for NbdCa {
    fn eq(&self, other: &Self) -> bool {
        self.inner.ca_pem == other.inner.ca_pem
    }
}

/// The identity (subject DN as qemu's authz sees it) of a backup job's writer.
pub fn backup_identity(backup_id: impl std::fmt::Display) -> String {
    format!("sendense-job-{backup_id}")
}

/// The identity of a restore's reader.
pub fn restore_identity(restore_id: impl std::fmt::Display) -> String {
    format!("sendense-restore-{restore_id}")
}

/// The identity of an instant recovery's reader (the recovered VM's QEMU on the node): one
/// for every disk of the recovery, so a restarted export admits the certificate the node
/// already holds.
pub fn recovery_identity(recovery_id: impl std::fmt::Display) -> String {
    format!("sendense-recovery-{recovery_id}")
}

/// `CN=<cn>`: how qemu 7.2 prints a subject of only a common name.
pub fn dn(cn: &str) -> String {
    format!("CN={cn}")
}

fn params(cn: &str, sans: Vec<String>) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(sans)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    p.distinguished_name = name;
    Ok(p)
}

fn leaf_params(cn: &str, server: bool) -> Result<CertificateParams, rcgen::Error> {
    let sans = if server {
        // The loopback addresses too, so that stock tools that check the host they dial
        // (libnbd's `nbds://127.0.0.1/...`) accept it; the project's client checks the name.
        vec![
            SERVER_NAME.to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ]
    } else {
        Vec::new()
    };
    let mut p = params(cn, sans)?;
    // qemu's sanity check of its own and the peer's certificate wants both usages.
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    Ok(p)
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut p = params("Sendense hub NBD CA", Vec::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

impl NbdCa {
    /// Opens `<data_dir>/nbd-ca`, creating the CA, the hub's client certificate and the server
    /// directory when missing.
    pub fn open(data_dir: &Path) -> Result<NbdCa, NbdCaError> {
        let dir = data_dir.join("nbd-ca");
        private_dir(&dir).map_err(NbdCaError::Dir)?;
        let server_dir = dir.join("server");
        private_dir(&server_dir).map_err(NbdCaError::Dir)?;
        let (ca_cert, ca_key) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        let pem_err = |path: &Path, what| {
            let path = path.to_path_buf();
            move |source| NbdCaError::Pem { path, what, source }
        };
        // A new CA invalidates whatever was issued by an earlier one.
        let fresh = !ca_key.exists();
        if fresh {
            let key = KeyPair::generate().map_err(pem_err(&ca_key, "generating the CA key"))?;
            let cert = ca_params()
                .and_then(|p| p.self_signed(&key))
                .map_err(pem_err(&ca_cert, "creating the CA certificate"))?;
            write_private(&ca_cert, &cert.pem())?;
            write_private(&ca_key, &key.serialize_pem())?;
        }
        let ca_pem = read(&ca_cert)?;
        let key = KeyPair::from_pem(&read(&ca_key)?).map_err(pem_err(&ca_key, "reading"))?;
        // The issuer is the CA's parameters (its DN is fixed) with its key; parsing the PEM
        // back would need rcgen's x509-parser feature.
        let issuer = Issuer::new(
            ca_params().map_err(pem_err(&ca_cert, "the CA's parameters"))?,
            key,
        );
        let mut ca = Inner {
            ca_pem,
            issuer,
            server_dir: server_dir.clone(),
            // Filled in below, once the hub's certificate exists.
            hub: NbdTls {
                ca_pem: String::new(),
                cert_pem: String::new(),
                key_pem: String::new(),
            },
        };
        // qemu-nbd's directory, rewritten from the CA when incomplete or from another CA.
        let server_key = server_dir.join("server-key.pem");
        let server_ca = server_dir.join("ca-cert.pem");
        if fresh || !server_key.exists() || read(&server_ca).ok().as_deref() != Some(&ca.ca_pem) {
            let (cert, key) = issue(&ca.issuer, SERVER_NAME, true)
                .map_err(pem_err(&server_key, "issuing the server certificate"))?;
            write_private(&server_ca, &ca.ca_pem)?;
            write_private(&server_dir.join("server-cert.pem"), &cert)?;
            write_private(&server_key, &key)?;
        }
        let dh = server_dir.join("dh-params.pem");
        if read(&dh).ok().as_deref() != Some(DH_PARAMS_PEM) {
            write_private(&dh, DH_PARAMS_PEM)?;
        }
        let (hub_cert, hub_key) = (dir.join("hub-cert.pem"), dir.join("hub-key.pem"));
        if fresh || !hub_key.exists() || !hub_cert.exists() {
            let (cert, key) = issue(&ca.issuer, HUB_CN, false)
                .map_err(pem_err(&hub_key, "issuing the hub's client certificate"))?;
            write_private(&hub_cert, &cert)?;
            write_private(&hub_key, &key)?;
        }
        ca.hub = NbdTls {
            ca_pem: ca.ca_pem.clone(),
            cert_pem: read(&hub_cert)?,
            key_pem: read(&hub_key)?,
        };
        Ok(NbdCa {
            inner: Arc::new(ca),
        })
    }

    /// The directory qemu-nbd's `tls-creds-x509,dir=` reads.
    pub fn server_dir(&self) -> &Path {
        &self.inner.server_dir
    }

    /// The hub's own client material (probe, FLUSH).
    pub fn hub_client(&self) -> &NbdTls {
        &self.inner.hub
    }

    /// A fresh client certificate for `cn` (e.g. [`backup_identity`]) with the CA.
    pub fn issue_client(&self, cn: &str) -> Result<NbdTls, NbdCaError> {
        let (cert_pem, key_pem) =
            issue(&self.inner.issuer, cn, false).map_err(|source| NbdCaError::Issue {
                cn: cn.to_string(),
                source,
            })?;
        Ok(NbdTls {
            ca_pem: self.inner.ca_pem.clone(),
            cert_pem,
            key_pem,
        })
    }
}

fn issue(
    issuer: &Issuer<'static, KeyPair>,
    cn: &str,
    server: bool,
) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    let cert = leaf_params(cn, server)?.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn read(path: &Path) -> Result<String, NbdCaError> {
    std::fs::read_to_string(path).map_err(|source| NbdCaError::Io {
        path: path.to_path_buf(),
        what: "reading",
        source,
    })
}

/// Writes `text` to a new 0600 file (replacing an old one; never through a symlink).
fn write_private(path: &Path, text: &str) -> Result<(), NbdCaError> {
    use std::io::Write;
    let io = |what| {
        let path = path.to_path_buf();
        move |source| NbdCaError::Io { path, what, source }
    };
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io("creating"))?;
    f.write_all(text.as_bytes()).map_err(io("writing"))?;
    f.sync_all().map_err(io("syncing"))?;
    std::fs::rename(&tmp, path).map_err(io("renaming into place"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_private_and_reused() {
        let data = tempfile::tempdir().unwrap();
        let ca = NbdCa::open(data.path()).unwrap();
        let dir = data.path().join("nbd-ca");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("server")), 0o700);
        for f in ["ca-key.pem", "hub-key.pem", "server/server-key.pem"] {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        // qemu-nbd loads the fixed group instead of generating one at every start.
        let dh = std::fs::read_to_string(dir.join("server/dh-params.pem")).unwrap();
        assert!(dh.starts_with("-----BEGIN DH PARAMETERS-----\n"), "{dh}");
        let again = NbdCa::open(data.path()).unwrap();
        assert!(ca == again, "the second start reuses the CA");
        assert_eq!(ca.hub_client(), again.hub_client());
        let a = ca.issue_client(&backup_identity("b1")).unwrap();
        let b = ca.issue_client(&backup_identity("b1")).unwrap();
        assert_ne!(a.key_pem, b.key_pem, "every issue has its own key");
        assert_eq!(a.ca_pem, ca.hub_client().ca_pem);
    }
}
