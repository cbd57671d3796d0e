//! The hub's database, checked on SQLite and on a real MariaDB (see `db_support`).

mod db_support;
mod db_store {
    pub mod boot_checks;
    pub mod jobs;
    pub mod policies;
    pub mod records;
    pub mod recoveries;
    pub mod restores;
    pub mod schema;
}

use agent_hub::db::{Db, DbError, DiskUpdate, NewBackup, NewBackupDisk, VmSource};
use db_support::{TestDb, on_each_bare_dialect, on_each_dialect};
use sendense_shared::api::{
    BackupType, DiskStatus, JobStatus, NodeRegistration, ProcessInfo, TunnelState, TunnelStateKind,
    VmDisk, VmRequest,
};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use std::collections::BTreeSet;

pub(crate) fn disk(key: i64, unit: i32, size: u64) -> VmDisk {
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

pub(crate) fn vm(name: &str, disks: Vec<VmDisk>) -> VmRequest {
    VmRequest {
        vm_name: name.to_string(),
        node: None,
        disks,
    }
}

/// A registered VM and repository, and a job over all the VM's disks.
pub(crate) async fn job(
    db: &Db,
    vm_name: &str,
    id: &str,
    kind: BackupType,
) -> sendense_shared::api::Backup {
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

pub(crate) async fn job_dup(db: &Db) -> DbError {
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
