//! Hub and node together, all real: `sendense-hub`, `sendense-node`, a paused QEMU VM with two
//! disks holding data, qemu-nbd. A full then an incremental backup driven through the hub's API
//! alone. Needs the workspace binaries built (`cargo build --workspace --bins`; `cargo nextest
//! run --workspace` builds them).

use sendense_tests::disks;
use sendense_tests::hub::{HubOptions, HubProcess};
use sendense_tests::qemu::{NodeProcess, TestVm};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

#[tokio::test(flavor = "multi_thread")]
async fn a_two_disk_vm_backed_up_through_hub_and_node() {
    let tmp = tempfile::tempdir().unwrap();
    let mut images = Vec::new();
    for i in 0..2u8 {
        let p = tmp.path().join(format!("vm-disk{i}.qcow2"));
        disks::create_qcow2(&p, SIZE);
        disks::write_pattern(&p, 0, 2 * MIB, 0x41 + i);
        disks::write_pattern(&p, 17 * MIB, 3 * MIB, 0x61 + i);
        images.push(p);
    }
    let vm = TestVm::start(tmp.path(), images);
    let hub = HubProcess::start(
        &sendense_tests::bin_path("sendense-hub"),
        HubOptions::new(tmp.path().join("hub")),
    )
    .expect("hub");
    let api = hub.api();
    let node = NodeProcess::start(
        tmp.path(),
        "node1",
        "vm1",
        &vm.node_qmp,
        &hub.url,
        &hub.opts.data_dir.join("token"),
    );

    // The node registers and pushes its inventory.
    let t = Instant::now();
    let v = loop {
        let (s, v) = api.get("/api/v1/vms/vm1").await;
        if s == 200 {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "vm1 never reached the hub; node log:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(v["node"], "node1", "{v}");
    assert_eq!(v["disks"].as_array().unwrap().len(), 2, "{v}");

    let mut previous: Option<(String, Vec<PathBuf>)> = None;
    // (requested, recorded): the third round loses the node's changed-block maps first, so the
    // node refuses the incremental and the hub falls back to a full backup, recorded as such.
    let rounds = [
        ("full", "full"),
        ("incremental", "incremental"),
        ("incremental", "full"),
    ];
    for (round, (kind, recorded)) in rounds.iter().enumerate() {
        if round >= 1 {
            vm.guest_write(0, 0x7e - round as u8, 30 * MIB, MIB);
            vm.guest_write(1, 0x7f - round as u8, 40 * MIB, 2 * MIB);
        }
        if round == 2 {
            let nodes = vm.qmp("query-named-block-nodes", json!({"flat": true}));
            let mut removed = 0;
            for n in nodes.as_array().unwrap() {
                for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                    vm.qmp(
                        "block-dirty-bitmap-remove",
                        json!({"node": n["node-name"], "name": b["name"]}),
                    );
                    removed += 1;
                }
            }
            assert!(removed >= 2, "the node keeps a bitmap per disk: {nodes}");
        }
        // What the disks hold at the snapshot instant (the VM is paused: nothing else writes).
        let expected: Vec<PathBuf> = (0..2)
            .map(|i| {
                let p = tmp.path().join(format!("expected-{round}-{i}.raw"));
                vm.copy_disk_now(i, &p);
                p
            })
            .collect();
        let (s, b) = api
            .post(
                "/api/v1/backups",
                &json!({"vm_name": "vm1", "repository_id": "default", "backup_type": kind}),
            )
            .await;
        assert_eq!(s, 202, "{b}");
        let id = b["backup_id"].as_str().unwrap().to_string();
        let done = api
            .wait_status(
                &id,
                &["completed", "failed", "cancelled"],
                Duration::from_secs(120),
            )
            .await;
        let events = api.event_lines(&id).await;
        assert_eq!(
            done["status"],
            "completed",
            "{done:#}\nevents: {events:#?}\nnode log:\n{}",
            node.log_text()
        );
        assert_eq!(done["backup_type"], *recorded, "{done}");
        if kind != recorded {
            assert!(
                events.iter().any(|e| e.starts_with("incremental_fallback")),
                "{events:#?}"
            );
        }
        let ver = api
            .get_ok(&format!("/api/v1/backups/{id}/verification"))
            .await;
        for d in ver.as_array().unwrap() {
            assert_eq!(d["checksum_status"], "passed", "{ver}");
        }
        let mut tops = Vec::new();
        for (i, d) in done["disk_results"].as_array().unwrap().iter().enumerate() {
            let img = PathBuf::from(d["qcow2_path"].as_str().unwrap());
            assert!(
                disks::images_equal(&img, &expected[i]),
                "{kind} backup of disk {} differs from the VM disk at the snapshot",
                d["disk_key"]
            );
            tops.push(img);
        }
        if let Some((prev_id, _)) = &previous {
            for d in ver.as_array().unwrap() {
                if *recorded == "incremental" {
                    assert_eq!(d["parent_backup_id"], prev_id.as_str(), "{ver}");
                } else {
                    assert_eq!(d["parent_backup_id"], json!(null), "{ver}");
                    assert_eq!(d["backing_path"], json!(null), "{ver}");
                }
            }
        }
        if *recorded == "full" {
            for t in &tops {
                assert!(
                    disks::info(t)["backing-filename"].is_null(),
                    "a full backup has no backing file: {}",
                    t.display()
                );
            }
        }
        assert_eq!(api.get_ok("/api/v1/ports").await["allocations"], json!([]));
        assert_eq!(api.get_ok("/api/v1/processes?alive=true").await, json!([]));
        previous = Some((id, tops));
    }
}
