//! Boot checks (schema 0010): a point's last check, replaced by the next, shown on the backup;
//! a running check's QEMU PID and work directory listed for start-up recovery; a pruned point
//! takes its check along. On both dialects.

use crate::*;
use sendense_shared::api::BootStatus;

#[tokio::test]
async fn a_points_boot_check_is_recorded_listed_while_running_and_replaced() {
    on_each_dialect("boot_checks", |t: TestDb| async move {
        let db = &t.db;
        let b = job(db, "pg", "b-1", BackupType::Full).await;
        let id = &b.backup_id;
        assert_eq!(db.get_backup(id).await.unwrap().boot_check, None);
        db.start_boot_check(id, "v-1", "/data/boot-checks/abc")
            .await
            .unwrap();
        db.set_boot_check_pid(id, 4242).await.unwrap();
        let live = db.interrupted_boot_checks().await.unwrap();
        assert_eq!(live.len(), 1, "{}", t.dialect);
        assert_eq!(
            (live[0].qemu_pid, live[0].work_dir.as_deref()),
            (Some(4242), Some("/data/boot-checks/abc")),
            "{}",
            t.dialect
        );
        let c = db.get_backup(id).await.unwrap().boot_check.unwrap();
        assert_eq!((c.status, c.qemu_pid), (BootStatus::Booting, Some(4242)));

        let tail = vec![
            "Failed to mount /dev/vda".to_string(),
            "reboot: ß".to_string(),
        ];
        db.finish_boot_check(id, BootStatus::BootFailed, "QEMU exited", &tail, None)
            .await
            .unwrap();
        assert!(db.interrupted_boot_checks().await.unwrap().is_empty());
        let listed = db.list_backups().await.unwrap();
        let c = listed[0].boot_check.clone().unwrap();
        assert_eq!(
            (c.status, c.console_tail, c.qemu_pid, c.detail.as_deref()),
            (BootStatus::BootFailed, tail, None, Some("QEMU exited")),
            "{}",
            t.dialect
        );
        // The next check replaces the point's result.
        db.start_boot_check(id, "v-2", "/data/boot-checks/def")
            .await
            .unwrap();
        db.finish_boot_check(id, BootStatus::BootOk, "guest agent", &[], Some(15000))
            .await
            .unwrap();
        let c = db
            .list_backups_in(&[
                JobStatus::Completed,
                JobStatus::Pending,
                JobStatus::Running,
                JobStatus::Preparing,
            ])
            .await
            .unwrap()[0]
            .boot_check
            .clone()
            .unwrap();
        assert_eq!(
            (c.status, c.verify_id.as_str(), c.boot_ms),
            (BootStatus::BootOk, "v-2", Some(15000)),
            "{}",
            t.dialect
        );
    })
    .await;
}
