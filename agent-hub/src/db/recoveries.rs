//! Instant recoveries: `recovery_jobs`, one row per recovery, and `recovery_disks`, one row per
//! disk it serves. Status moves only by compare-and-set ([`Db::transition_recovery`]); a
//! terminal move also clears every disk's port and qemu-nbd PID, so a recovery read terminal
//! names nothing it still holds. The events live in `job_events` under the point's id with
//! `job_id` set to the recovery's.

use super::{DbError, col, from_db_u64, from_us, is_foreign_key_violation, q, to_db_u64};
use crate::db::Db;
use sendense_shared::api::{JobStatus, NodeRecoveryState, Recovery, RecoveryDisk};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use sqlx::any::AnyRow;
use std::collections::HashMap;

/// `SELECT <every job column> FROM recovery_jobs <rest>`.
macro_rules! select_jobs {
    ($rest:literal) => {
        concat!(
            "SELECT recovery_id, backup_id, source_vm, node, vm_name, status, vm_state, qemu_pid, \
             qmp_socket, serial_log, stalled, error_message, created_at, vm_started_at, \
             completed_at FROM recovery_jobs ",
            $rest
        )
    };
}

/// `SELECT <every disk column> FROM recovery_disks <rest>`.
macro_rules! select_disks {
    ($rest:literal) => {
        concat!(
            "SELECT recovery_id, disk_key, position, source_qcow2, nbd_port, nbd_export_name, \
             qemu_nbd_pid, overlay, bytes_done, bytes_total, rate_bps, stream \
             FROM recovery_disks ",
            $rest
        )
    };
}

fn corrupt(column: &'static str, v: impl ToString) -> DbError {
    DbError::Corrupt {
        column,
        value: v.to_string(),
    }
}

fn opt_u32(r: &AnyRow, name: &'static str) -> Result<Option<u32>, DbError> {
    col::<Option<i64>>(r, name)?
        .map(|v| u32::try_from(v).map_err(|_| corrupt(name, v)))
        .transpose()
}

fn job_row(r: &AnyRow) -> Result<Recovery, DbError> {
    let status: String = col(r, "status")?;
    let status =
        JobStatus::parse(&status).ok_or_else(|| corrupt("recovery_jobs.status", &status))?;
    Ok(Recovery {
        recovery_id: col(r, "recovery_id")?,
        backup_id: BackupId(col(r, "backup_id")?),
        source_vm: col(r, "source_vm")?,
        node: col(r, "node")?,
        vm_name: col(r, "vm_name")?,
        status,
        disks: Vec::new(),
        vm_state: col(r, "vm_state")?,
        qemu_pid: opt_u32(r, "qemu_pid")?,
        qmp_socket: col(r, "qmp_socket")?,
        serial_log: col(r, "serial_log")?,
        stalled: col(r, "stalled")?,
        created_at: from_us(col(r, "created_at")?),
        vm_started_at: col::<Option<i64>>(r, "vm_started_at")?.map(from_us),
        completed_at: col::<Option<i64>>(r, "completed_at")?.map(from_us),
        error_message: col(r, "error_message")?,
    })
}

/// A disk row: its recovery's id, its guest position, the disk.
fn disk_row(r: &AnyRow) -> Result<(String, i64, RecoveryDisk), DbError> {
    let port = col::<Option<i64>>(r, "nbd_port")?
        .map(|p| {
            u16::try_from(p)
                .map(NbdPort)
                .map_err(|_| corrupt("recovery_disks.nbd_port", p))
        })
        .transpose()?;
    Ok((
        col(r, "recovery_id")?,
        col(r, "position")?,
        RecoveryDisk {
            disk_key: DiskKey(col(r, "disk_key")?),
            source_qcow2: col(r, "source_qcow2")?,
            nbd_port: port,
            nbd_export_name: col(r, "nbd_export_name")?,
            qemu_nbd_pid: opt_u32(r, "qemu_nbd_pid")?,
            overlay: col(r, "overlay")?,
            bytes_done: from_db_u64("recovery_disks.bytes_done", col(r, "bytes_done")?)?,
            bytes_total: from_db_u64("recovery_disks.bytes_total", col(r, "bytes_total")?)?,
            rate_bps: from_db_u64("recovery_disks.rate_bps", col(r, "rate_bps")?)?,
            stream: col(r, "stream")?,
        },
    ))
}

