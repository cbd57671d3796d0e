//! The NBD targets string: `<disk_key>:nbd://<host>:<port>/<export>[,...]`, e.g.
//! `2000:nbd://127.0.0.1:10100/pgtest1-disk-2000,2001:nbd://127.0.0.1:10101/pgtest1-disk-2001`,
//! or with exports on unix sockets (the hub's default, `nbd_listen = "unix"`)
//! `2000:nbd+unix:///pgtest1-disk-2000?socket=/run/sendense-nbd/10100.sock`. Both forms parse;
//! a unix entry's `port` is the slot its socket is named after (`<port>.sock`), 0 otherwise.
//!
//! The hub builds it from its exports; the node parses it and refuses a list that misses a
//! disk of the VM. The parser never panics on any input (it has a fuzz target).

use crate::ids::DiskKey;
use std::fmt;
use thiserror::Error;

/// An `nbd://host:port/export` URI (IPv6 hosts in brackets), or with `socket` an
/// `nbd+unix:///export?socket=PATH` one (`host` is then empty and `port` the socket's slot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    pub host: String,
    pub port: u16,
    pub export: String,
    /// The export's unix socket; `None`: TCP at `host:port`.
    pub socket: Option<String>,
}

/// The slot a hub export socket is named after: `10105` of `/run/sendense-nbd/10105.sock`.
pub fn socket_slot(path: &str) -> Option<u16> {
    let name = path.rsplit('/').next()?;
    let digits = name.strip_suffix(".sock")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|p| *p != 0)
}

/// Longest unix socket path (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(socket) = &self.socket {
            write!(f, "nbd+unix:///{}?socket={socket}", self.export)
        } else if self.host.contains(':') {
            write!(f, "nbd://[{}]:{}/{}", self.host, self.port, self.export)
        } else {
            write!(f, "nbd://{}:{}/{}", self.host, self.port, self.export)
        }
    }
}

/// One entry of the targets string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdTarget {
    pub disk_key: DiskKey,
    pub uri: NbdUri,
}

/// Why a targets string or URI was refused; each names the offending entry.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TargetsError {
    #[error("targets string is empty")]
    Empty,
    #[error(
        "entry {index} ({entry:?}): expected <disk_key>:nbd://<host>:<port>/<export> or \
         <disk_key>:nbd+unix:///<export>?socket=<path>"
    )]
    Shape { index: usize, entry: String },
    #[error("entry {index}: disk key {key:?} is not a number")]
    DiskKey { index: usize, key: String },
    #[error("entry {index}: disk key {key} appears twice")]
    DuplicateKey { index: usize, key: DiskKey },
    #[error("{uri:?}: {reason}")]
    Uri { uri: String, reason: &'static str },
}

/// Longest accepted export name (NBD allows 4096 bytes).
const MAX_EXPORT: usize = 4096;

impl NbdUri {
    /// Parses `nbd://host:port/export` or `nbd+unix:///export?socket=/abs/path`. The port is
    /// required: an NBD target without one is almost always a mistake in a generated string.
    pub fn parse(s: &str) -> Result<Self, TargetsError> {
        let err = |reason| TargetsError::Uri {
            uri: s.chars().take(200).collect(),
            reason,
        };
        if let Some(rest) = s.strip_prefix("nbd+unix:///") {
            let (export, socket) = rest
                .split_once("?socket=")
                .ok_or(err("missing ?socket=<path>"))?;
            check_export(export).map_err(err)?;
            if export.contains('?') {
                return Err(err("bad character in export name"));
            }
            check_socket(socket).map_err(err)?;
            return Ok(NbdUri {
                host: String::new(),
                port: socket_slot(socket).unwrap_or(0),
                export: export.to_string(),
                socket: Some(socket.to_string()),
            });
        }
        let rest = s
            .strip_prefix("nbd://")
            .ok_or(err("scheme must be nbd:// or nbd+unix://"))?;
        let (authority, export) = rest.split_once('/').ok_or(err("missing /<export>"))?;
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or(err("unclosed [ in host"))?;
            (h, p.strip_prefix(':').ok_or(err("missing :<port>"))?)
        } else {
            authority.rsplit_once(':').ok_or(err("missing :<port>"))?
        };
        if host.is_empty() {
            return Err(err("empty host"));
        }
        if host.contains(['/', '[', ']', ',', ' ', '\0']) {
            return Err(err("bad character in host"));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| err("port is not a number in 1-65535"))?;
        if port == 0 {
            return Err(err("port is not a number in 1-65535"));
        }
        check_export(export).map_err(err)?;
        Ok(NbdUri {
            host: host.to_string(),
            port,
            export: export.to_string(),
            socket: None,
        })
    }
}

