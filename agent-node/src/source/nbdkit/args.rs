//! What one nbdkit serves and how it is told: the plugin (`curl` or `vddk`) with its
//! arguments, and the files of the run directory it uses. Secrets are referenced by file
//! (`+FILE`, a cookie script), never on the command line.

use super::FILE_PREFIX;
use std::path::PathBuf;

/// How nbdkit reaches the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plugin {
    /// The datastore's HTTPS file access with the session cookie.
    Curl {
        /// `https://host/folder/dir/name-flat.vmdk?dcPath=..&dsName=..`.
        url: String,
        /// The `Cookie` header value (`vmware_soap_session="..."`); goes into a 0600 file.
        cookie: String,
        /// Re-read the cookie file when this many seconds passed since it was last read
        /// (`cookie-script-renew`); `None`: read once at start.
        cookie_renew_secs: Option<u32>,
        /// A CA bundle, or the pinned server certificate (PEM).
        cainfo: Option<CaInfo>,
        /// `sslverify=false` (only when configured `insecure = true`).
        insecure: bool,
    },
    /// VMware's VDDK.
    Vddk(VddkArgs),
}

/// Where curl's trust anchors come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaInfo {
    /// An existing PEM file (the configured `ca_file`).
    File(PathBuf),
    /// PEM text to write into a file of the run directory (the pinned server certificate).
    Pem(String),
}

/// Arguments of the vddk plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VddkArgs {
    pub libdir: PathBuf,
    /// vCenter/ESXi host name (no scheme, no port).
    pub server: String,
    pub port: Option<u16>,
    pub user: String,
    /// Goes into a 0600 file (`password=+FILE`).
    pub password: String,
    /// The server certificate's SHA-1 thumbprint, colon-separated hex (VDDK's format).
    pub thumbprint: String,
    /// `vm-42`.
    pub vm_moref: String,
    /// `snapshot-43`.
    pub snapshot_moref: String,
    /// `[datastore1] vm1/vm1.vmdk`, as the snapshot's configuration names the disk.
    pub file: String,
}

/// What one nbdkit serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdkitSpec {
    /// `<run_dir>/nbdkit-<stem>.sock`; the pid file and secret files share the stem.
    pub run_dir: PathBuf,
    /// Unique per disk of a snapshot: `<backup id>-<disk key>`.
    pub stem: String,
    /// The NBD export name.
    pub export: String,
    pub plugin: Plugin,
}

impl NbdkitSpec {
    pub(super) fn path(&self, ext: &str) -> PathBuf {
        self.run_dir
            .join(format!("{FILE_PREFIX}{}.{ext}", self.stem))
    }
    pub fn socket(&self) -> PathBuf {
        self.path("sock")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.path("pid")
    }
    pub(super) fn cookie_file(&self) -> PathBuf {
        self.path("cookie")
    }
    pub(super) fn cookie_tmp(&self) -> PathBuf {
        self.path("cookie.tmp")
    }
    pub(super) fn password_file(&self) -> PathBuf {
        self.path("password")
    }
    pub(super) fn pem_file(&self) -> PathBuf {
        self.path("pem")
    }
    /// Every file this spec may create.
    pub(super) fn files(&self) -> [PathBuf; 6] {
        [
            self.socket(),
            self.pid_file(),
            self.cookie_file(),
            self.cookie_tmp(),
            self.password_file(),
            self.pem_file(),
        ]
    }
}

/// curl plugin: how often a failed read is retried, and how long apart (the `retry-request`
/// filter). Together they bridge about 10 s, longer than the cookie's renew interval at the
/// driver's default keepalive cap.
pub const READ_RETRIES: u32 = 5;
pub const READ_RETRY_DELAY_SECS: u32 = 2;

/// The arguments after the binary. Secrets are referenced by file (`+FILE`), never inline.
pub fn command_args(spec: &NbdkitSpec) -> Vec<String> {
    let mut args = vec![
        "--exit-with-parent".to_string(),
        "--foreground".to_string(),
        "--readonly".to_string(),
        "--unix".to_string(),
        spec.socket().to_string_lossy().into_owned(),
        "--exportname".to_string(),
        spec.export.clone(),
    ];
    match &spec.plugin {
        Plugin::Curl {
            url,
            cainfo,
            insecure,
            cookie_renew_secs,
            ..
        } => {
            // A failed read is tried again a few times before the copy sees EIO: an HTTP hiccup,
            // or a 401 between the end of a session and the renewed cookie, must not fail a
            // backup. Opening is not retried, so that a refused start is named at once.
            args.push("--filter=retry-request".into());
            args.push("curl".into());
            args.push(format!("url={url}"));
            args.push(format!("retry-request-retries={READ_RETRIES}"));
            args.push(format!("retry-request-delay={READ_RETRY_DELAY_SECS}"));
            args.push("retry-request-open=false".into());
            match cookie_renew_secs {
                Some(secs) => {
                    // A shell fragment: the path is quoted for /bin/sh.
                    args.push(format!(
                        "cookie-script=exec cat {}",
                        shell_quote(&spec.cookie_file().to_string_lossy())
                    ));
                    args.push(format!("cookie-script-renew={}", (*secs).max(1)));
                }
                None => args.push(format!("cookie=+{}", spec.cookie_file().display())),
            }
            // A redirect must not lead to another protocol (or to plain HTTP with the cookie).
            args.push("protocols=https".into());
            match cainfo {
                Some(CaInfo::File(p)) => args.push(format!("cainfo={}", p.display())),
                Some(CaInfo::Pem(_)) => args.push(format!("cainfo={}", spec.pem_file().display())),
                None => {}
            }
            if *insecure {
                args.push("sslverify=false".into());
            }
        }
        Plugin::Vddk(v) => {
            args.push("vddk".into());
            args.push(format!("libdir={}", v.libdir.display()));
            args.push(format!("server={}", v.server));
            if let Some(port) = v.port {
                args.push(format!("port={port}"));
            }
            args.push(format!("user={}", v.user));
            args.push(format!("password=+{}", spec.password_file().display()));
            args.push(format!("thumbprint={}", v.thumbprint));
            args.push(format!("vm=moref={}", v.vm_moref));
            args.push(format!("snapshot={}", v.snapshot_moref));
            // Advanced transports first where the host offers them; NBD(SSL) always works.
            args.push("transports=file:san:hotadd:nbdssl:nbd".into());
            args.push(format!("file={}", v.file));
        }
    }
    args
}

