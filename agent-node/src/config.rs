//! The node's configuration: command-line flags (each also an environment variable) over a TOML
//! config file over defaults.
//!
//! ```toml
//! listen = "127.0.0.1:8081"
//! name = "node1"
//! hub_url = "http://127.0.0.1:8082"
//! token_file = "/etc/sendense/token"
//! # Where fleecing files, NBD sockets, journals and the QMP log live (QEMU must reach it).
//! run_dir = "/run/sendense-node"
//! # URL the hub calls this node on (default: http://<listen address>).
//! api_url = "http://127.0.0.1:8081"
//! [qmp]
//! pgtest1 = "/run/qemu/pgtest1.qmp"
//! # Optional: the SSH tunnel to the hub (see crate::tunnel::config for every key).
//! [tunnel]
//! target = "sendense@hub.example:443"
//! # Optional: VMs of a vCenter or ESXi (see [`VsphereFile`] for every key).
//! [vsphere]
//! url = "https://vcenter.example"
//! user = "backup@vsphere.local"
//! password_file = "/etc/sendense/vsphere-password"
//! thumbprint_sha256 = "AB:CD:..."   # or ca_file = "/etc/sendense/vcenter-ca.pem", or insecure = true
//! ```

use clap::Args;
use sendense_shared::names::validate_name;
use sendense_shared::token::Token;
use sendense_vsphere::{Secret, TlsPolicy};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Default API address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

/// Flags of `sendense-node` (serve).
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML config file (flags and environment win over it).
    #[arg(long, value_name = "FILE", env = "SENDENSE_NODE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the node's API [default: 127.0.0.1:8081].
    #[arg(long, value_name = "ADDR", env = "SENDENSE_NODE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Name of this node at the hub [default: the host name].
    #[arg(long, value_name = "NODE", env = "SENDENSE_NODE_NAME")]
    pub name: Option<String>,
    /// Hub to register with and report to, e.g. http://127.0.0.1:8082.
    #[arg(long, value_name = "URL", env = "SENDENSE_HUB_URL")]
    pub hub_url: Option<String>,
    /// File holding the bearer token shared with the hub.
    #[arg(long, value_name = "FILE", env = "SENDENSE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// A VM and its QMP socket, VM_NAME=QMP_SOCKET (repeatable).
    #[arg(
        long = "qmp",
        value_name = "VM_NAME=QMP_SOCKET",
        env = "SENDENSE_NODE_QMP",
        value_delimiter = ','
    )]
    pub qmp: Vec<String>,
    #[command(flatten)]
    pub tunnel: crate::tunnel::TunnelArgs,
}

/// The config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<SocketAddr>,
    pub name: Option<String>,
    pub hub_url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub api_url: Option<String>,
    #[serde(default)]
    pub qmp: BTreeMap<String, PathBuf>,
    pub tunnel: Option<crate::tunnel::TunnelFile>,
    pub vsphere: Option<VsphereFile>,
}

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

/// Why the configuration was refused; each names the flag or key.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("--qmp {value:?}: expected VM_NAME=QMP_SOCKET")]
    QmpShape { value: String },
    #[error("--qmp: VM {vm:?} is given twice")]
    QmpDuplicate { vm: String },
    #[error("VM name {vm:?}: {source}")]
    VmName {
        vm: String,
        #[source]
        source: sendense_shared::names::NameError,
    },
    #[error("--name {name:?}: {source}")]
    NodeName {
        name: String,
        #[source]
        source: sendense_shared::names::NameError,
    },
    #[error("--hub-url {url:?}: must start with http:// or https://")]
    HubUrl { url: String },
    #[error(
        "no token: pass --token-file FILE (or token_file in the config); the API needs a bearer token"
    )]
    NoToken,
    #[error("--token-file: {0}")]
    Token(#[from] sendense_shared::token::TokenError),
    #[error(transparent)]
    Tunnel(#[from] crate::tunnel::TunnelConfigError),
    #[error("[vsphere] {key}: {detail}")]
    Vsphere { key: &'static str, detail: String },
}

/// The merged configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    pub name: String,
    /// Without a trailing slash.
    pub hub_url: Option<String>,
    pub token: Token,
    pub run_dir: PathBuf,
    pub api_url: Option<String>,
    /// VM name → QMP socket.
    pub vms: BTreeMap<String, PathBuf>,
    /// The SSH tunnel to the hub, when configured. With it, `hub_url` and `api_url` default to
    /// the forwards (the hub's API on the bind address, this node at the hub's reverse port).
    pub tunnel: Option<crate::tunnel::TunnelConfig>,
    /// VMs of a vCenter or ESXi, when configured.
    pub vsphere: Option<VsphereConfig>,
}

impl NodeConfig {
    /// Merges flags (and environment, through clap) over the config file over defaults.
    pub fn load(args: &ServeArgs) -> Result<NodeConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => ConfigFile::default(),
        };
        let mut vms = BTreeMap::new();
        for (vm, sock) in &file.qmp {
            vms.insert(vm.clone(), sock.clone());
        }
        let mut from_flags = BTreeMap::new();
        for value in &args.qmp {
            let (vm, sock) = value
                .split_once('=')
                .filter(|(v, s)| !v.is_empty() && !s.is_empty())
                .ok_or_else(|| ConfigError::QmpShape {
                    value: value.clone(),
                })?;
            if from_flags
                .insert(vm.to_string(), PathBuf::from(sock))
                .is_some()
            {
                return Err(ConfigError::QmpDuplicate { vm: vm.to_string() });
            }
        }
        vms.extend(from_flags);
        for vm in vms.keys() {
            validate_name("vm name", vm).map_err(|source| ConfigError::VmName {
                vm: vm.clone(),
                source,
            })?;
        }
        let name = args.name.clone().or(file.name).unwrap_or_else(default_name);
        validate_name("node name", &name).map_err(|source| ConfigError::NodeName {
            name: name.clone(),
            source,
        })?;
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("default listen address"));
        let run_dir = file
            .run_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("sendense-node-{name}")));
        let tunnel = crate::tunnel::TunnelConfig::resolve(
            &args.tunnel,
            file.tunnel.as_ref(),
            listen,
            &run_dir,
        )?;
        let hub_url = match args
            .hub_url
            .clone()
            .or(file.hub_url)
            .or_else(|| tunnel.as_ref().map(|t| t.hub_url()))
        {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                Some(u.trim_end_matches('/').to_string())
            }
            Some(u) => return Err(ConfigError::HubUrl { url: u }),
            None => None,
        };
        let token_file = args
            .token_file
            .clone()
            .or(file.token_file)
            .ok_or(ConfigError::NoToken)?;
        let token = read_token(&token_file)?;
        let api_url = file
            .api_url
            .or_else(|| tunnel.as_ref().map(|t| t.node_url_at_hub()));
        let vsphere = file
            .vsphere
            .as_ref()
            .map(VsphereConfig::resolve)
            .transpose()?;
        if let Some(both) = vsphere
            .as_ref()
            .and_then(|v| v.vms.as_ref())
            .and_then(|list| list.iter().find(|vm| vms.contains_key(*vm)))
        {
            return Err(ConfigError::Vsphere {
                key: "vms",
                detail: format!(
                    "{both:?} is also a QEMU VM ([qmp] or --qmp); a VM name must be unique on a node"
                ),
            });
        }
        Ok(NodeConfig {
            listen,
            name,
            hub_url,
            token,
            run_dir,
            api_url,
            vms,
            tunnel,
            vsphere,
        })
    }
}

