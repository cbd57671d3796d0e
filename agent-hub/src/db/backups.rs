//! Backup jobs: `backup_jobs` (one per job) and `backup_disks` (one per disk of the job).

use super::{
    DbError, col, from_db_u64, from_us, is_foreign_key_violation, is_unique_violation, q, to_db_u64,
};
use crate::db::Db;
use sendense_shared::api::{
    Backup, BackupType, Consistency, ConsistencyLevel, DiskResult, DiskStatus, Integrity,
    JobStatus, VmHardware,
};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use sqlx::any::AnyRow;
use std::collections::HashMap;

/// A new job, stored with status `pending`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBackup {
    pub backup_id: BackupId,
    pub vm_context_id: String,
    pub vm_name: String,
    pub backup_type: BackupType,
    pub repository_id: String,
    pub disks: Vec<NewBackupDisk>,
}

/// One disk of a new job, stored with status `pending` and `bytes_done` 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBackupDisk {
    pub disk_key: DiskKey,
    pub unit_number: i32,
    pub qcow2_path: String,
    pub nbd_export_name: String,
    pub bytes_total: u64,
    /// For an incremental: the completed backup whose image is this image's backing file.
    pub parent_backup_id: Option<BackupId>,
    /// The backing file as written into the image (relative to the image's directory).
    pub backing_path: Option<String>,
}

/// A partial update of one disk of a job. `None` leaves a column as it is; for
/// `error_message`, `Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskUpdate {
    pub status: Option<DiskStatus>,
    pub bytes_done: Option<u64>,
    pub bytes_total: Option<u64>,
    pub nbd_port: Option<NbdPort>,
    pub qemu_nbd_pid: Option<u32>,
    pub error_message: Option<Option<String>>,
    /// `"passed"`, `"failed"` or `"skipped"`.
    pub checksum_status: Option<String>,
    pub checksum_ranges: Option<u64>,
    pub checksum_mismatches: Option<u64>,
    /// Summary of `qemu-img check` after the copy.
    pub qemu_img_check: Option<String>,
    /// Bytes the writer really wrote into the target (see
    /// [`sendense_shared::api::DiskProgress::bytes_transferred`]).
    pub bytes_transferred: Option<u64>,
    /// The hypervisor's change id the disk was copied at (vSphere CBT).
    pub change_id: Option<String>,
    /// The image's whole-disk checksum sidecar, the sidecar file's BLAKE3, and who computed
    /// the checksums (`"writer"` or `"hub"`).
    pub manifest_path: Option<String>,
    pub manifest_blake3: Option<String>,
    pub checksums_source: Option<String>,
}

/// Everything stored about one disk of a job (the API's [`DiskResult`] plus chain and
/// verification columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDiskRow {
    pub backup_id: BackupId,
    pub result: DiskResult,
    pub parent_backup_id: Option<BackupId>,
    pub backing_path: Option<String>,
    pub checksum_status: Option<String>,
    pub checksum_ranges: Option<u64>,
    pub checksum_mismatches: Option<u64>,
    pub qemu_img_check: Option<String>,
    /// Bytes the writer really wrote into the target, when it said.
    pub bytes_transferred: Option<u64>,
    /// The whole-disk checksum sidecar of the image, and the BLAKE3 of that file.
    pub manifest_path: Option<String>,
    pub manifest_blake3: Option<String>,
}

#[cfg(test)]
const JOB_COLUMNS: &str = "backup_id, vm_context_id, vm_name, backup_type, repository_id, status, \
     nbd_targets_string, error_message, created_at, started_at, completed_at, integrity, \
     integrity_detail, verified_at, consistency, consistency_reason, freeze_ms";

/// Every status has one placeholder in the `IN (...)` lists below, so a fixed statement serves
/// any subset: unused slots repeat the first status.
const STATUS_SLOTS: usize = 8;

