//! What the tunnel needs to know: the hub's sshd (`USER@HOST:PORT`), the key and known_hosts
//! files, where the local forwards bind, and which ports are forwarded. Flags (each also an
//! environment variable) win over the `[tunnel]` table of the config file, which wins over the
//! defaults of the original deployment (port 443, NBD 10100-10200, hub API 8082, reverse 9081).
//!
//! ```toml
//! [tunnel]
//! target = "sendense@hub.example:443"
//! identity = "/etc/sendense/tunnel_ed25519"
//! known_hosts = "/etc/sendense/tunnel_known_hosts"
//! bind = "127.0.0.1"
//! nbd_ports = "10100-10200"
//! hub_api_port = 8082
//! reverse_port = 9081
//! ssh = "/usr/bin/ssh"
//! server_alive_interval = 15
//! server_alive_count_max = 3
//! ciphers = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"
//! retry_max_secs = 30   # longest wait between ssh attempts (e.g. after a squatter left a port)
//! ```
//!
//! The values flags hold are parsed in `target` ([`TunnelTarget`]) and `forwards` ([`PortRange`],
//! [`Forward`]).

use clap::Args;
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

mod forwards;
mod target;

pub use forwards::{Forward, PortRange, PortRangeError, reachable};
pub use target::TunnelTarget;

/// The hub's sshd port when `USER@HOST` gives none: the original deployment tunnels over 443.
pub const DEFAULT_SSH_PORT: u16 = 443;
/// The hub's NBD port range.
pub const DEFAULT_NBD_PORTS: PortRange = PortRange {
    first: 10100,
    last: 10200,
};
/// The hub's API port.
pub const DEFAULT_HUB_API_PORT: u16 = 8082;
/// The port on the hub's loopback that leads back to this node's API.
pub const DEFAULT_REVERSE_PORT: u16 = 9081;
/// ssh's cipher preference for the tunnel. One ssh process carries every disk of a backup and
/// encrypts on one core, so the cipher bounds the copy: AES-GCM (AES-NI on x86, the AES
/// extensions on ARM) ran faster than OpenSSH's default first choice, chacha20-poly1305, in
/// `bench/tunnel.sh` here (1 GiB, median of 3: 166 against 135 MiB/s, ssh and sshd sharing 2
/// cores); chacha20 stays as the fallback for hubs without AES-GCM.
pub const DEFAULT_CIPHERS: &str =
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com";

/// Tunnel flags of `sendense-node` (serve).
#[derive(Debug, Clone, Default, Args)]
pub struct TunnelArgs {
    /// Open an SSH tunnel to the hub's sshd, USER@HOST:PORT (port default 443).
    #[arg(long, value_name = "USER@HOST:PORT", env = "SENDENSE_NODE_TUNNEL")]
    pub tunnel: Option<String>,
    /// Private key of the tunnel (its .pub goes into the hub's authorized_keys).
    #[arg(long, value_name = "FILE", env = "SENDENSE_NODE_TUNNEL_IDENTITY")]
    pub tunnel_identity: Option<PathBuf>,
    /// known_hosts file holding the hub sshd's host key (checked strictly).
    #[arg(long, value_name = "FILE", env = "SENDENSE_NODE_TUNNEL_KNOWN_HOSTS")]
    pub tunnel_known_hosts: Option<PathBuf>,
    /// Local address the forwards listen on [default: 127.0.0.1].
    #[arg(long, value_name = "ADDR", env = "SENDENSE_NODE_TUNNEL_BIND")]
    pub tunnel_bind: Option<IpAddr>,
    /// The hub's NBD port range, forwarded port by port [default: 10100-10200].
    #[arg(
        long,
        value_name = "FIRST-LAST",
        env = "SENDENSE_NODE_TUNNEL_NBD_PORTS"
    )]
    pub tunnel_nbd_ports: Option<PortRange>,
    /// The hub's API port, forwarded [default: 8082].
    #[arg(long, value_name = "PORT", env = "SENDENSE_NODE_TUNNEL_HUB_API_PORT")]
    pub tunnel_hub_api_port: Option<u16>,
    /// Port on the hub's loopback forwarded back to this node's API [default: 9081].
    #[arg(long, value_name = "PORT", env = "SENDENSE_NODE_TUNNEL_REVERSE_PORT")]
    pub tunnel_reverse_port: Option<u16>,
}

