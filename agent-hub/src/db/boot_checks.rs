//! Boot checks (`boot_checks`, one row per point: its last check). While a check runs the row
//! holds QEMU's PID and the private work directory of its overlays, so that the start-up
//! recovery of a hub that crashed mid-check can stop that QEMU (after checking
//! `/proc/PID/cmdline`) and remove the directory ([`Db::interrupted_boot_checks`]).

use super::{DbError, col, from_us, q};
use crate::db::Db;
use sendense_shared::api::{Backup, BootCheck, BootStatus};
use sendense_shared::ids::BackupId;
use sqlx::any::AnyRow;
use std::collections::HashMap;

const SELECT: &str = "SELECT backup_id, verify_id, status, detail, console_tail, qemu_pid, \
     work_dir, started_at, checked_at, boot_ms FROM boot_checks";

/// A check that was running when the hub stopped: what start-up recovery cleans.
#[derive(Debug, Clone)]
pub struct LiveBootCheck {
    pub backup_id: BackupId,
    pub verify_id: String,
    pub qemu_pid: Option<u32>,
    pub work_dir: Option<String>,
}

fn row(r: &AnyRow) -> Result<(BackupId, BootCheck), DbError> {
    let status: String = col(r, "status")?;
    let status = BootStatus::parse(&status).ok_or(DbError::Corrupt {
        column: "boot_checks.status",
        value: status,
    })?;
    let tail: Option<String> = col(r, "console_tail")?;
    let console_tail = match tail {
        Some(t) => serde_json::from_str(&t).map_err(|_| DbError::Corrupt {
            column: "boot_checks.console_tail",
            value: t,
        })?,
        None => Vec::new(),
    };
    Ok((
        BackupId(col(r, "backup_id")?),
        BootCheck {
            status,
            verify_id: col(r, "verify_id")?,
            started_at: from_us(col(r, "started_at")?),
            checked_at: col::<Option<i64>>(r, "checked_at")?.map(from_us),
            detail: col(r, "detail")?,
            console_tail,
            boot_ms: col::<Option<i64>>(r, "boot_ms")?.and_then(|v| u64::try_from(v).ok()),
            qemu_pid: col::<Option<i64>>(r, "qemu_pid")?.and_then(|v| u32::try_from(v).ok()),
        },
    ))
}

impl Db {
    /// A check of `backup` by `verify_id` starts (it replaces the point's previous result).
    pub async fn start_boot_check(
        &self,
        backup: &BackupId,
        verify_id: &str,
        work_dir: &str,
    ) -> Result<(), DbError> {
        let doing = "recording a boot check's start";
        let mut tx = self.pool().begin().await.map_err(q(doing))?;
        sqlx::query("DELETE FROM boot_checks WHERE backup_id = ?")
            .bind(&backup.0)
            .execute(&mut *tx)
            .await
            .map_err(q(doing))?;
        sqlx::query(
            "INSERT INTO boot_checks (backup_id, verify_id, status, detail, console_tail, \
             qemu_pid, work_dir, started_at, checked_at, boot_ms) \
             VALUES (?, ?, 'booting', NULL, NULL, NULL, ?, ?, NULL, NULL)",
        )
        .bind(&backup.0)
        .bind(verify_id)
        .bind(work_dir)
        .bind(self.now_us())
        .execute(&mut *tx)
        .await
        .map_err(q(doing))?;
        tx.commit().await.map_err(q(doing))
    }

    /// QEMU of the running check of `backup` was started with `pid`.
    pub async fn set_boot_check_pid(&self, backup: &BackupId, pid: u32) -> Result<(), DbError> {
        sqlx::query("UPDATE boot_checks SET qemu_pid = ? WHERE backup_id = ?")
            .bind(i64::from(pid))
            .bind(&backup.0)
            .execute(self.pool())
            .await
            .map_err(q("recording a boot check's QEMU pid"))?;
        Ok(())
    }

    /// The check of `backup` ended (QEMU stopped, overlays removed): its outcome.
    pub async fn finish_boot_check(
        &self,
        backup: &BackupId,
        status: BootStatus,
        detail: &str,
        console_tail: &[String],
        boot_ms: Option<u64>,
    ) -> Result<(), DbError> {
        let tail = serde_json::to_string(console_tail).unwrap_or_else(|_| "[]".into());
        sqlx::query(
            "UPDATE boot_checks SET status = ?, detail = ?, console_tail = ?, qemu_pid = NULL, \
             work_dir = NULL, checked_at = ?, boot_ms = ? WHERE backup_id = ?",
        )
        .bind(status.as_str())
        .bind(detail)
        .bind(tail)
        .bind(self.now_us())
        .bind(boot_ms.and_then(|v| i64::try_from(v).ok()))
        .bind(&backup.0)
        .execute(self.pool())
        .await
        .map_err(q("recording a boot check's outcome"))?;
        Ok(())
    }

    /// Checks still `booting` (none runs in a process that just started).
    pub async fn interrupted_boot_checks(&self) -> Result<Vec<LiveBootCheck>, DbError> {
        sqlx::query(
            "SELECT backup_id, verify_id, qemu_pid, work_dir FROM boot_checks \
             WHERE status = 'booting'",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q("listing running boot checks"))?
        .iter()
        .map(|r| {
            Ok(LiveBootCheck {
                backup_id: BackupId(col(r, "backup_id")?),
                verify_id: col(r, "verify_id")?,
                qemu_pid: col::<Option<i64>>(r, "qemu_pid")?.and_then(|p| u32::try_from(p).ok()),
                work_dir: col(r, "work_dir")?,
            })
        })
        .collect()
    }

    /// Sets `boot_check` of each job that has one.
    pub(super) async fn attach_boot_checks(&self, jobs: &mut [Backup]) -> Result<(), DbError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut all: HashMap<BackupId, BootCheck> = sqlx::query(SELECT)
            .fetch_all(self.pool())
            .await
            .map_err(q("reading boot checks"))?
            .iter()
            .map(row)
            .collect::<Result<_, _>>()?;
        for j in jobs {
            j.boot_check = all.remove(&j.backup_id).map(Box::new);
        }
        Ok(())
    }
}
