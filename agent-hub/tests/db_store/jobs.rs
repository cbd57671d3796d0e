//! Backup jobs: disks, targets, times, listings and chains, the status compare-and-set under races, events, change ids.

use crate::*;

#[tokio::test]
async fn every_disk_keeps_its_own_unit_number_through_updates() {
    on_each_dialect("vm_disk_units", |t: TestDb| async move {
        let db = &t.db;
        let first = db
            .upsert_vm(&vm(
                "pgtest1",
                vec![
                    disk(2000, 0, 10 << 30),
                    disk(2001, 1, 20 << 30),
                    disk(2002, 2, 30 << 30),
                ],
            ))
            .await
            .unwrap();
        let units: Vec<(i64, i32, u64)> = first
            .disks
            .iter()
            .map(|d| (d.disk_key.0, d.unit_number, d.size_bytes))
            .collect();
        assert_eq!(
            units,
            [
                (2000, 0, 10 << 30),
                (2001, 1, 20 << 30),
                (2002, 2, 30 << 30)
            ],
            "{}",
            t.dialect
        );
        assert!(first.vm_context_id.starts_with("ctx-"));

        // Re-registration from a new inventory: 2001 moved to unit 5, 2002 grew, 2000 vanished,
        // 2003 appeared on unit 3.
        let mut req = vm(
            "pgtest1",
            vec![
                disk(2001, 5, 20 << 30),
                disk(2002, 2, 40 << 30),
                disk(2003, 3, 1 << 30),
            ],
        );
        req.node = Some("node1".into());
        let second = db.upsert_vm(&req).await.unwrap();
        assert_eq!(
            second.vm_context_id, first.vm_context_id,
            "same VM, same context"
        );
        assert_eq!(second.node.as_deref(), Some("node1"));
        let stored = db.get_vm("pgtest1").await.unwrap();
        assert_eq!(stored, second);
        let units: Vec<(i64, i32, u64, String)> = stored
            .disks
            .iter()
            .map(|d| (d.disk_key.0, d.unit_number, d.size_bytes, d.label.clone()))
            .collect();
        assert_eq!(
            units,
            [
                (2001, 5, 20 << 30, "Hard disk 6".to_string()),
                (2002, 2, 40 << 30, "Hard disk 3".to_string()),
                (2003, 3, 1 << 30, "Hard disk 4".to_string()),
            ]
        );
        let distinct: BTreeSet<i32> = stored.disks.iter().map(|d| d.unit_number).collect();
        assert_eq!(distinct.len(), 3, "units must not collapse to one value");

        db.upsert_vm(&vm("web01", vec![disk(2000, 0, 1 << 20)]))
            .await
            .unwrap();
        let names: Vec<String> = db
            .list_vms()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.vm_name)
            .collect();
        assert_eq!(names, ["pgtest1", "web01"]);
        let listed = db.list_vms().await.unwrap().remove(0);
        assert_eq!(listed, stored);
    })
    .await;
}

