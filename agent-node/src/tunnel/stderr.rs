//! Reading ssh's stderr: when the forwards are established (the `up` markers) and why ssh ended
//! (the failure an operator must fix, named precisely).
//!
//! ssh runs with `LogLevel DEBUG1`; its own errors are the lines without a `debugN:` prefix, and
//! those are what [`classify`] looks at, so that a debug line mentioning "Connection refused"
//! (e.g. a forwarded connection whose far end is down) is not taken for the cause of an exit.
//! Strings were taken from OpenSSH 9.2 runs against a real sshd.

use super::config::TunnelConfig;
use sendense_shared::child::ExitReport;
use thiserror::Error;

/// ssh's DEBUG1 line for each local forward bound.
const LOCAL_LISTENING: &str = "Local forwarding listening on ";
/// ssh's DEBUG1 line once the hub's sshd accepted every remote forward.
const REMOTE_ALL_CONFIRMED: &str = "forwarding_success: all expected forwarding replies received";

/// Why one run of ssh ended, as an operator needs to read it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SshFailure {
    #[error(
        "local forward port {port} already in use{on} (another process listens there; ssh: {line})"
    )]
    LocalPortInUse { port: u16, on: String, line: String },
    #[error(
        "remote port forwarding failed for listen port {port}: the hub's sshd refused it \
         (permitlisten of the tunnel key in authorized_keys, or the port is taken on the hub)"
    )]
    RemoteForwardRefused { port: u16 },
    #[error(
        "host key verification failed for {host_port} against known_hosts {known_hosts}: {detail}"
    )]
    HostKey {
        host_port: String,
        known_hosts: String,
        detail: String,
    },
    #[error(
        "the hub refused the key {identity} for {target}: {line} (wrong key: add the line of \
         `sendense-node tunnel authorized-key` to the tunnel user's authorized_keys on the hub)"
    )]
    KeyRefused {
        identity: String,
        target: String,
        line: String,
    },
    #[error("the identity file cannot be used: {line}")]
    Identity { line: String },
    #[error("{line}")]
    Connect { line: String },
    #[error("the hub's sshd stopped answering: {line}")]
    Unresponsive { line: String },
    #[error("ssh (PID {pid}) {status}{last}")]
    Exited {
        pid: u32,
        status: String,
        last: String,
    },
}

/// Lines ssh itself logged as errors or notices about the connection: not `debugN:`, not the
/// exit statistics, and not per-channel errors ("channel 3: open failed: connect failed:
/// Connection refused" when the hub's API is down), which never end ssh.
fn own_lines(stderr: &str) -> impl Iterator<Item = &str> {
    stderr.lines().map(str::trim).filter(|l| {
        !l.is_empty()
            && !l.starts_with("debug")
            && !l.starts_with("channel ")
            && !l.starts_with("Authenticated to ")
            && !l.starts_with("Transferred: ")
            && !l.starts_with("Bytes per second: ")
    })
}

/// The last line ssh logged about the connection (see [`own_lines`]), if any.
pub fn last_own_line(stderr: &str) -> Option<&str> {
    own_lines(stderr).last()
}

/// The port in `... port N` / `...port: N` at the end of a line.
fn trailing_port(line: &str) -> Option<u16> {
    let digits: String = line
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.chars().rev().collect::<String>().parse().ok()
}

/// Names the cause of an ssh exit from its stderr.
pub fn classify(report: &ExitReport, pid: u32, cfg: &TunnelConfig) -> SshFailure {
    let lines: Vec<&str> = own_lines(&report.stderr_tail).collect();
    let find = |needle: &str| lines.iter().copied().find(|l| l.contains(needle));

    // "bind [127.0.0.2]:10101: Address already in use" comes first and names the address;
    // "channel_setup_fwd_listener_tcpip: cannot listen to port: 10101" names the port.
    if let Some(l) = find("cannot listen to port") {
        let bind_line = find("Address already in use");
        let port = trailing_port(l).unwrap_or(0);
        let on = bind_line
            .and_then(|b| b.strip_prefix("bind ["))
            .and_then(|b| b.split_once(']'))
            .map(|(addr, _)| format!(" on {addr}"))
            .unwrap_or_default();
        return SshFailure::LocalPortInUse {
            port,
            on,
            line: bind_line.unwrap_or(l).to_string(),
        };
    }
    if let Some(l) = find("Address already in use") {
        return SshFailure::LocalPortInUse {
            port: trailing_port(l.trim_end_matches(": Address already in use")).unwrap_or(0),
            on: String::new(),
            line: l.to_string(),
        };
    }
    if let Some(l) = find("remote port forwarding failed for listen port") {
        return SshFailure::RemoteForwardRefused {
            port: trailing_port(l).unwrap_or(0),
        };
    }
    if find("Host key verification failed").is_some() {
        let detail = find("has changed and you have requested strict checking")
            .or_else(|| find("host key is known for"))
            .or_else(|| find("REMOTE HOST IDENTIFICATION HAS CHANGED"))
            .unwrap_or("Host key verification failed.")
            .to_string();
        return SshFailure::HostKey {
            host_port: format!("[{}]:{}", cfg.target.host, cfg.target.port),
            known_hosts: cfg.known_hosts.display().to_string(),
            detail,
        };
    }
    if let Some(l) = find("no such identity")
        .or_else(|| find("are too open"))
        .or_else(|| find("Load key"))
    {
        return SshFailure::Identity {
            line: l.to_string(),
        };
    }
    if let Some(l) = find("Permission denied (") {
        return SshFailure::KeyRefused {
            identity: cfg.identity.display().to_string(),
            target: cfg.target.to_string(),
            line: l.to_string(),
        };
    }
    if let Some(l) = find("Timeout, server")
        .or_else(|| find("Connection closed by"))
        .or_else(|| find("closed by remote host"))
        .or_else(|| find("Broken pipe"))
        .or_else(|| find("Connection reset"))
    {
        return SshFailure::Unresponsive {
            line: l.to_string(),
        };
    }
    if let Some(l) = find("Connection refused")
        .or_else(|| find("Connection timed out"))
        .or_else(|| find("Could not resolve hostname"))
        .or_else(|| find("No route to host"))
        .or_else(|| find("Network is unreachable"))
    {
        return SshFailure::Connect {
            line: l.to_string(),
        };
    }
    SshFailure::Exited {
        pid,
        status: report.status.clone(),
        last: lines.last().map(|l| format!(": {l}")).unwrap_or_default(),
    }
}

