//! Backups: one snapshot exporting the frozen disks, release, change tracking (areas, change ids,
//! incrementals, the change-tracking route).

use super::*;
use agent_node::source::vsphere::VsphereDriver;
use agent_node::source::{ReleaseOutcome, SourceDriver, SourceError};
use sendense_shared::api::BackupType;
use sendense_shared::ids::DiskKey;
use sendense_tests::net::free_port;
use std::collections::BTreeMap;

#[tokio::test]
async fn a_full_snapshot_exports_the_frozen_disks_and_release_leaves_nothing() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    sim.write_disk(2000, 0, &pattern(0x11, MIB)).unwrap();
    sim.write_disk(2000, 3 * MIB, &pattern(0x22, MIB)).unwrap();
    sim.write_disk(2001, 5 * MIB, &pattern(0x33, 64 * 1024))
        .unwrap();
    let frozen = [sim.disk_image(2000).unwrap(), sim.disk_image(2001).unwrap()];

    // CBT is off: a full reads every block (no area list).
    let req = request(&sim, "full-1", BackupType::Full, BTreeMap::new());
    let snap = d.snapshot(&req).await.unwrap();
    assert_eq!(
        sim.snapshot_names().unwrap(),
        ["sendense-node-a-full-1"],
        "exactly one snapshot, named after the backup"
    );
    let again = d
        .snapshot(&request(&sim, "full-2", BackupType::Full, BTreeMap::new()))
        .await;
    assert!(
        matches!(again, Err(SourceError::SnapshotHeld { .. })),
        "{again:?}"
    );
    // The guest keeps writing: the exports show the disks as the snapshot froze them.
    sim.write_disk(2000, 0, &pattern(0x99, 64 * 1024)).unwrap();
    assert_eq!(snap.disks.len(), 2);
    for (disk, want) in snap.disks.iter().zip(&frozen) {
        assert_eq!(disk.areas, None, "CBT off: no area list");
        assert!(disk.dirty_bitmap.is_none());
        assert_eq!(disk.size_bytes, want.len() as u64);
        let got = read_export(&disk.socket, &disk.export).await;
        assert!(
            got == *want,
            "disk {}: export differs from the frozen data",
            disk.disk_key
        );
    }
    let pids = nbdkit_pids(run.path());
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|&p| alive(p)));

    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert!(sim.snapshot_names().unwrap().is_empty(), "snapshot removed");
    assert!(pids.iter().all(|&p| !alive(p)), "nbdkit stopped");
    for disk in &snap.disks {
        assert!(!disk.socket.exists(), "{} left", disk.socket.display());
    }
    assert!(
        files(run.path()).is_empty(),
        "left in the run dir: {:?}",
        files(run.path())
    );
    // The write after the snapshot survived consolidation.
    assert_eq!(sim.read_disk(2000, 0, 4).unwrap(), [0x99; 4]);
    // Released twice: nothing to do.
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
}

