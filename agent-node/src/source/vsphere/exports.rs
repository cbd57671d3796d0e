//! One nbdkit per disk of a snapshot: the `vddk` plugin when configured and installed, else
//! `curl` on the datastore file URL with the session cookie and the endpoint's certificate
//! policy.

use super::VsphereDriver;
use crate::source::nbdkit::{CaInfo, Nbdkit, NbdkitSpec, Plugin, VddkArgs};
use crate::source::{SnapshotDisk, SnapshotRequest, SourceError};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sendense_shared::ids::DiskKey;
use sendense_vsphere::{Client, DiskInfo, MoRef, TlsPolicy, VmInfo};
use std::path::Path;

impl VsphereDriver {
    /// Areas, change ids and one nbdkit per disk of the snapshot. On failure, the nbdkits
    /// started so far are stopped.
    pub(super) async fn export(
        &self,
        vm: &VmInfo,
        snapshot: &MoRef,
        request: &SnapshotRequest,
        stem: &str,
    ) -> Result<(Vec<SnapshotDisk>, Vec<Nbdkit>), SourceError> {
        let disks = self
            .call(|c| async move { c.snapshot_disks(snapshot).await })
            .await
            .map_err(|e| self.error(&vm.name, "reading the snapshot's disks", e))?;
        if disks.is_empty() {
            return Err(SourceError::NoDisks {
                vm: vm.name.clone(),
            });
        }
        let mut exports: Vec<Nbdkit> = Vec::new();
        let built = async {
            let mut out = Vec::new();
            for d in &disks {
                let areas = self.areas(vm, snapshot, d, request).await?;
                let client = self
                    .session()
                    .await
                    .map_err(|e| self.error(&vm.name, "nbdkit session", e))?;
                let spec = NbdkitSpec {
                    run_dir: self.run_dir.clone(),
                    stem: format!("{stem}-{}", d.key),
                    export: format!("{}-disk-{}", vm.name, d.key),
                    plugin: self.plugin(&client, vm, snapshot, d)?,
                };
                let nbd =
                    Nbdkit::start(&self.nbdkit, spec)
                        .await
                        .map_err(|e| SourceError::Tool {
                            command: format!("nbdkit for disk {} of VM {}", d.key, vm.name),
                            detail: e.to_string(),
                        })?;
                out.push(SnapshotDisk {
                    disk_key: DiskKey(d.key as i64),
                    size_bytes: d.capacity_bytes,
                    socket: nbd.socket(),
                    export: nbd.export().to_string(),
                    dirty_bitmap: None,
                    areas,
                    change_id: d.change_id.clone(),
                });
                exports.push(nbd);
            }
            Ok::<_, SourceError>(out)
        }
        .await;
        match built {
            Ok(out) => Ok((out, exports)),
            Err(e) => {
                for n in &exports {
                    n.stop().await;
                }
                Err(e)
            }
        }
    }

    pub(super) fn plugin(
        &self,
        client: &Client,
        vm: &VmInfo,
        snapshot: &MoRef,
        disk: &DiskInfo,
    ) -> Result<Plugin, SourceError> {
        let no_cert = || SourceError::Endpoint {
            endpoint: self.endpoint.url.clone(),
            detail: "the server certificate was not captured in the TLS handshake".into(),
        };
        if let Some(libdir) = &self.vddk_libdir {
            let pem = client.server_certificate_pem().ok_or_else(no_cert)?;
            let (server, port) = host_port(&self.endpoint.url);
            return Ok(Plugin::Vddk(VddkArgs {
                libdir: libdir.clone(),
                server,
                port,
                user: self.endpoint.user.clone(),
                password: self.endpoint.password.expose().to_string(),
                thumbprint: sha1_thumbprint(&pem).ok_or_else(no_cert)?,
                vm_moref: vm.moref.value.clone(),
                snapshot_moref: snapshot.value.clone(),
                file: disk.file_name.clone(),
            }));
        }
        let url = client
            .datastore_file_url(&vm.datacenter, &disk.file_name)
            .map_err(|e| self.error(&vm.name, "datastore file URL", e))?;
        let cainfo = match &self.endpoint.tls {
            TlsPolicy::System | TlsPolicy::Insecure => None,
            TlsPolicy::CaFile(p) => Some(CaInfo::File(p.clone())),
            TlsPolicy::Pinned(_) => Some(CaInfo::Pem(
                client.server_certificate_pem().ok_or_else(no_cert)?,
            )),
        };
        Ok(Plugin::Curl {
            url,
            cookie: client.session_cookie(),
            // Within a keepalive period of a new login, nbdkit reads with the new cookie.
            cookie_renew_secs: Some(self.keepalive.as_secs().clamp(1, 30) as u32),
            cainfo,
            insecure: self.endpoint.tls == TlsPolicy::Insecure,
        })
    }
}

/// "https://host:port" → ("host", Some(port)).
pub(super) fn host_port(url: &str) -> (String, Option<u16>) {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    let rest = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').unwrap_or((v6, ""));
        return (
            host.to_string(),
            after.strip_prefix(':').and_then(|p| p.parse().ok()),
        );
    }
    match rest.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().ok()),
        _ => (rest.to_string(), None),
    }
}

/// VDDK's thumbprint of a PEM certificate: SHA-1 of the DER, "AA:BB:.." (what
/// `openssl x509 -fingerprint -sha1` prints).
pub fn sha1_thumbprint(pem: &str) -> Option<String> {
    use sha1::Digest;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let digest = sha1::Sha1::digest(der.as_ref());
    Some(
        digest
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Whether nbdkit's vddk plugin is installed (in nbdkit's plugin directory).
pub(super) fn vddk_plugin_installed(nbdkit: &Path) -> bool {
    let Ok(out) = std::process::Command::new(nbdkit)
        .arg("--dump-config")
        .output()
    else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("plugindir="))
        .is_some_and(|dir| Path::new(dir).join("nbdkit-vddk-plugin.so").exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_of_the_url() {
        assert_eq!(host_port("https://vc.example"), ("vc.example".into(), None));
        assert_eq!(
            host_port("https://127.0.0.1:8989"),
            ("127.0.0.1".into(), Some(8989))
        );
        assert_eq!(host_port("https://[::1]:443"), ("::1".into(), Some(443)));
    }
}