fn read_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Reads a token file: surrounding white space ignored; refused when empty or readable by
/// group or others (`sendense_shared::token::read_token_file`, the hub's reader too).
pub fn read_token(path: &Path) -> Result<Token, ConfigError> {
    Ok(sendense_shared::token::read_token_file(path)?)
}

fn default_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| validate_name("node name", s).is_ok())
        .unwrap_or_else(|| "node".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_file(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("token");
        std::fs::write(&p, "secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                "name = \"fromfile\"\nlisten = \"127.0.0.1:9000\"\ntoken_file = \"{}\"\n[qmp]\nvm1 = \"/a\"\nvm2 = \"/b\"\n",
                token_file(dir.path()).display()
            ),
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(cfg),
            name: Some("fromflag".into()),
            qmp: vec!["vm2=/c".into()],
            ..Default::default()
        };
        let c = NodeConfig::load(&args).unwrap();
        assert_eq!(c.name, "fromflag");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.token.as_str(), "secret");
        assert_eq!(c.vms["vm1"], PathBuf::from("/a"));
        assert_eq!(c.vms["vm2"], PathBuf::from("/c"));
    }

    #[test]
    fn bad_input_names_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let tf = token_file(dir.path());
        let base = ServeArgs {
            token_file: Some(tf),
            ..Default::default()
        };
        let cases: Vec<(ServeArgs, &str)> = vec![
            (
                ServeArgs {
                    qmp: vec!["novalue".into()],
                    ..base.clone()
                },
                "VM_NAME=QMP_SOCKET",
            ),
            (
                ServeArgs {
                    qmp: vec!["a=/x".into(), "a=/y".into()],
                    ..base.clone()
                },
                "twice",
            ),
            (
                ServeArgs {
                    qmp: vec!["../x=/y".into()],
                    ..base.clone()
                },
                "VM name",
            ),
            (
                ServeArgs {
                    hub_url: Some("127.0.0.1:8082".into()),
                    ..base.clone()
                },
                "--hub-url",
            ),
            (ServeArgs::default(), "--token-file"),
        ];
        for (args, want) in cases {
            let e = NodeConfig::load(&args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        let e = NodeConfig::load(&ServeArgs {
            config: Some(dir.path().join("missing.toml")),
            ..base
        })
        .unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
    }

    #[test]
    fn a_token_file_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tf = token_file(dir.path());
        std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = NodeConfig::load(&ServeArgs {
            token_file: Some(tf.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::Token(sendense_shared::token::TokenError::Permissions {
                    mode: 0o644,
                    ..
                })
            ),
            "{e:?}"
        );
        let shown = e.to_string();
        assert!(shown.starts_with("--token-file: token file "), "{shown}");
        assert!(
            shown.contains(&tf.display().to_string()) && shown.contains("0644"),
            "{shown}"
        );
    }

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

    #[test]
    fn a_tunnel_points_hub_and_api_urls_at_the_forwards() {
        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("id");
        let kh = dir.path().join("kh");
        std::fs::write(&id, "k").unwrap();
        std::fs::write(&kh, "h").unwrap();
        let args = ServeArgs {
            token_file: Some(token_file(dir.path())),
            tunnel: crate::tunnel::TunnelArgs {
                tunnel: Some("sendense@127.0.0.1:2222".into()),
                tunnel_identity: Some(id),
                tunnel_known_hosts: Some(kh),
                tunnel_bind: Some("127.0.0.2".parse().unwrap()),
                tunnel_reverse_port: Some(9999),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = NodeConfig::load(&args).unwrap();
        assert_eq!(c.hub_url.as_deref(), Some("http://127.0.0.2:8082"));
        assert_eq!(c.api_url.as_deref(), Some("http://127.0.0.1:9999"));
        assert_eq!(c.tunnel.unwrap().target.port, 2222);
    }
}
