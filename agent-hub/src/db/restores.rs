//! Restore jobs: `restore_jobs`, one row per restore. Status moves only by compare-and-set,
//! like a backup's ([`Db::transition_restore`]); the events live in `job_events` under the
//! backup point's id with `job_id` set to the restore's.

use super::{DbError, col, from_db_u64, from_us, is_foreign_key_violation, q, to_db_u64};
use crate::db::Db;
use sendense_shared::api::{JobStatus, Restore, RestoreTarget};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use sqlx::any::AnyRow;

/// `SELECT <every column> FROM restore_jobs <rest>`, as one static string.
macro_rules! select {
    ($rest:literal) => {
        concat!(
            "SELECT restore_id, backup_id, vm_name, disk_key, target_node, target_path, target_vm, status, \
             source_qcow2, nbd_port, nbd_export_name, bytes_done, bytes_total, error_message, \
             created_at, started_at, completed_at FROM restore_jobs ",
            $rest
        )
    };
}

fn restore_row(r: &AnyRow) -> Result<Restore, DbError> {
    let status: String = col(r, "status")?;
    let status = JobStatus::parse(&status).ok_or(DbError::Corrupt {
        column: "restore_jobs.status",
        value: status,
    })?;
    let port: Option<i32> = col(r, "nbd_port")?;
    let port = port
        .map(|p| {
            u16::try_from(p).map(NbdPort).map_err(|_| DbError::Corrupt {
                column: "restore_jobs.nbd_port",
                value: p.to_string(),
            })
        })
        .transpose()?;
    Ok(Restore {
        restore_id: col(r, "restore_id")?,
        backup_id: BackupId(col(r, "backup_id")?),
        vm_name: col(r, "vm_name")?,
        disk_key: DiskKey(col(r, "disk_key")?),
        target: RestoreTarget {
            node: col(r, "target_node")?,
            path: col(r, "target_path")?,
            vm: col(r, "target_vm")?,
        },
        status,
        source_qcow2: col(r, "source_qcow2")?,
        nbd_port: port,
        nbd_export_name: col(r, "nbd_export_name")?,
        bytes_done: from_db_u64("restore_jobs.bytes_done", col(r, "bytes_done")?)?,
        bytes_total: from_db_u64("restore_jobs.bytes_total", col(r, "bytes_total")?)?,
        created_at: from_us(col(r, "created_at")?),
        completed_at: col::<Option<i64>>(r, "completed_at")?.map(from_us),
        error_message: col(r, "error_message")?,
    })
}

impl Db {
    /// Stores a new restore as given (its status is the caller's, normally `preparing`).
    pub async fn create_restore(&self, r: &Restore) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO restore_jobs (restore_id, backup_id, vm_name, disk_key, target_node, \
             target_path, target_vm, status, source_qcow2, nbd_port, nbd_export_name, \
             bytes_done, bytes_total, error_message, created_at, started_at, completed_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
        )
        .bind(&r.restore_id)
        .bind(&r.backup_id.0)
        .bind(&r.vm_name)
        .bind(r.disk_key.0)
        .bind(&r.target.node)
        .bind(&r.target.path)
        .bind(&r.target.vm)
        .bind(r.status.as_str())
        .bind(&r.source_qcow2)
        .bind(r.nbd_port.map(|p| i32::from(p.0)))
        .bind(&r.nbd_export_name)
        .bind(to_db_u64("bytes_done", r.bytes_done)?)
        .bind(to_db_u64("bytes_total", r.bytes_total)?)
        .bind(&r.error_message)
        .bind(r.created_at.timestamp_micros())
        .execute(self.pool())
        .await
        .map_err(|e| {
            if is_foreign_key_violation(&e) {
                DbError::NotFound {
                    what: format!("backup '{}'", r.backup_id),
                }
            } else {
                q("storing a restore job")(e)
            }
        })?;
        Ok(())
    }

    pub async fn get_restore(&self, id: &str) -> Result<Restore, DbError> {
        let row = sqlx::query(select!("WHERE restore_id = ?"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(q("reading a restore job"))?
            .ok_or_else(|| DbError::NotFound {
                what: format!("restore '{id}'"),
            })?;
        restore_row(&row)
    }

    /// Every restore, newest first.
    pub async fn list_restores(&self) -> Result<Vec<Restore>, DbError> {
        sqlx::query(select!("ORDER BY created_at DESC, restore_id DESC"))
            .fetch_all(self.pool())
            .await
            .map_err(q("listing restore jobs"))?
            .iter()
            .map(restore_row)
            .collect()
    }

    /// Restores in one of `statuses`, newest first (the reconciler's and the busy check's view).
    pub async fn list_restores_in(&self, statuses: &[JobStatus]) -> Result<Vec<Restore>, DbError> {
        let Some(slots) = super::backups::status_slots(statuses) else {
            return Ok(Vec::new());
        };
        let mut query = sqlx::query(select!(
            "WHERE status IN (?, ?, ?, ?, ?, ?, ?, ?) ORDER BY created_at DESC, restore_id DESC"
        ));
        for s in slots {
            query = query.bind(s);
        }
        query
            .fetch_all(self.pool())
            .await
            .map_err(q("listing restore jobs by status"))?
            .iter()
            .map(restore_row)
            .collect()
    }

    /// Compare-and-set of a restore's status, as [`Db::transition_backup`] for backups:
    /// moves to `to` only from one of `from`; sets `started_at` on the first move to `running`,
    /// `completed_at` and clears `nbd_port` on a terminal move, `error_message` when given.
    pub async fn transition_restore(
        &self,
        id: &str,
        from: &[JobStatus],
        to: JobStatus,
        error: Option<&str>,
    ) -> Result<bool, DbError> {
        const RESTORE: super::backups::JobTable = super::backups::job_table!(
            "restore_jobs",
            "restore_id",
            "restore",
            clears "nbd_port"
        );
        self.transition_job(&RESTORE, id, from, to, error).await
    }

    /// The port of the restore's export while it holds one.
    pub async fn set_restore_port(&self, id: &str, port: Option<NbdPort>) -> Result<(), DbError> {
        sqlx::query("UPDATE restore_jobs SET nbd_port = ? WHERE restore_id = ?")
            .bind(port.map(|p| i32::from(p.0)))
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(q("recording a restore's port"))?;
        Ok(())
    }

    /// Bytes copied so far, as the node last reported.
    pub async fn set_restore_progress(
        &self,
        id: &str,
        bytes_done: u64,
        bytes_total: u64,
    ) -> Result<(), DbError> {
        sqlx::query("UPDATE restore_jobs SET bytes_done = ?, bytes_total = ? WHERE restore_id = ?")
            .bind(to_db_u64("bytes_done", bytes_done)?)
            .bind(to_db_u64("bytes_total", bytes_total)?)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(q("recording a restore's progress"))?;
        Ok(())
    }
}
