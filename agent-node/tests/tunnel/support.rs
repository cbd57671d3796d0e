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

/// `n` consecutive ports free on 127.0.0.1 and on 127.0.0.2 (the hub's side and the node's),
/// below the kernel's ephemeral range (32768+): a port from that range may become the source
/// port of any outgoing connection (ssh's own to sshd, another test's) between the pick and
/// ssh's bind, and the forward then fails with "Address already in use" and counts a restart.
pub fn free_block(n: u16) -> PortRange {
    let mut rng = rand::rng();
    for _ in 0..500 {
        let first = rng.random_range(12000..32000 - n);
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
    /// One block of six consecutive free ports, split: the four picks can never coincide (four
    /// independent picks could, e.g. the reverse port equal to the node's API port, which made
    /// the tunnel fail its first start now and then and count a restart).
    pub fn pick() -> Ports {
        let block = free_block(6);
        let f = block.first;
        Ports {
            nbd: PortRange {
                first: f,
                last: f + 2,
            },
            hub_api: f + 3,
            reverse: f + 4,
            node_api: f + 5,
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
        // qemu-nbd's TCP exports.
        hub_nbd_dir: None,
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
            // These tests forward qemu-nbd's TCP exports.
            nbd_forward: agent_node::tunnel::config::NbdForward::Tcp,
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
            // One ssh, as before links existed; the links tests set more.
            links: 1,
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
    node_with_tunnel_links(sshd, ports, vms, None)
}

/// [`node_with_tunnel`] with `--tunnel-links N` (`None`: the node's default).
pub fn node_with_tunnel_links(
    sshd: &Sshd,
    ports: &Ports,
    vms: Vec<(String, PathBuf)>,
    links: Option<u16>,
) -> NodeProcess {
    let mut args: Vec<String> = vec!["--tunnel-nbd".into(), "tcp".into()];
    if let Some(n) = links {
        args.extend(["--tunnel-links".into(), n.to_string()]);
    }
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
        // These tests serve qemu-nbd's TCP exports.
        args,
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
