//! Who listens on a TCP port of this host, from `/proc/net/tcp{,6}` (the socket's inode and
//! owner) and `/proc/*/fd` (the process holding that inode): the name a tunnel state gives a
//! squatter ("port 8082 held by pid 1234 (nc -l 8082), user 1001").
//!
//! The same walk as the hub's qemu-nbd check (`listens_on` there asks about one PID; this
//! finds the PID). A process of another user is found when its `/proc/PID/fd` is readable to
//! us, which it is not for an unprivileged agent: then the socket's owning uid (from the
//! table, always readable) is still named.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A listener on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub port: u16,
    /// `None` when the holding process could not be found (another user's `/proc/PID/fd`).
    pub pid: Option<u32>,
    /// The command line, space-joined (empty when unknown).
    pub command: String,
    /// The socket owner's uid, from the kernel's table.
    pub uid: u32,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) if !self.command.is_empty() => write!(
                f,
                "port {} held by pid {pid} ({}), user {}",
                self.port, self.command, self.uid
            ),
            Some(pid) => write!(f, "port {} held by pid {pid}, user {}", self.port, self.uid),
            None => write!(
                f,
                "port {} held by a process of user {} (its pid is not visible to this agent)",
                self.port, self.uid
            ),
        }
    }
}

/// The address of a `/proc/net/tcp{,6}` entry (the kernel prints the bytes of each 32-bit
/// word in host order, i.e. reversed on little-endian machines).
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_le_bytes(),
        )
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// True when a listener on `bound` takes connections to `want` (the same address, a wildcard,
/// or the v4-mapped form).
fn covers(bound: IpAddr, want: IpAddr) -> bool {
    if bound.is_unspecified() || bound == want {
        return true;
    }
    match (bound, want) {
        (IpAddr::V6(b), IpAddr::V4(w)) => b.to_ipv4_mapped() == Some(w),
        _ => false,
    }
}

/// The listeners (state `0A`) on `port` (at `ip`, or any address): `(inode, uid)`.
fn listening_sockets(ip: Option<IpAddr>, port: u16) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:tm retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let Some((addr, p)) = f[1].rsplit_once(':') else {
                continue;
            };
            let at = match (ip, parse_addr(addr)) {
                (None, _) => true,
                (Some(want), Some(bound)) => covers(bound, want),
                (Some(_), None) => false,
            };
            if at && u16::from_str_radix(p, 16).ok() == Some(port) {
                out.push((
                    format!("socket:[{}]", f[9]),
                    f[7].parse().unwrap_or(u32::MAX),
                ));
            }
        }
    }
    out
}

/// Who listens on `port` (any address), if anyone.
pub fn holder_of(port: u16) -> Option<Holder> {
    holder_at(None, port)
}

/// Who takes connections to `ip:port` (`ip` `None`: any address), if anyone.
pub fn holder_at(ip: Option<IpAddr>, port: u16) -> Option<Holder> {
    let sockets = listening_sockets(ip, port);
    let (_, uid) = sockets.first()?.clone();
    let procs = std::fs::read_dir("/proc").ok()?;
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let found = fds.flatten().find_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            sockets
                .iter()
                .find(|(inode, _)| target.as_os_str() == inode.as_str())
                .map(|(_, uid)| *uid)
        });
        if let Some(uid) = found {
            let command = std::fs::read(p.path().join("cmdline"))
                .map(|c| {
                    c.split(|b| *b == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            return Some(Holder {
                port,
                pid: Some(pid),
                command,
                uid,
            });
        }
    }
    Some(Holder {
        port,
        pid: None,
        command: String::new(),
        uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_this_process_as_the_holder_of_its_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = holder_of(port).expect("a listener");
        assert_eq!(h.pid, Some(std::process::id()));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(h.uid, std::fs::metadata("/proc/self").unwrap().uid());
        let shown = h.to_string();
        assert!(
            shown.starts_with(&format!("port {port} held by pid {} (", std::process::id())),
            "{shown}"
        );
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(
            holder_at(Some(lo), port).and_then(|h| h.pid),
            Some(std::process::id())
        );
        // Another address of the same port is not this listener's.
        assert_eq!(holder_at(Some("127.0.0.2".parse().unwrap()), port), None);
        drop(l);
        assert_eq!(holder_of(port), None);
    }
}
