//! The `[vsphere]` table: VMs of a vCenter or ESXi, as written ([`VsphereFile`]) and checked
//! ([`VsphereConfig::resolve`], whose errors name the key).

use sendense_shared::names::validate_name;
use sendense_vsphere::{Secret, TlsPolicy};
use serde::Deserialize;
use std::path::PathBuf;

use super::ConfigError;

/// The `[vsphere]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsphereFile {
    /// `https://vcenter.example` or `https://esxi:443` (no path; `/sdk` is accepted and dropped).
    pub url: Option<String>,
    pub user: Option<String>,
    /// File holding the password (read at start-up; a trailing newline is not part of it).
    pub password_file: Option<PathBuf>,
    /// Trust only certificates signed by the CA(s) in this PEM file.
    pub ca_file: Option<PathBuf>,
    /// Accept exactly the server certificate with this SHA-256 ("AB:CD:..." or plain hex).
    pub thumbprint_sha256: Option<String>,
    /// No certificate verification at all.
    #[serde(default)]
    pub insecure: bool,
    /// Quiesce the guest file systems (VMware Tools) when taking the snapshot.
    #[serde(default)]
    pub quiesce: bool,
    /// Only these VMs (by name); all VMs when not given.
    pub vms: Option<Vec<String>>,
    /// The nbdkit executable [default: "nbdkit"].
    pub nbdkit: Option<PathBuf>,
    /// VMware VDDK's library directory: with it (and nbdkit's vddk plugin installed) disks are
    /// read through VDDK, else over the datastore's HTTPS file access (curl plugin).
    pub vddk_libdir: Option<PathBuf>,
    /// While a snapshot is held, touch the SOAP session this often (seconds) so that vCenter's
    /// idle timeout (30 minutes) does not end it under nbdkit [default: 300].
    pub session_keepalive_secs: Option<u64>,
}

/// The checked `[vsphere]` section.
#[derive(Debug, Clone)]
pub struct VsphereConfig {
    /// Without a trailing slash or path.
    pub url: String,
    pub user: String,
    /// Never logged (its `Debug` is redacted).
    pub password: Secret,
    pub tls: TlsPolicy,
    pub quiesce: bool,
    /// Only these VM names, when given.
    pub vms: Option<std::collections::BTreeSet<String>>,
    pub nbdkit: PathBuf,
    pub vddk_libdir: Option<PathBuf>,
    /// How often the session is touched while a snapshot is held.
    pub session_keepalive: std::time::Duration,
}

impl VsphereConfig {
    /// Checks the `[vsphere]` table; errors name the key.
    pub fn resolve(file: &VsphereFile) -> Result<VsphereConfig, ConfigError> {
        let bad = |key: &'static str, detail: String| ConfigError::Vsphere { key, detail };
        let url = file
            .url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| bad("url", "missing (e.g. https://vcenter.example)".into()))?;
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            bad(
                "url",
                format!("{url:?} must start with https:// (the SOAP API is HTTPS only)"),
            )
        })?;
        let host = rest.trim_end_matches('/');
        let host = host.strip_suffix("/sdk").unwrap_or(host);
        if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad(
                "url",
                format!("{url:?}: expected https://HOST[:PORT] without a path or user"),
            ));
        }
        let url = format!("https://{host}");
        let user = file
            .user
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| bad("user", "missing".into()))?
            .to_string();
        let pf = file.password_file.as_ref().ok_or_else(|| {
            bad(
                "password_file",
                "missing (the password is read from a file, never given on the command line)"
                    .into(),
            )
        })?;
        let password = std::fs::read_to_string(pf)
            .map_err(|e| bad("password_file", format!("{}: {e}", pf.display())))?;
        let password = password.trim_end_matches(['\n', '\r']).to_string();
        if password.is_empty() {
            return Err(bad("password_file", format!("{} is empty", pf.display())));
        }
        let chosen = [
            file.ca_file.is_some(),
            file.thumbprint_sha256.is_some(),
            file.insecure,
        ]
        .iter()
        .filter(|&&b| b)
        .count();
        if chosen > 1 {
            return Err(bad(
                "ca_file",
                "give at most one of ca_file, thumbprint_sha256 and insecure = true".into(),
            ));
        }
        let tls = if let Some(ca) = &file.ca_file {
            std::fs::metadata(ca).map_err(|e| bad("ca_file", format!("{}: {e}", ca.display())))?;
            TlsPolicy::CaFile(ca.clone())
        } else if let Some(t) = &file.thumbprint_sha256 {
            TlsPolicy::Pinned(
                parse_thumbprint(t).map_err(|detail| bad("thumbprint_sha256", detail))?,
            )
        } else if file.insecure {
            TlsPolicy::Insecure
        } else {
            TlsPolicy::System
        };
        let vms = match &file.vms {
            None => None,
            Some(list) => {
                let mut set = std::collections::BTreeSet::new();
                for vm in list {
                    validate_name("vm name", vm).map_err(|e| bad("vms", format!("{vm:?}: {e}")))?;
                    if !set.insert(vm.clone()) {
                        return Err(bad("vms", format!("{vm:?} is listed twice")));
                    }
                }
                Some(set)
            }
        };
        let nbdkit = file
            .nbdkit
            .clone()
            .unwrap_or_else(|| PathBuf::from("nbdkit"));
        if nbdkit.as_os_str().is_empty() {
            return Err(bad("nbdkit", "is empty".into()));
        }
        if let Some(dir) = &file.vddk_libdir
            && !dir.is_dir()
        {
            return Err(bad(
                "vddk_libdir",
                format!("{} is not a directory", dir.display()),
            ));
        }
        let keepalive = file.session_keepalive_secs.unwrap_or(300);
        if !(1..1800).contains(&keepalive) {
            return Err(bad(
                "session_keepalive_secs",
                format!("{keepalive} must be 1 to 1799 (vCenter ends sessions idle for 1800 s)"),
            ));
        }
        Ok(VsphereConfig {
            url,
            user,
            password: Secret::new(password),
            tls,
            quiesce: file.quiesce,
            vms,
            nbdkit,
            vddk_libdir: file.vddk_libdir.clone(),
            session_keepalive: std::time::Duration::from_secs(keepalive),
        })
    }
}