#[tokio::test]
async fn cbt_areas_and_change_ids_drive_incrementals() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    d.enable_change_tracking(&sim.vm.name).await.unwrap();
    assert!(sim.state().unwrap().unwrap().cbt_enabled);
    assert_eq!(
        d.vm(&sim.vm.name).await.unwrap().change_tracking,
        Some(true)
    );
    sim.write_disk(2000, 2 * MIB, &pattern(0x44, MIB)).unwrap();

    // Full with CBT on: the allocated areas, and a change id per disk.
    let full = d
        .snapshot(&request(&sim, "f1", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    let areas = full.disks[0].areas.clone().expect("CBT on: an area list");
    assert!(
        areas.iter().any(|&(o, l)| o <= 2 * MIB && o + l >= 3 * MIB),
        "the written MiB is in the allocated areas: {areas:?}"
    );
    let ids: BTreeMap<DiskKey, String> = full
        .disks
        .iter()
        .map(|disk| (disk.disk_key, disk.change_id.clone().expect("a change id")))
        .collect();
    d.release(&full, ReleaseOutcome::Success).await.unwrap();

    // Changes after the full: only they are listed for the incremental.
    sim.write_disk(2000, 10 * MIB, &pattern(0x55, 64 * 1024))
        .unwrap();
    let inc = request(&sim, "i1", BackupType::Incremental, ids.clone());
    d.check_incremental_base(&inc).await.unwrap();
    let snap = d.snapshot(&inc).await.unwrap();
    let a0 = snap.disks[0].areas.clone().unwrap();
    assert!(!a0.is_empty(), "the change is listed");
    assert!(
        a0.iter()
            .all(|&(o, l)| o >= 10 * MIB - 64 * 1024 && o + l <= 10 * MIB + 128 * 1024),
        "only the changed block: {a0:?}"
    );
    assert_eq!(
        snap.disks[1].areas,
        Some(vec![]),
        "nothing changed on disk 2001"
    );
    let data = read_export(&snap.disks[0].socket, &snap.disks[0].export).await;
    assert_eq!(
        &data[10 * MIB as usize..][..64 * 1024],
        &pattern(0x55, 64 * 1024)[..]
    );
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();

    // Without the hub's change ids: refused, naming the disk.
    let e = d
        .check_incremental_base(&request(
            &sim,
            "i2",
            BackupType::Incremental,
            BTreeMap::new(),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SourceError::IncrementalBase { disk_key, .. } if *disk_key == DiskKey(2000)),
        "{e}"
    );
    // After a CBT reset the old change ids are of another epoch: refused before any snapshot.
    sim.reset_cbt().unwrap();
    let e = d
        .check_incremental_base(&request(&sim, "i3", BackupType::Incremental, ids.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SourceError::IncrementalBase { detail, .. } if detail.contains("reset")),
        "{e}"
    );
    let e = d
        .snapshot(&request(&sim, "i3", BackupType::Incremental, ids))
        .await
        .unwrap_err();
    assert!(matches!(e, SourceError::IncrementalBase { .. }), "{e}");
    assert!(
        sim.snapshot_names().unwrap().is_empty(),
        "no snapshot taken"
    );
}

/// `POST /api/v1/vms/{vm}/change-tracking` through the node's router.
async fn post_change_tracking(
    driver: std::sync::Arc<dyn SourceDriver>,
    vm: &str,
) -> (u16, serde_json::Value) {
    use agent_node::api::{NodeState, router};
    use agent_node::copy::CopyOptions;
    use agent_node::jobs::Jobs;
    use http_body_util::BodyExt;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt;
    let jobs = Jobs::new(
        driver,
        None,
        CopyOptions::default(),
        CancellationToken::new(),
    );
    let app = router(std::sync::Arc::new(NodeState {
        name: "n".into(),
        token: "tok".into(),
        started_at: chrono::Utc::now(),
        tunnel: None,
        restores: agent_node::restore::Restores::new(jobs.context().clone(), std::env::temp_dir()),
        recoveries: agent_node::recovery::Recoveries::new(
            jobs.context().clone(),
            std::env::temp_dir(),
            std::env::temp_dir(),
        ),
        jobs,
    }));
    let resp = app
        .oneshot(
            axum::http::Request::post(format!("/api/v1/vms/{vm}/change-tracking"))
                .header("authorization", "Bearer tok")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test]
async fn the_change_tracking_route_turns_cbt_on() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let d = std::sync::Arc::new(VsphereDriver::new(
        &config(&sim, pin(&sim)),
        NODE,
        run.path().into(),
    ));
    assert!(!sim.state().unwrap().unwrap().cbt_enabled);
    let (status, body) = post_change_tracking(d.clone(), &sim.vm.name).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"vm_name": sim.vm.name, "change_tracking": true})
    );
    assert!(
        sim.state().unwrap().unwrap().cbt_enabled,
        "ReconfigVM_Task ran"
    );
    let (status, body) = post_change_tracking(d.clone(), "nope").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));

    let port = free_port();
    let mut gone = config(&sim, pin(&sim));
    gone.url = format!("https://127.0.0.1:{port}");
    let (status, body) = post_change_tracking(
        std::sync::Arc::new(VsphereDriver::new(&gone, NODE, run.path().into())),
        &sim.vm.name,
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "hypervisor_unavailable");
    assert!(
        body["detail"].as_str().unwrap().contains(&port.to_string()),
        "{body}"
    );
}
