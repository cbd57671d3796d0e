//! Instant recoveries (schema 0011): a recovery and its disks in guest order, the status
//! compare-and-set (a terminal move clears every disk's export), the node's state recorded
//! (the first QEMU PID stamps `vm_started_at` once, a stall set and cleared), the listing by
//! status, and prune taking terminal recoveries with the point, on both dialects.

use crate::*;
use sendense_shared::api::{NodeRecoveryState, Recovery, RecoveryDisk, RecoveryDiskProgress};

fn disk(key: i64, backup: &str) -> RecoveryDisk {
    RecoveryDisk {
        disk_key: DiskKey(key),
        source_qcow2: format!("/repo/pg/{key}/{backup}.qcow2"),
        nbd_port: None,
        nbd_export_name: format!("recovery-x-{key}"),
        qemu_nbd_pid: None,
        overlay: None,
        bytes_done: 0,
        bytes_total: 1 << 30,
        rate_bps: 0,
        stream: "pending".into(),
    }
}

fn recovery(id: &str, backup: &str, vm: &str, created_secs_ago: i64) -> Recovery {
    Recovery {
        recovery_id: id.into(),
        backup_id: BackupId(backup.into()),
        source_vm: "pg".into(),
        node: "node1".into(),
        vm_name: vm.into(),
        status: JobStatus::Preparing,
        // Guest order, not key order.
        disks: vec![disk(2001, backup), disk(2000, backup)],
        vm_state: None,
        qemu_pid: None,
        qmp_socket: None,
        serial_log: None,
        stalled: None,
        created_at: chrono::Utc::now() - chrono::Duration::seconds(created_secs_ago),
        vm_started_at: None,
        completed_at: None,
        error_message: None,
    }
}

fn state(id: &str, pid: Option<u32>, stalled: Option<&str>, done: u64) -> NodeRecoveryState {
    NodeRecoveryState {
        recovery_id: id.into(),
        vm_name: "pg-r".into(),
        status: JobStatus::Running,
        vm_state: Some(
            if stalled.is_some() {
                "paused"
            } else {
                "running"
            }
            .into(),
        ),
        qemu_pid: pid,
        qmp_socket: pid.map(|_| "/run/sendense-node/r1/qmp.sock".into()),
        serial_log: None,
        disks: vec![RecoveryDiskProgress {
            disk_key: DiskKey(2000),
            overlay: "/var/lib/recovered/pg-r-2000.qcow2".into(),
            bytes_done: done,
            bytes_total: 1 << 30,
            rate_bps: 1 << 20,
            stream: "running".into(),
        }],
        stalled: stalled.map(str::to_string),
        error_message: None,
    }
}