/// A SHA-256 certificate fingerprint, "AB:CD:..." (as browsers and vCenter show it) or plain
/// hex, 32 bytes.
pub fn parse_thumbprint(text: &str) -> Result<[u8; 32], String> {
    let hex: String = text
        .trim()
        .chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .collect();
    if hex.len() != 64 {
        return Err(format!(
            "{text:?}: expected 32 bytes as hex (64 digits, colons allowed), got {} digits",
            hex.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{text:?}: {:?} is not hex", &hex[2 * i..2 * i + 2]))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::token_file;
    use crate::config::{NodeConfig, ServeArgs};
    use std::path::Path;

    fn load_vsphere(dir: &Path, table: &str) -> Result<NodeConfig, ConfigError> {
        let cfg = dir.join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                "token_file = \"{}\"\n[qmp]\nkvm1 = \"/a\"\n[vsphere]\n{table}",
                token_file(dir).display()
            ),
        )
        .unwrap();
        NodeConfig::load(&ServeArgs {
            config: Some(cfg),
            ..Default::default()
        })
    }

    #[test]
    fn a_vsphere_section_is_checked_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret pass\n").unwrap();
        let pin = "ab:CD:".repeat(16);
        let c = load_vsphere(
            dir.path(),
            &format!(
                "url = \"https://127.0.0.1:8989/sdk\"\nuser = \"u@vsphere.local\"\npassword_file = \"{}\"\nthumbprint_sha256 = \"{}\"\nquiesce = true\nvms = [\"vm1\", \"web.2\"]\n",
                pw.display(),
                &pin[..pin.len() - 1]
            ),
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("***"),
            "{shown}"
        );
        let v = c.vsphere.unwrap();
        assert_eq!(v.url, "https://127.0.0.1:8989");
        assert_eq!(v.password.expose(), "s3cret pass");
        let mut want = [0u8; 32];
        for (i, b) in want.iter_mut().enumerate() {
            *b = if i % 2 == 0 { 0xab } else { 0xcd };
        }
        assert_eq!(v.tls, TlsPolicy::Pinned(want));
        assert!(v.quiesce);
        assert_eq!(v.nbdkit, PathBuf::from("nbdkit"));
        assert_eq!(v.session_keepalive, std::time::Duration::from_secs(300));
        assert_eq!(v.vms.unwrap().len(), 2);
        // Nothing about certificates: the system trust store, verification on.
        let c = load_vsphere(
            dir.path(),
            &format!(
                "url = \"https://vc.example/\"\nuser = \"u\"\npassword_file = \"{}\"\n",
                pw.display()
            ),
        )
        .unwrap();
        let v = c.vsphere.unwrap();
        assert_eq!(v.tls, TlsPolicy::System);
        assert!(!v.quiesce);
        assert_eq!(v.vms, None);
    }

    #[test]
    fn bad_vsphere_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "pw\n").unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let ok = format!(
            "url = \"https://vc\"\nuser = \"u\"\npassword_file = \"{}\"\n",
            pw.display()
        );
        let cases = [
            ("user = \"u\"\n".to_string(), "[vsphere] url: missing"),
            (ok.replace("https://vc", "http://vc"), "[vsphere] url"),
            (ok.replace("https://vc", "https://vc/x/y"), "without a path"),
            (ok.replace("user = \"u\"\n", ""), "[vsphere] user"),
            (
                ok.replace(&pw.display().to_string(), &empty.display().to_string()),
                "[vsphere] password_file",
            ),
            (
                ok.replace(&pw.display().to_string(), "/nonexistent/pw"),
                "/nonexistent/pw",
            ),
            (
                format!("{ok}thumbprint_sha256 = \"AB:CD\"\n"),
                "[vsphere] thumbprint_sha256",
            ),
            (
                format!("{ok}thumbprint_sha256 = \"{}\"\n", "zz".repeat(32)),
                "not hex",
            ),
            (
                format!("{ok}insecure = true\nca_file = \"{}\"\n", pw.display()),
                "at most one",
            ),
            (
                format!("{ok}ca_file = \"/nonexistent/ca.pem\"\n"),
                "[vsphere] ca_file",
            ),
            (format!("{ok}vms = [\"a/b\"]\n"), "[vsphere] vms"),
            (format!("{ok}vms = [\"kvm1\"]\n"), "also a QEMU VM"),
            (
                format!("{ok}vddk_libdir = \"/nonexistent\"\n"),
                "[vsphere] vddk_libdir",
            ),
            (format!("{ok}pasword = \"x\"\n"), "pasword"),
            (
                format!("{ok}session_keepalive_secs = 0\n"),
                "[vsphere] session_keepalive_secs: 0 must be 1 to 1799",
            ),
        ];
        for (table, want) in cases {
            let e = load_vsphere(dir.path(), &table).unwrap_err().to_string();
            assert!(e.contains(want), "{table}: {e}");
        }
    }
}
