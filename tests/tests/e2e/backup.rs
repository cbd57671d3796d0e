//! The critical path: a 2-disk VM backed up through the hub's API from one snapshot instant,
//! with guest writes in flight, then an incremental; and the node's inventory at the hub.

use super::sys::{DATA_BYTES, DISK_SIZE, MIB, SLOW_BPS, Sys, SysOptions, disk, image_paths};
use sendense_tests::disks;
use serde_json::{Value, json};
use std::path::Path;

/// Steps every successful job logs, in this order.
const FULL_STEPS: &[&str] = &[
    "created",
    "space_checked",
    "port_allocated",
    "image_created",
    "qemu_nbd_started",
    "running",
    "node_start",
    "node_accepted",
    // The truth is stored before the completion report is taken; the writable exports stop
    // (cleanly) before the read-back, which covers the written ranges and the whole chain.
    "checksums_stored",
    "finalizing",
    "qemu_nbd_stopped",
    "checksums_verified",
    "image_verified",
    "image_checked",
    "ports_released",
    "completed",
];

fn assert_steps_in_order(events: &[String], steps: &[&str]) {
    let mut at = 0;
    for s in steps {
        match events[at..]
            .iter()
            .position(|e| e.starts_with(&format!("{s}:")))
        {
            Some(i) => at += i + 1,
            None => panic!("event {s} missing (or out of order) in {events:#?}"),
        }
    }
}

