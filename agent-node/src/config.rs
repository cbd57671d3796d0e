//! The node's configuration: command-line flags (each also an environment variable) over a TOML
//! config file over defaults.
//!
//! ```toml
//! listen = "127.0.0.1:8081"
//! name = "node1"
//! hub_url = "http://127.0.0.1:8082"
//! token_file = "/etc/sendense/token"       # this node's credential: `sendense-hub node enroll NAME`
//! # Where fleecing files, NBD sockets, journals and the QMP log live (QEMU must reach it).
//! run_dir = "/run/sendense-node"
//! # Where instant recoveries put their overlays (the recovered disks) unless the request names
//! # a directory: a disk, not the tmpfs /run usually is [default: <run_dir>/recoveries].
//! recovery_dir = "/var/lib/sendense-node/recoveries"
//! # URL the hub calls this node on (default: http://<listen address>).
//! api_url = "http://127.0.0.1:8081"
//! # Bound of each guest agent command (connect + sync, freeze, thaw), seconds.
//! guest_agent_timeout_secs = 10
//! [qmp]
//! pgtest1 = "/run/qemu/pgtest1.qmp"
//! # Optional, per QEMU VM: its guest agent channel, the unix socket of QEMU's
//! # `-chardev socket,path=...,server=on` behind `virtserialport,name=org.qemu.guest_agent.0`.
//! # A VM with one has its file systems frozen for the snapshot (application-consistent).
//! [qga]
//! pgtest1 = "/run/qemu/pgtest1.qga"
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
//!
//! The `[vsphere]` table and its checks are in `vsphere`.

use clap::Args;
use sendense_shared::names::validate_name;
use sendense_shared::token::Token;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use thiserror::Error;

mod vsphere;

pub use vsphere::{VsphereConfig, VsphereFile, parse_thumbprint};

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
    /// File holding this node's credential, issued by `sendense-hub node enroll NAME` (mode
    /// 0600; refused when group or others may read it): the node presents it to the hub, and
    /// its own API accepts it (the hub calls the node with it).
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
    /// A VM's guest agent channel, VM_NAME=SOCKET (the unix socket of its
    /// `org.qemu.guest_agent.0` port; repeatable): its file systems are frozen for snapshots.
    #[arg(
        long = "qga",
        value_name = "VM_NAME=SOCKET",
        env = "SENDENSE_NODE_QGA",
        value_delimiter = ','
    )]
    pub qga: Vec<String>,
    /// Bound of each guest agent command (connect, freeze, thaw) in seconds [default: 10].
    #[arg(long, value_name = "SECS", env = "SENDENSE_NODE_GUEST_AGENT_TIMEOUT")]
    pub guest_agent_timeout: Option<u64>,
    /// Directory of instant recoveries' overlays (the recovered VMs' disks) when a request
    /// names none; created 0700 when a recovery first needs it. Put it on a disk: the run
    /// directory is often a tmpfs [default: <run dir>/recoveries].
    #[arg(long, value_name = "DIR", env = "SENDENSE_NODE_RECOVERY_DIR")]
    pub recovery_dir: Option<PathBuf>,
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
    pub recovery_dir: Option<PathBuf>,
    pub api_url: Option<String>,
    #[serde(default)]
    pub qmp: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub qga: BTreeMap<String, PathBuf>,
    pub guest_agent_timeout_secs: Option<u64>,
    pub tunnel: Option<crate::tunnel::TunnelFile>,
    pub vsphere: Option<VsphereFile>,
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
    #[error("--qga {value:?}: expected VM_NAME=SOCKET")]
    QgaShape { value: String },
    #[error("--qga / [qga]: VM {vm:?} has no QMP socket ([qmp] or --qmp)")]
    QgaUnknownVm { vm: String },
    #[error("--guest-agent-timeout: must be at least 1 second")]
    AgentTimeout,
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
    #[error("--recovery-dir {dir:?}: must be an absolute path")]
    RecoveryDir { dir: PathBuf },
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
    /// Where instant recoveries' overlays go unless a request names a directory.
    pub recovery_dir: PathBuf,
    pub api_url: Option<String>,
    /// VM name → QMP socket.
    pub vms: BTreeMap<String, PathBuf>,
    /// VM name → guest agent socket (a subset of `vms`' names).
    pub guest_agents: BTreeMap<String, PathBuf>,
    /// Bound of each guest agent command.
    pub guest_agent_timeout: std::time::Duration,
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
        let mut guest_agents = file.qga.clone();
        for value in &args.qga {
            let (vm, sock) = value
                .split_once('=')
                .filter(|(v, s)| !v.is_empty() && !s.is_empty())
                .ok_or_else(|| ConfigError::QgaShape {
                    value: value.clone(),
                })?;
            guest_agents.insert(vm.to_string(), PathBuf::from(sock));
        }
        if let Some(vm) = guest_agents.keys().find(|vm| !vms.contains_key(*vm)) {
            return Err(ConfigError::QgaUnknownVm { vm: vm.clone() });
        }
        let guest_agent_timeout = match args.guest_agent_timeout.or(file.guest_agent_timeout_secs) {
            Some(0) => return Err(ConfigError::AgentTimeout),
            Some(s) => std::time::Duration::from_secs(s),
            None => crate::source::qemu::DEFAULT_AGENT_TIMEOUT,
        };
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
            .unwrap_or_else(|| default_run_dir(&name));
        let recovery_dir = args
            .recovery_dir
            .clone()
            .or(file.recovery_dir.clone())
            .unwrap_or_else(|| run_dir.join("recoveries"));
        if !recovery_dir.is_absolute() {
            return Err(ConfigError::RecoveryDir { dir: recovery_dir });
        }
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
            recovery_dir,
            api_url,
            vms,
            guest_agents,
            guest_agent_timeout,
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

