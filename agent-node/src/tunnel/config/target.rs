//! The hub's sshd as `--tunnel` gives it, `USER@HOST[:PORT]`: only plain names, since both end up
//! in an ssh config file.

use std::fmt;
use std::str::FromStr;

use super::{DEFAULT_SSH_PORT, TunnelConfigError};

/// The hub's sshd and the user the tunnel logs in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl FromStr for TunnelTarget {
    type Err = TunnelConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let err = |reason| TunnelConfigError::Target {
            value: value.to_string(),
            reason,
        };
        let (user, rest) = value.split_once('@').ok_or_else(|| err("no USER@"))?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| err("PORT is not a port number (1-65535)"))?,
            ),
            None => (rest, DEFAULT_SSH_PORT),
        };
        // Both end up in an ssh config file and on ssh's side of a login: only plain names.
        let plain = |s: &str, extra: &[u8]| {
            !s.is_empty()
                && !s.starts_with('-')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || extra.contains(&b))
        };
        if !plain(user, b"") {
            return Err(err("USER may hold only letters, digits, '.', '_' and '-'"));
        }
        if !plain(host, b"") {
            return Err(err(
                "HOST must be a host name or IPv4 address (letters, digits, '.', '-')",
            ));
        }
        Ok(TunnelTarget {
            user: user.to_string(),
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for TunnelTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}:{}", self.user, self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_parses_and_defaults_to_443() {
        let t: TunnelTarget = "sendense@hub.example".parse().unwrap();
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("sendense", "hub.example", 443)
        );
        let t: TunnelTarget = "root@127.0.0.1:2222".parse().unwrap();
        assert_eq!(t.port, 2222);
        assert_eq!(t.to_string(), "root@127.0.0.1:2222");
        for (bad, why) in [
            ("hub:443", "USER@"),
            ("u@h:0", "PORT"),
            ("u@h:99999", "PORT"),
            ("u@h:x", "PORT"),
            ("@h:443", "USER"),
            ("u@:443", "HOST"),
            ("u@-oProxyCommand=x:22", "HOST"),
            ("u v@h:22", "USER"),
        ] {
            let e = bad.parse::<TunnelTarget>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }
}
