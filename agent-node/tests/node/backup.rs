//! Whole backups through the real `sendense-node` binary: a 2-disk QEMU VM, real qemu-nbd
//! targets, guest writes while the copy is in flight, full then incremental, cancel, crash.

use crate::grid_reference::{expand, overlay, reference_grid};
use crate::support::*;
use serde_json::{Value, json};
use std::path::PathBuf;

const SIZES: [u64; 2] = [64 * MIB, 128 * MIB];
const GRID_CELL: u64 = sendense_shared::api::DEFAULT_GRID_CELL;

fn grid_of(disk: &Value) -> sendense_shared::api::GridChecksums {
    serde_json::from_value(disk["grid"].clone()).unwrap_or_else(|e| panic!("grid of {disk}: {e}"))
}

async fn two_disk_vm() -> TestVm {
    TestVm::temp(&SIZES, |imgs| {
        write_pattern(&imgs[0], 0, 24 * MIB, 0x11);
        write_pattern(&imgs[0], 40 * MIB, 8 * MIB, 0x12);
        write_pattern(&imgs[1], 8 * MIB, 32 * MIB, 0x21);
        write_pattern(&imgs[1], 100 * MIB, 20 * MIB, 0x22);
    })
    .await
}

/// qemu-nbd targets for every disk; `backing`: the previous backup's images.
async fn targets(vm: &TestVm, name: &str, backing: Option<&[PathBuf]>) -> (Vec<QemuNbd>, String) {
    let mut out = Vec::new();
    for (i, size) in SIZES.iter().enumerate() {
        let img = vm.dir.as_path().join(format!("{name}-{i}.qcow2"));
        let b = backing.map(|b| b[i].as_path());
        out.push(nbd_target(img, *size, b, &format!("vm1-disk-{}", 2000 + i)).await);
    }
    let s = out
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{}:{}", 2000 + i, t.uri()))
        .collect::<Vec<_>>()
        .join(",");
    (out, s)
}

fn terminal(v: &Value) -> bool {
    matches!(
        v["status"].as_str(),
        Some("completed" | "failed" | "cancelled")
    )
}

fn status_is(s: &'static str) -> impl Fn(&Value) -> bool {
    move |v| v["status"] == s
}

async fn snapshot_sources(vm: &TestVm, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for i in 0..SIZES.len() {
        let p = vm.dir.as_path().join(format!("{name}-src{i}.raw"));
        vm.copy_disk_now(i, &p).await;
        out.push(p);
    }
    out
}

