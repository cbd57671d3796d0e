//! Who listens on a TCP port of this host, from `/proc/net/tcp{,6}` (the socket's inode and
//! owner) and `/proc/*/fd` (the process holding that inode): the name a tunnel state gives a
//! squatter ("port 8082 held by pid 1234 (nc -l 8082), user 1001").
//!
//! The same walk as the hub's qemu-nbd check (`listens_on` there asks about one PID; this
//! finds the PID). A process of another user is found when its `/proc/PID/fd` is readable to
//! us, which it is not for an unprivileged agent: then the socket's owning uid (from the
//! table, always readable) is still named.

use std::fmt;

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

/// The listeners (state `0A`) on `port`, any address: `(inode, uid)`.
fn listening_sockets(port: u16) -> Vec<(String, u32)> {
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
            let local_port = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                out.push((
                    format!("socket:[{}]", f[9]),
                    f[7].parse().unwrap_or(u32::MAX),
                ));
            }
        }
    }
    out
}

/// Who listens on `port`, if anyone.
pub fn holder_of(port: u16) -> Option<Holder> {
    let sockets = listening_sockets(port);
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
        drop(l);
        assert_eq!(holder_of(port), None);
    }
}
