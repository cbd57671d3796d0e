//! Hub and node talking only through the node's SSH tunnel: a real sshd on a free loopback port
//! with generated keys and the restricted line of `sendense-node tunnel authorized-key`; the
//! node's forwards bound on 127.0.0.2 (the hub's own ports are on 127.0.0.1). The node is given
//! no `--hub-url`: it reaches the hub's API through its `-L` forward, the hub reaches the node
//! through the `-R` port, and the NBD data crosses the per-port forwards.

use super::sys::{DATA, DISK_SIZE, hub_bin, node_bin};
use sendense_tests::disks;
use sendense_tests::hub::{HubOptions, HubProcess};
use sendense_tests::node::{NodeOptions, NodeProcess, TunnelOptions};
use sendense_tests::qemu::TestVm;
use sendense_tests::sshd::{KeyPorts, Sshd};
use std::path::Path;
use std::time::{Duration, Instant};

const BIND: &str = "127.0.0.2";

/// `n` consecutive ports free on 127.0.0.1 and on 127.0.0.2.
fn free_on_both(n: u16) -> (u16, u16) {
    let ips = [std::net::Ipv4Addr::LOCALHOST, BIND.parse().unwrap()];
    sendense_tests::net::free_port_range_on(n, &ips)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backup_runs_through_the_tunnel() {
    let tmp = tempfile::Builder::new()
        .prefix("sde2e-tunnel-")
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
    let vm = TestVm::start("tunvm", &d.join("vm"), &[DISK_SIZE, DISK_SIZE], |imgs| {
        for (i, img) in imgs.iter().enumerate() {
            for (off, len, pat) in DATA {
                disks::write_pattern(img, *off, *len, pat + i as u8);
            }
        }
    })
    .await
    .expect("start QEMU");

    // The hub's sshd: keys, the restricted key line, the Match block of deploy/README-sshd.md.
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

    // The node, with the tunnel and without --hub-url.
    let mut node = NodeProcess::start(
        &node_bin(),
        NodeOptions {
            token_file: Some(hub.node_credential("tunnode").expect("enrolling the node")),
            vms: vec![("tunvm".into(), vm.node_qmp.clone())],
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
            // The hub's export sockets, forwarded as streamlocal (the default).
            args: super::sys::hub_nbd_dir_args(&hub.opts),
            ..NodeOptions::new(d.join("node"), "tunnode")
        },
    )
    .expect("start sendense-node");

    // Registration and inventory crossed the tunnel both ways.
    let t = Instant::now();
    loop {
        let (s, v) = api.get("/api/v1/vms/tunvm").await;
        if s == 200 && v["node"] == "tunnode" && v["disks"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "VM not imported through the tunnel: {s} {v}\nnode: {}",
            node.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = api.get_ok("/api/v1/nodes/tunnode").await;
    assert_eq!(n["api_url"], format!("http://127.0.0.1:{reverse}"), "{n}");

    let done = super::sys::full_backup_completes(&api, "tunvm", &node).await;
    let id = done["backup_id"].as_str().unwrap().to_string();
    for (i, r) in done["disk_results"].as_array().unwrap().iter().enumerate() {
        let port = r["nbd_port"].as_u64().unwrap() as u16;
        assert!((nbd.0..=nbd.1).contains(&port), "{r}");
        let now = d.join(format!("disk{i}.raw"));
        vm.copy_disk_now(i, &now).await;
        let image = Path::new(r["qcow2_path"].as_str().unwrap());
        assert!(disks::images_equal(&now, image), "disk {i} differs");
    }
    // The node's own record of the copy: its targets were the forwards on 127.0.0.2.
    let (s, job) = node.get(&format!("/backup/{id}")).await;
    assert_eq!(s, 200, "node job: {job}");
    assert_eq!(job["status"], "completed", "{job}");
    // Each disk crossed the tunnel over 4 NBD connections (each its own ssh channel, with its
    // own window), as the node's log of each copy says.
    let log = node.stderr();
    let copies: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("copy connected"))
        .collect();
    assert_eq!(copies.len(), 2, "one copy a disk: {copies:?}");
    assert!(
        copies.iter().all(|l| l.contains("target_connections=4")),
        "{copies:?}"
    );

    // Without anyone asking, the hub's prober has recorded the node's tunnel as up (this is
    // what its event stream publishes; `GET /api/v1/nodes` reads the recorded state only).
    let t = Instant::now();
    loop {
        let n = api.get_ok("/api/v1/nodes/tunnode").await;
        if n["tunnel"]["state"] == "up" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the hub never recorded the tunnel as up: {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The hub asks the node (through -R) for its tunnel state.
    let tunnels = api.get_ok("/api/v1/tunnel").await;
    let t = tunnels
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "tunnode")
        .unwrap_or_else(|| panic!("{tunnels}"));
    assert_eq!(t["live"], true, "{t}");
    assert_eq!(t["tunnel"]["state"], "up", "{t}");
    assert_eq!(t["tunnel"]["restarts"], 0, "{t}");
    // Four ssh links by default (one per slot of the 4-slot range), each up; the hub hands out
    // consecutive slots, so the two disks crossed two different links.
    let links = t["tunnel"]["links"].as_array().expect("links");
    assert_eq!(links.len(), 4, "{t}");
    assert!(links.iter().all(|l| l["state"] == "up"), "{t}");
    let carried: std::collections::BTreeSet<usize> = done["disk_results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let port = r["nbd_port"].as_u64().unwrap();
            links
                .iter()
                .position(|l| {
                    l["slots"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p.as_u64() == Some(port))
                })
                .expect("a link carries the disk's slot")
        })
        .collect();
    assert_eq!(carried.len(), 2, "both disks on one link: {t}");
    // SIGTERM: the node stops its ssh (in a process group of its own) before it exits.
    node.terminate(Duration::from_secs(15)).await;
    drop(sshd);
    drop(hub);
}