/// The node's QMP log, parsed.
fn qmp_log(node: &NodeProcess) -> Vec<Value> {
    std::fs::read_to_string(node.run_dir.join("qmp.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_then_incremental_hold_the_snapshot_instant_on_every_disk() {
    let vm = two_disk_vm().await;
    let hub = HubRecorder::start().await;
    let node = start_node(node_opts(
        vm.dir.as_path(),
        Some(&vm.node_qmp),
        Some(&hub.url),
    ));

    // --- full backup; the targets are frozen so that the copy is in flight for sure ---
    let before = snapshot_sources(&vm, "full").await;
    let (mut full_targets, s) = targets(&vm, "full", None).await;
    for t in &full_targets {
        t.pause();
    }
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-full", "vm_name": "vm1", "backup_type": "full", "nbd_targets": s,
                   "checksum_grid": GRID_CELL}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    node.wait_job("b-full", 30, status_is("running")).await;
    for i in 0..SIZES.len() {
        vm.guest_write(i, 0x99, 0, 4 * MIB).await;
        vm.guest_write(i, 0x98, 44 * MIB, 2 * MIB).await;
    }
    let (_, mid) = node.get("/backup/b-full").await;
    assert_eq!(mid["status"], "running", "copy must be in flight: {mid}");
    for t in &full_targets {
        t.resume();
    }
    let done = node.wait_job("b-full", 60, terminal).await;
    assert_eq!(done["status"], "completed", "{done}\n{}", node.stderr());

    // One transaction covered both disks.
    let log = qmp_log(&node);
    let tx = commands(&log, "transaction");
    // The snapshot's transaction; a first full backup has no older bitmap to rotate away.
    assert_eq!(tx.len(), 1, "{tx:?}");
    let devices: Vec<_> = tx[0]["arguments"]["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["type"] == "blockdev-backup")
        .map(|a| a["data"]["device"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(devices, ["fmt0", "fmt1"]);

    for t in &mut full_targets {
        t.stop();
    }
    for (i, t) in full_targets.iter().enumerate() {
        images_equal(before[i].to_str().unwrap(), t.image.to_str().unwrap())
            .unwrap_or_else(|e| panic!("full backup of disk {i} is not the snapshot: {e}"));
    }
    assert_eq!(vm.leftovers().await, Vec::<String>::new());

    // The hub heard the final state with checksums.
    let complete = hub.wait_for("/backups/b-full/complete", 10).await;
    assert_eq!(complete.len(), 1, "{complete:?}");
    let c = &complete[0];
    assert_eq!(c.auth.as_deref(), Some(&*format!("Bearer {TOKEN}")));
    assert_eq!(c.body["status"], "completed");
    let mut full_grids = Vec::new();
    for (i, d) in c.body["disks"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["status"], "completed", "{d}");
        assert!(!d["checksums"]["ranges"].as_array().unwrap().is_empty());
        // The whole-disk grid is the snapshot's, cell by cell.
        let grid: Vec<String> = expand(&grid_of(d))
            .into_iter()
            .map(|c| c.expect("a full lists every cell"))
            .collect();
        assert_eq!(grid, reference_grid(&before[i], GRID_CELL), "disk {i}");
        full_grids.push(grid);
    }
    let progress = hub.calls_to("/backups/b-full/progress");
    let last = &progress.last().expect("progress reports").body;
    for (i, d) in last["disks"].as_array().unwrap().iter().enumerate() {
        assert_eq!(d["bytes_done"], d["bytes_total"], "{last}");
        assert_eq!(d["bytes_total"], SIZES[i]);
    }

    // --- incremental after guest writes ---
    vm.guest_write(0, 0x55, 30 * MIB, 3 * MIB).await;
    vm.guest_write(1, 0x56, 64 * MIB, 5 * MIB).await;
    // Writes during the full's copy (0x99, 0x98 areas) changed 6 MiB per disk too.
    let changed = [3 * MIB + 6 * MIB, 5 * MIB + 6 * MIB];
    let at_instant = snapshot_sources(&vm, "inc").await;
    let backing: Vec<PathBuf> = full_targets.iter().map(|t| t.image.clone()).collect();
    let (mut inc_targets, s) = targets(&vm, "inc", Some(&backing)).await;
    for t in &inc_targets {
        t.pause();
    }
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-inc", "vm_name": "vm1", "backup_type": "incremental",
                   "previous_backup_id": "b-full", "nbd_targets": s, "checksum_grid": GRID_CELL}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    node.wait_job("b-inc", 30, status_is("running")).await;
    vm.guest_write(0, 0x44, 50 * MIB, MIB).await;
    vm.guest_write(1, 0x45, 64 * MIB, MIB).await;
    for t in &inc_targets {
        t.resume();
    }
    let done = node.wait_job("b-inc", 60, terminal).await;
    assert_eq!(done["status"], "completed", "{done}\n{}", node.stderr());
    for t in &mut inc_targets {
        t.stop();
    }
    for (i, t) in inc_targets.iter().enumerate() {
        images_equal(at_instant[i].to_str().unwrap(), t.image.to_str().unwrap())
            .unwrap_or_else(|e| panic!("incremental chain of disk {i} is not the source: {e}"));
        let written = done["disks"][i]["bytes_written"].as_u64().unwrap();
        assert!(
            written >= changed[i] && written <= changed[i] + MIB,
            "disk {i}: wrote {written} bytes for {} changed (disk {} bytes)",
            changed[i],
            SIZES[i]
        );
    }
    let complete = hub.wait_for("/backups/b-inc/complete", 10).await;
    assert_eq!(complete[0].body["status"], "completed");
    for (i, d) in complete[0].body["disks"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        // Laid over the full's grid, the incremental's is the new snapshot's; the unchanged
        // parts of cells changed in part (e.g. 30M..33M of disk 0) were read for it.
        assert_eq!(
            overlay(&full_grids[i], &grid_of(d)),
            reference_grid(&at_instant[i], GRID_CELL),
            "disk {i}"
        );
        assert!(
            done["disks"][i]["bytes_read_for_grid"].as_u64() > Some(0),
            "{done}"
        );
    }
    assert_eq!(
        complete[0].body["disks"][1]["bytes_transferred"],
        json!(changed[1])
    );
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
    assert_eq!(vm.bitmaps(0).await, [("sendense-b-inc".to_string(), true)]);

    // Registration and inventory reached the hub.
    let nodes = hub.calls_to("/api/v1/nodes");
    assert_eq!(nodes[0].body["name"], "node1");
    assert_eq!(nodes[0].body["api_url"], node.url);
    let vms = hub.calls_to("/api/v1/vms");
    assert_eq!(vms[0].body["node"], "node1");
    assert_eq!(vms[0].body["disks"][1]["size_bytes"], SIZES[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_copy_releases_the_snapshot() {
    let vm = two_disk_vm().await;
    let hub = HubRecorder::start().await;
    let node = start_node(node_opts(
        vm.dir.as_path(),
        Some(&vm.node_qmp),
        Some(&hub.url),
    ));
    let (targets, s) = targets(&vm, "c", None).await;
    for t in &targets {
        t.pause();
    }
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-c", "vm_name": "vm1", "backup_type": "full", "nbd_targets": s}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    node.wait_job("b-c", 30, status_is("running")).await;
    assert!(!vm.leftovers().await.is_empty(), "snapshot should be held");
    // A second backup of the same VM is refused while this one runs.
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-c2", "vm_name": "vm1", "backup_type": "full", "nbd_targets": s}),
        )
        .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"], "vm_busy");

    // The hub is unreachable for a while: the final report must still arrive.
    hub.fail_first.store(4, std::sync::atomic::Ordering::SeqCst);
    let (code, body) = node.post("/backup/b-c/cancel", json!({})).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["status"], "cancelling");
    for t in &targets {
        t.resume();
    }
    let done = node.wait_job("b-c", 30, status_is("cancelled")).await;
    for d in done["disks"].as_array().unwrap() {
        assert_eq!(d["status"], "cancelled", "{done}");
    }
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
    // A cancelled first full backup leaves no change tracking behind.
    assert_eq!(vm.bitmaps(0).await, Vec::<(String, bool)>::new());
    let complete = hub.wait_for("/backups/b-c/complete", 30).await;
    assert_eq!(complete.len(), 1);
    assert_eq!(hub.fail_first.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(complete[0].body["status"], "failed");
    assert_eq!(complete[0].body["error_message"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_leftovers_are_released_at_start_up() {
    let vm = two_disk_vm().await;
    let mut node = start_node(node_opts(vm.dir.as_path(), Some(&vm.node_qmp), None));
    let (targets_a, s) = targets(&vm, "k", None).await;
    for t in &targets_a {
        t.pause();
    }
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-k", "vm_name": "vm1", "backup_type": "full", "nbd_targets": s}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    node.wait_job("b-k", 30, status_is("running")).await;
    let held = vm.leftovers().await;
    assert!(held.len() >= 4, "fleecing nodes and exports held: {held:?}");
    node.kill9();
    drop(targets_a);
    // The crash left everything in QEMU.
    assert_eq!(vm.leftovers().await, held);

    let node = start_node(node_opts(vm.dir.as_path(), Some(&vm.node_qmp), None));
    assert_eq!(
        vm.leftovers().await,
        Vec::<String>::new(),
        "{}",
        node.stderr()
    );
    assert_eq!(vm.bitmaps(1).await, Vec::<(String, bool)>::new());
    // And the next backup works.
    let before = snapshot_sources(&vm, "k2").await;
    let (mut t2, s) = targets(&vm, "k2", None).await;
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-k2", "vm_name": "vm1", "backup_type": "full", "nbd_targets": s}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    let done = node.wait_job("b-k2", 60, terminal).await;
    assert_eq!(done["status"], "completed", "{done}");
    for t in &mut t2 {
        t.stop();
    }
    for (i, t) in t2.iter().enumerate() {
        images_equal(before[i].to_str().unwrap(), t.image.to_str().unwrap()).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cancels_releases_and_reports() {
    let vm = two_disk_vm().await;
    let hub = HubRecorder::start().await;
    let mut node = start_node(node_opts(
        vm.dir.as_path(),
        Some(&vm.node_qmp),
        Some(&hub.url),
    ));
    let (targets, s) = targets(&vm, "t", None).await;
    for t in &targets {
        t.pause();
    }
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-t", "vm_name": "vm1", "backup_type": "full", "nbd_targets": s}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    node.wait_job("b-t", 30, status_is("running")).await;
    let node_log = node.stderr_path.clone();
    // The targets resume once the node has begun its shutdown (its log says so), so the copy
    // cannot finish before the cancel is in effect.
    let resume = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&node_log)
            .unwrap_or_default()
            .contains("shutting down: cancelling jobs")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the node never logged its shutdown"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        for t in &targets {
            t.resume();
        }
    };
    let (exited, ()) = tokio::join!(node.terminate(std::time::Duration::from_secs(30)), resume);
    assert!(
        exited.is_some(),
        "node did not exit on SIGTERM:\n{}",
        node.stderr()
    );
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
    let complete = hub.wait_for("/backups/b-t/complete", 5).await;
    assert_eq!(complete[0].body["status"], "failed");
    assert_eq!(
        complete[0].body["error_message"],
        "cancelled: the node is shutting down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_fails_the_job_names_the_disk_and_releases() {
    let vm = two_disk_vm().await;
    let hub = HubRecorder::start().await;
    let node = start_node(node_opts(
        vm.dir.as_path(),
        Some(&vm.node_qmp),
        Some(&hub.url),
    ));
    let (mut targets, s) = targets(&vm, "f", None).await;
    for t in &targets {
        t.pause();
    }
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-f", "vm_name": "vm1", "backup_type": "full", "nbd_targets": s}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    node.wait_job("b-f", 30, status_is("running")).await;
    // qemu-nbd of disk 2001 dies; 2000 goes on.
    targets[1].kill();
    targets[0].resume();
    let done = node.wait_job("b-f", 60, status_is("failed")).await;
    let d1 = &done["disks"][1];
    assert_eq!(d1["status"], "failed", "{done}");
    let err = d1["error_message"].as_str().unwrap();
    assert!(
        err.contains(&targets[1].uri()),
        "the error names the target: {err}"
    );
    assert!(
        done["error_message"]
            .as_str()
            .unwrap()
            .contains("disk 2001"),
        "{done}"
    );
    assert_ne!(done["disks"][0]["status"], "failed", "{done}");
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
    assert_eq!(vm.bitmaps(0).await, Vec::<(String, bool)>::new());
    let complete = hub.wait_for("/backups/b-f/complete", 10).await;
    assert_eq!(complete[0].body["status"], "failed");
    assert_eq!(complete[0].body["disks"][1]["status"], "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_while_preparing_still_releases_the_snapshot() {
    let vm = two_disk_vm().await;
    // The node's qemu-img (creating fleecing files, part of taking the snapshot) waits at a gate
    // the test opens: the job is held in "preparing" for as long as the test wants.
    let gate_dir = vm.dir.as_path().join("gate");
    std::fs::create_dir(&gate_dir).unwrap();
    let gate = vm.dir.as_path().join("gate-open");
    let real = run(std::process::Command::new("sh").args(["-c", "command -v qemu-img"]));
    // The script marks that it was reached (the snapshot is being taken) before it waits.
    let reached = vm.dir.as_path().join("gate-reached");
    let script = gate_dir.join("qemu-img");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ntouch {}\nwhile [ ! -e {} ]; do sleep 0.05; done\nexec {} \"$@\"\n",
            reached.display(),
            gate.display(),
            real.trim()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let node = start_node(NodeOptions {
        path_first: Some(gate_dir.clone()),
        ..node_opts(vm.dir.as_path(), Some(&vm.node_qmp), None)
    });
    let (_targets, s) = targets(&vm, "p", None).await;
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-p", "vm_name": "vm1", "backup_type": "full", "nbd_targets": s}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["status"], "preparing");
    // The cancel comes while the snapshot is really being taken: the gate was reached.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !reached.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the snapshot never called qemu-img"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (code, body) = node.post("/backup/b-p/cancel", json!({})).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["status"], "cancelling");
    // The job cannot end while its snapshot step waits at the closed gate: cancelling, and
    // still held there (the gate is only opened below).
    let (_, held) = node.get("/backup/b-p").await;
    assert_eq!(
        held["status"], "cancelling",
        "still taking the snapshot: {held}"
    );
    assert!(!gate.exists());
    std::fs::write(&gate, "").unwrap();
    let done = node.wait_job("b-p", 60, terminal).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["error_message"], "cancelled", "{done}");
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
    assert_eq!(vm.bitmaps(0).await, Vec::<(String, bool)>::new());
    assert_run_dir_empty(&node.run_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_with_a_hung_target_still_releases() {
    let vm = two_disk_vm().await;
    let node = start_node(node_opts(vm.dir.as_path(), Some(&vm.node_qmp), None));
    let (targets, s) = targets(&vm, "h", None).await;
    // The targets hang for good (never resumed): the copy cannot finish a request.
    for t in &targets {
        t.pause();
    }
    let (code, body) = node
        .post(
            "/backup/start",
            json!({"backup_id": "b-h", "vm_name": "vm1", "backup_type": "full", "nbd_targets": s}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    node.wait_job("b-h", 30, status_is("running")).await;
    let (code, _) = node.post("/backup/b-h/cancel", json!({})).await;
    assert_eq!(code, 202);
    let done = node.wait_job("b-h", 30, terminal).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_back_up_at_once() {
    let vm = two_disk_vm().await;
    let vm2 = TestVm::temp(&SIZES, |imgs| {
        write_pattern(&imgs[0], 0, 16 * MIB, 0x61);
        write_pattern(&imgs[1], 32 * MIB, 16 * MIB, 0x62);
    })
    .await;
    let mut opts = node_opts(vm.dir.as_path(), Some(&vm.node_qmp), None);
    opts.vms.push(("vm2".into(), vm2.node_qmp.clone()));
    let node = start_node(opts);
    let (_, inv) = node.get("/inventory").await;
    assert_eq!(inv["vms"].as_array().unwrap().len(), 2, "{inv}");
    let before1 = snapshot_sources(&vm, "m1").await;
    let before2 = snapshot_sources(&vm2, "m2").await;
    let (mut t1, s1) = targets(&vm, "m1", None).await;
    let (mut t2, s2) = targets(&vm2, "m2", None).await;
    for t in t1.iter().chain(&t2) {
        t.pause();
    }
    for (id, name, s) in [("b-m1", "vm1", &s1), ("b-m2", "vm2", &s2)] {
        let (code, body) = node
            .post(
                "/backup/start",
                json!({"backup_id": id, "vm_name": name, "backup_type": "full", "nbd_targets": s}),
            )
            .await;
        assert_eq!(code, 202, "{body}");
    }
    node.wait_job("b-m1", 30, status_is("running")).await;
    node.wait_job("b-m2", 30, status_is("running")).await;
    for t in t1.iter().chain(&t2) {
        t.resume();
    }
    for id in ["b-m1", "b-m2"] {
        let done = node.wait_job(id, 60, terminal).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    for t in t1.iter_mut().chain(t2.iter_mut()) {
        t.stop();
    }
    for (before, targets) in [(&before1, &t1), (&before2, &t2)] {
        for (b, t) in before.iter().zip(targets) {
            images_equal(b.to_str().unwrap(), t.image.to_str().unwrap()).unwrap();
        }
    }
    // One snapshot transaction per VM, each covering only that VM's disks.
    let log = qmp_log(&node);
    for vm_name in ["vm1", "vm2"] {
        let tx: Vec<_> = commands(&log, "transaction")
            .into_iter()
            .filter(|e| e["vm"] == vm_name)
            .collect();
        assert_eq!(tx.len(), 1, "{vm_name}: {tx:?}");
        let backups = tx[0]["arguments"]["actions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["type"] == "blockdev-backup")
            .count();
        assert_eq!(backups, 2);
    }
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
    assert_eq!(vm2.leftovers().await, Vec::<String>::new());
}
