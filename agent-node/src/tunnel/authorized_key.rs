//! `sendense-node tunnel authorized-key`: the line the hub's tunnel user puts into its
//! `authorized_keys`, so that the node's key can do exactly what the tunnel needs and nothing
//! else. Per sshd(8) (OpenSSH 9.2, AUTHORIZED_KEYS FILE FORMAT): `restrict` turns off every
//! forwarding, the PTY, the agent, X11 and `~/.ssh/rc`; `port-forwarding` turns TCP forwarding
//! back on; each `permitopen="host:port"` allows one `-L` destination and `permitlisten=
//! "host:port"` one `-R` listen address. `restrict` does not stop a login from running a
//! command without a PTY: the hub's sshd config adds `ForceCommand /usr/sbin/nologin` (and
//! `PermitTTY no`) for the tunnel user, see `deploy/README-sshd.md`; the tunnel itself runs `-N`.
//!
//! **Streamlocal forwards and `permitopen`.** `port-forwarding` also turns on `-L` to unix
//! sockets (sshd gates them with the same key flag plus the server's
//! `AllowStreamLocalForwarding`). Once a key has any `permitopen`, OpenSSH 9.2 checks a unix
//! socket target against the same list (`channel_connect_to_path`: a path matches an entry
//! whose host is that path and whose port is `*`), so every other path is "denied". An entry
//! for a path is written in brackets, `permitopen="[/run/sendense-nbd/10100.sock]:*"`, as
//! `hpdelim2` would otherwise split the path at its first `/`. Tried against this sshd: the
//! listed socket opens, an unlisted one in the same directory is refused. So with `--nbd unix`
//! (the default) the line lists one socket per slot and the API's port, and no NBD port: the
//! key reaches nothing else of the hub. Beneath it, sshd opens the socket as the tunnel user
//! (file modes: the hub's socket directory is 0750 with that user's group, its data directory
//! 0700), and each export still requires the job's TLS client certificate (its authz).

use super::config::{
    DEFAULT_HUB_API_PORT, DEFAULT_HUB_NBD_DIR, DEFAULT_NBD_PORTS, DEFAULT_REVERSE_PORT,
    NbdForwardMode, PortRange,
};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The comment that ends the line, so an operator can find it in `authorized_keys`.
pub const COMMENT: &str = "sendense-node";

/// `sendense-node tunnel ...`.
#[derive(Debug, Subcommand)]
pub enum TunnelCommand {
    /// Print the restricted authorized_keys line for the hub's tunnel user.
    AuthorizedKey(AuthorizedKeyArgs),
}

/// Options of `sendense-node tunnel authorized-key`.
#[derive(Debug, Clone, Args)]
pub struct AuthorizedKeyArgs {
    /// The tunnel's private key; its public half is read from FILE.pub.
    #[arg(long, value_name = "FILE", env = "SENDENSE_NODE_TUNNEL_IDENTITY")]
    pub tunnel_identity: PathBuf,
    /// The hub's NBD port range.
    #[arg(long, value_name = "FIRST-LAST", default_value_t = DEFAULT_NBD_PORTS)]
    pub nbd_ports: PortRange,
    /// The hub's API port.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_HUB_API_PORT)]
    pub hub_api_port: u16,
    /// The port on the hub's loopback that leads back to the node's API.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_REVERSE_PORT)]
    pub reverse_port: u16,
    /// How the node forwards the exports (its `[tunnel] nbd`): `unix` needs no NBD port in the
    /// line, `tcp` one `permitopen` per NBD port.
    #[arg(long, value_name = "unix|tcp", default_value = "unix")]
    pub nbd: NbdForwardMode,
    /// The hub's socket directory of its exports (its `nbd_socket_dir`), with `--nbd unix`.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_HUB_NBD_DIR)]
    pub hub_nbd_dir: PathBuf,
}

/// Which NBD destinations the line permits.
#[derive(Debug, Clone)]
pub enum NbdPermits {
    /// One `permitopen="127.0.0.1:PORT"` per port.
    Tcp(PortRange),
    /// One `permitopen="[DIR/PORT.sock]:*"` per slot.
    Unix { dir: PathBuf, ports: PortRange },
}

/// Why no line could be printed.
#[derive(Debug, Error)]
pub enum AuthorizedKeyError {
    #[error("reading the public key {path} (the .pub next to --tunnel-identity)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an OpenSSH public key: {reason}")]
    NotAKey { path: PathBuf, reason: &'static str },
    #[error("--hub-api-port {port} lies inside --nbd-ports {range}")]
    Overlap { port: u16, range: PortRange },
    #[error("--hub-nbd-dir {}: must be absolute, without spaces, quotes or brackets", dir.display())]
    BadDir { dir: PathBuf },
}

/// The public key of `identity`: `identity.pub`, or `identity` itself when it is the `.pub`.
pub fn read_public_key(identity: &Path) -> Result<String, AuthorizedKeyError> {
    let path = if identity.extension().is_some_and(|e| e == "pub") {
        identity.to_path_buf()
    } else {
        let mut p = identity.as_os_str().to_owned();
        p.push(".pub");
        PathBuf::from(p)
    };
    let text = std::fs::read_to_string(&path).map_err(|source| AuthorizedKeyError::Read {
        path: path.clone(),
        source,
    })?;
    let not = |reason| AuthorizedKeyError::NotAKey {
        path: path.clone(),
        reason,
    };
    let mut words = text.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err(not("expected \"TYPE BASE64 [COMMENT]\""));
    };
    let known_kind = kind.starts_with("ssh-")
        || kind.starts_with("ecdsa-sha2-")
        || kind.starts_with("sk-ssh-")
        || kind.starts_with("sk-ecdsa-");
    if !known_kind {
        return Err(not(
            "unknown key type (expected ssh-ed25519, ssh-rsa, ecdsa-sha2-...)",
        ));
    }
    if !blob
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
    {
        return Err(not("the key is not base64"));
    }
    Ok(format!("{kind} {blob}"))
}

