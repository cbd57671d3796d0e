//! Crash recovery: the journal's snapshots and nbdkits, this node's leftovers, other nodes'
//! snapshots left alone.

use super::*;
use agent_node::source::vsphere::VsphereDriver;
use agent_node::source::{ReleaseOutcome, Snapshot, SourceDriver, SourceError};
use sendense_shared::api::BackupType;
use sendense_tests::net::free_port;
use sendense_tests::vcsim::Vcsim;
use sendense_vsphere::TlsPolicy;
use std::collections::BTreeMap;

#[tokio::test]
async fn recovery_after_a_crash_removes_the_snapshot_and_kills_nbdkit() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let cfg = config(&sim, TlsPolicy::CaFile(sim.cert_pem.clone()));
    let d = VsphereDriver::new(&cfg, NODE, run.path().into());
    let snap: Snapshot = d
        .snapshot(&request(&sim, "crashed", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    let pids = nbdkit_pids(run.path());
    assert_eq!(pids.len(), 2);
    // The node dies without releasing: its driver is gone, the snapshot and nbdkits stay.
    drop(d);
    assert_eq!(sim.snapshot_names().unwrap(), ["sendense-node-a-crashed"]);
    assert!(pids.iter().all(|&p| alive(p)));

    // Restarted while the vCenter is unreachable: the nbdkits go, the snapshot and its journal
    // entry stay, and the report says why, once.
    let port = free_port();
    let mut down = cfg.clone();
    down.url = format!("https://127.0.0.1:{port}");
    let report = VsphereDriver::new(&down, NODE, run.path().into())
        .recover()
        .await;
    assert_eq!(report.exports_removed.len(), 2, "{report:?}");
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].contains("1 journal entries kept")
            && report.errors[0].contains(&port.to_string()),
        "{report:?}"
    );
    assert!(pids.iter().all(|&p| !alive(p)), "leftover nbdkit killed");
    assert_eq!(sim.snapshot_names().unwrap(), ["sendense-node-a-crashed"]);

    let d = VsphereDriver::new(&cfg, NODE, run.path().into());
    let report = d.recover().await;
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(removed(&report, "sendense-node-a-crashed"), "{report:?}");
    assert!(sim.snapshot_names().unwrap().is_empty());
    assert!(pids.iter().all(|&p| !alive(p)), "leftover nbdkit killed");
    for disk in &snap.disks {
        assert!(!disk.socket.exists());
    }
    assert!(files(run.path()).is_empty(), "{:?}", files(run.path()));
    // A snapshot named like ours that no journal knows (journal lost) is removed too.
    let d2 = VsphereDriver::new(&cfg, NODE, tempfile::tempdir().unwrap().path().into());
    let snap = d2
        .snapshot(&request(
            &sim,
            "no-journal",
            BackupType::Full,
            BTreeMap::new(),
        ))
        .await
        .unwrap();
    let report = d.recover().await;
    assert!(removed(&report, "sendense-node-a-no-journal"), "{report:?}");
    assert!(sim.snapshot_names().unwrap().is_empty());
    d2.release(&snap, ReleaseOutcome::Failure).await.unwrap();
}

/// A snapshot taken behind the driver's back (another node, an older version), as raw SOAP.
fn raw_snapshot(sim: &Vcsim, name: &str, description: &str) {
    let cookie = sim.login_cookie(&sim.user, &sim.password).unwrap();
    let (status, _, body) = sim
        .soap_call(
            Some(&cookie),
            &format!(
                concat!(
                    r#"<CreateSnapshot_Task xmlns="urn:vim25"><_this type="VirtualMachine">{}</_this>"#,
                    "<name>{}</name><description>{}</description><memory>false</memory>",
                    "<quiesce>false</quiesce></CreateSnapshot_Task>"
                ),
                sim.vm.moref, name, description
            ),
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let t = std::time::Instant::now();
    while !sim.snapshot_names().unwrap().iter().any(|n| n == name) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "snapshot {name} did not appear in the simulator's snapshot tree"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[tokio::test]
async fn recovery_removes_only_this_nodes_snapshots() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    let cfg = config(&sim, pin(&sim));
    // This node crashed holding a snapshot.
    let d = VsphereDriver::new(&cfg, NODE, run.path().into());
    d.snapshot(&request(&sim, "mine", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    drop(d);
    // Node "node-a-b" (whose snapshot names start with "sendense-node-a-") and node "other"
    // hold snapshots of the same VM; an older version left one that names no node.
    raw_snapshot(
        &sim,
        "sendense-node-a-b-7",
        r#"Taken by Sendense node "node-a-b" for backup 7 at 2026-11-27T04:00:00Z."#,
    );
    raw_snapshot(
        &sim,
        "sendense-other-9",
        r#"Taken by Sendense node "other" for backup 9 at 2026-11-27T04:00:00Z."#,
    );
    raw_snapshot(
        &sim,
        "sendense-5f1c",
        "Taken by Sendense for backup 5f1c at 2026-11-27T03:00:00Z.",
    );
    // The journal is lost too: only the name and description tell which snapshot is ours.
    for f in files(run.path()) {
        if f.starts_with("vsphere-snapshot-") {
            std::fs::remove_file(run.path().join(f)).unwrap();
        }
    }

    let report = VsphereDriver::new(&cfg, NODE, run.path().into())
        .recover()
        .await;
    assert!(removed(&report, "sendense-node-a-mine"), "{report:?}");
    assert_eq!(report.snapshots_removed.len(), 1, "{report:?}");
    let mut left = sim.snapshot_names().unwrap();
    left.sort();
    assert_eq!(
        left,
        ["sendense-5f1c", "sendense-node-a-b-7", "sendense-other-9"],
        "the other nodes' snapshots survive this node's recovery"
    );
    // The one nobody can vouch for is left, and the report says so.
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(
        report.errors[0].contains("sendense-5f1c") && report.errors[0].contains("by hand"),
        "{report:?}"
    );

    // The other nodes' snapshots are not swept before this node's next backup either: without
    // VDDK the VM is refused (it has snapshots), and they stay.
    let e = VsphereDriver::new(&cfg, NODE, run.path().into())
        .snapshot(&request(&sim, "next", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap_err();
    assert!(matches!(e, SourceError::Unsupported { .. }), "{e}");
    assert_eq!(sim.snapshot_names().unwrap().len(), 3);
}

/// A snapshot this node left (journal lost) is removed before the next backup, which then goes
/// ahead: without VDDK a VM with any snapshot left would be refused.
#[tokio::test]
async fn a_snapshot_this_node_left_is_removed_and_the_next_backup_goes_ahead() {
    let sim = sim();
    let run = tempfile::tempdir().unwrap();
    raw_snapshot(
        &sim,
        "sendense-node-a-old",
        r#"Taken by Sendense node "node-a" for backup old at 2026-11-27T04:00:00Z."#,
    );
    let d = VsphereDriver::new(&config(&sim, pin(&sim)), NODE, run.path().into());
    let snap = d
        .snapshot(&request(&sim, "new", BackupType::Full, BTreeMap::new()))
        .await
        .unwrap();
    assert_eq!(
        sim.snapshot_names().unwrap(),
        ["sendense-node-a-new"],
        "the leftover is gone, the new one taken"
    );
    d.release(&snap, ReleaseOutcome::Success).await.unwrap();
    assert!(sim.snapshot_names().unwrap().is_empty());
}