/// Jobs with their disks, each job's in guest order.
fn assemble(jobs: Vec<Recovery>, disks: &[AnyRow]) -> Result<Vec<Recovery>, DbError> {
    let mut by_job: HashMap<String, Vec<(i64, RecoveryDisk)>> = HashMap::new();
    for r in disks {
        let (id, pos, d) = disk_row(r)?;
        by_job.entry(id).or_default().push((pos, d));
    }
    Ok(jobs
        .into_iter()
        .map(|mut j| {
            let mut d = by_job.remove(&j.recovery_id).unwrap_or_default();
            d.sort_by_key(|(pos, _)| *pos);
            j.disks = d.into_iter().map(|(_, d)| d).collect();
            j
        })
        .collect())
}

fn opt_pid(pid: Option<u32>) -> Option<i64> {
    pid.map(i64::from)
}

impl Db {
    /// Stores a new recovery and its disks (in the order given: the guest's) as given; its
    /// status is the caller's, normally `preparing`.
    pub async fn create_recovery(&self, r: &Recovery) -> Result<(), DbError> {
        let doing = "storing a recovery";
        let mut tx = self.begin_write(doing).await?;
        sqlx::query(
            "INSERT INTO recovery_jobs (recovery_id, backup_id, source_vm, node, vm_name, status, \
             vm_state, qemu_pid, qmp_socket, serial_log, stalled, error_message, created_at, \
             started_at, vm_started_at, completed_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL)",
        )
        .bind(&r.recovery_id)
        .bind(&r.backup_id.0)
        .bind(&r.source_vm)
        .bind(&r.node)
        .bind(&r.vm_name)
        .bind(r.status.as_str())
        .bind(&r.vm_state)
        .bind(opt_pid(r.qemu_pid))
        .bind(&r.qmp_socket)
        .bind(&r.serial_log)
        .bind(&r.stalled)
        .bind(&r.error_message)
        .bind(r.created_at.timestamp_micros())
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            if is_foreign_key_violation(&e) {
                DbError::NotFound {
                    what: format!("backup '{}'", r.backup_id),
                }
            } else {
                q(doing)(e)
            }
        })?;
        for (pos, d) in r.disks.iter().enumerate() {
            sqlx::query(
                "INSERT INTO recovery_disks (recovery_id, disk_key, position, source_qcow2, \
                 nbd_port, nbd_export_name, qemu_nbd_pid, overlay, bytes_done, bytes_total, \
                 rate_bps, stream) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&r.recovery_id)
            .bind(d.disk_key.0)
            .bind(pos as i64)
            .bind(&d.source_qcow2)
            .bind(d.nbd_port.map(|p| i64::from(p.0)))
            .bind(&d.nbd_export_name)
            .bind(opt_pid(d.qemu_nbd_pid))
            .bind(&d.overlay)
            .bind(to_db_u64("bytes_done", d.bytes_done)?)
            .bind(to_db_u64("bytes_total", d.bytes_total)?)
            .bind(to_db_u64("rate_bps", d.rate_bps)?)
            .bind(&d.stream)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                if super::is_unique_violation(&e) {
                    DbError::Invalid {
                        field: "disks",
                        reason: format!("disk {} appears twice", d.disk_key),
                    }
                } else {
                    q(doing)(e)
                }
            })?;
        }
        tx.commit().await.map_err(q(doing))
    }

    pub async fn get_recovery(&self, id: &str) -> Result<Recovery, DbError> {
        let doing = "reading a recovery";
        let job = sqlx::query(select_jobs!("WHERE recovery_id = ?"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(q(doing))?
            .ok_or_else(|| DbError::NotFound {
                what: format!("recovery '{id}'"),
            })?;
        let disks = sqlx::query(select_disks!("WHERE recovery_id = ?"))
            .bind(id)
            .fetch_all(self.pool())
            .await
            .map_err(q(doing))?;
        let mut one = assemble(vec![job_row(&job)?], &disks)?;
        Ok(one.remove(0))
    }

    /// Every recovery, newest first.
    pub async fn list_recoveries(&self) -> Result<Vec<Recovery>, DbError> {
        let doing = "listing recoveries";
        let jobs = sqlx::query(select_jobs!("ORDER BY created_at DESC, recovery_id DESC"))
            .fetch_all(self.pool())
            .await
            .map_err(q(doing))?
            .iter()
            .map(job_row)
            .collect::<Result<Vec<_>, _>>()?;
        let disks = sqlx::query(select_disks!(""))
            .fetch_all(self.pool())
            .await
            .map_err(q(doing))?;
        assemble(jobs, &disks)
    }

    /// Recoveries in one of `statuses`, newest first (the reconciler's, the admission's and
    /// prune's view).
    pub async fn list_recoveries_in(
        &self,
        statuses: &[JobStatus],
    ) -> Result<Vec<Recovery>, DbError> {
        let doing = "listing recoveries by status";
        let Some(slots) = super::backups::status_slots(statuses) else {
            return Ok(Vec::new());
        };
        const JOBS: &str = select_jobs!(
            "WHERE status IN (?, ?, ?, ?, ?, ?, ?, ?) ORDER BY created_at DESC, recovery_id DESC"
        );
        const DISKS: &str = select_disks!(
            "WHERE recovery_id IN (SELECT recovery_id FROM recovery_jobs \
             WHERE status IN (?, ?, ?, ?, ?, ?, ?, ?))"
        );
        let (mut jobs_q, mut disks_q) = (sqlx::query(JOBS), sqlx::query(DISKS));
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
        let disks = disks_q.fetch_all(self.pool()).await.map_err(q(doing))?;
        assemble(jobs, &disks)
    }

    /// Compare-and-set of a recovery's status, as [`Db::transition_restore`]: moves to `to`
    /// only from one of `from`; `started_at` on the first move to `running`, `completed_at` on
    /// a terminal move, `error_message` when given. A terminal move also clears every disk's
    /// port and qemu-nbd PID (the caller stopped and released them first).
    pub async fn transition_recovery(
        &self,
        id: &str,
        from: &[JobStatus],
        to: JobStatus,
        error: Option<&str>,
    ) -> Result<bool, DbError> {
        const RECOVERY: super::backups::JobTable =
            super::backups::job_table!("recovery_jobs", "recovery_id", "recovery");
        let moved = self.transition_job(&RECOVERY, id, from, to, error).await?;
        if moved && to.is_terminal() {
            sqlx::query(
                "UPDATE recovery_disks SET nbd_port = NULL, qemu_nbd_pid = NULL \
                 WHERE recovery_id = ?",
            )
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(q("clearing an ended recovery's exports"))?;
        }
        Ok(moved)
    }

    /// The port and qemu-nbd of one disk's export while the recovery holds them.
    pub async fn set_recovery_export(
        &self,
        id: &str,
        disk: DiskKey,
        port: Option<NbdPort>,
        pid: Option<u32>,
    ) -> Result<(), DbError> {
        let res = sqlx::query(
            "UPDATE recovery_disks SET nbd_port = ?, qemu_nbd_pid = ? \
             WHERE recovery_id = ? AND disk_key = ?",
        )
        .bind(port.map(|p| i64::from(p.0)))
        .bind(opt_pid(pid))
        .bind(id)
        .bind(disk.0)
        .execute(self.pool())
        .await
        .map_err(q("recording a recovery disk's export"))?;
        if res.rows_affected() == 0 {
            return Err(DbError::NotFound {
                what: format!("disk {disk} of recovery '{id}'"),
            });
        }
        Ok(())
    }

    /// The node's state of the recovery, as reported: the VM's state, QEMU, its sockets, the
    /// stall (cleared when absent), and each reported disk's stream. `vm_started_at` is set by
    /// the first state that names a QEMU PID. Disks the recovery does not have are the
    /// caller's to refuse; here they change nothing.
    pub async fn record_recovery_state(
        &self,
        id: &str,
        st: &NodeRecoveryState,
    ) -> Result<(), DbError> {
        let doing = "recording a recovery's state";
        let now = self.now_us();
        let mut tx = self.begin_write(doing).await?;
        let res = sqlx::query(
            "UPDATE recovery_jobs SET vm_state = COALESCE(?, vm_state), \
             qemu_pid = COALESCE(?, qemu_pid), qmp_socket = COALESCE(?, qmp_socket), \
             serial_log = COALESCE(?, serial_log), stalled = ?, \
             vm_started_at = CASE WHEN ? = 1 AND vm_started_at IS NULL THEN ? \
             ELSE vm_started_at END WHERE recovery_id = ?",
        )
        .bind(&st.vm_state)
        .bind(opt_pid(st.qemu_pid))
        .bind(&st.qmp_socket)
        .bind(&st.serial_log)
        .bind(&st.stalled)
        .bind(i32::from(st.qemu_pid.is_some()))
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(q(doing))?;
        if res.rows_affected() == 0 {
            return Err(DbError::NotFound {
                what: format!("recovery '{id}'"),
            });
        }
        for d in &st.disks {
            sqlx::query(
                "UPDATE recovery_disks SET overlay = ?, bytes_done = ?, bytes_total = ?, \
                 rate_bps = ?, stream = ? WHERE recovery_id = ? AND disk_key = ?",
            )
            .bind(&d.overlay)
            .bind(to_db_u64("bytes_done", d.bytes_done)?)
            .bind(to_db_u64("bytes_total", d.bytes_total)?)
            .bind(to_db_u64("rate_bps", d.rate_bps)?)
            .bind(&d.stream)
            .bind(id)
            .bind(d.disk_key.0)
            .execute(&mut *tx)
            .await
            .map_err(q(doing))?;
        }
        tx.commit().await.map_err(q(doing))
    }
}
