//! A real OpenSSH `sshd` for tunnel tests: on a free port of 127.0.0.1, with generated host and
//! user keys (and a wrong one), the restricted line that `sendense-node tunnel authorized-key`
//! prints in its `authorized_keys`, the `Match` block of deploy/README-sshd.md, and a
//! `known_hosts` for it. Killed with its whole process group (the per-connection processes it
//! forks) in `Drop`.

use sendense_shared::child::Supervised;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The ports the key line permits (`--nbd-ports`, `--hub-api-port`, `--reverse-port`).
#[derive(Debug, Clone)]
pub struct KeyPorts {
    pub nbd: (u16, u16),
    pub hub_api: u16,
    pub reverse: u16,
    /// `Some(dir)`: the exports are the hub's unix sockets in `dir` (`--nbd unix
    /// --hub-nbd-dir DIR`: one socket per slot); `None`: its TCP ports (`--nbd tcp`).
    pub hub_nbd_dir: Option<PathBuf>,
}

/// `ssh-keygen` of an ed25519 key without passphrase at `path`.
pub fn keygen(path: &Path) {
    crate::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "sendense-test", "-f"])
            .arg(path),
    );
}

/// The `Match` block of deploy/README-sshd.md (step 2), for the test's login user.
fn match_block(user: &str) -> String {
    format!(
        "Match User {user}\n    AuthenticationMethods publickey\n    PasswordAuthentication no\n    \
         KbdInteractiveAuthentication no\n    AllowTcpForwarding yes\n    GatewayPorts no\n    \
         PermitTTY no\n    X11Forwarding no\n    AllowAgentForwarding no\n    \
         AllowStreamLocalForwarding local\n    PermitTunnel no\n    ForceCommand /usr/sbin/nologin\n    \
         ClientAliveInterval 15\n    ClientAliveCountMax 3\n"
    )
}

fn user_name() -> String {
    crate::run_stdout(Command::new("id").arg("-un"))
        .trim()
        .to_string()
}

/// A running sshd accepting `user_key` through the restricted key line.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub user: String,
    pub user_key: PathBuf,
    pub wrong_key: PathBuf,
    pub known_hosts: PathBuf,
    pub authorized_line: String,
    child: Supervised,
}

impl Sshd {
    /// Generates the keys, asks `node_bin` for the key line of `ports`, starts sshd (another
    /// free port when it lost a race for one) and waits until it accepts connections.
    pub async fn start(node_bin: &Path, ports: KeyPorts) -> Sshd {
        std::fs::create_dir_all("/run/sshd")
            .expect("mkdir /run/sshd (sshd's privilege separation dir)");
        let dir = tempfile::Builder::new()
            .prefix("sd-sshd-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let host_key = d.join("host_key");
        let user_key = d.join("user_key");
        let wrong_key = d.join("wrong_key");
        for k in [&host_key, &user_key, &wrong_key] {
            keygen(k);
        }
        let authorized_line = crate::run_stdout(
            Command::new(node_bin)
                .args(["tunnel", "authorized-key", "--tunnel-identity"])
                .arg(&user_key)
                .arg("--nbd-ports")
                .arg(format!("{}-{}", ports.nbd.0, ports.nbd.1))
                .args(["--hub-api-port", &ports.hub_api.to_string()])
                .args(["--reverse-port", &ports.reverse.to_string()])
                .args(match &ports.hub_nbd_dir {
                    Some(dir) => vec![
                        "--nbd".to_string(),
                        "unix".to_string(),
                        "--hub-nbd-dir".to_string(),
                        dir.display().to_string(),
                    ],
                    None => vec!["--nbd".to_string(), "tcp".to_string()],
                }),
        )
        .trim()
        .to_string();
        let authorized_keys = d.join("authorized_keys");
        std::fs::write(&authorized_keys, format!("{authorized_line}\n")).expect("authorized_keys");
        let mut last_err = String::new();
        for _ in 0..20 {
            let port = crate::net::free_port();
            let config = d.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                     PidFile {}\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n\
                     PasswordAuthentication no\nKbdInteractiveAuthentication no\nUseDNS no\n\
                     LogLevel VERBOSE\n{}",
                    host_key.display(),
                    authorized_keys.display(),
                    d.join("sshd.pid").display(),
                    match_block(&user_name()),
                ),
            )
            .expect("sshd_config");
            let mut cmd = tokio::process::Command::new("/usr/sbin/sshd");
            cmd.arg("-D").arg("-e").arg("-f").arg(&config);
            cmd.stdin(Stdio::null()).stdout(Stdio::null());
            let child = Supervised::spawn(cmd).expect("spawn sshd");
            eprintln!("+ {}", child.command_line_string());
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && child.is_alive() {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let host_pub =
                        std::fs::read_to_string(d.join("host_key.pub")).expect("host key");
                    let known_hosts = d.join("known_hosts");
                    std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {host_pub}"))
                        .expect("known_hosts");
                    return Sshd {
                        port,
                        user: user_name(),
                        user_key,
                        wrong_key,
                        known_hosts,
                        authorized_line,
                        child,
                        dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Lost a race for the port (or sshd failed): say why, try another port.
            child.kill_now();
            last_err = child.stderr_tail();
        }
        panic!("sshd did not start: {last_err}");
    }

    /// What sshd logged (the tail of its stderr).
    pub fn stderr(&self) -> String {
        self.child.stderr_tail()
    }

    /// `USER@127.0.0.1:PORT`, the node's `--tunnel`.
    pub fn login(&self) -> String {
        format!("{}@127.0.0.1:{}", self.user, self.port)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // The whole group: sshd and the per-connection processes it forked.
        self.child.kill_now();
    }
}
