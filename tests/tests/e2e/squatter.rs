//! A squatter on each forwarded port of a tunnel whose ssh was SIGKILLed: the node's local
//! forward to the hub's API (on 127.0.0.2) and the hub's end of the reverse forward to the
//! node's API (on 127.0.0.1). Each squatter records every byte it receives and, to be a
//! clever one, relays a proof challenge to the API of the side that asked (a reflection),
//! answering anything else with `200 {}`. For 30 s, driven by the agents' own timers and by
//! the console's `GET /api/v1/tunnel`, neither credential nor an `Authorization` header
//! reaches them, both tunnel states name the squatter's PID, and once the squatters leave, the
//! tunnel comes back and a backup completes.

use super::sys::{DATA, DISK_SIZE, hub_bin, node_bin};
use sendense_tests::disks;
use sendense_tests::hub::{HubOptions, HubProcess};
use sendense_tests::node::{NodeOptions, NodeProcess, TunnelOptions};
use sendense_tests::qemu::TestVm;
use sendense_tests::sshd::{KeyPorts, Sshd};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIND: &str = "127.0.0.2";
/// How long the squatters hold the ports (the "for 30 s").
const HOLD: Duration = Duration::from_secs(30);

fn free_on_both(n: u16) -> (u16, u16) {
    for _ in 0..100 {
        let (a, b) = sendense_tests::net::free_port_range(n);
        if (a..=b).all(|p| std::net::TcpListener::bind((BIND, p)).is_ok()) {
            return (a, b);
        }
    }
    panic!("no {n} ports free on both loopback addresses");
}

