//! Repositories, nodes, VM registrations, qemu-nbd processes, the connection itself.

use crate::*;

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
            links: Vec::new(),
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

/// Two nodes registering a VM of one name at once, from two hub processes, end with two VMs:
/// one keeps the name, the other's is `<name>.<node>` and remembers the name its node knows;
/// registering again finds the same VMs, and a name that cannot be qualified is refused naming
/// the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_with_one_vm_name_get_two_vms() {
    on_each_dialect("vm_two_nodes", |t: TestDb| async move {
        let other = t.another_pool().await;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let db = if i % 2 == 0 {
                t.db.clone()
            } else {
                other.clone()
            };
            let node = if i < 4 { "na" } else { "nb" };
            tasks.push(tokio::spawn(async move {
                let req = VmRequest {
                    node: Some(node.to_string()),
                    ..vm("shared", vec![disk(2000, 0, 1 << 20)])
                };
                db.upsert_vm_of_node(&req)
                    .await
                    .map(|v| (node, v.vm_name, v.node_vm_name))
            }));
        }
        let mut got = BTreeSet::new();
        for task in tasks {
            got.insert(
                task.await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("{}: {e}", t.dialect)),
            );
        }
        let vms = t.db.list_vms().await.unwrap();
        assert_eq!(vms.len(), 2, "{}: {vms:?}", t.dialect);
        let first = vms.iter().find(|v| v.vm_name == "shared").unwrap();
        let second = if first.node.as_deref() == Some("na") {
            "nb"
        } else {
            "na"
        };
        let qualified = format!("shared.{second}");
        let theirs = vms.iter().find(|v| v.vm_name == qualified).unwrap();
        assert_eq!(theirs.node.as_deref(), Some(second), "{}", t.dialect);
        assert_eq!(theirs.node_vm_name.as_deref(), Some("shared"));
        assert_eq!(theirs.name_on_node(), "shared");
        assert_eq!(first.node_vm_name, None);
        // Every registration answered its own node's VM.
        for (node, name, _) in &got {
            let want = if *node == second {
                &qualified
            } else {
                "shared"
            };
            assert_eq!(name, want, "{}: {got:?}", t.dialect);
        }
        assert_eq!(t.db.hub_vm_name(second, "shared").await.unwrap(), qualified);
        assert_eq!(
            t.db.hub_vm_name(first.node.as_deref().unwrap(), "shared")
                .await
                .unwrap(),
            "shared"
        );

        // A name one byte short of the limit: qualified, it would be too long.
        let long = "l".repeat(sendense_shared::names::MAX_NAME_LEN - 1);
        t.db.upsert_vm_of_node(&VmRequest {
            node: Some("na".into()),
            ..vm(&long, vec![disk(2000, 0, 1 << 20)])
        })
        .await
        .unwrap();
        let e =
            t.db.upsert_vm_of_node(&VmRequest {
                node: Some("nb".into()),
                ..vm(&long, vec![disk(2000, 0, 1 << 20)])
            })
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("vm_name") && msg.contains("another node's VM holds the name"),
            "{}: {msg}",
            t.dialect
        );
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