/// The snapshot transactions of the node's QMP log: those holding `blockdev-backup` actions,
/// each as the list of devices it covered.
fn snapshot_transactions(log: &[Value]) -> Vec<Vec<String>> {
    log.iter()
        .filter(|e| e["execute"] == "transaction")
        .map(|e| {
            e["arguments"]["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["type"] == "blockdev-backup")
                .map(|a| a["data"]["device"].as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect()
}

fn equal(expected: &Path, image: &Path) -> bool {
    disks::images_equal(expected, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_of_a_two_disk_vm_from_one_instant() {
    let sys = Sys::start(
        "e2evm",
        SysOptions {
            throttle_bps: Some(SLOW_BPS),
            ..Default::default()
        },
    )
    .await;

    // The VM as the node reported it: disk keys, distinct unit numbers, sizes.
    let vm = sys.api.get_ok("/api/v1/vms/e2evm").await;
    let keys: Vec<i64> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["disk_key"].as_i64().unwrap())
        .collect();
    assert_eq!(keys, [2000, 2001], "{vm}");
    let units: Vec<i64> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["unit_number"].as_i64().unwrap())
        .collect();
    assert_eq!(units, [0, 1], "{vm}");

    // The VM is paused and nobody writes: its disks now are the snapshot's expected content.
    let at_full = sys.disks_now("at-full").await;

    // 1. Full backup; guest writes while the node copies must not reach the backup.
    let (id, b) = sys.backup("full").await;
    assert_eq!(b["status"], "running", "{b}");
    assert_eq!(b["backup_type"], "full", "{b}");
    let targets = b["nbd_targets_string"].as_str().unwrap();
    for d in b["disk_results"].as_array().unwrap() {
        assert!(
            // The hub's default `nbd_listen = "unix"`: the port is the slot of its socket.
            targets.contains(&format!(
                "{}:nbd+unix:///{}?socket={}/nbd/{}.sock",
                d["disk_key"],
                d["nbd_export_name"].as_str().unwrap(),
                sys.hub.opts.data_dir.display(),
                d["nbd_port"],
            )),
            "{targets} vs {d}"
        );
    }
    sys.wait_node_copying(&id).await;
    for i in 0..2 {
        sys.vm.guest_write(i, 0x99, 0, 4 * MIB).await;
        sys.vm.guest_write(i, 0x98, 60 * MIB, 4 * MIB).await;
    }
    let full = sys.wait_completed(&id).await;
    sys.assert_clean(&full).await;
    for d in full["disk_results"].as_array().unwrap() {
        assert_eq!(d["status"], "completed", "{d}");
        assert_eq!(d["bytes_done"], json!(DISK_SIZE), "{d}");
    }
    let full_images = image_paths(&full);
    for (i, img) in full_images.iter().enumerate() {
        assert!(
            equal(&at_full[i], img),
            "full backup of disk {i} ({}) differs from the disk at the snapshot instant",
            img.display()
        );
    }
    // The guest writes did land in the VM (so their absence above means something).
    let after_writes = sys.disks_now("after-writes").await;
    for i in 0..2 {
        assert!(
            !equal(&at_full[i], &after_writes[i]),
            "guest write to disk {i} missing"
        );
    }
    // One QMP transaction took the snapshot of both disks; no disk was snapshotted alone.
    let log = sys.node.qmp_log();
    assert_eq!(
        snapshot_transactions(&log),
        vec![vec!["fmt0".to_string(), "fmt1".to_string()]],
        "QMP log: {log:#?}"
    );
    assert!(
        !log.iter().any(|e| e["execute"] == "blockdev-backup"),
        "a blockdev-backup outside a transaction: {log:#?}"
    );
    let events = sys.events(&id).await;
    assert_steps_in_order(&events, FULL_STEPS);
    for key in [2000, 2001] {
        assert!(
            events
                .iter()
                .any(|e| e.starts_with("checksums_verified:") && e.contains(&format!("disk {key}"))),
            "disk {key} not verified: {events:#?}"
        );
    }

    // The verification is stored and shown per disk.
    let ver = sys
        .api
        .get_ok(&format!("/api/v1/backups/{id}/verification"))
        .await;
    for d in ver.as_array().unwrap() {
        assert_eq!(d["checksum_status"], "passed", "{ver}");
        assert!(d["qemu_img_check"].is_string(), "{ver}");
    }

    // 2. Guest writes between the backups are what the incremental must carry.
    sys.vm.guest_write(0, 0x77, 20 * MIB, 8 * MIB).await;
    sys.vm.guest_write(1, 0x78, 70 * MIB, 2 * MIB).await;
    // Changed since the full's snapshot: the writes made during its copy, and these.
    let changed = [16 * MIB, 10 * MIB];
    let at_incr = sys.disks_now("at-incr").await;

    let (id2, b2) = sys.backup("incremental").await;
    assert_eq!(b2["backup_type"], "incremental", "{b2}");
    sys.wait_node_copying(&id2).await;
    for i in 0..2 {
        sys.vm.guest_write(i, 0xab, 8 * MIB, MIB).await;
    }
    let incr = sys.wait_completed(&id2).await;
    sys.assert_clean(&incr).await;
    let node_view = sys.node.get(&format!("/backup/{id2}")).await.1;
    for (i, key) in [2000i64, 2001].iter().enumerate() {
        let nd = node_view["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["disk_key"] == *key)
            .unwrap();
        let written = nd["bytes_written"].as_u64().unwrap();
        assert!(
            written >= changed[i] && written <= changed[i] + MIB,
            "disk {key}: incremental wrote {written} bytes, {} changed: {nd}",
            changed[i]
        );
        assert!(written < DATA_BYTES, "incremental copied like a full: {nd}");
    }
    let incr_images = image_paths(&incr);
    for (i, img) in incr_images.iter().enumerate() {
        let info = disks::info(img);
        assert_eq!(
            info["backing-filename"]
                .as_str()
                .map(|s| !s.starts_with('/')),
            Some(true),
            "incremental image of disk {i} has no relative backing file: {info}"
        );
        assert!(
            equal(&at_incr[i], img),
            "chain top of disk {i} ({}) differs from the disk at the second snapshot",
            img.display()
        );
        // The full is untouched by the incremental on top of it.
        assert!(
            equal(&at_full[i], &full_images[i]),
            "full of disk {i} changed"
        );
    }
    assert_eq!(disk(&incr, 2000)["status"], "completed");
    let ver = sys
        .api
        .get_ok(&format!("/api/v1/backups/{id2}/verification"))
        .await;
    for d in ver.as_array().unwrap() {
        assert_eq!(d["checksum_status"], "passed", "{ver}");
        assert_eq!(d["parent_backup_id"], json!(id), "{ver}");
    }
    let log = sys.node.qmp_log();
    assert_eq!(snapshot_transactions(&log).len(), 2, "{log:#?}");
    // Both points are proven against the node's whole-disk checksums of the snapshot (the
    // incremental's unchanged cells inherited from the full), and say they are only
    // crash-consistent: these VMs have no guest agent.
    for pid in [&id, &id2] {
        let b = sys.api.get_ok(&format!("/api/v1/backups/{pid}")).await;
        assert_eq!(b["integrity"], "verified", "{b:#}");
        assert_eq!(b["consistency"]["level"], "crash", "{b:#}");
        for k in [2000, 2001] {
            assert_eq!(disk(&b, k)["checksums_source"], "writer", "{b:#}");
        }
        let events = sys.events(pid).await;
        assert!(
            events.iter().any(|e| e.starts_with("image_verified:")),
            "{events:#?}"
        );
        // The VM's hardware as the node recorded it at the snapshot (`-m 64`, one vCPU,
        // q35 under TCG, virtio-blk `disk0`/`disk1` on the VM's own images).
        let hw = &b["hardware"];
        assert_eq!(hw["memory_mib"], 64, "{b:#}");
        assert_eq!(hw["cpus"], 1, "{b:#}");
        assert!(hw["machine"].as_str().unwrap().contains("q35"), "{hw:#}");
        assert_eq!(hw["accel"], "tcg", "{hw:#}");
        let hw_disks = hw["disks"].as_array().unwrap();
        assert_eq!(hw_disks.len(), 2, "{hw:#}");
        for (i, d) in hw_disks.iter().enumerate() {
            assert_eq!(d["disk_key"], 2000 + i as i64, "{hw:#}");
            assert_eq!(d["device_id"], format!("disk{i}"), "{hw:#}");
            assert_eq!(d["virtual_size"], json!(DISK_SIZE), "{hw:#}");
            assert_eq!(d["bus"], "virtio", "{hw:#}");
            assert_eq!(d["format"], "qcow2", "{hw:#}");
            assert_eq!(
                d["image_path"],
                sys.vm.images[i].display().to_string(),
                "{hw:#}"
            );
        }
        let argv: Vec<&str> = hw["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(argv[0].ends_with("qemu-system-x86_64"), "{argv:?}");
        assert!(argv.contains(&"e2evm"), "{argv:?}");
        assert!(
            events.iter().any(|e| e.starts_with("hardware:")),
            "{events:#?}"
        );
    }

    // 3. A restore of each point (each disk) equals that point.
    for (point, id, expected) in [("full", &id, &at_full), ("incr", &id2, &at_incr)] {
        for (i, key) in [2000i64, 2001].iter().enumerate() {
            let (r, path) = sys
                .restore(id, *key, &format!("restore-{point}-{key}.qcow2"))
                .await;
            assert_eq!(
                r["status"], "completed",
                "restore of {point} disk {key}: {r:#}"
            );
            assert!(
                equal(&expected[i], &path),
                "restore of {point} disk {key} differs from the disk at that snapshot"
            );
            assert_eq!(r["nbd_port"], Value::Null, "{r}");
        }
    }
    let events = sys.events(&id2).await;
    assert!(
        events
            .iter()
            .filter(|e| e.starts_with("restore_completed:"))
            .count()
            == 2,
        "{events:#?}"
    );
    let ports = sys.api.get_ok("/api/v1/ports").await;
    assert_eq!(ports["allocations"], json!([]), "{ports}");
    let procs = sys.api.get_ok("/api/v1/processes").await;
    for p in procs.as_array().unwrap() {
        assert_eq!(p["alive"], json!(false), "{p}");
    }
    // Refusals name the field or the cause.
    let (s, v) = sys
        .api
        .post(
            "/api/v1/restores",
            &json!({"backup_id": id, "target": {"node": sys.node.opts.name, "path": "/tmp/x.qcow2"}}),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("disk_key"), "{v}");
    let (s, v) = sys
        .api
        .post(
            "/api/v1/restores",
            &json!({"backup_id": id, "disk_key": 2000, "target": {"node": sys.node.opts.name, "path": "relative.qcow2"}}),
        )
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("target.path"), "{v}");
}

/// Re-discovery: a disk grown in QEMU shows its new size at the hub after
/// `POST /api/v1/nodes/{name}/discover`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_follows_a_resized_disk() {
    let sys = Sys::start("e2einv", SysOptions::default()).await;
    let nodes = sys.api.get_ok("/api/v1/nodes").await;
    let me = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == json!(sys.node.opts.name))
        .unwrap_or_else(|| panic!("node not registered: {nodes}"));
    assert_eq!(me["api_url"], json!(sys.node.url), "{me}");
    assert!(
        !me["version"].as_str().unwrap_or_default().is_empty(),
        "{me}"
    );

    sys.vm.resize(1, DISK_SIZE + 64 * MIB).await;
    let (s, v) = sys
        .api
        .post(
            &format!("/api/v1/nodes/{}/discover", sys.node.opts.name),
            &json!({}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let vm = sys.api.get_ok("/api/v1/vms/e2einv").await;
    let sizes: Vec<u64> = vm["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["size_bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [DISK_SIZE, DISK_SIZE + 64 * MIB], "{vm}");
    // A backup after the change covers the new size.
    let b = sys.backup_completes("full").await;
    assert_eq!(
        disk(&b, 2001)["bytes_total"],
        json!(DISK_SIZE + 64 * MIB),
        "{b}"
    );
}

/// A lost change-tracking bitmap: asked before anything is prepared (`POST
/// /api/v1/backup/check`), the node refuses the incremental (409 `bitmap_missing`) and the hub
/// runs the job as a full backup from the start, recorded as such, with images without a
/// backing file and no export built twice; the next incremental then builds on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_without_bitmap_falls_back_to_full() {
    let sys = Sys::start("e2efallback", SysOptions::default()).await;
    sys.backup_completes("full").await;
    sys.vm.guest_write(0, 0x55, 30 * MIB, 2 * MIB).await;
    // The bitmaps vanish (as with a QEMU restart on non-persistent ones).
    let nodes = sys
        .vm
        .qmp()
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let mut removed = 0;
    for n in nodes.as_array().unwrap() {
        let node = n["node-name"].as_str().unwrap_or_default();
        for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
            let name = b["name"].as_str().unwrap_or_default();
            if node.starts_with("fmt") && name.starts_with("sendense-") {
                sys.vm
                    .qmp()
                    .execute(
                        "block-dirty-bitmap-remove",
                        json!({"node": node, "name": name}),
                    )
                    .await
                    .unwrap();
                removed += 1;
            }
        }
    }
    assert_eq!(removed, 2, "{nodes:#}");
    let now = sys.disks_now("now").await;

    let (id, b) = sys.backup("incremental").await;
    assert_eq!(
        b["backup_type"], "full",
        "the answer already says full: {b}"
    );
    let end = sys.wait_completed(&id).await;
    assert_eq!(end["backup_type"], "full", "{end:#}");
    sys.assert_event(
        &id,
        "incremental_fallback",
        &["FULL", "bitmap_missing", "before any export was prepared"],
    )
    .await;
    let events = sys.events(&id).await;
    for step in ["port_allocated:", "qemu_nbd_started:"] {
        let n = events.iter().filter(|e| e.starts_with(step)).count();
        assert_eq!(n, 2, "one {step} per disk, none rebuilt: {events:#?}");
    }
    let ver = sys
        .api
        .get_ok(&format!("/api/v1/backups/{id}/verification"))
        .await;
    for d in ver.as_array().unwrap() {
        assert_eq!(d["parent_backup_id"], Value::Null, "{ver}");
        assert_eq!(d["backing_path"], Value::Null, "{ver}");
    }
    sys.assert_clean(&end).await;
    for (i, img) in image_paths(&end).iter().enumerate() {
        let info = disks::info(img);
        assert!(info.get("backing-filename").is_none(), "{info}");
        assert!(equal(&now[i], img), "fallback full of disk {i} differs");
    }
    // The chain goes on from the fallback full.
    sys.vm.guest_write(1, 0x56, 10 * MIB, MIB).await;
    let now = sys.disks_now("next").await;
    let (id, _) = sys.backup("incremental").await;
    let next = sys.wait_completed(&id).await;
    assert_eq!(next["backup_type"], "incremental", "{next:#}");
    sys.assert_clean(&next).await;
    for (i, img) in image_paths(&next).iter().enumerate() {
        assert!(equal(&now[i], img), "incremental of disk {i} differs");
    }
}

/// A node whose inventory holds a VM the hub refuses (another node's VM has its name) still
/// gets its other VMs imported: the refused one is said in the node's log, not retried ahead
/// of the rest forever.
/// Two nodes with a VM of one name get two VMs on the hub, never a takeover: the first keeps
/// the name, the second's becomes `<name>.<node>` and its backup copies the second node's disk
/// (the hub names the VM to its node as the node knows it). A VM the hub refuses outright (both
/// names held by another node) is said once by the node and does not keep its other VMs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_a_vm_of_one_name_get_two_vms() {
    let sys = Sys::start("e2einvb", SysOptions::default()).await;
    let clash =
        sendense_tests::qemu::TestVm::start("e2einvb", &sys.path("vm-clash"), &[MIB], |_| {})
            .await
            .expect("start QEMU");
    let refused =
        sendense_tests::qemu::TestVm::start("e2einvr", &sys.path("vm-refused"), &[MIB], |_| {})
            .await
            .expect("start QEMU");
    let after =
        sendense_tests::qemu::TestVm::start("e2einvz", &sys.path("vm-after"), &[MIB], |_| {})
            .await
            .expect("start QEMU");
    // Both names of `e2einvr` held by the first node (by the admin, before the second starts).
    let first_node = sys.node.opts.name.clone();
    for name in ["e2einvr", "e2einvr.node-second"] {
        let (s, v) = sys
            .api
            .post(
                "/api/v1/vms",
                &json!({"vm_name": name, "node": first_node,
                        "disks": [{"disk_key": 2000, "unit_number": 0, "size_bytes": MIB, "label": "d"}]}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    clash.guest_write(0, 0x5c, 0, MIB / 2).await;
    let second = sendense_tests::node::NodeProcess::start(
        &super::sys::node_bin(),
        super::sys::node_options(
            &sys.hub,
            &sys.path("second"),
            "second",
            vec![
                ("e2einvb".to_string(), clash.node_qmp.clone()),
                ("e2einvr".to_string(), refused.node_qmp.clone()),
                ("e2einvz".to_string(), after.node_qmp.clone()),
            ],
            None,
        ),
    )
    .expect("start the second node");
    let t = std::time::Instant::now();
    loop {
        let (s, v) = sys.api.get("/api/v1/vms/e2einvz").await;
        if s == 200 && v["node"] == "node-second" {
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "e2einvz not imported within 30 s ({s}: {v})\nsecond node log:\n{}",
            second.stderr()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let first = sys.api.get_ok("/api/v1/vms/e2einvb").await;
    assert_eq!(
        first["node"],
        json!(first_node),
        "never a takeover: {first}"
    );
    assert!(first.get("node_vm_name").is_none(), "{first}");
    let theirs = sys.api.get_ok("/api/v1/vms/e2einvb.node-second").await;
    assert_eq!(theirs["node"], "node-second", "{theirs}");
    assert_eq!(theirs["node_vm_name"], "e2einvb", "{theirs}");
    assert_eq!(theirs["disks"][0]["size_bytes"], json!(MIB), "{theirs}");
    // The second node names its VM as it knows it, and gets its own.
    let nb = sys.hub.node_api("node-second").unwrap();
    let (s, v) = nb.get("/api/v1/vms/e2einvb").await;
    assert_eq!(
        (s, &v["vm_name"]),
        (200, &json!("e2einvb.node-second")),
        "{v}"
    );

    // Each VM's full backup holds its own node's disk.
    let at_clash = sys.path("clash-now.raw");
    clash.copy_disk_now(0, &at_clash).await;
    let done = super::sys::full_backup_completes(&sys.api, "e2einvb.node-second", &second).await;
    let img = image_paths(&done);
    assert!(
        equal(&at_clash, &img[0]),
        "the backup of e2einvb.node-second is not the second node's e2einvb disk"
    );
    let mine = sys.backup_completes("full").await;
    assert_eq!(mine["vm_name"], "e2einvb", "{mine}");
    assert!(
        !equal(&at_clash, &image_paths(&mine)[0]),
        "the first node's e2einvb backed up the second node's disk"
    );

    // The node's own push: the refusal said once, the loop not stuck retrying it.
    let t = std::time::Instant::now();
    while !second.stderr().contains("the hub refused this VM") {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "the refusal is not in the node's log:\n{}",
            second.stderr()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let log = second.stderr();
    assert!(log.contains("e2einvr"), "{log}");
    assert!(
        !log.contains("inventory push failed; retrying"),
        "the node keeps retrying the refused VM:\n{log}"
    );
}