/// The `[tunnel]` table of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelFile {
    pub target: Option<String>,
    pub identity: Option<PathBuf>,
    pub known_hosts: Option<PathBuf>,
    pub bind: Option<IpAddr>,
    pub nbd_ports: Option<String>,
    pub hub_api_port: Option<u16>,
    pub reverse_port: Option<u16>,
    pub ssh: Option<PathBuf>,
    pub server_alive_interval: Option<u32>,
    pub server_alive_count_max: Option<u32>,
    pub ciphers: Option<String>,
    /// Longest wait between two ssh attempts, seconds (default 30): how soon a tunnel comes
    /// back once a squatter left the port it held.
    pub retry_max_secs: Option<u64>,
}

/// Why the tunnel configuration was refused; each names the flag.
#[derive(Debug, Error)]
pub enum TunnelConfigError {
    #[error(
        "--tunnel {value:?}: {reason} (expected USER@HOST:PORT, e.g. sendense@hub.example:443)"
    )]
    Target { value: String, reason: &'static str },
    #[error("--tunnel needs --tunnel-identity FILE (the private key whose .pub the hub accepts)")]
    NoIdentity,
    #[error(
        "--tunnel needs --tunnel-known-hosts FILE (the hub sshd's host key; checking is strict)"
    )]
    NoKnownHosts,
    #[error("{flag} {path}: cannot read it")]
    Unreadable {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{flag} {path}: {reason}")]
    BadPath {
        flag: &'static str,
        path: PathBuf,
        reason: &'static str,
    },
    #[error("{flag}: {source}")]
    Ports {
        flag: &'static str,
        #[source]
        source: PortRangeError,
    },
    #[error("{flag} {port}: {reason}")]
    Port {
        flag: &'static str,
        port: u16,
        reason: String,
    },
    #[error("[tunnel] ciphers {value:?}: expected a comma-separated list of ssh cipher names")]
    Ciphers { value: String },
    #[error("{flag} is set but --tunnel is not: give --tunnel USER@HOST:PORT too")]
    WithoutTunnel { flag: &'static str },
}

/// Restart pacing: exponential from `initial`, capped, jittered; the count of failures starts
/// over once a run stayed up for `healthy_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub healthy_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
        }
    }
}

/// The merged tunnel configuration.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub target: TunnelTarget,
    pub identity: PathBuf,
    pub known_hosts: PathBuf,
    /// Where the local forwards listen (not the hub's own address when both share a machine).
    pub bind: IpAddr,
    pub nbd_ports: PortRange,
    pub hub_api_port: u16,
    pub reverse_port: u16,
    /// The node's API, where the reverse forward lands.
    pub node_api: SocketAddr,
    /// The `ssh` program.
    pub ssh: PathBuf,
    pub server_alive_interval: u32,
    pub server_alive_count_max: u32,
    /// ssh's `Ciphers` list.
    pub ciphers: String,
    /// Where the ssh config file is written.
    pub run_dir: PathBuf,
    /// Bound on the preflight TCP connect.
    pub preflight_timeout: Duration,
    /// From spawning ssh to all forwards established; past it the attempt counts as failed.
    pub up_timeout: Duration,
    pub backoff: BackoffPolicy,
}