/// `/run/sendense-node/<name>` for root (not the shared `/tmp`, where any user could create
/// the directory first), else `$XDG_RUNTIME_DIR/sendense-node-<name>`, else the temporary
/// directory; wherever it is, the daemon refuses it when another user owns it or may write
/// into it.
fn default_run_dir(name: &str) -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/sendense-node").join(name);
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("sendense-node-{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn token_file(dir: &Path) -> PathBuf {
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
    fn the_recovery_dir_defaults_to_the_run_dirs_and_must_be_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                "token_file = \"{}\"\nrun_dir = \"/run/n1\"\n",
                token_file(dir.path()).display()
            ),
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(cfg.clone()),
            ..Default::default()
        };
        let c = NodeConfig::load(&args).unwrap();
        assert_eq!(c.recovery_dir, PathBuf::from("/run/n1/recoveries"));
        std::fs::write(
            &cfg,
            format!(
                "token_file = \"{}\"\nrecovery_dir = \"/data/rec\"\n",
                token_file(dir.path()).display()
            ),
        )
        .unwrap();
        assert_eq!(
            NodeConfig::load(&args).unwrap().recovery_dir,
            PathBuf::from("/data/rec")
        );
        let flag = ServeArgs {
            recovery_dir: Some("/disk/r".into()),
            ..args.clone()
        };
        assert_eq!(
            NodeConfig::load(&flag).unwrap().recovery_dir,
            PathBuf::from("/disk/r")
        );
        let e = NodeConfig::load(&ServeArgs {
            recovery_dir: Some("rel".into()),
            ..args
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("--recovery-dir"), "{e}");
    }

    #[test]
    fn guest_agent_channels_per_vm_and_their_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                "token_file = \"{}\"\nguest_agent_timeout_secs = 4\n[qmp]\nvm1 = \"/a\"\nvm2 = \"/b\"\n[qga]\nvm1 = \"/a.qga\"\n",
                token_file(dir.path()).display()
            ),
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(cfg.clone()),
            qga: vec!["vm2=/b.qga".into()],
            ..Default::default()
        };
        let c = NodeConfig::load(&args).unwrap();
        assert_eq!(c.guest_agents["vm1"], PathBuf::from("/a.qga"));
        assert_eq!(c.guest_agents["vm2"], PathBuf::from("/b.qga"));
        assert_eq!(c.guest_agent_timeout, std::time::Duration::from_secs(4));
        let without = NodeConfig::load(&ServeArgs {
            token_file: Some(token_file(dir.path())),
            qmp: vec!["vm1=/a".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(without.guest_agents.is_empty());
        assert_eq!(
            without.guest_agent_timeout,
            std::time::Duration::from_secs(10)
        );
        for (qga, timeout, want) in [
            ("vm3=/c.qga", None, "VM \"vm3\" has no QMP socket"),
            ("novalue", None, "VM_NAME=SOCKET"),
            ("vm1=/a.qga", Some(0), "--guest-agent-timeout"),
        ] {
            let e = NodeConfig::load(&ServeArgs {
                config: Some(cfg.clone()),
                qga: vec![qga.into()],
                guest_agent_timeout: timeout,
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{qga}: {e}");
        }
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
