//! The QEMU driver alone: one transaction, frozen exports, release, start-up recovery.

use crate::support::*;
use agent_node::qmp::{QmpClient, QmpLog};
use agent_node::source::qemu::QemuDriver;
use agent_node::source::{ReleaseOutcome, SnapshotRequest, SourceDriver};
use sendense_shared::api::BackupType;
use sendense_shared::ids::{BackupId, DiskKey};
use std::sync::Arc;

fn driver(vm: &TestVm, run_dir: &std::path::Path) -> QemuDriver {
    QemuDriver::new(
        [("vm1".to_string(), vm.node_qmp.clone())],
        run_dir.to_path_buf(),
        Arc::new(QmpLog::new(Some(run_dir.join("qmp.log")))),
    )
}

fn request(id: &str, t: BackupType, prev: Option<&str>) -> SnapshotRequest {
    SnapshotRequest {
        backup_id: BackupId::from(id),
        vm_name: "vm1".into(),
        backup_type: t,
        previous_backup_id: prev.map(BackupId::from),
        previous_change_ids: Default::default(),
        require_application_consistency: false,
    }
}

/// Three disks with known data; `observer`: with a QMP socket for the node's own client.
async fn three_disk_vm_with(observer: bool) -> TestVm {
    let opts = sendense_tests::qemu::VmOptions {
        name: "vm1".into(),
        sizes: vec![64 * MIB, 96 * MIB, 64 * MIB],
        observer_qmp: observer,
        ..Default::default()
    };
    TestVm::start_opts(opts, |imgs| {
        write_pattern(&imgs[0], 0, 8 * MIB, 0x11);
        write_pattern(&imgs[1], 16 * MIB, 8 * MIB, 0x22);
        write_pattern(&imgs[2], 60 * MIB, 4 * MIB, 0x33);
    })
    .await
    .expect("start QEMU")
}