/// True once ssh reported every local forward listening and, when it has one (`remote`), the hub
/// accepted the remote forward. A link without a remote forward never prints the confirmation.
pub fn forwards_established(stderr: &str, local_forwards: usize, remote: bool) -> bool {
    let listening = stderr
        .lines()
        .filter(|l| l.contains(LOCAL_LISTENING))
        .count();
    listening >= local_forwards && (!remote || stderr.contains(REMOTE_ALL_CONFIRMED))
}

#[cfg(test)]
mod tests {
    use super::super::ssh_config::tests::sample;
    use super::*;
    use std::path::Path;

    fn report(stderr: &str) -> ExitReport {
        ExitReport {
            status: "exit status 255".into(),
            code: Some(255),
            signal: None,
            stderr_tail: stderr.into(),
            requested: false,
        }
    }

    fn cls(stderr: &str) -> String {
        classify(&report(stderr), 42, &sample(Path::new("/run/x"))).to_string()
    }

    // Each input is ssh 9.2's stderr (DEBUG1) as seen against a real sshd, shortened.
    #[test]
    fn names_each_cause() {
        let busy = "debug1: Local forwarding listening on 127.0.0.2 port 10100.\n\
            bind [127.0.0.2]:10101: Address already in use\n\
            channel_setup_fwd_listener_tcpip: cannot listen to port: 10101\n\
            Could not request local forwarding.\n";
        assert_eq!(
            cls(busy),
            "local forward port 10101 already in use on 127.0.0.2 (another process listens \
             there; ssh: bind [127.0.0.2]:10101: Address already in use)"
        );
        let remote = "Authenticated to 127.0.0.1 ([127.0.0.1]:2222) using \"publickey\".\n\
            debug1: remote forward failure for: listen 127.0.0.1:9999, connect 127.0.0.1:8081\n\
            Error: remote port forwarding failed for listen port 9999\n";
        assert!(
            cls(remote).starts_with("remote port forwarding failed for listen port 9999:"),
            "{}",
            cls(remote)
        );
        let hostkey = "No ED25519 host key is known for [127.0.0.1]:2222 and you have requested \
            strict checking.\nHost key verification failed.\n";
        assert_eq!(
            cls(hostkey),
            "host key verification failed for [127.0.0.1]:2222 against known_hosts \
             /etc/sendense/known_hosts: No ED25519 host key is known for [127.0.0.1]:2222 and \
             you have requested strict checking."
        );
        let key = "debug1: Offering public key: /x ED25519 SHA256:abc explicit\n\
            sendense@127.0.0.1: Permission denied (publickey,password,keyboard-interactive).\n";
        let k = cls(key);
        assert!(
            k.starts_with("the hub refused the key /etc/sendense/id ed25519 for sendense@127.0.0.1:2222: sendense@127.0.0.1: Permission denied (publickey"),
            "{k}"
        );
        assert_eq!(
            cls("ssh: connect to host 127.0.0.1 port 2222: Connection refused\n"),
            "ssh: connect to host 127.0.0.1 port 2222: Connection refused"
        );
        assert!(cls("Timeout, server 127.0.0.1 not responding.\n").contains("stopped answering"));
    }

    #[test]
    fn debug_lines_are_not_causes() {
        // A forwarded connection to a port where nothing listens on the hub logs this at debug
        // level; the exit was a SIGKILL.
        let mut r = report(
            "debug1: connect_next: connect to 127.0.0.1 port 8082 failed: Connection refused\n\
             channel 3: open failed: connect failed: Connection refused\n\
             Transferred: sent 3412, received 3132 bytes, in 2.0 seconds\n",
        );
        r.status = "killed by SIGKILL".into();
        r.code = None;
        r.signal = Some(9);
        assert_eq!(
            classify(&r, 7, &sample(Path::new("/x"))).to_string(),
            "ssh (PID 7) killed by SIGKILL"
        );
        r.status = "exit status 255".into();
        r.signal = None;
        r.stderr_tail
            .push_str("client_loop: send disconnect: Broken pipe\n");
        assert_eq!(
            classify(&r, 7, &sample(Path::new("/x"))).to_string(),
            "the hub's sshd stopped answering: client_loop: send disconnect: Broken pipe"
        );
    }

    #[test]
    fn up_needs_every_local_forward_and_the_remote_confirmation() {
        let two = "debug1: Local forwarding listening on 127.0.0.2 port 1.\n\
            debug1: Local forwarding listening on 127.0.0.2 port 2.\n";
        assert!(!forwards_established(two, 2, true));
        let all = format!("{two}debug1: {REMOTE_ALL_CONFIRMED}\n");
        assert!(forwards_established(&all, 2, true));
        assert!(!forwards_established(&all, 3, true));
        // A link that carries NBD forwards only.
        assert!(forwards_established(two, 2, false));
        assert!(!forwards_established(two, 3, false));
    }
}