/// `restrict,port-forwarding,permitopen="127.0.0.1:10100",...,permitopen="127.0.0.1:8082",
/// permitlisten="127.0.0.1:9081" ssh-ed25519 AAAA... sendense-node` for TCP exports; for unix
/// ones `permitopen="[/run/sendense-nbd/10100.sock]:*",...` instead of the NBD ports.
pub fn line(
    public_key: &str,
    nbd: &NbdPermits,
    hub_api_port: u16,
    reverse_port: u16,
) -> Result<String, AuthorizedKeyError> {
    let mut options = vec!["restrict".to_string(), "port-forwarding".to_string()];
    match nbd {
        NbdPermits::Tcp(ports) | NbdPermits::Unix { ports, .. } if ports.contains(hub_api_port) => {
            return Err(AuthorizedKeyError::Overlap {
                port: hub_api_port,
                range: *ports,
            });
        }
        NbdPermits::Tcp(ports) => options.extend(
            ports
                .ports()
                .map(|p| format!("permitopen=\"127.0.0.1:{p}\"")),
        ),
        NbdPermits::Unix { dir, ports } => {
            let text = dir.to_string_lossy();
            if !dir.is_absolute()
                || text
                    .contains(|c: char| c.is_whitespace() || c.is_control() || "\"[],".contains(c))
            {
                return Err(AuthorizedKeyError::BadDir { dir: dir.clone() });
            }
            options.extend(ports.ports().map(|p| {
                format!(
                    "permitopen=\"[{}]:*\"",
                    dir.join(format!("{p}.sock")).display()
                )
            }));
        }
    }
    options.push(format!("permitopen=\"127.0.0.1:{hub_api_port}\""));
    options.push(format!("permitlisten=\"127.0.0.1:{reverse_port}\""));
    Ok(format!("{} {public_key} {COMMENT}", options.join(",")))
}

/// Runs the subcommand: prints the line on stdout.
pub fn run_cli(cmd: TunnelCommand) -> anyhow::Result<()> {
    match cmd {
        TunnelCommand::AuthorizedKey(a) => {
            let key = read_public_key(&a.tunnel_identity)?;
            let nbd = match a.nbd {
                NbdForwardMode::Tcp => NbdPermits::Tcp(a.nbd_ports),
                NbdForwardMode::Unix => NbdPermits::Unix {
                    dir: a.hub_nbd_dir,
                    ports: a.nbd_ports,
                },
            };
            println!("{}", line(&key, &nbd, a.hub_api_port, a.reverse_port)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEv0c1Xw3q0Ew2s9m7dQ1mQ8kq2m1M3wHZ7dQm0Vq3cF";

    #[test]
    fn line_permits_exactly_the_forwarded_ports() {
        let tcp = |r: &str| NbdPermits::Tcp(r.parse().unwrap());
        let l = line(KEY, &tcp("10100-10102"), 8082, 9081).unwrap();
        assert_eq!(
            l,
            format!(
                "restrict,port-forwarding,permitopen=\"127.0.0.1:10100\",\
                 permitopen=\"127.0.0.1:10101\",permitopen=\"127.0.0.1:10102\",\
                 permitopen=\"127.0.0.1:8082\",permitlisten=\"127.0.0.1:9081\" {KEY} sendense-node"
            )
        );
        let full = line(KEY, &NbdPermits::Tcp(DEFAULT_NBD_PORTS), 8082, 9081).unwrap();
        assert_eq!(full.matches("permitopen=").count(), 102);
        assert!(full.contains("permitopen=\"127.0.0.1:10200\""));
        assert!(!full.contains("10201"));
        assert!(line(KEY, &NbdPermits::Tcp(DEFAULT_NBD_PORTS), 10150, 9081).is_err());
        // Unix exports: one socket per slot, no NBD port over TCP.
        let unix = |dir: &str| NbdPermits::Unix {
            dir: dir.into(),
            ports: "10100-10101".parse().unwrap(),
        };
        assert_eq!(
            line(KEY, &unix("/run/sendense-nbd"), 8082, 9081).unwrap(),
            format!(
                "restrict,port-forwarding,permitopen=\"[/run/sendense-nbd/10100.sock]:*\",\
                 permitopen=\"[/run/sendense-nbd/10101.sock]:*\",\
                 permitopen=\"127.0.0.1:8082\",permitlisten=\"127.0.0.1:9081\" {KEY} sendense-node"
            )
        );
        for bad in ["rel", "/a b", "/a]b", "/a\"b"] {
            assert!(line(KEY, &unix(bad), 8082, 9081).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_the_pub_next_to_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("id_ed25519");
        std::fs::write(
            dir.path().join("id_ed25519.pub"),
            format!("{KEY} me@host\n"),
        )
        .unwrap();
        assert_eq!(read_public_key(&id).unwrap(), KEY);
        assert_eq!(
            read_public_key(&dir.path().join("id_ed25519.pub")).unwrap(),
            KEY
        );
        let e = read_public_key(&dir.path().join("other")).unwrap_err();
        assert!(e.to_string().contains("other.pub"), "{e}");
        std::fs::write(
            dir.path().join("bad.pub"),
            "-----BEGIN OPENSSH PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = read_public_key(&dir.path().join("bad")).unwrap_err();
        assert!(e.to_string().contains("not an OpenSSH public key"), "{e}");
    }
}