#[tokio::test]
async fn backup_jobs_carry_disks_targets_and_times() {
    on_each_dialect("backup_jobs", |t: TestDb| async move {
        let db = &t.db;
        let b = job(db, "pgtest1", "b-1", BackupType::Full).await;
        assert_eq!(b.status, JobStatus::Pending);
        assert_eq!(b.total_bytes, 3 << 30);
        assert_eq!(b.bytes_transferred, 0);
        assert_eq!(b.nbd_targets_string, "");
        assert!(b.started_at.is_none() && b.completed_at.is_none());
        let units: Vec<(i64, i32)> = b.disk_results.iter().map(|d| (d.disk_key.0, d.unit_number)).collect();
        assert_eq!(units, [(2000, 0), (2001, 1)]);
        assert_eq!(b.disk_results[1].nbd_export_name, "pgtest1-disk-2001");

        let id = BackupId::from("b-1");
        let targets = "2000:nbd://127.0.0.1:10100/pgtest1-disk-2000,2001:nbd://127.0.0.1:10101/pgtest1-disk-2001";
        db.set_targets_string(&id, targets).await.unwrap();
        db.update_disk(
            &id,
            DiskKey(2001),
            &DiskUpdate {
                status: Some(DiskStatus::Running),
                bytes_done: Some(512 << 20),
                nbd_port: Some(NbdPort(10101)),
                qemu_nbd_pid: Some(4242),
                error_message: Some(Some("slow".into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // Leaving fields alone, clearing the error, recording verification.
        db.update_disk(
            &id,
            DiskKey(2001),
            &DiskUpdate {
                bytes_done: Some(1 << 30),
                error_message: Some(None),
                checksum_status: Some("passed".into()),
                checksum_ranges: Some(256),
                checksum_mismatches: Some(0),
                qemu_img_check: Some("clean".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(db.transition_backup(&id, &[JobStatus::Pending], JobStatus::Running, None).await.unwrap());
        let b = db.get_backup(&id).await.unwrap();
        assert_eq!(b.nbd_targets_string, targets);
        assert_eq!(b.status, JobStatus::Running);
        assert!(b.started_at.is_some() && b.completed_at.is_none());
        let d = &b.disk_results[1];
        assert_eq!(d.status, DiskStatus::Running);
        assert_eq!(d.bytes_done, 1 << 30);
        assert_eq!(d.nbd_port, Some(NbdPort(10101)));
        assert_eq!(d.qemu_nbd_pid, Some(4242));
        assert_eq!(d.error_message, None);
        assert_eq!(b.bytes_transferred, 1 << 30);
        let rows = db.backup_disks(&id).await.unwrap();
        assert_eq!(rows[1].checksum_status.as_deref(), Some("passed"));
        assert_eq!(rows[1].checksum_ranges, Some(256));
        assert_eq!(rows[0].checksum_status, None);

        let e = db.update_disk(&id, DiskKey(9999), &DiskUpdate::default()).await.unwrap_err();
        assert_eq!(e.to_string(), "disk 9999 of backup 'b-1' not found");

        // Terminal transition sets completed_at and the error; no way out of a terminal state.
        assert!(db.transition_backup(&id, &[JobStatus::Running], JobStatus::Failed, Some("node lost")).await.unwrap());
        assert!(!db.transition_backup(&id, &[JobStatus::Running], JobStatus::Completed, None).await.unwrap());
        let b = db.get_backup(&id).await.unwrap();
        assert_eq!(b.status, JobStatus::Failed);
        assert_eq!(b.error_message.as_deref(), Some("node lost"));
        assert!(b.completed_at.unwrap() >= b.started_at.unwrap());

        let e = job_dup(db).await;
        assert_eq!(e.to_string(), "backup 'b-1' already exists");
        let e = db.get_backup(&BackupId::from("nope")).await.unwrap_err();
        assert_eq!(e.to_string(), "backup 'nope' not found");
        let e = db
            .transition_backup(&BackupId::from("nope"), &[JobStatus::Pending], JobStatus::Running, None)
            .await
            .unwrap_err();
        assert!(matches!(e, DbError::NotFound { .. }), "{e:?}");
    })
    .await;
}

#[tokio::test]
async fn unknown_repository_or_context_is_refused_for_a_job() {
    on_each_dialect("job_unknown_refs", |t: TestDb| async move {
        let db = &t.db;
        db.upsert_vm(&vm("pg", vec![disk(2000, 0, 1)]))
            .await
            .unwrap();
        let v = db.get_vm("pg").await.unwrap();
        let e = db
            .create_backup(&NewBackup {
                backup_id: BackupId::from("b-x"),
                vm_context_id: v.vm_context_id,
                vm_name: "pg".into(),
                backup_type: BackupType::Full,
                repository_id: "missing".into(),
                disks: vec![NewBackupDisk {
                    disk_key: DiskKey(2000),
                    unit_number: 0,
                    qcow2_path: "/x".into(),
                    nbd_export_name: "pg-disk-2000".into(),
                    bytes_total: 1,
                    parent_backup_id: None,
                    backing_path: None,
                }],
            })
            .await
            .unwrap_err();
        assert!(
            matches!(e, DbError::NotFound { .. }),
            "{}: {e:?}",
            t.dialect
        );
        assert!(e.to_string().contains("repository 'missing'"), "{e}");
        assert!(
            db.list_backups().await.unwrap().is_empty(),
            "nothing half-stored"
        );
    })
    .await;
}

#[tokio::test]
async fn listings_order_and_chain_parents() {
    on_each_dialect("listings", |t: TestDb| async move {
        let db = &t.db;
        for id in ["b-1", "b-2", "b-3"] {
            job(db, "pgtest1", id, BackupType::Full).await;
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let order: Vec<String> = db
            .list_backups()
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.backup_id.0)
            .collect();
        assert_eq!(order, ["b-3", "b-2", "b-1"], "newest first");
        let v = db.get_vm("pgtest1").await.unwrap();
        assert_eq!(
            db.last_completed_backup(&v.vm_context_id).await.unwrap(),
            None
        );
        assert_eq!(v.last_backup_id, None);

        for id in ["b-1", "b-2"] {
            let id = BackupId::from(id);
            assert!(
                db.transition_backup(&id, &[JobStatus::Pending], JobStatus::Running, None)
                    .await
                    .unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            assert!(
                db.transition_backup(&id, &[JobStatus::Running], JobStatus::Completed, None)
                    .await
                    .unwrap()
            );
        }
        let last = db
            .last_completed_backup(&v.vm_context_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(last.backup_id.0, "b-2");
        assert_eq!(last.disk_results.len(), 2);
        let v = db.get_vm("pgtest1").await.unwrap();
        assert_eq!(v.last_backup_id, Some(BackupId::from("b-2")));
        assert_eq!(v.last_backup_at, last.completed_at);
        assert_eq!(
            db.list_vms().await.unwrap()[0].last_backup_id,
            Some(BackupId::from("b-2"))
        );

        let active = db
            .list_backups_in(&[
                JobStatus::Pending,
                JobStatus::Running,
                JobStatus::Cancelling,
            ])
            .await
            .unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].backup_id.0, "b-3");
        assert_eq!(active[0].disk_results.len(), 2, "disks come along");
        assert_eq!(
            db.list_backups_in(&[JobStatus::Completed])
                .await
                .unwrap()
                .len(),
            2
        );
        assert!(db.list_backups_in(&[]).await.unwrap().is_empty());

        // An incremental records its parent and the relative backing path per disk.
        let v = db.get_vm("pgtest1").await.unwrap();
        let inc = db
            .create_backup(&NewBackup {
                backup_id: BackupId::from("b-4"),
                vm_context_id: v.vm_context_id.clone(),
                vm_name: v.vm_name.clone(),
                backup_type: BackupType::Incremental,
                repository_id: "main".into(),
                disks: last
                    .disk_results
                    .iter()
                    .map(|d| NewBackupDisk {
                        disk_key: d.disk_key,
                        unit_number: d.unit_number,
                        qcow2_path: format!("/srv/repo/pgtest1/{}/b-4.qcow2", d.disk_key),
                        nbd_export_name: d.nbd_export_name.clone(),
                        bytes_total: d.bytes_total,
                        parent_backup_id: Some(last.backup_id.clone()),
                        backing_path: Some("b-2.qcow2".into()),
                    })
                    .collect(),
            })
            .await
            .unwrap();
        assert_eq!(inc.backup_type, BackupType::Incremental);
        let rows = db.backup_disks(&inc.backup_id).await.unwrap();
        assert!(
            rows.iter()
                .all(|r| r.parent_backup_id == Some(BackupId::from("b-2")))
        );
        assert!(
            rows.iter()
                .all(|r| r.backing_path.as_deref() == Some("b-2.qcow2"))
        );
    })
    .await;
}

/// A cancel and a completion racing on the same job, from two pools (two hub processes):
/// exactly one of them moves the job, every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_racing_completion_has_exactly_one_winner() {
    on_each_dialect("transition_race", |t: TestDb| async move {
        let other = t.another_pool().await;
        let rounds = 15;
        for i in 0..rounds {
            let id = BackupId(format!("race-{i}"));
            job(&t.db, "pgtest1", &id.0, BackupType::Full).await;
            assert!(
                t.db.transition_backup(&id, &[JobStatus::Pending], JobStatus::Running, None)
                    .await
                    .unwrap()
            );
            let active = [
                JobStatus::Pending,
                JobStatus::Preparing,
                JobStatus::Running,
                JobStatus::Finalizing,
            ];
            let (a, b) = (t.db.clone(), other.clone());
            let (ida, idb) = (id.clone(), id.clone());
            let cancel = tokio::spawn(async move {
                a.transition_backup(
                    &ida,
                    &active,
                    JobStatus::Cancelling,
                    Some("cancelled by operator"),
                )
                .await
            });
            let complete = tokio::spawn(async move {
                b.transition_backup(
                    &idb,
                    &[JobStatus::Running, JobStatus::Finalizing],
                    JobStatus::Completed,
                    None,
                )
                .await
            });
            let cancelled = cancel.await.unwrap().unwrap();
            let completed = complete.await.unwrap().unwrap();
            assert!(
                cancelled ^ completed,
                "{}: round {i}: cancel {cancelled}, complete {completed}",
                t.dialect
            );
            let b = t.db.get_backup(&id).await.unwrap();
            let expect = if cancelled {
                JobStatus::Cancelling
            } else {
                JobStatus::Completed
            };
            assert_eq!(b.status, expect);
            assert_eq!(b.error_message.is_some(), cancelled);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_come_back_in_strictly_increasing_order() {
    on_each_dialect("events", |t: TestDb| async move {
        job(&t.db, "pgtest1", "b-1", BackupType::Full).await;
        job(&t.db, "pgtest1", "b-2", BackupType::Full).await;
        let other = t.another_pool().await;
        let mut tasks = Vec::new();
        for w in 0..4 {
            let db = if w % 2 == 0 {
                t.db.clone()
            } else {
                other.clone()
            };
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..15 {
                    let id = BackupId::from(if i % 2 == 0 { "b-1" } else { "b-2" });
                    let disk = (i % 3 == 0).then_some(DiskKey(2000));
                    let e = db
                        .append_event(
                            &id,
                            "info",
                            "progress",
                            &format!("writer {w} step {i}"),
                            disk,
                        )
                        .await
                        .unwrap();
                    seqs.push(e.seq);
                }
                seqs
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            let seqs = task.await.unwrap();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "one writer's events increase: {seqs:?}"
            );
            all.extend(seqs);
        }
        let distinct: BTreeSet<i64> = all.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            60,
            "{}: every event got its own seq",
            t.dialect
        );

        let mut listed = Vec::new();
        // Each writer sends its even steps (8) to b-1 and its odd steps (7) to b-2.
        for (id, count) in [("b-1", 32), ("b-2", 28)] {
            let evs = t.db.list_events(&BackupId::from(id)).await.unwrap();
            assert_eq!(evs.len(), count);
            assert!(
                evs.windows(2).all(|w| w[0].seq < w[1].seq),
                "ordered by seq"
            );
            assert!(evs.iter().all(|e| e.backup_id.0 == id));
            listed.extend(evs.into_iter().map(|e| e.seq));
        }
        let listed: BTreeSet<i64> = listed.into_iter().collect();
        assert_eq!(listed, distinct);

        let last =
            t.db.append_event(&BackupId::from("b-1"), "warn", "done", "last one", None)
                .await
                .unwrap();
        assert!(last.seq > *distinct.last().unwrap());
        let since =
            t.db.events_since(*distinct.last().unwrap(), 10)
                .await
                .unwrap();
        assert_eq!(since.len(), 1);
        assert_eq!(since[0], last);

        let e =
            t.db.append_event(&BackupId::from("ghost"), "info", "x", "y", None)
                .await
                .unwrap_err();
        assert_eq!(e.to_string(), "backup 'ghost' not found");
    })
    .await;
}

/// Change ids and the bytes really written are kept per disk; the job's `bytes_transferred` is
/// their sum when every disk reported one, else the bytes done.
#[tokio::test]
async fn change_ids_and_written_bytes_are_kept_per_disk() {
    on_each_dialect("change_ids", |t: TestDb| async move {
        let db = &t.db;
        let b = job(db, "vc1", "b-cbt", BackupType::Full).await;
        let id = b.backup_id.clone();
        assert!(b.disk_results.iter().all(|d| d.change_id.is_none()));
        for (key, total) in [(2000, 1u64 << 30), (2001, 2 << 30)] {
            db.update_disk(
                &id,
                DiskKey(key),
                &DiskUpdate {
                    bytes_done: Some(total),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
        // No disk reported what it wrote: the bytes done, as before.
        assert_eq!(db.get_backup(&id).await.unwrap().bytes_transferred, 3 << 30);
        db.update_disk(
            &id,
            DiskKey(2000),
            &DiskUpdate {
                bytes_transferred: Some(4 << 20),
                change_id: Some("52 9c 1d 4b 7e 10 aa 01-5f 3c 22 9e 10 7b 4b 11/17".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // One disk only: still the bytes done (a sum of both kinds would mean nothing).
        assert_eq!(
            db.get_backup(&id).await.unwrap().bytes_transferred,
            3 << 30,
            "{}",
            t.dialect
        );
        db.update_disk(
            &id,
            DiskKey(2001),
            &DiskUpdate {
                bytes_transferred: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let b = db.get_backup(&id).await.unwrap();
        assert_eq!(b.bytes_transferred, 4 << 20, "{}", t.dialect);
        assert_eq!(b.total_bytes, 3 << 30);
        assert_eq!(
            b.disk_results[0].change_id.as_deref(),
            Some("52 9c 1d 4b 7e 10 aa 01-5f 3c 22 9e 10 7b 4b 11/17")
        );
        assert_eq!(b.disk_results[1].change_id, None);
        let rows = db.backup_disks(&id).await.unwrap();
        assert_eq!(rows[0].bytes_transferred, Some(4 << 20));
        assert_eq!(rows[1].bytes_transferred, Some(0));
        // An unrelated update leaves them alone.
        db.update_disk(
            &id,
            DiskKey(2000),
            &DiskUpdate {
                checksum_status: Some("passed".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let listed = db.list_backups().await.unwrap();
        assert_eq!(listed[0].bytes_transferred, 4 << 20, "{}", t.dialect);
        assert!(listed[0].disk_results[0].change_id.is_some());
        let active = db.list_backups_in(&[JobStatus::Pending]).await.unwrap();
        assert_eq!(active[0].bytes_transferred, 4 << 20);
    })
    .await;
}

#[tokio::test]
async fn a_points_vm_hardware_is_stored_and_read_back() {
    on_each_dialect("hardware", |t: TestDb| async move {
        let db = &t.db;
        job(db, "pgtest1", "b-hw", BackupType::Full).await;
        let id = BackupId::from("b-hw");
        assert_eq!(db.get_backup(&id).await.unwrap().hardware, None);
        let hw = sendense_shared::api::VmHardware {
            memory_mib: 512,
            cpus: 2,
            machine: Some("pc-q35-9.2".into()),
            accel: Some("tcg".into()),
            disks: vec![sendense_shared::api::HardwareDisk {
                disk_key: DiskKey(2000),
                device_id: "disk0".into(),
                virtual_size: 1 << 30,
                bus: "virtio".into(),
                image_path: "/var/lib/vms/pg/root.qcow2".into(),
                format: "qcow2".into(),
            }],
            nics: vec![sendense_shared::api::HardwareNic {
                name: "net0".into(),
                mac: Some("52:54:00:12:34:56".into()),
                model: Some("virtio-net-pci".into()),
            }],
            kernel: Some("/boot/vmlinuz".into()),
            initrd: None,
            append: Some("console=ttyS0".into()),
            argv: vec!["qemu-system-x86_64".into(), "-m".into(), "512".into()],
            pid: Some(4242),
        };
        db.set_hardware(&id, &hw).await.unwrap();
        let b = db.get_backup(&id).await.unwrap();
        assert_eq!(b.hardware.as_deref(), Some(&hw), "{}", t.dialect);
        let listed = db.list_backups().await.unwrap();
        assert_eq!(listed[0].hardware.as_deref(), Some(&hw), "{}", t.dialect);
    })
    .await;
}