/// A job table whose status moves by compare-and-set ([`Db::transition_job`]); made by
/// [`job_table!`], so its statements are constants.
pub(super) struct JobTable {
    /// Binds: status, error, running flag, now, terminal flag, now, [terminal flag], id, slots.
    pub update: &'static str,
    pub exists: &'static str,
    /// The `UPDATE` also clears a column on a terminal move (one more bind).
    pub clears_on_end: bool,
    /// What a missing row is called (`backup`, `restore`, ...).
    pub what: &'static str,
    pub doing: &'static str,
}

/// `job_table!(table, id column, what [, clears column])`: the [`JobTable`] of a job table.
/// Sets `started_at` on the first move to `running`, `completed_at` (and clears the column) on
/// a terminal move, `error_message` when given.
macro_rules! job_table {
    (@clears) => { false };
    (@clears $col:literal) => { true };
    ($table:literal, $id:literal, $what:literal $(, clears $col:literal)?) => {
        super::backups::JobTable {
            update: concat!(
                "UPDATE ", $table, " SET status = ?, error_message = COALESCE(?, error_message), \
                 started_at = CASE WHEN ? = 1 AND started_at IS NULL THEN ? ELSE started_at END, \
                 completed_at = CASE WHEN ? = 1 THEN ? ELSE completed_at END",
                $(", ", $col, " = CASE WHEN ? = 1 THEN NULL ELSE ", $col, " END",)?
                " WHERE ", $id, " = ? AND status IN (?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            exists: concat!("SELECT COUNT(*) FROM ", $table, " WHERE ", $id, " = ?"),
            clears_on_end: super::backups::job_table!(@clears $($col)?),
            what: $what,
            doing: concat!("changing the status of a ", $what),
        }
    };
}
pub(super) use job_table;

pub(super) fn status_slots(statuses: &[JobStatus]) -> Option<[&'static str; STATUS_SLOTS]> {
    let first = statuses.first()?;
    let mut slots = [first.as_str(); STATUS_SLOTS];
    for (slot, s) in slots.iter_mut().zip(statuses) {
        *slot = s.as_str();
    }
    Some(slots)
}

fn job_status(v: String) -> Result<JobStatus, DbError> {
    JobStatus::parse(&v).ok_or(DbError::Corrupt {
        column: "backup_jobs.status",
        value: v,
    })
}

fn job_row(r: &AnyRow) -> Result<Backup, DbError> {
    let backup_type: String = col(r, "backup_type")?;
    let backup_type = match backup_type.as_str() {
        "full" => BackupType::Full,
        "incremental" => BackupType::Incremental,
        _ => {
            return Err(DbError::Corrupt {
                column: "backup_jobs.backup_type",
                value: backup_type,
            });
        }
    };
    Ok(Backup {
        backup_id: BackupId(col(r, "backup_id")?),
        vm_context_id: col(r, "vm_context_id")?,
        vm_name: col(r, "vm_name")?,
        backup_type,
        repository_id: col(r, "repository_id")?,
        status: job_status(col(r, "status")?)?,
        disk_results: Vec::new(),
        nbd_targets_string: col(r, "nbd_targets_string")?,
        bytes_transferred: 0,
        total_bytes: 0,
        created_at: from_us(col(r, "created_at")?),
        started_at: col::<Option<i64>>(r, "started_at")?.map(from_us),
        completed_at: col::<Option<i64>>(r, "completed_at")?.map(from_us),
        error_message: col(r, "error_message")?,
        integrity: integrity(col(r, "integrity")?)?,
        integrity_detail: col(r, "integrity_detail")?,
        verified_at: col::<Option<i64>>(r, "verified_at")?.map(from_us),
        consistency: consistency(r)?,
        protected: col::<i64>(r, "protected")? != 0,
        policy_id: col(r, "policy_id")?,
        boot_check: None,
        hardware: hardware(r)?,
    })
}

fn hardware(r: &AnyRow) -> Result<Option<Box<VmHardware>>, DbError> {
    let Some(json) = col::<Option<String>>(r, "hardware_json")? else {
        return Ok(None);
    };
    serde_json::from_str(&json)
        .map(Some)
        .map_err(|_| DbError::Corrupt {
            column: "backup_jobs.hardware_json",
            value: json,
        })
}

fn integrity(v: String) -> Result<Integrity, DbError> {
    Integrity::parse(&v).ok_or(DbError::Corrupt {
        column: "backup_jobs.integrity",
        value: v,
    })
}

fn consistency(r: &AnyRow) -> Result<Option<Consistency>, DbError> {
    let Some(level) = col::<Option<String>>(r, "consistency")? else {
        return Ok(None);
    };
    let level = match level.as_str() {
        "application" => ConsistencyLevel::Application,
        "crash" => ConsistencyLevel::Crash,
        _ => {
            return Err(DbError::Corrupt {
                column: "backup_jobs.consistency",
                value: level,
            });
        }
    };
    Ok(Some(Consistency {
        level,
        reason: col::<Option<String>>(r, "consistency_reason")?.unwrap_or_default(),
        freeze_ms: opt_u64(r, "freeze_ms")?,
    }))
}

fn opt_u64(r: &AnyRow, name: &'static str) -> Result<Option<u64>, DbError> {
    col::<Option<i64>>(r, name)?
        .map(|v| from_db_u64(name, v))
        .transpose()
}

fn disk_row(r: &AnyRow) -> Result<BackupDiskRow, DbError> {
    let status: String = col(r, "status")?;
    let status = DiskStatus::parse(&status).ok_or(DbError::Corrupt {
        column: "backup_disks.status",
        value: status,
    })?;
    let port = col::<Option<i64>>(r, "nbd_port")?
        .map(|p| {
            u16::try_from(p).map(NbdPort).map_err(|_| DbError::Corrupt {
                column: "backup_disks.nbd_port",
                value: p.to_string(),
            })
        })
        .transpose()?;
    let pid = col::<Option<i64>>(r, "qemu_nbd_pid")?
        .map(|p| {
            u32::try_from(p).map_err(|_| DbError::Corrupt {
                column: "backup_disks.qemu_nbd_pid",
                value: p.to_string(),
            })
        })
        .transpose()?;
    Ok(BackupDiskRow {
        backup_id: BackupId(col(r, "backup_id")?),
        result: DiskResult {
            disk_key: DiskKey(col(r, "disk_key")?),
            unit_number: col(r, "unit_number")?,
            nbd_port: port,
            nbd_export_name: col(r, "nbd_export_name")?,
            qcow2_path: col(r, "qcow2_path")?,
            qemu_nbd_pid: pid,
            status,
            bytes_done: from_db_u64("backup_disks.bytes_done", col(r, "bytes_done")?)?,
            bytes_total: from_db_u64("backup_disks.bytes_total", col(r, "bytes_total")?)?,
            error_message: col(r, "error_message")?,
            change_id: col(r, "change_id")?,
            checksums_source: col(r, "checksums_source")?,
        },
        manifest_path: col(r, "manifest_path")?,
        manifest_blake3: col(r, "manifest_blake3")?,
        parent_backup_id: col::<Option<String>>(r, "parent_backup_id")?.map(BackupId),
        backing_path: col(r, "backing_path")?,
        checksum_status: col(r, "checksum_status")?,
        checksum_ranges: opt_u64(r, "checksum_ranges")?,
        checksum_mismatches: opt_u64(r, "checksum_mismatches")?,
        qemu_img_check: col(r, "qemu_img_check")?,
        bytes_transferred: opt_u64(r, "bytes_transferred")?,
    })
}

/// Attaches disks (already ordered by backup and disk key) to their jobs and sums the bytes.
///
/// `bytes_transferred` is what the writer really wrote when it said so for every disk (an
/// incremental that changed 4 MiB of a 20 GiB VM shows 4 MiB); otherwise, for writers that do
/// not report it, the bytes done (which count skipped areas too).
fn assemble(mut jobs: Vec<Backup>, disks: Vec<BackupDiskRow>) -> Vec<Backup> {
    let mut by_job: HashMap<BackupId, Vec<(DiskResult, Option<u64>)>> = HashMap::new();
    for d in disks {
        by_job
            .entry(d.backup_id)
            .or_default()
            .push((d.result, d.bytes_transferred));
    }
    for job in &mut jobs {
        let disks = by_job.remove(&job.backup_id).unwrap_or_default();
        let written: Option<u64> = disks.iter().map(|(_, w)| *w).sum();
        job.bytes_transferred =
            written.unwrap_or_else(|| disks.iter().map(|(d, _)| d.bytes_done).sum());
        job.disk_results = disks.into_iter().map(|(d, _)| d).collect();
        job.total_bytes = job.disk_results.iter().map(|d| d.bytes_total).sum();
    }
    jobs
}

#[cfg(test)]
const DISK_COLUMNS: &str = "backup_id, disk_key, unit_number, qcow2_path, nbd_export_name, \
     nbd_port, qemu_nbd_pid, status, bytes_done, bytes_total, error_message, parent_backup_id, \
     backing_path, checksum_status, checksum_ranges, checksum_mismatches, qemu_img_check, change_id, \
     bytes_transferred, manifest_path, manifest_blake3, checksums_source";

// The column lists above are spelled out again in each statement so that every statement stays
// one static string; this check keeps the copies honest.
#[cfg(test)]
#[test]
fn column_lists_match_statements() {
    for sql in [SELECT_JOB, SELECT_JOBS, SELECT_JOBS_IN] {
        assert!(sql.contains(JOB_COLUMNS), "{sql}");
    }
    for sql in [SELECT_DISKS_OF, SELECT_ALL_DISKS, SELECT_DISKS_IN] {
        assert!(sql.contains(DISK_COLUMNS), "{sql}");
    }
}

const SELECT_JOB: &str = "SELECT backup_id, vm_context_id, vm_name, backup_type, repository_id, status, \
     nbd_targets_string, error_message, created_at, started_at, completed_at, integrity, \
     integrity_detail, verified_at, consistency, consistency_reason, freeze_ms, protected, policy_id, \
     hardware_json \
     FROM backup_jobs WHERE backup_id = ?";
const SELECT_JOBS: &str = "SELECT backup_id, vm_context_id, vm_name, backup_type, repository_id, status, \
     nbd_targets_string, error_message, created_at, started_at, completed_at, integrity, \
     integrity_detail, verified_at, consistency, consistency_reason, freeze_ms, protected, policy_id, \
     hardware_json \
     FROM backup_jobs ORDER BY created_at DESC, backup_id DESC";
const SELECT_JOBS_IN: &str = "SELECT backup_id, vm_context_id, vm_name, backup_type, repository_id, status, \
     nbd_targets_string, error_message, created_at, started_at, completed_at, integrity, \
     integrity_detail, verified_at, consistency, consistency_reason, freeze_ms, protected, policy_id, \
     hardware_json \
     FROM backup_jobs WHERE status IN (?, ?, ?, ?, ?, ?, ?, ?) \
     ORDER BY created_at DESC, backup_id DESC";
const SELECT_LAST_COMPLETED: &str = "SELECT backup_id, vm_context_id, vm_name, backup_type, repository_id, status, \
     nbd_targets_string, error_message, created_at, started_at, completed_at, integrity, \
     integrity_detail, verified_at, consistency, consistency_reason, freeze_ms, protected, policy_id, \
     hardware_json \
     FROM backup_jobs WHERE vm_context_id = ? AND status = 'completed' \
     ORDER BY completed_at DESC, created_at DESC LIMIT 1";
const SELECT_DISKS_OF: &str = "SELECT backup_id, disk_key, unit_number, qcow2_path, nbd_export_name, \
     nbd_port, qemu_nbd_pid, status, bytes_done, bytes_total, error_message, parent_backup_id, \
     backing_path, checksum_status, checksum_ranges, checksum_mismatches, qemu_img_check, change_id, \
     bytes_transferred, manifest_path, manifest_blake3, checksums_source \
     FROM backup_disks WHERE backup_id = ? ORDER BY disk_key";
const SELECT_ALL_DISKS: &str = "SELECT backup_id, disk_key, unit_number, qcow2_path, nbd_export_name, \
     nbd_port, qemu_nbd_pid, status, bytes_done, bytes_total, error_message, parent_backup_id, \
     backing_path, checksum_status, checksum_ranges, checksum_mismatches, qemu_img_check, change_id, \
     bytes_transferred, manifest_path, manifest_blake3, checksums_source \
     FROM backup_disks ORDER BY backup_id, disk_key";
const SELECT_DISKS_IN: &str = "SELECT backup_id, disk_key, unit_number, qcow2_path, nbd_export_name, \
     nbd_port, qemu_nbd_pid, status, bytes_done, bytes_total, error_message, parent_backup_id, \
     backing_path, checksum_status, checksum_ranges, checksum_mismatches, qemu_img_check, change_id, \
     bytes_transferred, manifest_path, manifest_blake3, checksums_source \
     FROM backup_disks WHERE backup_id IN \
     (SELECT backup_id FROM backup_jobs WHERE status IN (?, ?, ?, ?, ?, ?, ?, ?)) \
     ORDER BY backup_id, disk_key";

impl Db {
    /// Stores a new job (status `pending`) with all its disks, in one transaction.
    pub async fn create_backup(&self, new: &NewBackup) -> Result<Backup, DbError> {
        let doing = "creating a backup job";
        if new.disks.is_empty() {
            return Err(DbError::Invalid {
                field: "disks",
                reason: format!("backup '{}' has no disks", new.backup_id),
            });
        }
        let mut tx = self.begin_write(doing).await?;
        let now = self.now_us();
        sqlx::query(
            "INSERT INTO backup_jobs (backup_id, vm_context_id, vm_name, backup_type, \
             repository_id, status, nbd_targets_string, created_at) \
             VALUES (?, ?, ?, ?, ?, 'pending', '', ?)",
        )
        .bind(&new.backup_id.0)
        .bind(&new.vm_context_id)
        .bind(&new.vm_name)
        .bind(new.backup_type.as_str())
        .bind(&new.repository_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                DbError::Conflict {
                    what: format!("backup '{}'", new.backup_id),
                }
            } else if is_foreign_key_violation(&e) {
                DbError::NotFound {
                    what: format!(
                        "VM context '{}' or repository '{}'",
                        new.vm_context_id, new.repository_id
                    ),
                }
            } else {
                q(doing)(e)
            }
        })?;
        for d in &new.disks {
            sqlx::query(
                "INSERT INTO backup_disks (backup_id, disk_key, unit_number, qcow2_path, \
                 nbd_export_name, status, bytes_done, bytes_total, parent_backup_id, backing_path) \
                 VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
            )
            .bind(&new.backup_id.0)
            .bind(d.disk_key.0)
            .bind(d.unit_number)
            .bind(&d.qcow2_path)
            .bind(&d.nbd_export_name)
            .bind(to_db_u64("disks[].bytes_total", d.bytes_total)?)
            .bind(d.parent_backup_id.as_ref().map(|p| p.0.as_str()))
            .bind(d.backing_path.as_deref())
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    DbError::Invalid {
                        field: "disks[].disk_key",
                        reason: format!("disk key {} appears twice", d.disk_key),
                    }
                } else {
                    q(doing)(e)
                }
            })?;
        }
        tx.commit().await.map_err(q(doing))?;
        self.get_backup(&new.backup_id).await
    }

    /// One job with its `disk_results` (ordered by disk key) and `nbd_targets_string`.
    pub async fn get_backup(&self, id: &BackupId) -> Result<Backup, DbError> {
        let doing = "reading a backup job";
        let row = sqlx::query(SELECT_JOB)
            .bind(&id.0)
            .fetch_optional(self.pool())
            .await
            .map_err(q(doing))?
            .ok_or_else(|| DbError::NotFound {
                what: format!("backup '{id}'"),
            })?;
        let job = job_row(&row)?;
        let disks = self.backup_disks(id).await?;
        let mut jobs = assemble(vec![job], disks);
        self.attach_boot_checks(&mut jobs).await?;
        Ok(jobs.remove(0))
    }

    /// Every column of every disk of one job, ordered by disk key.
    pub async fn backup_disks(&self, id: &BackupId) -> Result<Vec<BackupDiskRow>, DbError> {
        sqlx::query(SELECT_DISKS_OF)
            .bind(&id.0)
            .fetch_all(self.pool())
            .await
            .map_err(q("reading a backup's disks"))?
            .iter()
            .map(disk_row)
            .collect()
    }

    /// Every job, newest first.
    pub async fn list_backups(&self) -> Result<Vec<Backup>, DbError> {
        let doing = "listing backup jobs";
        let jobs = sqlx::query(SELECT_JOBS)
            .fetch_all(self.pool())
            .await
            .map_err(q(doing))?
            .iter()
            .map(job_row)
            .collect::<Result<Vec<_>, _>>()?;
        let disks = sqlx::query(SELECT_ALL_DISKS)
            .fetch_all(self.pool())
            .await
            .map_err(q(doing))?
            .iter()
            .map(disk_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut jobs = assemble(jobs, disks);
        self.attach_boot_checks(&mut jobs).await?;
        Ok(jobs)
    }

    /// Jobs whose status is one of `statuses`, newest first (the reconciler's view).
    pub async fn list_backups_in(&self, statuses: &[JobStatus]) -> Result<Vec<Backup>, DbError> {
        let doing = "listing backup jobs by status";
        let Some(slots) = status_slots(statuses) else {
            return Ok(Vec::new());
        };
        let mut jobs_q = sqlx::query(SELECT_JOBS_IN);
        let mut disks_q = sqlx::query(SELECT_DISKS_IN);
        for s in slots {
            jobs_q = jobs_q.bind(s);
            disks_q = disks_q.bind(s);
        }
        let jobs = jobs_q
            .fetch_all(self.pool())
            .await
            .map_err(q(doing))?
            .iter()
            .map(job_row)
            .collect::<Result<Vec<_>, _>>()?;
        let disks = disks_q
            .fetch_all(self.pool())
            .await
            .map_err(q(doing))?
            .iter()
            .map(disk_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut jobs = assemble(jobs, disks);
        self.attach_boot_checks(&mut jobs).await?;
        Ok(jobs)
    }

    /// Compare-and-set of a job's status: moves to `to` only if the current status is one of
    /// `from`, in one `UPDATE ... WHERE status IN (...)`, so of a cancel and a completion racing
    /// each other exactly one wins. Returns whether it moved. Sets `started_at` on the first move
    /// to `running`, `completed_at` on a move to a terminal status, and `error_message` when
    /// `error` is given. `NotFound` if the job does not exist.
    pub async fn transition_backup(
        &self,
        id: &BackupId,
        from: &[JobStatus],
        to: JobStatus,
        error: Option<&str>,
    ) -> Result<bool, DbError> {
        const BACKUP: JobTable = job_table!("backup_jobs", "backup_id", "backup");
        self.transition_job(&BACKUP, &id.0, from, to, error).await
    }

    /// The compare-and-set of every job table (see [`Db::transition_backup`]); `NotFound`
    /// tells "not there" from "lost the race".
    pub(super) async fn transition_job(
        &self,
        table: &JobTable,
        id: &str,
        from: &[JobStatus],
        to: JobStatus,
        error: Option<&str>,
    ) -> Result<bool, DbError> {
        let Some(slots) = status_slots(from) else {
            return Ok(false);
        };
        let now = self.now_us();
        let terminal = i32::from(to.is_terminal());
        let mut query = sqlx::query(table.update)
            .bind(to.as_str())
            .bind(error)
            .bind(i32::from(to == JobStatus::Running))
            .bind(now)
            .bind(terminal)
            .bind(now);
        if table.clears_on_end {
            query = query.bind(terminal);
        }
        query = query.bind(id);
        for s in slots {
            query = query.bind(s);
        }
        let doing = table.doing;
        let res = query.execute(self.pool()).await.map_err(q(doing))?;
        if res.rows_affected() > 0 {
            return Ok(true);
        }
        let exists: i64 = sqlx::query_scalar(table.exists)
            .bind(id)
            .fetch_one(self.pool())
            .await
            .map_err(q(doing))?;
        if exists == 0 {
            return Err(DbError::NotFound {
                what: format!("{} '{id}'", table.what),
            });
        }
        Ok(false)
    }

    /// Records that an incremental job became a full one: type `full`, no parent, no backing
    /// file on any disk.
    pub async fn set_backup_full(&self, id: &BackupId) -> Result<(), DbError> {
        let res = sqlx::query("UPDATE backup_jobs SET backup_type = ? WHERE backup_id = ?")
            .bind(BackupType::Full.as_str())
            .bind(&id.0)
            .execute(self.pool())
            .await
            .map_err(q("turning a backup into a full one"))?;
        if res.rows_affected() == 0 {
            return Err(DbError::NotFound {
                what: format!("backup '{id}'"),
            });
        }
        sqlx::query(
            "UPDATE backup_disks SET parent_backup_id = NULL, backing_path = NULL \
             WHERE backup_id = ?",
        )
        .bind(&id.0)
        .execute(self.pool())
        .await
        .map_err(q("clearing the backing files of a backup"))?;
        Ok(())
    }

    /// Stores the NBD targets string handed to the writer.
    pub async fn set_targets_string(&self, id: &BackupId, s: &str) -> Result<(), DbError> {
        let res = sqlx::query("UPDATE backup_jobs SET nbd_targets_string = ? WHERE backup_id = ?")
            .bind(s)
            .bind(&id.0)
            .execute(self.pool())
            .await
            .map_err(q("storing a backup's NBD targets"))?;
        if res.rows_affected() == 0 {
            return Err(DbError::NotFound {
                what: format!("backup '{id}'"),
            });
        }
        Ok(())
    }

    /// Applies a partial update to one disk of a job (see [`DiskUpdate`]).
    pub async fn update_disk(
        &self,
        id: &BackupId,
        disk: DiskKey,
        upd: &DiskUpdate,
    ) -> Result<(), DbError> {
        let (set_error, error) = match &upd.error_message {
            Some(e) => (1i32, e.as_deref()),
            None => (0i32, None),
        };
        let res = sqlx::query(
            "UPDATE backup_disks SET \
             status = COALESCE(?, status), \
             bytes_done = COALESCE(?, bytes_done), \
             bytes_total = COALESCE(?, bytes_total), \
             nbd_port = COALESCE(?, nbd_port), \
             qemu_nbd_pid = COALESCE(?, qemu_nbd_pid), \
             error_message = CASE WHEN ? = 1 THEN ? ELSE error_message END, \
             checksum_status = COALESCE(?, checksum_status), \
             checksum_ranges = COALESCE(?, checksum_ranges), \
             checksum_mismatches = COALESCE(?, checksum_mismatches), \
             qemu_img_check = COALESCE(?, qemu_img_check), \
             bytes_transferred = COALESCE(?, bytes_transferred), \
             change_id = COALESCE(?, change_id), \
             manifest_path = COALESCE(?, manifest_path), \
             manifest_blake3 = COALESCE(?, manifest_blake3), \
             checksums_source = COALESCE(?, checksums_source) \
             WHERE backup_id = ? AND disk_key = ?",
        )
        .bind(upd.status.map(|s| s.as_str()))
        .bind(
            upd.bytes_done
                .map(|v| to_db_u64("bytes_done", v))
                .transpose()?,
        )
        .bind(
            upd.bytes_total
                .map(|v| to_db_u64("bytes_total", v))
                .transpose()?,
        )
        .bind(upd.nbd_port.map(|p| i32::from(p.0)))
        .bind(upd.qemu_nbd_pid.map(i64::from))
        .bind(set_error)
        .bind(error)
        .bind(upd.checksum_status.as_deref())
        .bind(
            upd.checksum_ranges
                .map(|v| to_db_u64("checksum_ranges", v))
                .transpose()?,
        )
        .bind(
            upd.checksum_mismatches
                .map(|v| to_db_u64("checksum_mismatches", v))
                .transpose()?,
        )
        .bind(upd.qemu_img_check.as_deref())
        .bind(
            upd.bytes_transferred
                .map(|v| to_db_u64("bytes_transferred", v))
                .transpose()?,
        )
        .bind(upd.change_id.as_deref())
        .bind(upd.manifest_path.as_deref())
        .bind(upd.manifest_blake3.as_deref())
        .bind(upd.checksums_source.as_deref())
        .bind(&id.0)
        .bind(disk.0)
        .execute(self.pool())
        .await
        .map_err(q("updating a backup disk"))?;
        if res.rows_affected() == 0 {
            return Err(DbError::NotFound {
                what: format!("disk {disk} of backup '{id}'"),
            });
        }
        Ok(())
    }

    /// Sets a point's integrity (and its detail; `verified_at` is set to now for `verified`
    /// and `hub_computed`).
    pub async fn set_integrity(
        &self,
        id: &BackupId,
        integrity: Integrity,
        detail: Option<&str>,
    ) -> Result<(), DbError> {
        let verified = matches!(integrity, Integrity::Verified | Integrity::HubComputed);
        let res = sqlx::query(
            "UPDATE backup_jobs SET integrity = ?, integrity_detail = ?, \
             verified_at = CASE WHEN ? = 1 THEN ? ELSE verified_at END WHERE backup_id = ?",
        )
        .bind(integrity.as_str())
        .bind(detail)
        .bind(i32::from(verified))
        .bind(self.now_us())
        .bind(&id.0)
        .execute(self.pool())
        .await
        .map_err(q("setting a backup's integrity"))?;
        if res.rows_affected() == 0 {
            return Err(DbError::NotFound {
                what: format!("backup '{id}'"),
            });
        }
        Ok(())
    }

    /// Records the VM's hardware at the point's snapshot.
    pub async fn set_hardware(&self, id: &BackupId, h: &VmHardware) -> Result<(), DbError> {
        let json = serde_json::to_string(h).map_err(|e| DbError::Corrupt {
            column: "backup_jobs.hardware_json",
            value: e.to_string(),
        })?;
        sqlx::query("UPDATE backup_jobs SET hardware_json = ? WHERE backup_id = ?")
            .bind(json)
            .bind(&id.0)
            .execute(self.pool())
            .await
            .map_err(q("recording a backup's VM hardware"))?;
        Ok(())
    }

    /// Records how consistent a point's snapshot was.
    pub async fn set_consistency(&self, id: &BackupId, c: &Consistency) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE backup_jobs SET consistency = ?, consistency_reason = ?, freeze_ms = ? \
             WHERE backup_id = ?",
        )
        .bind(c.level.as_str())
        .bind(&c.reason)
        .bind(c.freeze_ms.map(|v| to_db_u64("freeze_ms", v)).transpose()?)
        .bind(&id.0)
        .execute(self.pool())
        .await
        .map_err(q("recording a backup's consistency"))?;
        Ok(())
    }

    /// The newest completed job of a VM context (the parent of the next incremental).
    pub async fn last_completed_backup(
        &self,
        vm_context_id: &str,
    ) -> Result<Option<Backup>, DbError> {
        let row = sqlx::query(SELECT_LAST_COMPLETED)
            .bind(vm_context_id)
            .fetch_optional(self.pool())
            .await
            .map_err(q("finding the last completed backup"))?;
        match row {
            Some(r) => {
                let job = job_row(&r)?;
                let disks = self.backup_disks(&job.backup_id).await?;
                Ok(Some(assemble(vec![job], disks).remove(0)))
            }
            None => Ok(None),
        }
    }
}
