//! Test helpers: a real OpenSSH `sshd` on a free loopback port with generated host and user keys
//! and the node's restricted key line in its `authorized_keys`; real `qemu-nbd` exports; free
//! port blocks on 127.0.0.1 and 127.0.0.2. Every process is started by the test and killed by
//! PID (process group) in `Drop`.

#![allow(dead_code)]

use agent_node::tunnel::config::{BackoffPolicy, PortRange, TunnelTarget};
use agent_node::tunnel::{Tunnel, TunnelConfig};
use rand::Rng;
use sendense_shared::api::{TunnelState, TunnelStateKind};
use sendense_tests::node::{NodeOptions, NodeProcess, TunnelOptions};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const NODE_BIN: &str = env!("CARGO_BIN_EXE_sendense-node");
pub const BIND: &str = "127.0.0.2";

/// Runs a command, panicking with its full command line and output when it fails; its stdout.
pub use sendense_tests::run_stdout as run;

fn bindable(ip: &str, port: u16) -> bool {
    TcpListener::bind((ip.parse::<IpAddr>().unwrap(), port)).is_ok()
}

/// `n` consecutive ports free on 127.0.0.1 and on 127.0.0.2 (the hub's side and the node's).
pub fn free_block(n: u16) -> PortRange {
    let mut rng = rand::rng();
    for _ in 0..500 {
        let first = rng.random_range(20000..60000u16);
        if (first..first + n).all(|p| bindable("127.0.0.1", p) && bindable(BIND, p)) {
            return PortRange {
                first,
                last: first + n - 1,
            };
        }
    }
    panic!("no block of {n} free ports found");
}

/// One port free on both loopback addresses.
pub fn free_port() -> u16 {
    free_block(1).first
}

/// The ports one tunnel uses.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub nbd: PortRange,
    pub hub_api: u16,
    pub reverse: u16,
    pub node_api: u16,
}

impl Ports {
    pub fn pick() -> Ports {
        Ports {
            nbd: free_block(3),
            hub_api: free_port(),
            reverse: free_port(),
            node_api: free_port(),
        }
    }
}

pub use sendense_tests::sshd::{Sshd, keygen};

/// A real sshd accepting the user key through the restricted line for `ports`.
pub async fn sshd(ports: &Ports) -> Sshd {
    let key_ports = sendense_tests::sshd::KeyPorts {
        nbd: (ports.nbd.first, ports.nbd.last),
        hub_api: ports.hub_api,
        reverse: ports.reverse,
    };
    Sshd::start(Path::new(NODE_BIN), key_ports).await
}

/// What the tunnel tests build from an [`Sshd`] with the node's own types.
pub trait SshdExt {
    fn target(&self) -> TunnelTarget;
    fn tunnel_config(&self, ports: &Ports) -> TunnelConfig;
}

impl SshdExt for Sshd {
    fn target(&self) -> TunnelTarget {
        TunnelTarget {
            user: self.user.clone(),
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    /// A tunnel configuration against this sshd with test-sized waits.
    fn tunnel_config(&self, ports: &Ports) -> TunnelConfig {
        TunnelConfig {
            target: self.target(),
            identity: self.user_key.clone(),
            known_hosts: self.known_hosts.clone(),
            bind: BIND.parse().unwrap(),
            nbd_ports: ports.nbd,
            hub_api_port: ports.hub_api,
            reverse_port: ports.reverse,
            node_api: SocketAddr::from(([127, 0, 0, 1], ports.node_api)),
            ssh: "ssh".into(),
            server_alive_interval: 5,
            server_alive_count_max: 3,
            ciphers: agent_node::tunnel::config::DEFAULT_CIPHERS.into(),
            run_dir: self.dir.path().join("run"),
            preflight_timeout: Duration::from_secs(3),
            up_timeout: Duration::from_secs(20),
            backoff: BackoffPolicy {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(2),
                healthy_after: Duration::from_secs(60),
            },
        }
    }
}

/// A running supervisor; `Drop` stops it and SIGKILLs its ssh by PID.
pub struct TestTunnel {
    pub tunnel: Arc<Tunnel>,
    stop: CancellationToken,
}

impl TestTunnel {
    pub fn start(cfg: TunnelConfig) -> TestTunnel {
        let stop = CancellationToken::new();
        let tunnel = Tunnel::start(cfg, stop.clone());
        TestTunnel { tunnel, stop }
    }

    /// Waits until `pred` holds for the state; panics with the last state after `within`.
    pub async fn wait(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&TunnelState) -> bool,
    ) -> TunnelState {
        let mut rx = self.tunnel.subscribe();
        match tokio::time::timeout(within, rx.wait_for(|s| pred(s))).await {
            Ok(Ok(s)) => s.clone(),
            _ => panic!(
                "tunnel not {what} within {within:?}: {:?}",
                self.tunnel.state()
            ),
        }
    }

    pub async fn wait_up(&self) -> TunnelState {
        self.wait(Duration::from_secs(30), "up", |s| {
            s.state == TunnelStateKind::Up
        })
        .await
    }

    /// Waits for the first failure and answers its `last_error`.
    pub async fn wait_error(&self) -> String {
        self.wait(Duration::from_secs(30), "failed", |s| {
            s.last_error.is_some()
        })
        .await
        .last_error
        .unwrap()
    }

    pub async fn stop(&self) {
        self.stop.cancel();
        self.tunnel.stopped().await;
    }
}

impl Drop for TestTunnel {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(pid) = self.tunnel.ssh_pid() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

pub use sendense_tests::nbd::QemuNbd;

/// qemu-nbd serving `file` (`format`) as `export` on 127.0.0.1:`port` (the hub's side).
pub async fn serve(file: &Path, format: &str, export: &str, port: u16) -> QemuNbd {
    QemuNbd::builder(file, export)
        .format(format)
        .tcp_on("127.0.0.1", port)
        .start_async()
        .await
}

pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// `sendense-node` with `--tunnel` against `sshd` (its API on 127.0.0.1:`ports.node_api`, where
/// the reverse forward leads) and `vms`; the harness's launcher, killed with its ssh in `Drop`.
pub fn node_with_tunnel(sshd: &Sshd, ports: &Ports, vms: Vec<(String, PathBuf)>) -> NodeProcess {
    let opts = NodeOptions {
        listen: format!("127.0.0.1:{}", ports.node_api),
        vms,
        tunnel: Some(TunnelOptions {
            target: sshd.login(),
            identity: sshd.user_key.clone(),
            known_hosts: sshd.known_hosts.clone(),
            bind: BIND.into(),
            nbd_ports: (ports.nbd.first, ports.nbd.last),
            hub_api_port: ports.hub_api,
            reverse_port: ports.reverse,
        }),
        ..NodeOptions::new(sshd.dir.path().join("node"), "tnode")
    };
    NodeProcess::start(Path::new(NODE_BIN), opts).expect("start sendense-node")
}

/// A raw file of `size` bytes whose first `data` bytes are random (the rest a hole).
pub fn random_image(path: &Path, size: u64, data: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; data];
    rand::rng().fill(&mut bytes[..]);
    std::fs::write(path, &bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(size).unwrap();
    bytes
}

/// An empty (all-zero, sparse) raw file.
pub fn empty_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// `sendense-node copy --from FROM --to TO --destination-is-zero`; answers (success, stderr).
pub async fn node_copy(from: &str, to: &str) -> (bool, String) {
    let out = tokio::process::Command::new(NODE_BIN)
        .args(["copy", "--from", from, "--to", to, "--destination-is-zero"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .expect("run sendense-node copy");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