fn check_export(export: &str) -> Result<(), &'static str> {
    if export.is_empty() {
        return Err("empty export name");
    }
    if export.len() > MAX_EXPORT {
        return Err("export name longer than 4096 bytes");
    }
    if export.contains([',', '\0']) || export.chars().any(char::is_control) {
        return Err("bad character in export name");
    }
    Ok(())
}

/// An absolute socket path that fits `sun_path` and cannot break the list or the URI.
pub fn check_socket(socket: &str) -> Result<(), &'static str> {
    if !socket.starts_with('/') {
        return Err("socket path must be absolute");
    }
    if socket.len() > MAX_SOCKET_PATH {
        return Err("socket path longer than 107 bytes");
    }
    if socket.contains([',', '\0', '?', '&']) || socket.chars().any(char::is_control) {
        return Err("bad character in socket path");
    }
    Ok(())
}

/// Parses a whole targets string; keys must be distinct.
pub fn parse_targets(s: &str) -> Result<Vec<NbdTarget>, TargetsError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(TargetsError::Empty);
    }
    let mut out: Vec<NbdTarget> = Vec::new();
    for (index, entry) in s.split(',').enumerate() {
        let entry = entry.trim();
        let (key, uri) = entry.split_once(':').ok_or_else(|| TargetsError::Shape {
            index,
            entry: entry.chars().take(200).collect(),
        })?;
        let disk_key =
            key.trim()
                .parse::<i64>()
                .map(DiskKey)
                .map_err(|_| TargetsError::DiskKey {
                    index,
                    key: key.chars().take(40).collect(),
                })?;
        if out.iter().any(|t| t.disk_key == disk_key) {
            return Err(TargetsError::DuplicateKey {
                index,
                key: disk_key,
            });
        }
        out.push(NbdTarget {
            disk_key,
            uri: NbdUri::parse(uri)?,
        });
    }
    Ok(out)
}

/// Builds the targets string from `(disk key, uri)` pairs, in the given order.
pub fn format_targets<'a>(targets: impl IntoIterator<Item = &'a NbdTarget>) -> String {
    targets
        .into_iter()
        .map(|t| format!("{}:{}", t.disk_key, t.uri))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_original_systems_string() {
        let s = "2000:nbd://127.0.0.1:10100/pgtest1-disk-2000,2001:nbd://127.0.0.1:10101/pgtest1-disk-2001";
        let t = parse_targets(s).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].disk_key, DiskKey(2000));
        assert_eq!(t[0].uri.host, "127.0.0.1");
        assert_eq!(t[0].uri.port, 10100);
        assert_eq!(t[1].uri.export, "pgtest1-disk-2001");
        assert_eq!(format_targets(&t), s);
    }

    #[test]
    fn ipv6_host_round_trips() {
        let t = parse_targets("2000:nbd://[::1]:10100/e").unwrap();
        assert_eq!(t[0].uri.host, "::1");
        assert_eq!(format_targets(&t), "2000:nbd://[::1]:10100/e");
    }

    #[test]
    fn unix_entries_round_trip_with_their_slot_and_the_tcp_form_still_parses() {
        let s = "2000:nbd+unix:///vm-disk-2000?socket=/run/sendense-nbd/10105.sock,\
                 2001:nbd://127.0.0.1:10101/vm-disk-2001";
        let t = parse_targets(s).unwrap();
        assert_eq!(t[0].uri.port, 10105);
        assert_eq!(t[0].uri.export, "vm-disk-2000");
        assert_eq!(
            t[0].uri.socket.as_deref(),
            Some("/run/sendense-nbd/10105.sock")
        );
        assert_eq!(t[1].uri.socket, None);
        assert_eq!(format_targets(&t), s);
        assert_eq!(socket_slot("/x/other.sock"), None);
        assert_eq!(socket_slot("/x/0.sock"), None);
    }

    #[test]
    fn refuses_bad_strings_with_a_named_cause() {
        let cases = [
            ("", "empty"),
            ("2000", "expected"),
            ("x:nbd://h:1/e", "not a number"),
            ("2000:http://h:1/e", "scheme"),
            ("2000:nbd://h/e", "port"),
            ("2000:nbd://h:0/e", "port"),
            ("2000:nbd://h:70000/e", "port"),
            ("2000:nbd://h:1/", "empty export"),
            ("2000:nbd://:1/e", "empty host"),
            ("2000:nbd://h:1/a,2000:nbd://h:2/b", "twice"),
            ("2000:nbd+unix:///e", "socket"),
            ("2000:nbd+unix:///e?socket=rel.sock", "absolute"),
            ("2000:nbd+unix:///?socket=/s", "empty export"),
        ];
        for (input, want) in cases {
            let e = parse_targets(input).unwrap_err().to_string();
            assert!(e.contains(want), "{input:?}: {e}");
        }
    }
}
