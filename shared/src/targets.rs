//! The NBD targets string: `<disk_key>:nbd://<host>:<port>/<export>[,...]`, e.g.
//! `2000:nbd://127.0.0.1:10100/pgtest1-disk-2000,2001:nbd://127.0.0.1:10101/pgtest1-disk-2001`.
//!
//! The hub builds it from its exports; the node parses it and refuses a list that misses a
//! disk of the VM. The parser never panics on any input (it has a fuzz target).

use crate::ids::DiskKey;
use std::fmt;
use thiserror::Error;

/// An `nbd://host:port/export` URI (TCP only; IPv6 hosts in brackets).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NbdUri {
    pub host: String,
    pub port: u16,
    pub export: String,
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
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
    #[error("entry {index} ({entry:?}): expected <disk_key>:nbd://<host>:<port>/<export>")]
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
    /// Parses `nbd://host:port/export`. The port is required: an NBD target without one is
    /// almost always a mistake in a generated string.
    pub fn parse(s: &str) -> Result<Self, TargetsError> {
        let err = |reason| TargetsError::Uri {
            uri: s.chars().take(200).collect(),
            reason,
        };
        let rest = s
            .strip_prefix("nbd://")
            .ok_or(err("scheme must be nbd://"))?;
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
        if export.is_empty() {
            return Err(err("empty export name"));
        }
        if export.len() > MAX_EXPORT {
            return Err(err("export name longer than 4096 bytes"));
        }
        if export.contains([',', '\0']) || export.chars().any(char::is_control) {
            return Err(err("bad character in export name"));
        }
        Ok(NbdUri {
            host: host.to_string(),
            port,
            export: export.to_string(),
        })
    }
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
        ];
        for (input, want) in cases {
            let e = parse_targets(input).unwrap_err().to_string();
            assert!(e.contains(want), "{input:?}: {e}");
        }
    }
}
