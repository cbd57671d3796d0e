//! Verify jobs (`verify_jobs`, one row per job), the chain links they follow to mark the
//! dependents of a corrupt point, and the scheduled verification of repositories. A verify job's
//! status moves only by compare-and-set, like a backup's ([`Db::transition_verify`]); its events
//! live in `job_events` under each point it reads, with `job_id` set to the verify job's id.

use super::{DbError, col, from_db_u64, from_us, q, to_db_u64};
use crate::db::Db;
use chrono::{DateTime, Utc};
use sendense_shared::api::{JobStatus, VerifyJob};
use sendense_shared::ids::BackupId;
use sqlx::any::AnyRow;

/// `SELECT <every column> FROM verify_jobs <rest>`, as one static string.
macro_rules! select {
    ($rest:literal) => {
        concat!(
            "SELECT verify_id, scope, trigger_kind, status, points_total, points_done, \
             bytes_total, bytes_read, corrupt, error_message, created_at, started_at, \
             completed_at FROM verify_jobs ",
            $rest
        )
    };
}

fn verify_row(r: &AnyRow) -> Result<VerifyJob, DbError> {
    let status: String = col(r, "status")?;
    let status = JobStatus::parse(&status).ok_or(DbError::Corrupt {
        column: "verify_jobs.status",
        value: status,
    })?;
    let corrupt: Option<String> = col(r, "corrupt")?;
    Ok(VerifyJob {
        verify_id: col(r, "verify_id")?,
        scope: col(r, "scope")?,
        trigger: col(r, "trigger_kind")?,
        status,
        points_total: from_db_u64("verify_jobs.points_total", col(r, "points_total")?)?,
        points_done: from_db_u64("verify_jobs.points_done", col(r, "points_done")?)?,
        bytes_total: from_db_u64("verify_jobs.bytes_total", col(r, "bytes_total")?)?,
        bytes_read: from_db_u64("verify_jobs.bytes_read", col(r, "bytes_read")?)?,
        corrupt: corrupt
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(BackupId::from)
            .collect(),
        created_at: from_us(col(r, "created_at")?),
        started_at: col::<Option<i64>>(r, "started_at")?.map(from_us),
        completed_at: col::<Option<i64>>(r, "completed_at")?.map(from_us),
        error_message: col(r, "error_message")?,
    })
}

/// Progress of a running verify job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifyProgress {
    pub points_done: u64,
    pub bytes_total: u64,
    pub bytes_read: u64,
}

impl Db {
    /// Stores a new verify job as given (its status is the caller's, normally `pending`).
    pub async fn create_verify(&self, v: &VerifyJob) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO verify_jobs (verify_id, scope, trigger_kind, status, points_total, \
             points_done, bytes_total, bytes_read, corrupt, error_message, created_at, \
             started_at, completed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, NULL, NULL)",
        )
        .bind(&v.verify_id)
        .bind(&v.scope)
        .bind(&v.trigger)
        .bind(v.status.as_str())
        .bind(to_db_u64("points_total", v.points_total)?)
        .bind(to_db_u64("points_done", v.points_done)?)
        .bind(to_db_u64("bytes_total", v.bytes_total)?)
        .bind(to_db_u64("bytes_read", v.bytes_read)?)
        .bind(v.created_at.timestamp_micros())
        .execute(self.pool())
        .await
        .map_err(q("storing a verify job"))?;
        Ok(())
    }

    pub async fn get_verify(&self, id: &str) -> Result<VerifyJob, DbError> {
        let row = sqlx::query(select!("WHERE verify_id = ?"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(q("reading a verify job"))?
            .ok_or_else(|| DbError::NotFound {
                what: format!("verify job '{id}'"),
            })?;
        verify_row(&row)
    }

    /// Every verify job, newest first.
    pub async fn list_verifies(&self) -> Result<Vec<VerifyJob>, DbError> {
        sqlx::query(select!("ORDER BY created_at DESC, verify_id DESC"))
            .fetch_all(self.pool())
            .await
            .map_err(q("listing verify jobs"))?
            .iter()
            .map(verify_row)
            .collect()
    }

    /// Compare-and-set of a verify job's status, as [`Db::transition_backup`]: moves to `to`
    /// only from one of `from`; sets `started_at` on the first move to `running`,
    /// `completed_at` on a terminal move, `error_message` when given.
    pub async fn transition_verify(
        &self,
        id: &str,
        from: &[JobStatus],
        to: JobStatus,
        error: Option<&str>,
    ) -> Result<bool, DbError> {
        const VERIFY: super::backups::JobTable =
            super::backups::job_table!("verify_jobs", "verify_id", "verify job");
        self.transition_job(&VERIFY, id, from, to, error).await
    }

    /// Points, bytes and the corrupt points found so far.
    pub async fn set_verify_progress(
        &self,
        id: &str,
        p: VerifyProgress,
        points_total: u64,
        corrupt: &[BackupId],
    ) -> Result<(), DbError> {
        let corrupt = corrupt
            .iter()
            .map(|b| b.0.as_str())
            .collect::<Vec<_>>()
            .join(",");
        sqlx::query(
            "UPDATE verify_jobs SET points_total = ?, points_done = ?, bytes_total = ?, \
             bytes_read = ?, corrupt = ? WHERE verify_id = ?",
        )
        .bind(to_db_u64("points_total", points_total)?)
        .bind(to_db_u64("points_done", p.points_done)?)
        .bind(to_db_u64("bytes_total", p.bytes_total)?)
        .bind(to_db_u64("bytes_read", p.bytes_read)?)
        .bind((!corrupt.is_empty()).then_some(corrupt))
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(q("recording a verify job's progress"))?;
        Ok(())
    }

    /// The points whose disks are incrementals on `id` (its direct dependents).
    pub async fn children_of(&self, id: &BackupId) -> Result<Vec<BackupId>, DbError> {
        sqlx::query(
            "SELECT DISTINCT backup_id FROM backup_disks WHERE parent_backup_id = ? \
             ORDER BY backup_id",
        )
        .bind(&id.0)
        .fetch_all(self.pool())
        .await
        .map_err(q("finding the points that depend on a point"))?
        .iter()
        .map(|r| col::<String>(r, "backup_id").map(BackupId))
        .collect()
    }

    // ---- scheduled verification of repositories ---------------------------------------

    /// Sets (or with `None` clears) a repository's verify interval.
    pub async fn set_verify_interval(&self, id: &str, secs: Option<u64>) -> Result<(), DbError> {
        let secs = secs
            .map(|s| to_db_u64("verify_interval_secs", s))
            .transpose()?;
        let res = sqlx::query("UPDATE repositories SET verify_interval_secs = ? WHERE id = ?")
            .bind(secs)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(q("setting a repository's verify interval"))?;
        if res.rows_affected() == 0 {
            // MySQL counts only changed rows: tell "same value" from "not there".
            self.get_repository(id).await?;
        }
        Ok(())
    }

    /// When the last scheduled verify job of a repository ended.
    pub async fn set_last_verified(&self, id: &str, at: DateTime<Utc>) -> Result<(), DbError> {
        sqlx::query("UPDATE repositories SET last_verified_at = ? WHERE id = ?")
            .bind(at.timestamp_micros())
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(q("recording a repository's last verification"))?;
        Ok(())
    }
}