/// `'text'` for /bin/sh, a `'` inside written as `'\''`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(plugin: Plugin) -> NbdkitSpec {
        NbdkitSpec {
            run_dir: PathBuf::from("/run/sd"),
            stem: "b1-2000".into(),
            export: "vm1-disk-2000".into(),
            plugin,
        }
    }

    #[test]
    fn curl_arguments_keep_secrets_in_files() {
        let a = command_args(&spec(Plugin::Curl {
            url: "https://vc/folder/vm1/vm1-flat.vmdk?dcPath=DC0&dsName=LocalDS_0".into(),
            cookie: "vmware_soap_session=\"secret\"".into(),
            cookie_renew_secs: None,
            cainfo: Some(CaInfo::Pem("PEM".into())),
            insecure: false,
        }));
        assert_eq!(
            a,
            [
                "--exit-with-parent",
                "--foreground",
                "--readonly",
                "--unix",
                "/run/sd/nbdkit-b1-2000.sock",
                "--exportname",
                "vm1-disk-2000",
                "--filter=retry-request",
                "curl",
                "url=https://vc/folder/vm1/vm1-flat.vmdk?dcPath=DC0&dsName=LocalDS_0",
                "retry-request-retries=5",
                "retry-request-delay=2",
                "retry-request-open=false",
                "cookie=+/run/sd/nbdkit-b1-2000.cookie",
                "protocols=https",
                "cainfo=/run/sd/nbdkit-b1-2000.pem",
            ]
        );
        assert!(!a.iter().any(|x| x.contains("secret")));
        let a = command_args(&spec(Plugin::Curl {
            url: "https://vc/x".into(),
            cookie: "c".into(),
            cookie_renew_secs: None,
            cainfo: None,
            insecure: true,
        }));
        assert!(a.contains(&"sslverify=false".to_string()));
        assert!(!a.iter().any(|x| x.starts_with("cainfo")));
        let a = command_args(&spec(Plugin::Curl {
            url: "https://vc/x".into(),
            cookie: "c".into(),
            cookie_renew_secs: None,
            cainfo: Some(CaInfo::File("/etc/ca.pem".into())),
            insecure: false,
        }));
        assert!(a.contains(&"cainfo=/etc/ca.pem".to_string()));
        assert!(!a.iter().any(|x| x.starts_with("sslverify")));
        // Renewed: nbdkit runs `cat` on the file again, the path quoted for the shell.
        let mut s = spec(Plugin::Curl {
            url: "https://vc/x".into(),
            cookie: "c".into(),
            cookie_renew_secs: Some(7),
            cainfo: None,
            insecure: false,
        });
        s.run_dir = PathBuf::from("/run/it's here");
        let a = command_args(&s);
        assert!(
            a.contains(
                &r"cookie-script=exec cat '/run/it'\''s here/nbdkit-b1-2000.cookie'".to_string()
            ),
            "{a:?}"
        );
        assert!(a.contains(&"cookie-script-renew=7".to_string()), "{a:?}");
        assert!(!a.iter().any(|x| x.starts_with("cookie=")), "{a:?}");
    }

    #[test]
    fn vddk_arguments() {
        let a = command_args(&spec(Plugin::Vddk(VddkArgs {
            libdir: "/opt/vmware-vix-disklib-distrib".into(),
            server: "vcenter.example".into(),
            port: Some(8443),
            user: "backup@vsphere.local".into(),
            password: "hunter2".into(),
            thumbprint: "AA:BB".into(),
            vm_moref: "vm-42".into(),
            snapshot_moref: "snapshot-43".into(),
            file: "[datastore1] vm1/vm1.vmdk".into(),
        })));
        assert_eq!(
            a[7..],
            [
                "vddk",
                "libdir=/opt/vmware-vix-disklib-distrib",
                "server=vcenter.example",
                "port=8443",
                "user=backup@vsphere.local",
                "password=+/run/sd/nbdkit-b1-2000.password",
                "thumbprint=AA:BB",
                "vm=moref=vm-42",
                "snapshot=snapshot-43",
                "transports=file:san:hotadd:nbdssl:nbd",
                "file=[datastore1] vm1/vm1.vmdk",
            ]
        );
        assert!(!a.iter().any(|x| x.contains("hunter2")));
    }
}
