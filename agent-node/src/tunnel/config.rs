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
//! nbd = "unix"                          # or "tcp" (a hub with nbd_listen = "tcp")
//! hub_nbd_dir = "/run/sendense-nbd"     # the hub's nbd_socket_dir
//! hub_api_port = 8082
//! reverse_port = 9081
//! ssh = "/usr/bin/ssh"
//! server_alive_interval = 15
//! server_alive_count_max = 3
//! ciphers = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"
//! retry_max_secs = 30   # longest wait between ssh attempts (e.g. after a squatter left a port)
//! links = 4             # ssh processes sharing the NBD forwards (1-16, at most one per slot)
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
/// The hub's socket directory of its exports: its default `nbd_socket_dir` (`<data>/nbd` of the
/// default data directory). deploy/README-sshd.md moves both to `/run/sendense-nbd`.
pub const DEFAULT_HUB_NBD_DIR: &str = "/var/lib/sendense-hub/nbd";
/// Directory of the local ends of the streamlocal forwards, inside the run directory.
pub const LOCAL_NBD_DIR: &str = "nbd";

/// How the hub's exports are forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NbdForwardMode {
    /// Streamlocal: `<run_dir>/nbd/<port>.sock` to `<hub_nbd_dir>/<port>.sock` (the default; a
    /// hub with `nbd_listen = "unix"`).
    Unix,
    /// TCP: `bind:port` to the hub's `127.0.0.1:port` (a hub with `nbd_listen = "tcp"`).
    Tcp,
}

/// Where the NBD forwards lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdForward {
    /// To the hub's export sockets in this directory.
    Unix { hub_dir: PathBuf },
    /// To the hub's TCP ports.
    Tcp,
}
/// The port on the hub's loopback that leads back to this node's API.
pub const DEFAULT_REVERSE_PORT: u16 = 9081;
/// ssh's cipher preference for the tunnel. Each ssh process (link) encrypts its disks in one
/// thread, so the cipher bounds the copy: AES-GCM (AES-NI on x86, the AES
/// extensions on ARM) ran faster than OpenSSH's default first choice, chacha20-poly1305, in
/// `bench/tunnel.sh` here (1 GiB, median of 3: 166 against 135 MiB/s, ssh and sshd sharing 2
/// cores); chacha20 stays as the fallback for hubs without AES-GCM.
pub const DEFAULT_CIPHERS: &str =
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com";

