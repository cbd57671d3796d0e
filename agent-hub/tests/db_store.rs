//! The hub's database, checked on SQLite and on a real MariaDB (see `db_support`).

mod db_support;

use agent_hub::db::{Db, DbError, DiskUpdate, NewBackup, NewBackupDisk, VmSource};
use db_support::{TestDb, on_each_bare_dialect, on_each_dialect};
use sendense_shared::api::{
    BackupType, DiskStatus, JobStatus, NodeRegistration, ProcessInfo, TunnelState, TunnelStateKind,
    VmDisk, VmRequest,
};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use std::collections::BTreeSet;

fn disk(key: i64, unit: i32, size: u64) -> VmDisk {
    VmDisk {
        disk_key: DiskKey(key),
        unit_number: unit,
        size_bytes: size,
        label: format!("Hard disk {}", unit + 1),
        controller: None,
        backing_file: None,
        thin_provisioned: None,
    }
}

fn vm(name: &str, disks: Vec<VmDisk>) -> VmRequest {
    VmRequest {
        vm_name: name.to_string(),
        node: None,
        disks,
    }
}

/// A registered VM and repository, and a job over all the VM's disks.
async fn job(db: &Db, vm_name: &str, id: &str, kind: BackupType) -> sendense_shared::api::Backup {
    let v = match db.get_vm(vm_name).await {
        Ok(v) => v,
        Err(_) => db
            .upsert_vm(&vm(
                vm_name,
                vec![disk(2000, 0, 1 << 30), disk(2001, 1, 2 << 30)],
            ))
            .await
            .unwrap(),
    };
    if db.get_repository("main").await.is_err() {
        db.insert_repository("main", "/srv/repo").await.unwrap();
    }
    db.create_backup(&NewBackup {
        backup_id: BackupId::from(id),
        vm_context_id: v.vm_context_id.clone(),
        vm_name: v.vm_name.clone(),
        backup_type: kind,
        repository_id: "main".into(),
        disks: v
            .disks
            .iter()
            .map(|d| NewBackupDisk {
                disk_key: d.disk_key,
                unit_number: d.unit_number,
                qcow2_path: format!("/srv/repo/{vm_name}/{}/{id}.qcow2", d.disk_key),
                nbd_export_name: format!("{vm_name}-disk-{}", d.disk_key),
                bytes_total: d.size_bytes,
                parent_backup_id: None,
                backing_path: None,
            })
            .collect(),
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn migrations_apply_twice_and_ping_answers() {
    on_each_dialect("migrations_twice", |t: TestDb| async move {
        t.db.migrate().await.expect("second migrate is a no-op");
        assert!(t.db.ping().await, "{}", t.dialect);
        let again = t.another_pool().await;
        again.migrate().await.unwrap();
        assert!(again.list_backups().await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn repositories_round_trip_and_name_conflicts() {
    on_each_dialect("repositories", |t: TestDb| async move {
        let db = &t.db;
        db.insert_repository("main", "/srv/repo").await.unwrap();
        db.insert_repository("archive", "/mnt/archive")
            .await
            .unwrap();
        let r = db.get_repository("main").await.unwrap();
        assert_eq!((r.id.as_str(), r.path.as_str()), ("main", "/srv/repo"));
        let ids: Vec<String> = db
            .list_repositories()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["archive", "main"]);

        let e = db
            .insert_repository("main", "/elsewhere")
            .await
            .unwrap_err();
        assert!(matches!(e, DbError::Conflict { .. }), "{e:?}");
        assert_eq!(e.to_string(), "repository 'main' already exists");
        assert_eq!(db.get_repository("main").await.unwrap().path, "/srv/repo");

        let e = db.get_repository("nope").await.unwrap_err();
        assert!(matches!(e, DbError::NotFound { .. }), "{e:?}");
        assert_eq!(e.to_string(), "repository 'nope' not found");

        let e = db.insert_repository("../x", "/tmp").await.unwrap_err();
        assert!(e.to_string().contains("repository id"), "{e}");
    })
    .await;
}

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
async fn escaping_and_bad_vm_registrations_are_refused() {
    on_each_dialect("vm_bad_input", |t: TestDb| async move {
        let db = &t.db;
        for bad in ["..", "../etc", "a/b", "a\0b", ""] {
            let e = db
                .upsert_vm(&vm(bad, vec![disk(2000, 0, 1)]))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("vm_name"), "{bad:?}: {e}");
        }
        let e = db
            .upsert_vm(&vm("ok", vec![disk(2000, 0, 1), disk(2000, 1, 1)]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("disk key 2000 appears twice"), "{e}");
        let e = db.upsert_vm(&vm("ok", vec![])).await.unwrap_err();
        assert!(e.to_string().contains("disks"), "{e}");
        let e = db
            .upsert_vm(&vm("ok", vec![disk(2000, 0, u64::MAX)]))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("size_bytes"), "{e}");
        assert!(db.list_vms().await.unwrap().is_empty(), "nothing stored");
        let e = db.get_vm("ghost").await.unwrap_err();
        assert_eq!(e.to_string(), "VM 'ghost' not found");
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

async fn job_dup(db: &Db) -> DbError {
    let v = db.get_vm("pgtest1").await.unwrap();
    db.create_backup(&NewBackup {
        backup_id: BackupId::from("b-1"),
        vm_context_id: v.vm_context_id,
        vm_name: v.vm_name,
        backup_type: BackupType::Full,
        repository_id: "main".into(),
        disks: vec![NewBackupDisk {
            disk_key: DiskKey(2000),
            unit_number: 0,
            qcow2_path: "/x".into(),
            nbd_export_name: "x".into(),
            bytes_total: 1,
            parent_backup_id: None,
            backing_path: None,
        }],
    })
    .await
    .unwrap_err()
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

#[tokio::test]
async fn nodes_register_refresh_and_keep_tunnel_state() {
    on_each_dialect("nodes", |t: TestDb| async move {
        let db = &t.db;
        let reg = |v: &str| NodeRegistration {
            name: "node1".into(),
            api_url: "http://127.0.0.1:9081".into(),
            version: v.into(),
        };
        db.upsert_node(&reg("0.1.0")).await.unwrap();
        let first = db.get_node("node1").await.unwrap();
        assert!(first.last_seen_at.is_some() && first.tunnel.is_none());
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        db.upsert_node(&reg("0.2.0")).await.unwrap();
        let second = db.get_node("node1").await.unwrap();
        assert_eq!(second.version, "0.2.0");
        assert!(second.last_seen_at > first.last_seen_at);
        let tunnel = TunnelState {
            state: TunnelStateKind::Up,
            since: chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap(),
            restarts: 2,
            last_error: Some("connection reset".into()),
            forwards: vec!["L 127.0.0.1:10100 -> 127.0.0.1:10100".into()],
        };
        db.set_node_tunnel("node1", &tunnel).await.unwrap();
        assert_eq!(
            db.get_node("node1").await.unwrap().tunnel,
            Some(tunnel.clone())
        );
        assert_eq!(db.list_nodes().await.unwrap().len(), 1);
        let e = db.set_node_tunnel("ghost", &tunnel).await.unwrap_err();
        assert_eq!(e.to_string(), "node 'ghost' not found");
        assert!(db.get_node("ghost").await.is_err());
    })
    .await;
}

#[tokio::test]
async fn qemu_nbd_processes_are_recorded_and_stopped() {
    on_each_dialect("processes", |t: TestDb| async move {
        let db = &t.db;
        let started = chrono::DateTime::from_timestamp_micros(1_790_000_000_123_456).unwrap();
        for (pid, port, key) in [(1001u32, 10100u16, 2000i64), (1002, 10101, 2001)] {
            db.record_process(
                &ProcessInfo {
                    pid,
                    port: NbdPort(port),
                    export_name: format!("pg-disk-{key}"),
                    qcow2_path: format!("/srv/repo/pg/{key}/b-1.qcow2"),
                    backup_id: BackupId::from("b-1"),
                    disk_key: DiskKey(key),
                    alive: true,
                    started_at: started,
                },
                &format!("qemu-nbd --port {port} --export-name pg-disk-{key}"),
            )
            .await
            .unwrap();
        }
        assert_eq!(db.live_processes().await.unwrap().len(), 2);
        db.mark_process_stopped(1001, NbdPort(10100), "exit status 0")
            .await
            .unwrap();
        db.mark_process_stopped(1001, NbdPort(10100), "again")
            .await
            .unwrap();
        let live = db.live_processes().await.unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!((live[0].pid, live[0].started_at), (1002, started));
        let all = db.list_processes().await.unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().any(|p| p.pid == 1001 && !p.alive));
        let recs = db.process_records(&BackupId::from("b-1")).await.unwrap();
        assert_eq!(
            recs[0].exit_status.as_deref(),
            Some("exit status 0"),
            "first stop wins"
        );
        assert!(recs[0].stopped_at.is_some());
        assert_eq!(
            recs[1].command_line,
            "qemu-nbd --port 10101 --export-name pg-disk-2001"
        );
        let e = db
            .mark_process_stopped(77, NbdPort(10100), "x")
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "qemu-nbd process 77 on port 10100 not found");
    })
    .await;
}

/// Two hub processes registering the same new VM at once end with one VM context, and every
/// disk row is one of the requested ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_registrations_of_one_vm_make_one_context() {
    on_each_dialect("vm_concurrent", |t: TestDb| async move {
        let other = t.another_pool().await;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let db = if i % 2 == 0 {
                t.db.clone()
            } else {
                other.clone()
            };
            tasks.push(tokio::spawn(async move {
                let req = vm(
                    "racer",
                    vec![disk(2000, i, 1 << 20), disk(2001, 10 + i, 2 << 20)],
                );
                db.upsert_vm(&req).await.map(|v| v.vm_context_id)
            }));
        }
        let mut contexts = BTreeSet::new();
        for task in tasks {
            contexts.insert(
                task.await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{}: {e}", t.dialect)),
            );
        }
        assert_eq!(contexts.len(), 1, "{}: {contexts:?}", t.dialect);
        let v = t.db.get_vm("racer").await.unwrap();
        assert_eq!(v.disks.len(), 2);
        assert_eq!(
            v.disks[1].unit_number,
            v.disks[0].unit_number + 10,
            "one request's units, not a mix"
        );
        assert_eq!(t.db.list_vms().await.unwrap().len(), 1);
    })
    .await;
}

/// The SQLite database runs in WAL mode, so readers do not wait for a writer.
#[tokio::test]
async fn sqlite_uses_wal() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&format!("sqlite://{}/hub.db", dir.path().display()))
        .await
        .unwrap();
    db.migrate().await.unwrap();
    assert!(
        dir.path().join("hub.db-wal").exists(),
        "no WAL file next to the database"
    );
}

/// A wrong password names the database and the cause, and never prints the password.
#[tokio::test]
async fn connect_errors_hide_the_password() {
    let Some(server) = db_support::mysql_server_url() else {
        return;
    };
    let (scheme_user, host) = server.rsplit_once('@').unwrap();
    let user = scheme_user
        .trim_start_matches("mysql://")
        .split(':')
        .next()
        .unwrap();
    let url = format!("mysql://{user}:not-the-password-42@{host}/nowhere");
    let e = Db::connect(&url).await.unwrap_err();
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert!(!msg.contains("not-the-password-42"), "{msg}");
    assert!(
        msg.contains(&format!("mysql://{user}:***@{host}/nowhere")),
        "{msg}"
    );
    assert!(msg.contains("Access denied"), "{msg}");
}

#[tokio::test]
async fn sqlite_file_is_created_on_connect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fresh.db");
    let db = Db::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert_eq!(db.kind(), agent_hub::db::DbKind::Sqlite);
    assert!(path.exists());
    let e = Db::connect("sqlite:///no/such/dir/hub.db")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/no/such/dir/hub.db"), "{e}");
}

type Schema = std::collections::BTreeMap<String, BTreeSet<(String, &'static str, bool, bool)>>;

/// The kind of a column's type as the Any driver sees it: both dialects must store a column as
/// the same kind (a flag stored as INT in one and TEXT in the other would decode in one only).
fn type_kind(declared: &str) -> &'static str {
    let t = declared.to_ascii_lowercase();
    if t.contains("int") {
        "integer"
    } else if t.contains("char") || t.contains("text") {
        "text"
    } else {
        "other"
    }
}

/// (table → {(column, type kind, nullable, in primary key)}) as the database itself describes it.
async fn describe(t: &TestDb) -> Schema {
    use sqlx::{Connection, Row};
    let mut schema = Schema::new();
    if t.dialect == "sqlite" {
        let mut c = sqlx::SqliteConnection::connect(&t.url).await.unwrap();
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' \
             AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_sqlx%'",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        for table in tables {
            let rows = sqlx::query("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?)")
                .bind(&table)
                .fetch_all(&mut c)
                .await
                .unwrap();
            let cols = rows
                .iter()
                .map(|r| {
                    (
                        r.get::<String, _>(0),
                        type_kind(&r.get::<String, _>(1)),
                        r.get::<i64, _>(2) == 0,
                        r.get::<i64, _>(3) > 0,
                    )
                })
                .collect();
            schema.insert(table, cols);
        }
    } else {
        let mut c = sqlx::MySqlConnection::connect(&t.url).await.unwrap();
        let rows = sqlx::query(
            "SELECT CAST(TABLE_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR), CAST(IS_NULLABLE AS CHAR), \
             CAST(COLUMN_KEY AS CHAR), CAST(DATA_TYPE AS CHAR) FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME NOT LIKE '\\_sqlx%'",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        for r in rows {
            schema.entry(r.get::<String, _>(0)).or_default().insert((
                r.get::<String, _>(1),
                type_kind(&r.get::<String, _>(4)),
                r.get::<String, _>(2) == "YES",
                r.get::<String, _>(3) == "PRI",
            ));
        }
    }
    schema
}

/// The two dialects' migrations describe the same tables, columns, nullability and keys.
#[tokio::test]
async fn both_dialects_have_the_same_schema() {
    if db_support::mysql_server_url().is_none() {
        return;
    }
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    on_each_dialect("schema_equal", move |t: TestDb| {
        let s = s.clone();
        async move {
            let schema = describe(&t).await;
            s.lock().unwrap().push((t.dialect, schema));
        }
    })
    .await;
    let seen = seen.lock().unwrap();
    let (sqlite, mysql) = (&seen[0], &seen[1]);
    assert_eq!((sqlite.0, mysql.0), ("sqlite", "mysql"));
    let tables: Vec<&String> = sqlite.1.keys().collect();
    for t in [
        "vm_replication_contexts",
        "vm_disks",
        "repositories",
        "backup_jobs",
        "backup_disks",
        "nbd_port_allocations",
        "qemu_nbd_processes",
        "nodes",
        "job_events",
    ] {
        assert!(sqlite.1.contains_key(t), "table {t} missing: {tables:?}");
    }
    // The columns of migration 0002, all NULL-able in both dialects.
    for (table, column, kind) in [
        ("vm_replication_contexts", "driver", "text"),
        ("vm_replication_contexts", "change_tracking", "integer"),
        ("vm_disks", "controller", "text"),
        ("vm_disks", "backing_file", "text"),
        ("vm_disks", "thin_provisioned", "integer"),
        ("backup_disks", "change_id", "text"),
        ("backup_disks", "bytes_transferred", "integer"),
    ] {
        let want = (column.to_string(), kind, true, false);
        assert!(
            sqlite.1[table].contains(&want),
            "{table}.{column} missing or not a NULL-able {kind} column: {:?}",
            sqlite.1[table]
        );
    }
    for (table, cols) in &sqlite.1 {
        assert_eq!(
            Some(cols),
            mysql.1.get(table),
            "table {table} differs between dialects"
        );
    }
    assert_eq!(sqlite.1.len(), mysql.1.len());
}

/// Applies the migrations up to `version` only, as a hub of that schema would have.
async fn migrate_to(t: &TestDb, version: i64) {
    let pool = sqlx::AnyPool::connect(&t.url).await.unwrap();
    let migrator = if t.dialect == "sqlite" {
        sqlx::migrate!("../migrations/sqlite")
    } else {
        sqlx::migrate!("../migrations/mysql")
    };
    migrator.run_to(version, &pool).await.unwrap();
    pool.close().await;
}

/// A database written by a hub of schema 0001 (rows inserted as that hub wrote them) upgrades
/// with the current hub's migrations: every row stays, the new columns read NULL, and the hub
/// reads the old rows.
#[tokio::test]
async fn a_0001_database_upgrades_and_keeps_its_rows() {
    on_each_bare_dialect("upgrade_0001", |t: TestDb| async move {
        use sqlx::Row;
        migrate_to(&t, 1).await;
        let pool = sqlx::AnyPool::connect(&t.url).await.unwrap();
        for sql in [
            "INSERT INTO repositories (id, path, created_at) VALUES ('main', '/srv/repo', 1)",
            "INSERT INTO vm_replication_contexts (vm_context_id, vm_name, node, created_at, updated_at) \
             VALUES ('ctx-old', 'oldvm', NULL, 1, 1)",
            "INSERT INTO vm_disks (vm_context_id, disk_key, unit_number, size_bytes, label) \
             VALUES ('ctx-old', 2000, 0, 1073741824, 'Hard disk 1')",
            "INSERT INTO vm_disks (vm_context_id, disk_key, unit_number, size_bytes, label) \
             VALUES ('ctx-old', 2001, 1, 2147483648, 'Hard disk 2')",
            "INSERT INTO backup_jobs (backup_id, vm_context_id, vm_name, backup_type, repository_id, \
             status, nbd_targets_string, created_at, started_at, completed_at) \
             VALUES ('b-old', 'ctx-old', 'oldvm', 'full', 'main', 'completed', '', 10, 11, 12)",
            "INSERT INTO backup_disks (backup_id, disk_key, unit_number, qcow2_path, nbd_export_name, \
             status, bytes_done, bytes_total, checksum_status) \
             VALUES ('b-old', 2000, 0, '/srv/repo/oldvm/2000/b-old.qcow2', 'oldvm-disk-2000', \
             'completed', 1073741824, 1073741824, 'passed')",
            "INSERT INTO backup_disks (backup_id, disk_key, unit_number, qcow2_path, nbd_export_name, \
             status, bytes_done, bytes_total, checksum_status) \
             VALUES ('b-old', 2001, 1, '/srv/repo/oldvm/2001/b-old.qcow2', 'oldvm-disk-2001', \
             'completed', 2147483648, 2147483648, 'passed')",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        // The old schema has none of the new columns (so this test really starts at 0001).
        let e = sqlx::query("SELECT change_id FROM backup_disks").fetch_all(&pool).await;
        assert!(e.is_err(), "{}: change_id exists before 0002", t.dialect);

        t.db.migrate().await.expect("the hub's migrations upgrade a 0001 database");

        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(versions, [1, 2, 3], "{}", t.dialect);
        let rows = sqlx::query(
            "SELECT disk_key, change_id, bytes_transferred, bytes_done FROM backup_disks \
             ORDER BY disk_key",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 2, "{}", t.dialect);
        for r in &rows {
            assert_eq!(r.get::<Option<String>, _>("change_id"), None, "{}", t.dialect);
            assert_eq!(r.get::<Option<i64>, _>("bytes_transferred"), None, "{}", t.dialect);
        }
        let rows = sqlx::query(
            "SELECT controller, backing_file, thin_provisioned FROM vm_disks ORDER BY disk_key",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 2, "{}", t.dialect);
        for r in &rows {
            assert_eq!(r.get::<Option<String>, _>("controller"), None);
            assert_eq!(r.get::<Option<String>, _>("backing_file"), None);
            assert_eq!(r.get::<Option<i32>, _>("thin_provisioned"), None);
        }
        let r = sqlx::query("SELECT driver, change_tracking FROM vm_replication_contexts")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(r.get::<Option<String>, _>("driver"), None);
        assert_eq!(r.get::<Option<i32>, _>("change_tracking"), None);
        pool.close().await;

        // The hub reads the old rows as they were.
        let vm = t.db.get_vm("oldvm").await.unwrap();
        assert_eq!(vm.vm_context_id, "ctx-old");
        assert_eq!(vm.last_backup_id, Some(BackupId::from("b-old")));
        let units: Vec<(i64, i32, u64)> =
            vm.disks.iter().map(|d| (d.disk_key.0, d.unit_number, d.size_bytes)).collect();
        assert_eq!(units, [(2000, 0, 1 << 30), (2001, 1, 2 << 30)]);
        let b = t.db.get_backup(&BackupId::from("b-old")).await.unwrap();
        assert_eq!(b.status, JobStatus::Completed);
        assert_eq!(b.total_bytes, 3 << 30);
        assert_eq!(b.disk_results.len(), 2);
        let rows = t.db.backup_disks(&BackupId::from("b-old")).await.unwrap();
        assert_eq!(rows[1].checksum_status.as_deref(), Some("passed"));
        // ... and the new fields as "not known".
        assert_eq!((vm.driver, vm.change_tracking), (None, None));
        assert!(vm.disks.iter().all(|d| d.controller.is_none()
            && d.backing_file.is_none()
            && d.thin_provisioned.is_none()));
        assert!(b.disk_results.iter().all(|d| d.change_id.is_none()));
        assert!(rows.iter().all(|r| r.bytes_transferred.is_none()));
        assert_eq!(b.bytes_transferred, 3 << 30, "old rows: the bytes done");
    })
    .await;
}

/// The hypervisor's facts of a VM and its disks are stored, updated and read back; a VM
/// registered by hand keeps what the last inventory said of its driver.
#[tokio::test]
async fn vm_disk_facts_and_driver_round_trip() {
    on_each_dialect("vm_facts", |t: TestDb| async move {
        let db = &t.db;
        let mut d0 = disk(2000, 0, 1 << 30);
        d0.controller = Some("SCSI controller 0".into());
        d0.backing_file = Some("[datastore1] vc1/vc1.vmdk".into());
        d0.thin_provisioned = Some(true);
        let mut d1 = disk(2001, 1, 2 << 30);
        d1.controller = Some("SCSI controller 0".into());
        d1.backing_file = Some("[datastore1] vc1/vc1_1.vmdk".into());
        d1.thin_provisioned = Some(false);
        let source = VmSource {
            driver: Some("vsphere".into()),
            change_tracking: Some(true),
        };
        let v = db
            .upsert_inventory_vm(&vm("vc1", vec![d0.clone(), d1.clone()]), &source)
            .await
            .unwrap();
        assert_eq!(v.disks, [d0.clone(), d1.clone()], "{}", t.dialect);
        assert_eq!(v.driver.as_deref(), Some("vsphere"));
        assert_eq!(v.change_tracking, Some(true));

        // By hand, without the facts: the disk facts are the request's, the driver stays.
        let plain = vec![disk(2000, 0, 1 << 30), disk(2001, 1, 2 << 30)];
        let v = db.upsert_vm(&vm("vc1", plain.clone())).await.unwrap();
        assert_eq!(v.disks, plain, "{}", t.dialect);
        assert_eq!(v.driver.as_deref(), Some("vsphere"), "{}", t.dialect);
        assert_eq!(v.change_tracking, Some(true));

        // The next inventory says CBT is off now.
        let off = VmSource {
            driver: Some("vsphere".into()),
            change_tracking: Some(false),
        };
        db.upsert_inventory_vm(&vm("vc1", vec![d0.clone(), d1.clone()]), &off)
            .await
            .unwrap();
        let listed = db.list_vms().await.unwrap();
        assert_eq!(listed[0].change_tracking, Some(false), "{}", t.dialect);
        assert_eq!(listed[0].disks, [d0.clone(), d1.clone()]);

        // A QEMU VM: no facts at all.
        let q = db
            .upsert_inventory_vm(
                &vm("qemu1", vec![disk(2000, 0, 1 << 20)]),
                &VmSource {
                    driver: Some("qemu".into()),
                    change_tracking: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(q.driver.as_deref(), Some("qemu"));
        assert_eq!(q.change_tracking, None);
        assert_eq!(q.disks[0].controller, None);
        assert_eq!(q.disks[0].thin_provisioned, None);

        let mut bad = d0.clone();
        bad.controller = Some("SCSI\ncontroller".into());
        let e = db.upsert_vm(&vm("vc2", vec![bad])).await.unwrap_err();
        assert!(
            matches!(
                e,
                DbError::Invalid {
                    field: "disks[].controller",
                    ..
                }
            ),
            "{e}"
        );
        let mut long = d0.clone();
        long.controller = Some("c".repeat(256));
        let e = db.upsert_vm(&vm("vc2", vec![long])).await.unwrap_err();
        assert!(e.to_string().contains("longer than 255"), "{e}");
        assert!(db.get_vm("vc2").await.is_err(), "nothing stored");
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