async fn three_disk_vm() -> TestVm {
    three_disk_vm_with(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_three_disks_is_one_instant_and_release_leaves_nothing() {
    let vm = three_disk_vm_with(true).await;
    let run_dir = vm.dir.as_path().join("run");
    let d = driver(&vm, &run_dir);

    // QEMU's refusals carry its error class and description, through the node's QMP client.
    let observer = QmpClient::connect(
        vm.observer_qmp.as_ref().unwrap(),
        "test",
        Arc::new(QmpLog::new(None)),
    )
    .await
    .unwrap();
    let e = observer
        .execute("no-such-command", serde_json::json!({}))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("CommandNotFound") && msg.contains("no-such-command"),
        "{msg}"
    );

    let inv = d.vm("vm1").await.unwrap();
    let keys: Vec<_> = inv.disks.iter().map(|d| d.disk_key).collect();
    assert_eq!(keys, [DiskKey(2000), DiskKey(2001), DiskKey(2002)]);
    assert_eq!(inv.disks[1].size_bytes, 96 * MIB);
    assert_eq!(inv.disks[2].label, "disk2");

    let before: Vec<_> = (0..3)
        .map(|i| vm.dir.as_path().join(format!("before{i}.raw")))
        .collect();
    for (i, p) in before.iter().enumerate() {
        vm.copy_disk_now(i, p).await;
    }

    let snap = d
        .snapshot(&request("b1", BackupType::Full, None))
        .await
        .unwrap();
    assert_eq!(snap.disks.len(), 3);
    // Guest writes after the snapshot, on every disk, over the known data.
    for i in 0..3 {
        vm.guest_write(i, 0x99, 0, 4 * MIB).await;
        vm.guest_write(i, 0x98, 60 * MIB, 2 * MIB).await;
    }
    for (i, b) in before.iter().enumerate() {
        let now = vm.dir.as_path().join(format!("now{i}.raw"));
        vm.copy_disk_now(i, &now).await;
        assert!(
            images_equal(b.to_str().unwrap(), now.to_str().unwrap()).is_err(),
            "disk {i}: the guest writes did not land"
        );
    }
    for (i, disk) in snap.disks.iter().enumerate() {
        let out = vm.dir.as_path().join(format!("snap{i}.raw"));
        read_export(&disk.uri(), &out);
        images_equal(before[i].to_str().unwrap(), out.to_str().unwrap())
            .unwrap_or_else(|e| panic!("disk {i}: snapshot differs from pre-snapshot data: {e}"));
    }

    // One transaction covered every disk.
    let log = d.qmp_log().entries();
    let tx = commands(&log, "transaction");
    assert_eq!(tx.len(), 1, "exactly one transaction: {tx:?}");
    let actions = tx[0]["arguments"]["actions"].as_array().unwrap();
    let backups: Vec<_> = actions
        .iter()
        .filter(|a| a["type"] == "blockdev-backup")
        .map(|a| a["data"]["device"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(backups, ["fmt0", "fmt1", "fmt2"]);
    // The log file holds the same evidence.
    let file = std::fs::read_to_string(run_dir.join("qmp.log")).unwrap();
    assert_eq!(
        file.lines()
            .filter(|l| l.contains("\"transaction\""))
            .count(),
        1
    );

    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
    for i in 0..3 {
        assert_eq!(vm.bitmaps(i).await, [("sendense-b1".to_string(), true)]);
    }
    assert_run_dir_empty(&run_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_exports_the_changes_and_failure_keeps_the_base() {
    let vm = three_disk_vm().await;
    let run_dir = vm.dir.as_path().join("run");
    let d = driver(&vm, &run_dir);

    // No base yet: an incremental is refused with "bitmap missing".
    let e = d
        .check_incremental_base(&request("probe", BackupType::Incremental, None))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("bitmap missing"), "{e}");

    let full = d
        .snapshot(&request("f1", BackupType::Full, None))
        .await
        .unwrap();
    d.release(&full, ReleaseOutcome::Success).await.unwrap();
    vm.guest_write(1, 0x77, 32 * MIB, 3 * MIB).await;

    // A failed incremental rolls its changes back into the base.
    let inc = d
        .snapshot(&request("i1", BackupType::Incremental, Some("f1")))
        .await
        .unwrap();
    assert_eq!(inc.disks[1].dirty_bitmap.as_deref(), Some("sendense-f1"));
    vm.guest_write(1, 0x66, 40 * MIB, MIB).await;
    d.release(&inc, ReleaseOutcome::Failure).await.unwrap();
    assert_eq!(vm.bitmaps(1).await, [("sendense-f1".to_string(), true)]);
    assert_eq!(vm.leftovers().await, Vec::<String>::new());

    // The next incremental's map covers both writes (before and during the failed one).
    let inc = d
        .snapshot(&request("i2", BackupType::Incremental, Some("f1")))
        .await
        .unwrap();
    let map = run(std::process::Command::new("nbdinfo")
        .arg("--map=qemu:dirty-bitmap:sendense-f1")
        .arg(inc.disks[1].uri()));
    let dirty: u64 = map
        .lines()
        .filter(|l| l.contains("dirty"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(dirty, 4 * MIB, "dirty map: {map}");
    // Wrong base: refused while a snapshot is held, and also by name.
    let e = d
        .check_incremental_base(&request("probe", BackupType::Incremental, Some("other")))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("bitmap missing"), "{e}");
    d.release(&inc, ReleaseOutcome::Success).await.unwrap();
    assert_eq!(vm.bitmaps(1).await, [("sendense-i2".to_string(), true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_recovery_releases_a_crashed_snapshot() {
    let vm = three_disk_vm().await;
    let run_dir = vm.dir.as_path().join("run");
    {
        let d = driver(&vm, &run_dir);
        let full = d
            .snapshot(&request("f1", BackupType::Full, None))
            .await
            .unwrap();
        d.release(&full, ReleaseOutcome::Success).await.unwrap();
        let _inc = d
            .snapshot(&request("i1", BackupType::Incremental, Some("f1")))
            .await
            .unwrap();
        assert!(!vm.leftovers().await.is_empty());
        // The node "crashes": the driver and its QMP connection go away without release.
    }
    let d = driver(&vm, &run_dir);
    let report = d.recover().await;
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.exports_removed.len(), 3, "{report:?}");
    assert_eq!(report.nodes_removed.len(), 3, "{report:?}");
    assert_eq!(vm.leftovers().await, Vec::<String>::new());
    for i in 0..3 {
        assert_eq!(vm.bitmaps(i).await, [("sendense-f1".to_string(), true)]);
    }
    assert_run_dir_empty(&run_dir);
    // And the next backup works.
    let inc = d
        .snapshot(&request("i2", BackupType::Incremental, Some("f1")))
        .await
        .unwrap();
    d.release(&inc, ReleaseOutcome::Success).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_powered_off_vm_is_left_out_of_the_inventory_and_named_on_snapshot() {
    let vm = TestVm::temp(&[64 * MIB], |_| {}).await;
    let run_dir = vm.dir.as_path().join("run");
    let d = QemuDriver::new(
        [
            ("vm1".to_string(), vm.node_qmp.clone()),
            ("off".to_string(), vm.dir.as_path().join("gone.qmp")),
        ],
        run_dir,
        Arc::new(QmpLog::new(None)),
    );
    let vms = d.list_vms().await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].vm_name, "vm1");
    let mut req = request("x", BackupType::Full, None);
    req.vm_name = "off".into();
    let e = d.snapshot(&req).await.unwrap_err().to_string();
    assert!(e.contains("off") && e.contains("gone.qmp"), "{e}");
}