#[tokio::test]
async fn recoveries_round_trip_move_by_compare_and_set_and_record_the_nodes_state() {
    on_each_dialect("recoveries", |t: TestDb| async move {
        let db = &t.db;
        let d = t.dialect;
        let b = job(db, "pg", "b-1", BackupType::Full).await;
        db.create_recovery(&recovery("r-old", &b.backup_id.0, "pg-a", 60))
            .await
            .unwrap();
        db.create_recovery(&recovery("r-new", &b.backup_id.0, "pg-b", 1))
            .await
            .unwrap();
        let e = db
            .create_recovery(&recovery("r-x", "no-such-backup", "pg-c", 0))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, DbError::NotFound { what } if what.contains("no-such-backup")),
            "{d}: {e:?}"
        );
        let mut twice = recovery("r-dup", &b.backup_id.0, "pg-d", 0);
        twice.disks.push(disk(2000, "b-1"));
        let e = db.create_recovery(&twice).await.unwrap_err();
        assert!(
            matches!(e, DbError::Invalid { field: "disks", .. }),
            "{d}: {e:?}"
        );
        assert!(
            matches!(
                db.get_recovery("r-dup").await,
                Err(DbError::NotFound { .. })
            ),
            "{d}: a refused recovery leaves no row"
        );

        let ids: Vec<String> = db
            .list_recoveries()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.recovery_id)
            .collect();
        assert_eq!(ids, ["r-new", "r-old"], "{d}: newest first");
        let got = db.get_recovery("r-old").await.unwrap();
        let keys: Vec<i64> = got.disks.iter().map(|x| x.disk_key.0).collect();
        assert_eq!(keys, [2001, 2000], "{d}: the guest's order");
        let mut want = recovery("r-old", "b-1", "pg-a", 60);
        want.created_at = got.created_at;
        assert_eq!(got, want, "{d}");

        // The exports, then running.
        db.set_recovery_export("r-old", DiskKey(2000), Some(NbdPort(10150)), Some(4242))
            .await
            .unwrap();
        db.set_recovery_export("r-old", DiskKey(2001), Some(NbdPort(10151)), Some(4243))
            .await
            .unwrap();
        let e = db
            .set_recovery_export("r-old", DiskKey(9), Some(NbdPort(1)), None)
            .await
            .unwrap_err();
        assert!(matches!(e, DbError::NotFound { .. }), "{d}: {e:?}");
        assert!(
            db.transition_recovery("r-old", &[JobStatus::Preparing], JobStatus::Running, None)
                .await
                .unwrap()
        );

        // Reports: the first with a QEMU PID stamps vm_started_at, later ones keep it.
        db.record_recovery_state("r-old", &state("r-old", None, None, 0))
            .await
            .unwrap();
        assert_eq!(
            db.get_recovery("r-old").await.unwrap().vm_started_at,
            None,
            "{d}"
        );
        db.record_recovery_state("r-old", &state("r-old", Some(777), None, 4096))
            .await
            .unwrap();
        let r = db.get_recovery("r-old").await.unwrap();
        let started = r.vm_started_at.expect("stamped by the first QEMU PID");
        assert_eq!(
            (r.qemu_pid, r.vm_state.as_deref(), r.qmp_socket.as_deref()),
            (
                Some(777),
                Some("running"),
                Some("/run/sendense-node/r1/qmp.sock")
            ),
            "{d}"
        );
        let d0 = &r.disks[1];
        assert_eq!(
            (
                d0.disk_key,
                d0.bytes_done,
                d0.rate_bps,
                d0.stream.as_str(),
                d0.overlay.as_deref(),
                d0.nbd_port,
                d0.qemu_nbd_pid
            ),
            (
                DiskKey(2000),
                4096,
                1 << 20,
                "running",
                Some("/var/lib/recovered/pg-r-2000.qcow2"),
                Some(NbdPort(10150)),
                Some(4242)
            ),
            "{d}"
        );
        assert_eq!(
            r.disks[0].stream, "pending",
            "{d}: an unreported disk stays"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        db.record_recovery_state(
            "r-old",
            &state(
                "r-old",
                None,
                Some("export of disk 2000 does not answer"),
                8192,
            ),
        )
        .await
        .unwrap();
        let r = db.get_recovery("r-old").await.unwrap();
        assert_eq!(r.vm_started_at, Some(started), "{d}: stamped once");
        assert_eq!(
            r.qemu_pid,
            Some(777),
            "{d}: a state without a PID keeps the last"
        );
        assert_eq!(
            r.stalled.as_deref(),
            Some("export of disk 2000 does not answer")
        );
        db.record_recovery_state("r-old", &state("r-old", Some(777), None, 1 << 30))
            .await
            .unwrap();
        assert_eq!(db.get_recovery("r-old").await.unwrap().stalled, None, "{d}");
        let e = db
            .record_recovery_state("r-gone", &state("r-gone", None, None, 0))
            .await
            .unwrap_err();
        assert!(matches!(e, DbError::NotFound { .. }), "{d}: {e:?}");

        let active = db
            .list_recoveries_in(&[JobStatus::Preparing, JobStatus::Running])
            .await
            .unwrap();
        let ids: Vec<&str> = active.iter().map(|r| r.recovery_id.as_str()).collect();
        assert_eq!(ids, ["r-new", "r-old"], "{d}");
        assert_eq!(active[1].disks.len(), 2, "{d}: with their disks");

        // A cancel and a completion racing: exactly one moves it; the end clears the exports.
        assert!(
            db.transition_recovery("r-old", &[JobStatus::Running], JobStatus::Cancelling, None)
                .await
                .unwrap()
        );
        assert!(
            !db.transition_recovery("r-old", &[JobStatus::Running], JobStatus::Completed, None)
                .await
                .unwrap(),
            "{d}: the completion lost"
        );
        let mid = db.get_recovery("r-old").await.unwrap();
        assert!(
            mid.disks.iter().all(|x| x.nbd_port.is_some()),
            "{d}: still held"
        );
        assert!(
            db.transition_recovery(
                "r-old",
                &[JobStatus::Cancelling],
                JobStatus::Cancelled,
                Some("cancelled by the operator")
            )
            .await
            .unwrap()
        );
        let end = db.get_recovery("r-old").await.unwrap();
        assert_eq!(end.status, JobStatus::Cancelled, "{d}");
        assert!(end.completed_at.is_some(), "{d}");
        assert_eq!(
            end.error_message.as_deref(),
            Some("cancelled by the operator")
        );
        assert!(
            end.disks
                .iter()
                .all(|x| x.nbd_port.is_none() && x.qemu_nbd_pid.is_none()),
            "{d}: a terminal recovery names no port or PID: {:?}",
            end.disks
        );
        assert_eq!(end.disks[1].bytes_done, 1 << 30, "{d}: the progress stays");
        let e = db
            .transition_recovery("r-gone", &[JobStatus::Running], JobStatus::Failed, None)
            .await
            .unwrap_err();
        assert!(matches!(e, DbError::NotFound { .. }), "{d}: {e:?}");
        let ids: Vec<String> = db
            .list_recoveries_in(&[
                JobStatus::Pending,
                JobStatus::Preparing,
                JobStatus::Running,
                JobStatus::Cancelling,
            ])
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.recovery_id)
            .collect();
        assert_eq!(ids, ["r-new"], "{d}");

        // Its events: in the point's log, tagged with the recovery's id.
        db.append_job_event(
            &b.backup_id,
            Some("r-new"),
            "info",
            "recovery_created",
            "x",
            None,
        )
        .await
        .unwrap();
        let own = db.list_job_events("r-new").await.unwrap();
        assert_eq!(own.len(), 1, "{d}");
        assert_eq!(own[0].job_id.as_deref(), Some("r-new"));

        // Prune removing the point takes its recoveries and their disks along (they
        // reference it).
        db.step_drop_points("p-none", 0, std::slice::from_ref(&b.backup_id), "dropped")
            .await
            .unwrap();
        assert_eq!(db.list_recoveries().await.unwrap(), vec![], "{d}");
        assert!(
            matches!(
                db.get_backup(&b.backup_id).await,
                Err(DbError::NotFound { .. })
            ),
            "{d}"
        );
    })
    .await;
}
