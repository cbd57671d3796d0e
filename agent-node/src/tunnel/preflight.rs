//! The check before every start of ssh: a TCP connect to exactly the host and port the tunnel
//! is configured for. (The original deployment's check tested port 22 while the tunnel used
//! 443, so it passed while the tunnel could not come up, and failed where the tunnel would
//! have worked.) Its error names the address tried and what happened.

use std::net::SocketAddr;
use std::time::Duration;
use thiserror::Error;

/// Why the preflight failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PreflightError {
    #[error("resolving the hub host {host:?} failed: {detail}")]
    Resolve { host: String, detail: String },
    #[error("TCP connect to {shown} refused")]
    Refused { shown: String },
    #[error("TCP connect to {shown} timed out after {after:?}")]
    TimedOut { shown: String, after: Duration },
    #[error("TCP connect to {shown} failed: {detail}")]
    Failed { shown: String, detail: String },
}

/// Connects to `host:port` and closes again. Answers the address that accepted.
pub async fn tcp_connect(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<SocketAddr, PreflightError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| PreflightError::Resolve {
            host: host.to_string(),
            detail: e.to_string(),
        })?
        .collect();
    let Some(first) = addrs.first().copied() else {
        return Err(PreflightError::Resolve {
            host: host.to_string(),
            detail: "no address".to_string(),
        });
    };
    // "127.0.0.1:2222" for an address, "hub.example:443 (10.0.0.5:443)" for a name.
    let shown = |a: SocketAddr| {
        if host.parse::<std::net::IpAddr>().is_ok() {
            a.to_string()
        } else {
            format!("{host}:{port} ({a})")
        }
    };
    let mut last = None;
    for addr in addrs {
        let err = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_stream)) => return Ok(addr),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                PreflightError::Refused { shown: shown(addr) }
            }
            Ok(Err(e)) => PreflightError::Failed {
                shown: shown(addr),
                detail: e.to_string(),
            },
            Err(_) => PreflightError::TimedOut {
                shown: shown(addr),
                after: timeout,
            },
        };
        last = Some(err);
    }
    Err(last.unwrap_or(PreflightError::Refused {
        shown: shown(first),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_the_address_that_refused() {
        // A port that was just free: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = tcp_connect("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("TCP connect to 127.0.0.1:{port} refused")
        );
    }

    #[tokio::test]
    async fn accepts_a_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let a = tcp_connect("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(a.port(), port);
    }
}