impl TunnelConfig {
    /// Merges flags over the `[tunnel]` table; `Ok(None)` when no tunnel is configured.
    /// `listen` is the node's API address (the reverse forward's destination).
    pub fn resolve(
        args: &TunnelArgs,
        file: Option<&TunnelFile>,
        listen: SocketAddr,
        run_dir: &Path,
    ) -> Result<Option<TunnelConfig>, TunnelConfigError> {
        let empty = TunnelFile::default();
        let file = file.unwrap_or(&empty);
        let Some(target) = args.tunnel.clone().or_else(|| file.target.clone()) else {
            let stray = [
                ("--tunnel-identity", args.tunnel_identity.is_some()),
                ("--tunnel-known-hosts", args.tunnel_known_hosts.is_some()),
                ("--tunnel-bind", args.tunnel_bind.is_some()),
                ("--tunnel-nbd-ports", args.tunnel_nbd_ports.is_some()),
                ("--tunnel-hub-api-port", args.tunnel_hub_api_port.is_some()),
                ("--tunnel-reverse-port", args.tunnel_reverse_port.is_some()),
            ];
            if let Some((flag, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(TunnelConfigError::WithoutTunnel { flag });
            }
            return Ok(None);
        };
        let target: TunnelTarget = target.parse()?;
        let identity = args
            .tunnel_identity
            .clone()
            .or_else(|| file.identity.clone())
            .ok_or(TunnelConfigError::NoIdentity)?;
        check_file("--tunnel-identity", &identity)?;
        let known_hosts = args
            .tunnel_known_hosts
            .clone()
            .or_else(|| file.known_hosts.clone())
            .ok_or(TunnelConfigError::NoKnownHosts)?;
        check_file("--tunnel-known-hosts", &known_hosts)?;
        let nbd_ports = match (args.tunnel_nbd_ports, &file.nbd_ports) {
            (Some(r), _) => r,
            (None, Some(s)) => s.parse().map_err(|source| TunnelConfigError::Ports {
                flag: "nbd_ports",
                source,
            })?,
            (None, None) => DEFAULT_NBD_PORTS,
        };
        let hub_api_port = args
            .tunnel_hub_api_port
            .or(file.hub_api_port)
            .unwrap_or(DEFAULT_HUB_API_PORT);
        let reverse_port = args
            .tunnel_reverse_port
            .or(file.reverse_port)
            .unwrap_or(DEFAULT_REVERSE_PORT);
        for (flag, port) in [
            ("--tunnel-hub-api-port", hub_api_port),
            ("--tunnel-reverse-port", reverse_port),
        ] {
            if port == 0 {
                return Err(TunnelConfigError::Port {
                    flag,
                    port,
                    reason: "port 0 cannot be forwarded".into(),
                });
            }
        }
        if nbd_ports.contains(hub_api_port) {
            return Err(TunnelConfigError::Port {
                flag: "--tunnel-hub-api-port",
                port: hub_api_port,
                reason: format!("lies inside the NBD range {nbd_ports}"),
            });
        }
        let bind = args
            .tunnel_bind
            .or(file.bind)
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        Ok(Some(TunnelConfig {
            target,
            identity,
            known_hosts,
            bind,
            nbd_ports,
            hub_api_port,
            reverse_port,
            node_api: reachable(listen),
            ssh: file.ssh.clone().unwrap_or_else(|| PathBuf::from("ssh")),
            server_alive_interval: file.server_alive_interval.unwrap_or(15).max(1),
            server_alive_count_max: file.server_alive_count_max.unwrap_or(3).max(1),
            ciphers: match &file.ciphers {
                Some(c)
                    if !c.is_empty()
                        && c.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"@.,-+".contains(&b)) =>
                {
                    c.clone()
                }
                Some(c) => {
                    return Err(TunnelConfigError::Ciphers { value: c.clone() });
                }
                None => DEFAULT_CIPHERS.to_string(),
            },
            run_dir: run_dir.to_path_buf(),
            preflight_timeout: Duration::from_secs(5),
            up_timeout: Duration::from_secs(30),
            backoff: BackoffPolicy {
                max: file
                    .retry_max_secs
                    .map(|s| Duration::from_secs(s.max(1)))
                    .unwrap_or(BackoffPolicy::default().max),
                ..BackoffPolicy::default()
            },
        }))
    }

    /// The hub's API as this node reaches it: through the forward.
    pub fn hub_url(&self) -> String {
        format!("http://{}", SocketAddr::new(self.bind, self.hub_api_port))
    }

    /// This node's API as the hub reaches it: the reverse forward on the hub's loopback.
    pub fn node_url_at_hub(&self) -> String {
        format!("http://127.0.0.1:{}", self.reverse_port)
    }

    /// Every forward, as ssh spells them and the API lists them.
    pub fn forwards(&self) -> Vec<Forward> {
        let mut out: Vec<Forward> = self
            .nbd_ports
            .ports()
            .map(|p| Forward::local(self.bind, p))
            .collect();
        out.push(Forward::local(self.bind, self.hub_api_port));
        out.push(Forward::Remote {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.reverse_port),
            to: self.node_api,
        });
        out
    }
}

