//! Several VMs at once on one node, and the port ceiling: a hub with 5 NBD ports runs two
//! 2-disk VMs together and refuses a third cleanly (503 naming the range and the count in use,
//! nothing held for it); once the two are done, the third goes through.

use super::sys::{DATA, DISK_SIZE, JOB_LIMIT, SLOW_BPS, hub_bin, node_bin};
use sendense_tests::disks;
use sendense_tests::hub::{HubOptions, HubProcess};
use sendense_tests::node::{NodeOptions, NodeProcess};
use sendense_tests::qemu::TestVm;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_at_once_and_a_clean_refusal_beyond_the_ports() {
    let tmp = tempfile::Builder::new().prefix("sde2e-").tempdir().unwrap();
    let mut o = HubOptions::new(tmp.path().join("hub"));
    o.nbd_ports = Some(sendense_tests::net::free_port_range(5));
    let hub = HubProcess::start(&hub_bin(), o).expect("hub");
    let api = hub.api();
    let names = ["e2econ-a", "e2econ-b", "e2econ-c"];
    let mut vms = Vec::new();
    for n in names {
        vms.push(
            TestVm::start(n, &tmp.path().join(n), &[DISK_SIZE, DISK_SIZE], |imgs| {
                for (i, img) in imgs.iter().enumerate() {
                    for (off, len, pat) in DATA {
                        disks::write_pattern(img, *off, *len, pat + i as u8);
                    }
                }
            })
            .await
            .expect("qemu"),
        );
    }
    let node = NodeProcess::start(
        &node_bin(),
        NodeOptions {
            hub_url: Some(hub.url.clone()),
            token_file: Some(hub.node_credential("node-con").expect("enrolling the node")),
            vms: names
                .iter()
                .zip(&vms)
                .map(|(n, v)| (n.to_string(), v.node_qmp.clone()))
                .collect(),
            throttle_bps: Some(SLOW_BPS),
            ..NodeOptions::new(tmp.path().join("node"), "node-con")
        },
    )
    .expect("node");
    let t = Instant::now();
    while api.get_ok("/api/v1/vms").await.as_array().map(|a| a.len()) != Some(3) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "inventory not imported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = |vm: &str| {
        let api = api.clone();
        let vm = vm.to_string();
        async move {
            api.post(
                "/api/v1/backups",
                &json!({"vm_name": vm, "repository_id": "default", "backup_type": "full"}),
            )
            .await
        }
    };
    let ((sa, a), (sb, b)) = tokio::join!(start(names[0]), start(names[1]));
    assert_eq!(sa, 202, "{a}");
    assert_eq!(sb, 202, "{b}");
    let ports = api.get_ok("/api/v1/ports").await;
    assert_eq!(ports["allocations"].as_array().unwrap().len(), 4, "{ports}");

    let (sc, c) = start(names[2]).await;
    assert_eq!(sc, 503, "{c}");
    let detail = c["detail"].as_str().unwrap_or_default();
    let (first, last) = hub.nbd_ports;
    assert!(
        detail.contains(&first.to_string()) && detail.contains(&last.to_string()),
        "the refusal does not name the range {first}-{last}: {c}"
    );
    // Nothing held for the refused VM.
    let ports = api.get_ok("/api/v1/ports").await;
    let ids = [a["backup_id"].clone(), b["backup_id"].clone()];
    for p in ports["allocations"].as_array().unwrap() {
        assert!(
            ids.contains(&p["backup_id"]),
            "port held for another job: {p}"
        );
    }

    for id in &ids {
        let id = id.as_str().unwrap();
        let done = api
            .wait_status(id, &["completed", "failed", "cancelled"], JOB_LIMIT)
            .await;
        assert_eq!(
            done["status"],
            "completed",
            "{done:#}\n{:#?}",
            api.event_lines(id).await
        );
    }
    let (sc, c) = start(names[2]).await;
    assert_eq!(sc, 202, "{c}");
    let done = api
        .wait_status(
            c["backup_id"].as_str().unwrap(),
            &["completed", "failed", "cancelled"],
            JOB_LIMIT,
        )
        .await;
    assert_eq!(done["status"], "completed", "{done:#}");
    let ports = api.get_ok("/api/v1/ports").await;
    assert_eq!(ports["allocations"], json!([]), "{ports}");
    for vm in &vms {
        assert_eq!(vm.leftovers().await, Vec::<String>::new());
    }
    drop(node);
}
