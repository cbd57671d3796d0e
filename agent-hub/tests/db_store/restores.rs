//! Restore jobs (schema 0003): rows, the status compare-and-set, the listing by status, and the
//! events tagged with the restore's id, on both dialects.

use crate::*;
use sendense_shared::api::{Restore, RestoreTarget};

fn restore(id: &str, backup: &str, created_secs_ago: i64) -> Restore {
    Restore {
        restore_id: id.into(),
        backup_id: BackupId(backup.into()),
        vm_name: "pg".into(),
        disk_key: DiskKey(2000),
        target: RestoreTarget {
            node: "node1".into(),
            path: format!("/var/lib/vm/{id}.qcow2"),
            vm: None,
        },
        status: JobStatus::Preparing,
        source_qcow2: format!("/repo/pg/2000/{backup}.qcow2"),
        nbd_port: None,
        nbd_export_name: format!("restore-{id}"),
        bytes_done: 0,
        bytes_total: 1 << 30,
        created_at: chrono::Utc::now() - chrono::Duration::seconds(created_secs_ago),
        completed_at: None,
        error_message: None,
    }
}

#[tokio::test]
async fn restores_round_trip_move_by_compare_and_set_and_keep_their_events() {
    on_each_dialect("restores", |t: TestDb| async move {
        let db = &t.db;
        let b = job(db, "pg", "b-1", BackupType::Full).await;
        db.create_restore(&restore("r-old", &b.backup_id.0, 60))
            .await
            .unwrap();
        let mut into_vm = restore("r-new", &b.backup_id.0, 1);
        into_vm.target.vm = Some("pg".into());
        db.create_restore(&into_vm).await.unwrap();
        let e = db
            .create_restore(&restore("r-x", "no-such-backup", 0))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, DbError::NotFound { what } if what.contains("no-such-backup")),
            "{}: {e:?}",
            t.dialect
        );

        let list = db.list_restores().await.unwrap();
        let ids: Vec<&str> = list.iter().map(|r| r.restore_id.as_str()).collect();
        assert_eq!(ids, ["r-new", "r-old"], "{}: newest first", t.dialect);
        let got = db.get_restore("r-old").await.unwrap();
        assert_eq!(got.target.path, "/var/lib/vm/r-old.qcow2", "{}", t.dialect);
        assert_eq!(got.target.vm, None, "{}", t.dialect);
        assert_eq!(
            db.get_restore("r-new").await.unwrap().target.vm.as_deref(),
            Some("pg"),
            "{}: the VM whose disk a restore replaces (schema 0012)",
            t.dialect
        );
        assert_eq!(got.bytes_total, 1 << 30, "{}", t.dialect);

        db.set_restore_port("r-old", Some(NbdPort(10150)))
            .await
            .unwrap();
        assert!(
            db.transition_restore("r-old", &[JobStatus::Preparing], JobStatus::Running, None)
                .await
                .unwrap()
        );
        db.set_restore_progress("r-old", 4096, 1 << 30)
            .await
            .unwrap();
        let running = db.get_restore("r-old").await.unwrap();
        assert_eq!(
            (running.status, running.nbd_port, running.bytes_done),
            (JobStatus::Running, Some(NbdPort(10150)), 4096),
            "{}",
            t.dialect
        );
        // A cancel and a completion racing: exactly one moves it.
        assert!(
            db.transition_restore("r-old", &[JobStatus::Running], JobStatus::Cancelling, None)
                .await
                .unwrap()
        );
        assert!(
            !db.transition_restore("r-old", &[JobStatus::Running], JobStatus::Completed, None)
                .await
                .unwrap(),
            "{}: the completion lost",
            t.dialect
        );
        assert!(
            db.transition_restore(
                "r-old",
                &[JobStatus::Cancelling],
                JobStatus::Cancelled,
                Some("cancelled by the operator")
            )
            .await
            .unwrap()
        );
        let end = db.get_restore("r-old").await.unwrap();
        assert_eq!(end.status, JobStatus::Cancelled, "{}", t.dialect);
        assert_eq!(
            end.nbd_port, None,
            "{}: a terminal restore holds no port",
            t.dialect
        );
        assert!(end.completed_at.is_some(), "{}", t.dialect);
        assert_eq!(
            end.error_message.as_deref(),
            Some("cancelled by the operator")
        );
        let e = db
            .transition_restore("r-gone", &[JobStatus::Running], JobStatus::Failed, None)
            .await
            .unwrap_err();
        assert!(
            matches!(e, DbError::NotFound { .. }),
            "{}: {e:?}",
            t.dialect
        );

        let active = db
            .list_restores_in(&[JobStatus::Preparing, JobStatus::Running])
            .await
            .unwrap();
        let ids: Vec<&str> = active.iter().map(|r| r.restore_id.as_str()).collect();
        assert_eq!(ids, ["r-new"], "{}", t.dialect);

        // Its events: in the backup's log, tagged, and listed on their own.
        db.append_event(&b.backup_id, "info", "created", "the backup", None)
            .await
            .unwrap();
        let ev = db
            .append_job_event(
                &b.backup_id,
                Some("r-new"),
                "info",
                "restore_started",
                "served",
                Some(DiskKey(2000)),
            )
            .await
            .unwrap();
        assert_eq!(ev.job_id.as_deref(), Some("r-new"));
        let own = db.list_job_events("r-new").await.unwrap();
        assert_eq!(own.len(), 1, "{}", t.dialect);
        assert_eq!(own[0].step, "restore_started");
        assert_eq!(own[0].job_id.as_deref(), Some("r-new"));
        let all = db.list_events(&b.backup_id).await.unwrap();
        let steps: Vec<(&str, Option<&str>)> = all
            .iter()
            .map(|e| (e.step.as_str(), e.job_id.as_deref()))
            .collect();
        assert!(
            steps.contains(&("created", None))
                && steps.contains(&("restore_started", Some("r-new"))),
            "{}: {steps:?}",
            t.dialect
        );
    })
    .await;
}
