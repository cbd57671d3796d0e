//! The two dialects' schemas and the upgrade of an old database.

use crate::*;

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
        "node_credentials",
        "recovery_jobs",
        "recovery_disks",
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
        // Every migration file of the dialect, in order (its version is the file's prefix).
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/sqlite");
        let mut files: Vec<i64> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.split('_').next()?.parse().ok())
            .collect();
        files.sort();
        assert!(files.len() >= 13, "{files:?}");
        assert_eq!(versions, files, "{}", t.dialect);
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
        assert_eq!(vm.node_vm_name, None, "{}: an old VM is known by its hub name", t.dialect);
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
        // A point completed before whole-disk checksums is `legacy`: restorable, and a verify
        // job gives it checksums; it has no sidecar yet.
        assert_eq!(b.integrity, sendense_shared::api::Integrity::Legacy);
        assert!(rows.iter().all(|r| r.manifest_path.is_none() && r.manifest_blake3.is_none()));
        assert_eq!(b.bytes_transferred, 3 << 30, "old rows: the bytes done");
    })
    .await;
}
