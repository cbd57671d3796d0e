//! `sendense-node tunnel authorized-key`: the line the hub's tunnel user puts into its
//! `authorized_keys`, so that the node's key can do exactly what the tunnel needs and nothing
//! else. Per sshd(8) (OpenSSH 9.2, AUTHORIZED_KEYS FILE FORMAT): `restrict` turns off every
//! forwarding, the PTY, the agent, X11 and `~/.ssh/rc`; `port-forwarding` turns TCP forwarding
//! back on; each `permitopen="host:port"` allows one `-L` destination and `permitlisten=
//! "host:port"` one `-R` listen address. `restrict` does not stop a login from running a
//! command without a PTY: the hub's sshd config adds `ForceCommand /usr/sbin/nologin` (and
//! `PermitTTY no`) for the tunnel user, see `deploy/README-sshd.md`; the tunnel itself runs `-N`.

use super::config::{DEFAULT_HUB_API_PORT, DEFAULT_NBD_PORTS, DEFAULT_REVERSE_PORT, PortRange};
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
/// permitlisten="127.0.0.1:9081" ssh-ed25519 AAAA... sendense-node`.
pub fn line(
    public_key: &str,
    nbd_ports: PortRange,
    hub_api_port: u16,
    reverse_port: u16,
) -> Result<String, AuthorizedKeyError> {
    if nbd_ports.contains(hub_api_port) {
        return Err(AuthorizedKeyError::Overlap {
            port: hub_api_port,
            range: nbd_ports,
        });
    }
    let mut options = vec!["restrict".to_string(), "port-forwarding".to_string()];
    options.extend(
        nbd_ports
            .ports()
            .chain([hub_api_port])
            .map(|p| format!("permitopen=\"127.0.0.1:{p}\"")),
    );
    options.push(format!("permitlisten=\"127.0.0.1:{reverse_port}\""));
    Ok(format!("{} {public_key} {COMMENT}", options.join(",")))
}

/// Runs the subcommand: prints the line on stdout.
pub fn run_cli(cmd: TunnelCommand) -> anyhow::Result<()> {
    match cmd {
        TunnelCommand::AuthorizedKey(a) => {
            let key = read_public_key(&a.tunnel_identity)?;
            println!(
                "{}",
                line(&key, a.nbd_ports, a.hub_api_port, a.reverse_port)?
            );
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
        let l = line(KEY, "10100-10102".parse().unwrap(), 8082, 9081).unwrap();
        assert_eq!(
            l,
            format!(
                "restrict,port-forwarding,permitopen=\"127.0.0.1:10100\",\
                 permitopen=\"127.0.0.1:10101\",permitopen=\"127.0.0.1:10102\",\
                 permitopen=\"127.0.0.1:8082\",permitlisten=\"127.0.0.1:9081\" {KEY} sendense-node"
            )
        );
        let full = line(KEY, DEFAULT_NBD_PORTS, 8082, 9081).unwrap();
        assert_eq!(full.matches("permitopen=").count(), 102);
        assert!(full.contains("permitopen=\"127.0.0.1:10200\""));
        assert!(!full.contains("10201"));
        assert!(line(KEY, DEFAULT_NBD_PORTS, 10150, 9081).is_err());
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