/// How many ssh processes ("links") share the NBD forwards by default: one per disk for a VM of
/// up to four disks (see [`TunnelConfig::links`] and the numbers in `crate::tunnel`).
pub const DEFAULT_LINKS: u16 = 4;
/// The most links a tunnel may have.
pub const MAX_LINKS: u16 = 16;

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
    /// How the hub's exports are forwarded: `unix` (streamlocal, to the hub's socket
    /// directory) or `tcp` (its NBD ports) [default: unix].
    #[arg(long, value_name = "unix|tcp", env = "SENDENSE_NODE_TUNNEL_NBD")]
    pub tunnel_nbd: Option<NbdForwardMode>,
    /// The hub's socket directory of its exports (its `nbd_socket_dir`)
    /// [default: /var/lib/sendense-hub/nbd].
    #[arg(long, value_name = "DIR", env = "SENDENSE_NODE_TUNNEL_HUB_NBD_DIR")]
    pub tunnel_hub_nbd_dir: Option<PathBuf>,
    /// The hub's API port, forwarded [default: 8082].
    #[arg(long, value_name = "PORT", env = "SENDENSE_NODE_TUNNEL_HUB_API_PORT")]
    pub tunnel_hub_api_port: Option<u16>,
    /// Port on the hub's loopback forwarded back to this node's API [default: 9081].
    #[arg(long, value_name = "PORT", env = "SENDENSE_NODE_TUNNEL_REVERSE_PORT")]
    pub tunnel_reverse_port: Option<u16>,
    /// ssh processes sharing the NBD forwards, slot by slot in turn; the first also carries
    /// the API forwards [default: 4].
    #[arg(long, value_name = "N", env = "SENDENSE_NODE_TUNNEL_LINKS")]
    pub tunnel_links: Option<u16>,
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
    pub nbd: Option<NbdForwardMode>,
    pub hub_nbd_dir: Option<PathBuf>,
    pub hub_api_port: Option<u16>,
    pub reverse_port: Option<u16>,
    pub ssh: Option<PathBuf>,
    pub server_alive_interval: Option<u32>,
    pub server_alive_count_max: Option<u32>,
    pub ciphers: Option<String>,
    /// Longest wait between two ssh attempts, seconds (default 30): how soon a tunnel comes
    /// back once a squatter left the port it held.
    pub retry_max_secs: Option<u64>,
    /// ssh processes sharing the NBD forwards (default 4).
    pub links: Option<u16>,
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
    #[error("--tunnel-links {links}: {reason}")]
    Links { links: u16, reason: String },
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
    /// Streamlocal forwards to the hub's export sockets, or TCP forwards to its ports.
    pub nbd_forward: NbdForward,
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
    /// ssh processes ("links"), each a connection of its own to the hub's sshd: link `k`
    /// carries the NBD slots `first + k`, `first + k + links`, ...; link 0 also the hub's API
    /// forward and the reverse forward. Several links spread the encryption of several disks
    /// over several cores.
    pub links: u16,
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
                ("--tunnel-nbd", args.tunnel_nbd.is_some()),
                ("--tunnel-hub-nbd-dir", args.tunnel_hub_nbd_dir.is_some()),
                ("--tunnel-hub-api-port", args.tunnel_hub_api_port.is_some()),
                ("--tunnel-reverse-port", args.tunnel_reverse_port.is_some()),
                ("--tunnel-links", args.tunnel_links.is_some()),
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
        let nbd_forward = match args.tunnel_nbd.or(file.nbd).unwrap_or(NbdForwardMode::Unix) {
            NbdForwardMode::Tcp => NbdForward::Tcp,
            NbdForwardMode::Unix => {
                let hub_dir = args
                    .tunnel_hub_nbd_dir
                    .clone()
                    .or_else(|| file.hub_nbd_dir.clone())
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_HUB_NBD_DIR));
                check_socket_dir("--tunnel-hub-nbd-dir", &hub_dir, nbd_ports, true)?;
                check_socket_dir("run_dir", &run_dir.join(LOCAL_NBD_DIR), nbd_ports, false)?;
                NbdForward::Unix { hub_dir }
            }
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
        let links = args.tunnel_links.or(file.links).unwrap_or(DEFAULT_LINKS);
        if links == 0 || links > MAX_LINKS {
            return Err(TunnelConfigError::Links {
                links,
                reason: format!("expected 1 to {MAX_LINKS} ssh processes"),
            });
        }
        // More links than slots would leave a link without an NBD forward: the extra ones are
        // dropped (a one-slot range runs one ssh).
        let links = links.min(u16::try_from(nbd_ports.len()).unwrap_or(u16::MAX));
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
            nbd_forward,
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
            links,
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

    /// The hub's socket directory when the exports are forwarded as unix sockets.
    pub fn nbd_unix(&self) -> Option<&Path> {
        match &self.nbd_forward {
            NbdForward::Unix { hub_dir } => Some(hub_dir),
            NbdForward::Tcp => None,
        }
    }

    /// The directory of the forwards' local sockets: `<run_dir>/nbd` (0700).
    pub fn local_nbd_dir(&self) -> PathBuf {
        self.run_dir.join(LOCAL_NBD_DIR)
    }

    /// The link (ssh process) that carries NBD slot `port` of the range.
    pub fn link_of_slot(&self, port: u16) -> usize {
        usize::from(port.saturating_sub(self.nbd_ports.first) % self.links.max(1))
    }

    /// The NBD slots link `link` carries, ascending.
    pub fn link_slots(&self, link: usize) -> Vec<u16> {
        self.nbd_ports
            .ports()
            .filter(|p| self.link_of_slot(*p) == link)
            .collect()
    }

    /// The forwards of link `link`: its NBD slots and, on link 0, the API forwards (in the
    /// order of [`TunnelConfig::forwards`]).
    pub fn link_forwards(&self, link: usize) -> Vec<Forward> {
        let slots = self.nbd_ports.len();
        self.forwards()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| {
                if *i < slots {
                    let port = self.nbd_ports.first + u16::try_from(*i).unwrap_or(0);
                    self.link_of_slot(port) == link
                } else {
                    link == 0
                }
            })
            .map(|(_, f)| f)
            .collect()
    }

    /// Every forward, as ssh spells them and the API lists them.
    pub fn forwards(&self) -> Vec<Forward> {
        let mut out: Vec<Forward> = match self.nbd_unix() {
            Some(hub_dir) => self
                .nbd_ports
                .ports()
                .map(|p| Forward::LocalUnix {
                    listen: self.local_nbd_dir().join(format!("{p}.sock")),
                    to: hub_dir.join(format!("{p}.sock")),
                })
                .collect(),
            None => self
                .nbd_ports
                .ports()
                .map(|p| Forward::local(self.bind, p))
                .collect(),
        };
        out.push(Forward::local(self.bind, self.hub_api_port));
        out.push(Forward::Remote {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.reverse_port),
            to: self.node_api,
        });
        out
    }
}