/// One HTTP/1.1 message head (and a `Content-Length` body) from `s`, or `None` at EOF.
async fn read_message(s: &mut TcpStream, rec: &Mutex<Vec<u8>>) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                return Some(buf);
            }
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        rec.lock().unwrap().extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A squatter on `addr`: records all it receives; relays proof challenges to `reflect_to`.
struct Squatter {
    got: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Squatter {
    /// Binds `addr` as soon as it is free (within `within`).
    async fn bind(addr: SocketAddr, reflect_to: SocketAddr, within: Duration) -> Squatter {
        let t = Instant::now();
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(t.elapsed() < within, "cannot squat {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        };
        eprintln!("+ squatting {addr} (pid {})", std::process::id());
        let got: Arc<Mutex<Vec<u8>>> = Arc::default();
        let rec = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let rec = rec.clone();
                tokio::spawn(async move {
                    while let Some(req) = read_message(&mut sock, &rec).await {
                        let answer = if req.starts_with(b"GET /api/v1/proof") {
                            relay(&req, reflect_to).await
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}".to_vec()
                        };
                        if sock.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Squatter { got, task }
    }

    fn bytes(&self) -> String {
        String::from_utf8_lossy(&self.got.lock().unwrap()).into_owned()
    }
}

/// The real API's answer to `req` (the reflection attack).
async fn relay(req: &[u8], to: SocketAddr) -> Vec<u8> {
    let sink = Mutex::new(Vec::new());
    let Ok(mut s) = TcpStream::connect(to).await else {
        return b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n".to_vec();
    };
    if s.write_all(req).await.is_err() {
        return Vec::new();
    }
    read_message(&mut s, &sink).await.unwrap_or_default()
}

fn tunnel_of<'a>(tunnels: &'a Value, node: &str) -> &'a Value {
    tunnels
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == node)
        .unwrap_or_else(|| panic!("{tunnels}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squatters_on_both_forwards_get_no_credential_and_are_named() {
    let tmp = tempfile::Builder::new()
        .prefix("sde2e-squat-")
        .tempdir()
        .unwrap();
    let d = tmp.path();
    let (hub_port, _) = free_on_both(1);
    let nbd = free_on_both(4);
    let mut hopts = HubOptions::new(d.join("hub"));
    hopts.listen = format!("127.0.0.1:{hub_port}");
    hopts.nbd_ports = Some(nbd);
    let hub = HubProcess::start(&hub_bin(), hopts).expect("start sendense-hub");
    let api = hub.api();
    let vm = TestVm::start("sqvm", &d.join("vm"), &[DISK_SIZE], |imgs| {
        for (off, len, pat) in DATA {
            disks::write_pattern(&imgs[0], *off, *len, *pat);
        }
    })
    .await
    .expect("start QEMU");
    let (reverse, _) = free_on_both(1);
    let (node_api, _) = free_on_both(1);
    let sshd = Sshd::start(
        &node_bin(),
        KeyPorts {
            nbd,
            hub_api: hub_port,
            reverse,
            hub_nbd_dir: Some(hub.opts.data_dir.join("nbd")),
        },
    )
    .await;
    let credential_file = hub.node_credential("sqnode").expect("enrolling the node");
    let credential = std::fs::read_to_string(&credential_file)
        .unwrap()
        .trim()
        .to_string();
    let mut node = NodeProcess::start(
        &node_bin(),
        NodeOptions {
            token_file: Some(credential_file),
            vms: vec![("sqvm".into(), vm.node_qmp.clone())],
            listen: format!("127.0.0.1:{node_api}"),
            tunnel: Some(TunnelOptions {
                target: sshd.login(),
                identity: sshd.user_key.clone(),
                known_hosts: sshd.known_hosts.clone(),
                bind: BIND.into(),
                nbd_ports: nbd,
                hub_api_port: hub_port,
                reverse_port: reverse,
            }),
            // A tunnel that comes back within 2 s once the port is free (default 30 s).
            extra_config: "[tunnel]\nretry_max_secs = 2\n".into(),
            // The hub's export sockets, forwarded as streamlocal (the default).
            args: super::sys::hub_nbd_dir_args(&hub.opts),
            ..NodeOptions::new(d.join("node"), "sqnode")
        },
    )
    .expect("start sendense-node");
    let t = Instant::now();
    loop {
        let (s, v) = api.get("/api/v1/vms/sqvm").await;
        if s == 200 && v["node"] == "sqnode" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "VM not imported through the tunnel: {s} {v}\nnode: {}",
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The ssh of link 0 (the one carrying the API forwards; the others carry NBD slots only)
    // dies; the squatters take both forwarded ports before the node's supervisor retries.
    let (_, nt) = node.get("/tunnel").await;
    let api_ssh = nt["links"][0]["pid"].as_u64().expect("link 0's ssh PID") as u32;
    let ssh = node.ssh_children();
    assert!(ssh.contains(&api_ssh), "{ssh:?} {nt}");
    eprintln!("+ kill -KILL {api_ssh} (the tunnel's ssh of link 0)");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(api_ssh as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let hub_addr: SocketAddr = format!("127.0.0.1:{hub_port}").parse().unwrap();
    let node_addr: SocketAddr = format!("127.0.0.1:{node_api}").parse().unwrap();
    // On the node: its hub forward; a reflection goes to the node's own API.
    let at_node = Squatter::bind(
        format!("{BIND}:{hub_port}").parse().unwrap(),
        node_addr,
        Duration::from_millis(300),
    )
    .await;
    // On the hub: the reverse forward (freed once sshd saw the client go); a reflection goes
    // to the hub's own API.
    let at_hub = Squatter::bind(
        format!("127.0.0.1:{reverse}").parse().unwrap(),
        hub_addr,
        Duration::from_secs(10),
    )
    .await;
    let me = std::process::id();
    let named = format!("held by pid {me} (");

    // The node sees its ssh gone (it reaps it and says so) before the hold begins: on a
    // loaded machine that can take a moment after the SIGKILL.
    let t = Instant::now();
    loop {
        let (_, nt) = node.get("/tunnel").await;
        if nt["state"] != "up" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "tunnel still up: {nt}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 30 s with the agents' own timers (the hub's prober, the node's registration and
    // supervisor) and the console asking the hub every second.
    let start = Instant::now();
    let (mut node_named, mut hub_named) = (None, None);
    while start.elapsed() < HOLD {
        let (s, nt) = node.get("/tunnel").await;
        assert_eq!(s, 200, "{nt}");
        assert_ne!(nt["state"], "up", "{nt}");
        if nt["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(&named))
        {
            node_named.get_or_insert(nt.clone());
        }
        let tunnels = api.get_ok("/api/v1/tunnel").await;
        let ht = tunnel_of(&tunnels, "sqnode").clone();
        assert_eq!(ht["live"], false, "{ht}");
        if ht["error"].as_str().is_some_and(|e| e.contains(&named)) {
            hub_named.get_or_insert(ht.clone());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let nt = node_named.unwrap_or_else(|| {
        panic!(
            "the node's tunnel state never named the squatter ({named}): {}",
            node.stderr()
        )
    });
    assert!(
        nt["last_error"]
            .as_str()
            .unwrap()
            .contains(&format!("port {hub_port} held by pid {me}")),
        "{nt}"
    );
    let ht = hub_named.expect("the hub's tunnel state never named the squatter");
    let he = ht["error"].as_str().unwrap();
    assert!(
        he.contains("did not prove it is the node of node \"sqnode\": squatted port?"),
        "{he}"
    );
    assert!(
        he.contains(&format!("port {reverse} held by pid {me}")),
        "{he}"
    );

    for (which, sq) in [("node side", &at_node), ("hub side", &at_hub)] {
        let bytes = sq.bytes();
        let lower = bytes.to_ascii_lowercase();
        assert!(
            !bytes.contains(&credential),
            "{which}: the node credential leaked: {bytes}"
        );
        assert!(
            !bytes.contains(&hub.token),
            "{which}: the admin token leaked: {bytes}"
        );
        assert!(!lower.contains("authorization"), "{which}: {bytes}");
        // Whatever arrived was a proof challenge, nothing else.
        for line in bytes
            .lines()
            .filter(|l| l.starts_with("GET ") || l.starts_with("POST "))
        {
            assert!(
                line.starts_with("GET /api/v1/proof?nonce="),
                "{which}: {line}"
            );
        }
        eprintln!("{which}: {} bytes received", bytes.len());
    }
    assert!(
        at_hub.bytes().contains("GET /api/v1/proof?nonce="),
        "the hub never asked the squatter for a proof: {}",
        at_hub.bytes()
    );

    // The squatters leave; the node's supervisor brings the tunnel back.
    at_node.task.abort();
    at_hub.task.abort();
    let _ = at_node.task.await;
    let _ = at_hub.task.await;
    let t = Instant::now();
    loop {
        let tunnels = api.get_ok("/api/v1/tunnel").await;
        let ht = tunnel_of(&tunnels, "sqnode");
        if ht["live"] == true && ht["tunnel"]["state"] == "up" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the tunnel did not come back: {ht}\nnode: {}",
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    super::sys::full_backup_completes(&api, "sqvm", &node).await;
    node.terminate(Duration::from_secs(15)).await;
    drop(sshd);
    drop(hub);
}