fn check_file(flag: &'static str, path: &Path) -> Result<(), TunnelConfigError> {
    let text = path.to_string_lossy();
    // The path goes into a double-quoted value of the ssh config file.
    if text.contains(['"', '\n', '\r']) {
        return Err(TunnelConfigError::BadPath {
            flag,
            path: path.to_path_buf(),
            reason: "must not contain '\"' or a line break",
        });
    }
    let meta = std::fs::metadata(path).map_err(|source| TunnelConfigError::Unreadable {
        flag,
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(TunnelConfigError::BadPath {
            flag,
            path: path.to_path_buf(),
            reason: "is not a regular file",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> (PathBuf, PathBuf) {
        let id = dir.join("id");
        let kh = dir.join("known_hosts");
        std::fs::write(&id, "key").unwrap();
        std::fs::write(&kh, "hosts").unwrap();
        (id, kh)
    }

    #[test]
    fn resolve_merges_flags_over_file_and_lists_forwards() {
        let dir = tempfile::tempdir().unwrap();
        let (id, kh) = files(dir.path());
        let file = TunnelFile {
            target: Some("a@b:1".into()),
            identity: Some(id.clone()),
            known_hosts: Some(kh.clone()),
            nbd_ports: Some("10100-10102".into()),
            reverse_port: Some(9999),
            ..Default::default()
        };
        let args = TunnelArgs {
            tunnel: Some("root@127.0.0.1:2222".into()),
            tunnel_bind: Some("127.0.0.2".parse().unwrap()),
            ..Default::default()
        };
        let c = TunnelConfig::resolve(
            &args,
            Some(&file),
            "0.0.0.0:8081".parse().unwrap(),
            dir.path(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.target.port, 2222);
        assert_eq!(c.hub_url(), "http://127.0.0.2:8082");
        assert_eq!(c.node_url_at_hub(), "http://127.0.0.1:9999");
        let fw: Vec<String> = c.forwards().iter().map(|f| f.to_string()).collect();
        assert_eq!(
            fw,
            [
                "L 127.0.0.2:10100 -> 127.0.0.1:10100",
                "L 127.0.0.2:10101 -> 127.0.0.1:10101",
                "L 127.0.0.2:10102 -> 127.0.0.1:10102",
                "L 127.0.0.2:8082 -> 127.0.0.1:8082",
                "R 127.0.0.1:9999 -> 127.0.0.1:8081",
            ]
        );
    }

    #[test]
    fn resolve_names_the_missing_or_wrong_flag() {
        let dir = tempfile::tempdir().unwrap();
        let (id, kh) = files(dir.path());
        let listen: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let full = TunnelArgs {
            tunnel: Some("u@h:22".into()),
            tunnel_identity: Some(id.clone()),
            tunnel_known_hosts: Some(kh.clone()),
            ..Default::default()
        };
        assert!(
            TunnelConfig::resolve(&TunnelArgs::default(), None, listen, dir.path())
                .unwrap()
                .is_none()
        );
        let cases = [
            (
                TunnelArgs {
                    tunnel_identity: None,
                    ..full.clone()
                },
                "--tunnel-identity",
            ),
            (
                TunnelArgs {
                    tunnel_known_hosts: None,
                    ..full.clone()
                },
                "--tunnel-known-hosts",
            ),
            (
                TunnelArgs {
                    tunnel_identity: Some(dir.path().join("nope")),
                    ..full.clone()
                },
                "nope",
            ),
            (
                TunnelArgs {
                    tunnel_hub_api_port: Some(10150),
                    ..full.clone()
                },
                "inside the NBD range",
            ),
            (
                TunnelArgs {
                    tunnel: None,
                    tunnel_bind: Some("127.0.0.2".parse().unwrap()),
                    ..Default::default()
                },
                "--tunnel-bind is set but --tunnel is not",
            ),
        ];
        for (args, want) in cases {
            let e = TunnelConfig::resolve(&args, None, listen, dir.path())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }
}
