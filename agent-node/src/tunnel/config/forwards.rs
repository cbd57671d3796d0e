//! Ports and forwards: the NBD port range as written (`10100-10200`), and each forward of the
//! tunnel as ssh spells it.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use thiserror::Error;

/// An inclusive range of TCP ports, written `10100-10200` (or one port, `10100`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// A port range that does not parse.
#[derive(Debug, Error)]
#[error("invalid port range {input:?}: {reason} (expected FIRST-LAST, e.g. 10100-10200)")]
pub struct PortRangeError {
    pub input: String,
    pub reason: &'static str,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    pub fn ports(&self) -> std::ops::RangeInclusive<u16> {
        self.first..=self.last
    }

    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Never true for a parsed range; here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| PortRangeError {
            input: s.to_string(),
            reason,
        };
        let (a, b) = s.trim().split_once('-').unwrap_or((s.trim(), s.trim()));
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
        let (Some(first), Some(last)) = (port(a), port(b)) else {
            return Err(err("ports are numbers from 1 to 65535"));
        };
        if first > last {
            return Err(err("FIRST is above LAST"));
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// One port forward of the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// Listens here on the node, leads to `to` on the hub.
    Local { listen: SocketAddr, to: SocketAddr },
    /// A streamlocal forward: listens on the unix socket `listen` in the node's 0700 run
    /// directory, leads to the hub's export socket `to`.
    LocalUnix { listen: PathBuf, to: PathBuf },
    /// Listens on the hub's side, leads to `to` on the node.
    Remote { listen: SocketAddr, to: SocketAddr },
}

impl Forward {
    pub(super) fn local(bind: IpAddr, port: u16) -> Forward {
        Forward::Local {
            listen: SocketAddr::new(bind, port),
            to: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        }
    }
}

impl fmt::Display for Forward {
    /// `L 127.0.0.2:10100 -> 127.0.0.1:10100`, `R 127.0.0.1:9081 -> 127.0.0.1:8081`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Forward::Local { listen, to } => write!(f, "L {listen} -> {to}"),
            Forward::LocalUnix { listen, to } => {
                write!(f, "L {} -> {}", listen.display(), to.display())
            }
            Forward::Remote { listen, to } => write!(f, "R {listen} -> {to}"),
        }
    }
}

/// An API listening on every address is reached by the reverse forward on loopback.
pub fn reachable(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
    } else {
        listen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::config::DEFAULT_NBD_PORTS;

    #[test]
    fn port_ranges() {
        assert_eq!(
            "10100-10200".parse::<PortRange>().unwrap(),
            DEFAULT_NBD_PORTS
        );
        assert_eq!(DEFAULT_NBD_PORTS.len(), 101);
        let one: PortRange = "7000".parse().unwrap();
        assert_eq!((one.first, one.last, one.len()), (7000, 7000, 1));
        for bad in ["", "5-4", "0-3", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }
}