/// A directory whose `<port>.sock` names go into the ssh config (unquoted: ssh splits
/// `LocalForward` at spaces) and must fit `sun_path`.
fn check_socket_dir(
    flag: &'static str,
    dir: &Path,
    ports: PortRange,
    absolute: bool,
) -> Result<(), TunnelConfigError> {
    let bad = |reason| {
        Err(TunnelConfigError::BadPath {
            flag,
            path: dir.to_path_buf(),
            reason,
        })
    };
    let text = dir.to_string_lossy();
    if absolute && !dir.is_absolute() {
        return bad("must be an absolute path");
    }
    if text.contains(|c: char| c.is_whitespace() || c.is_control() || "\"',?&[]".contains(c)) {
        return bad(
            "must not contain spaces, quotes, brackets, ',', '?', '&' or control characters",
        );
    }
    let longest = dir.join(format!("{}.sock", ports.last));
    if longest.as_os_str().len() > sendense_shared::targets::MAX_SOCKET_PATH {
        return bad("is too long for a unix socket path (<dir>/<port>.sock must fit 107 bytes)");
    }
    Ok(())
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
    fn nbd_exports_are_forwarded_as_unix_sockets_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let (id, kh) = files(dir.path());
        let args = TunnelArgs {
            tunnel: Some("u@h:22".into()),
            tunnel_identity: Some(id),
            tunnel_known_hosts: Some(kh),
            tunnel_nbd_ports: Some("10100-10101".parse().unwrap()),
            ..Default::default()
        };
        let listen = "127.0.0.1:8081".parse().unwrap();
        let run = Path::new("/run/sendense-node");
        let c = TunnelConfig::resolve(&args, None, listen, run)
            .unwrap()
            .unwrap();
        let fw: Vec<String> = c.forwards().iter().map(|f| f.to_string()).collect();
        assert_eq!(
            fw[..2],
            [
                "L /run/sendense-node/nbd/10100.sock -> /var/lib/sendense-hub/nbd/10100.sock",
                "L /run/sendense-node/nbd/10101.sock -> /var/lib/sendense-hub/nbd/10101.sock",
            ]
        );
        assert_eq!(fw.len(), 4, "{fw:?}");
        let other = TunnelArgs {
            tunnel_hub_nbd_dir: Some("/run/sendense-nbd".into()),
            ..args.clone()
        };
        let c = TunnelConfig::resolve(&other, None, listen, run)
            .unwrap()
            .unwrap();
        assert_eq!(c.nbd_unix(), Some(Path::new("/run/sendense-nbd")));
        for (dir, want) in [
            ("relative/nbd", "absolute"),
            ("/with space", "spaces"),
            (&*format!("/{}", "x".repeat(100)), "too long"),
        ] {
            let bad = TunnelArgs {
                tunnel_hub_nbd_dir: Some(dir.into()),
                ..args.clone()
            };
            let e = TunnelConfig::resolve(&bad, None, listen, run)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(want) && e.contains("--tunnel-hub-nbd-dir"),
                "{e}"
            );
        }
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
            nbd: Some(NbdForwardMode::Tcp),
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
    fn links_default_to_four_at_most_one_per_slot_and_split_the_slots_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        let (id, kh) = files(dir.path());
        let listen: SocketAddr = "127.0.0.1:8081".parse().unwrap();
        let args = TunnelArgs {
            tunnel: Some("u@h:22".into()),
            tunnel_identity: Some(id),
            tunnel_known_hosts: Some(kh),
            tunnel_nbd: Some(NbdForwardMode::Tcp),
            ..Default::default()
        };
        let c = TunnelConfig::resolve(&args, None, listen, dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(c.links, DEFAULT_LINKS);
        assert_eq!(c.link_slots(1).len(), 25, "101 slots over 4 links");
        assert_eq!(c.link_slots(0)[..3], [10100, 10104, 10108]);
        assert_eq!(c.link_of_slot(10103), 3);
        // Link 0: its 26 slots and the API forwards; the others their slots only.
        let zero: Vec<String> = c.link_forwards(0).iter().map(|f| f.to_string()).collect();
        assert_eq!(zero.len(), 28);
        assert_eq!(zero[26], "L 127.0.0.1:8082 -> 127.0.0.1:8082");
        assert!(zero[27].starts_with("R 127.0.0.1:9081"));
        let all: usize = (0..4).map(|k| c.link_forwards(k).len()).sum();
        assert_eq!(all, c.forwards().len());
        // Fewer slots than links: one link per slot.
        let small = TunnelArgs {
            tunnel_nbd_ports: Some("10100-10101".parse().unwrap()),
            ..args.clone()
        };
        let c = TunnelConfig::resolve(&small, None, listen, dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(c.links, 2);
        let file = TunnelFile {
            links: Some(1),
            ..Default::default()
        };
        let c = TunnelConfig::resolve(&args, Some(&file), listen, dir.path())
            .unwrap()
            .unwrap();
        assert_eq!((c.links, c.link_forwards(0).len()), (1, c.forwards().len()));
        for bad in [0, MAX_LINKS + 1] {
            let a = TunnelArgs {
                tunnel_links: Some(bad),
                ..args.clone()
            };
            let e = TunnelConfig::resolve(&a, None, listen, dir.path())
                .unwrap_err()
                .to_string();
            assert!(e.contains("--tunnel-links") && e.contains("1 to 16"), "{e}");
        }
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
