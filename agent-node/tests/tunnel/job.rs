//! A backup whose NBD targets are reached through the tunnel, and the tunnel's ssh SIGKILLed
//! mid-copy: the job fails cleanly (as documented in `agent_node::tunnel`): every disk failed or
//! stopped, the error names the tunnel, the snapshot released, the tunnel back up with the
//! restart counted, and the final report reaches the "hub" through the restored hub-API forward.

use crate::node_support::{HubRecorder, MIB, TestVm, write_pattern};
use crate::support::*;
use serde_json::json;

const SIZES: [u64; 2] = [64 * MIB, 128 * MIB];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_killed_mid_copy_fails_the_job_cleanly_and_the_report_arrives() {
    let vm = TestVm::temp(&SIZES, |imgs| {
        write_pattern(&imgs[0], 0, 48 * MIB, 0x11);
        write_pattern(&imgs[1], 8 * MIB, 96 * MIB, 0x21);
    })
    .await;
    // The recording "hub" listens on the hub side's 127.0.0.1; the node reaches it only
    // through the tunnel (its hub URL defaults to the forward on 127.0.0.2).
    let hub = HubRecorder::start().await;
    let hub_api: u16 = hub.url.rsplit(':').next().unwrap().parse().unwrap();
    let ports = Ports {
        hub_api,
        ..Ports::pick()
    };
    assert!(std::net::TcpListener::bind((BIND, hub_api)).is_ok());
    let sshd = sshd(&ports).await;
    // One ssh carrying both disks, so that one SIGKILL cuts both (links.rs covers several).
    let node = node_with_tunnel_links(
        &sshd,
        &ports,
        vec![("vm1".into(), vm.node_qmp.clone())],
        Some(1),
    );
    node.wait_for("/tunnel", 30, |v| v["state"] == "up").await;
    // Registration went through the hub-API forward.
    hub.wait_for("/api/v1/nodes", 30).await;

    // Targets on the hub side, inside the forwarded range.
    let mut targets = Vec::new();
    let mut s = Vec::new();
    for (i, size) in SIZES.iter().enumerate() {
        let img = sshd.dir.path().join(format!("t{i}.qcow2"));
        run(std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg(size.to_string()));
        let port = ports.nbd.first + i as u16;
        let export = format!("vm1-disk-{}", 2000 + i);
        let t = serve(&img, "qcow2", &export, port).await;
        s.push(format!("{}:nbd://127.0.0.1:{port}/{export}", 2000 + i));
        targets.push(t);
    }
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-t", "vm_name": "vm1", "backup_type": "full",
                   "nbd_targets": s.join(",")}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    // Data is flowing: freeze the targets right there, so that ssh dies mid-stream.
    let moving = node
        .wait_for("/backup/b-t", 60, |v| {
            assert!(
                v["status"] != "completed",
                "the copy finished before it could be cut: {v}"
            );
            v["disks"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["bytes_written"].as_u64() > Some(0)))
        })
        .await;
    for t in &targets {
        t.pause();
    }
    assert!(!vm.leftovers().await.is_empty(), "the snapshot is held");
    let ssh = node.ssh_children();
    assert_eq!(ssh.len(), 1, "{ssh:?}");
    signal(ssh[0], nix::sys::signal::Signal::SIGKILL);
    for t in &targets {
        t.resume();
    }
    eprintln!("cut at: {moving}");
    let done = node
        .wait_for("/backup/b-t", 60, |v| v["status"] == "failed")
        .await;
    eprintln!("failed job: {done}");
    let err = done["error_message"].as_str().unwrap_or_default();
    assert!(
        err.contains(&format!(
            "through the ssh tunnel to {}@127.0.0.1:{} (now down since",
            sshd.user, sshd.port
        )),
        "{done}"
    );
    assert!(
        err.contains(&format!(
            "last error: ssh (PID {}) killed by SIGKILL",
            ssh[0]
        )),
        "{done}"
    );
    assert!(
        err.contains(&format!("nbd://127.0.0.2:{}", ports.nbd.first))
            || err.contains(&format!("nbd://127.0.0.2:{}", ports.nbd.first + 1)),
        "the routed target is named: {done}"
    );
    // Both disks' connections cross the killed ssh, so which disk fails first is a race; what
    // is determined (agent_node::jobs settle): at least one disk failed, and a disk that did
    // not fail by itself was stopped naming a failed disk.
    let disks = done["disks"].as_array().unwrap();
    let failed: Vec<String> = disks
        .iter()
        .filter(|d| d["status"] == "failed")
        .map(|d| d["disk_key"].to_string())
        .collect();
    assert!(!failed.is_empty(), "no disk failed: {done}");
    for d in disks {
        match d["status"].as_str() {
            Some("failed") => {}
            Some("cancelled") => {
                let why = d["error_message"].as_str().unwrap_or_default();
                assert!(
                    failed
                        .iter()
                        .any(|k| why == format!("stopped because disk {k} failed")),
                    "{done}"
                );
            }
            _ => panic!("disk neither failed nor stopped: {done}"),
        }
    }
    assert_eq!(
        vm.leftovers().await,
        Vec::<String>::new(),
        "snapshot released"
    );

    let t = node
        .wait_for("/tunnel", 30, |v| v["state"] == "up" && v["restarts"] == 1)
        .await;
    assert_eq!(
        t["last_error"],
        format!("ssh (PID {}) killed by SIGKILL", ssh[0])
    );
    let complete = hub.wait_for("/backups/b-t/complete", 60).await;
    assert_eq!(complete[0].body["status"], "failed");
}
