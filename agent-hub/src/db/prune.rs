//! Prune jobs (`prune_jobs`), their journal (`prune_steps`, migration 0007), the catalog
//! changes each step makes (in one transaction with the journal's phase), protected points,
//! and the policies' retention as prune reads it.
//!
//! Every catalog change of a step and the journal phase that records it commit together, so
//! after a crash the journal's phase says exactly which catalog changes were made; files are
//! touched only after the transaction that allows it committed (never on a database error).

use super::{DbError, col, from_db_u64, from_us, q, to_db_u64};
use crate::db::Db;
use sendense_shared::api::{JobStatus, PruneJob, PrunePlan};
use sendense_shared::ids::{BackupId, DiskKey};
use sqlx::any::AnyRow;

macro_rules! select {
    ($rest:literal) => {
        concat!(
            "SELECT prune_id, vm_name, kind, status, plan_json, steps_total, steps_done, \
             bytes_total, bytes_done, error_message, created_at, started_at, completed_at \
             FROM prune_jobs ",
            $rest
        )
    };
}

fn prune_row(r: &AnyRow) -> Result<PruneJob, DbError> {
    let status: String = col(r, "status")?;
    let status = JobStatus::parse(&status).ok_or(DbError::Corrupt {
        column: "prune_jobs.status",
        value: status.clone(),
    })?;
    let plan: String = col(r, "plan_json")?;
    let plan: PrunePlan = serde_json::from_str(&plan).map_err(|e| DbError::Corrupt {
        column: "prune_jobs.plan_json",
        value: e.to_string(),
    })?;
    let u32_of = |name: &'static str, v: i64| {
        u32::try_from(v).map_err(|_| DbError::Corrupt {
            column: name,
            value: v.to_string(),
        })
    };
    Ok(PruneJob {
        prune_id: col(r, "prune_id")?,
        vm_name: col(r, "vm_name")?,
        kind: col(r, "kind")?,
        status,
        plan,
        steps_total: u32_of("prune_jobs.steps_total", col(r, "steps_total")?)?,
        steps_done: u32_of("prune_jobs.steps_done", col(r, "steps_done")?)?,
        bytes_total: from_db_u64("prune_jobs.bytes_total", col(r, "bytes_total")?)?,
        bytes_done: from_db_u64("prune_jobs.bytes_done", col(r, "bytes_done")?)?,
        error_message: col(r, "error_message")?,
        created_at: from_us(col(r, "created_at")?),
        started_at: col::<Option<i64>>(r, "started_at")?.map(from_us),
        completed_at: col::<Option<i64>>(r, "completed_at")?.map(from_us),
    })
}

/// One journal row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRow {
    pub prune_id: String,
    pub seq: u32,
    pub kind: String,
    pub phase: String,
    pub step_json: String,
    pub pid: Option<u32>,
    pub bytes_copied: u64,
    pub bytes_freed: u64,
}

fn step_row(r: &AnyRow) -> Result<StepRow, DbError> {
    Ok(StepRow {
        prune_id: col(r, "prune_id")?,
        seq: u32::try_from(col::<i64>(r, "seq")?).unwrap_or(u32::MAX),
        kind: col(r, "kind")?,
        phase: col(r, "phase")?,
        step_json: col(r, "step_json")?,
        pid: col::<Option<i64>>(r, "pid")?.and_then(|p| u32::try_from(p).ok()),
        bytes_copied: from_db_u64("prune_steps.bytes_copied", col(r, "bytes_copied")?)?,
        bytes_freed: from_db_u64("prune_steps.bytes_freed", col(r, "bytes_freed")?)?,
    })
}

/// A new journal row: the step as planned.
#[derive(Debug, Clone)]
pub struct NewStep {
    pub kind: &'static str,
    pub step_json: String,
    pub bytes_copied: u64,
    pub bytes_freed: u64,
}

/// A policy as prune reads it: which VMs, in which time zone, keeping what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRetention {
    pub policy_id: String,
    pub name: String,
    pub vms_json: String,
    pub timezone: String,
    pub retention_json: String,
    pub priority: i64,
    pub enabled: bool,
    pub created_at: i64,
}

/// Removes points from the catalog inside `tx`: their terminal restores and recoveries (which
/// reference them), events and disks go with them.
async fn delete_points(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    points: &[BackupId],
) -> Result<(), DbError> {
    let doing = "removing pruned points from the catalog";
    for p in points {
        for sql in [
            "DELETE FROM restore_jobs WHERE backup_id = ?",
            "DELETE FROM recovery_disks WHERE recovery_id IN \
             (SELECT recovery_id FROM recovery_jobs WHERE backup_id = ?)",
            "DELETE FROM recovery_jobs WHERE backup_id = ?",
            "DELETE FROM boot_checks WHERE backup_id = ?",
            "DELETE FROM job_events WHERE backup_id = ?",
            "DELETE FROM backup_disks WHERE backup_id = ?",
            "DELETE FROM backup_jobs WHERE backup_id = ?",
        ] {
            sqlx::query(sql)
                .bind(&p.0)
                .execute(&mut **tx)
                .await
                .map_err(q(doing))?;
        }
    }
    Ok(())
}

async fn set_phase(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    now: i64,
    prune_id: &str,
    seq: u32,
    phase: &str,
) -> Result<(), DbError> {
    sqlx::query("UPDATE prune_steps SET phase = ?, updated_at = ? WHERE prune_id = ? AND seq = ?")
        .bind(phase)
        .bind(now)
        .bind(prune_id)
        .bind(i64::from(seq))
        .execute(&mut **tx)
        .await
        .map_err(q("recording a prune step's phase"))?;
    Ok(())
}

impl Db {
    /// Stores a new prune job with its planned steps (phase `planned`), in one transaction.
    pub async fn create_prune(&self, job: &PruneJob, steps: &[NewStep]) -> Result<(), DbError> {
        let doing = "storing a prune job";
        let plan = serde_json::to_string(&job.plan).map_err(|e| DbError::Invalid {
            field: "plan",
            reason: e.to_string(),
        })?;
        let mut tx = self.begin_write(doing).await?;
        sqlx::query(
            "INSERT INTO prune_jobs (prune_id, vm_name, kind, status, plan_json, steps_total, \
             steps_done, bytes_total, bytes_done, error_message, created_at, started_at, \
             completed_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, 0, NULL, ?, NULL, NULL)",
        )
        .bind(&job.prune_id)
        .bind(&job.vm_name)
        .bind(&job.kind)
        .bind(job.status.as_str())
        .bind(plan)
        .bind(i64::from(job.steps_total))
        .bind(to_db_u64("bytes_total", job.bytes_total)?)
        .bind(job.created_at.timestamp_micros())
        .execute(&mut *tx)
        .await
        .map_err(q(doing))?;
        let now = self.now_us();
        for (seq, s) in steps.iter().enumerate() {
            sqlx::query(
                "INSERT INTO prune_steps (prune_id, seq, kind, phase, step_json, pid, \
                 bytes_copied, bytes_freed, updated_at) VALUES (?, ?, ?, 'planned', ?, NULL, ?, ?, ?)",
            )
            .bind(&job.prune_id)
            .bind(seq as i64)
            .bind(s.kind)
            .bind(&s.step_json)
            .bind(to_db_u64("bytes_copied", s.bytes_copied)?)
            .bind(to_db_u64("bytes_freed", s.bytes_freed)?)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(q(doing))?;
        }
        tx.commit().await.map_err(q(doing))
    }

    pub async fn get_prune(&self, id: &str) -> Result<PruneJob, DbError> {
        let row = sqlx::query(select!("WHERE prune_id = ?"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(q("reading a prune job"))?
            .ok_or_else(|| DbError::NotFound {
                what: format!("prune job '{id}'"),
            })?;
        prune_row(&row)
    }

    /// Every prune job, newest first.
    pub async fn list_prunes(&self) -> Result<Vec<PruneJob>, DbError> {
        sqlx::query(select!("ORDER BY created_at DESC, prune_id DESC"))
            .fetch_all(self.pool())
            .await
            .map_err(q("listing prune jobs"))?
            .iter()
            .map(prune_row)
            .collect()
    }

    /// The prune job (not ended) that is changing `vm`'s chain, if any.
    pub async fn active_prune_of_vm(&self, vm: &str) -> Result<Option<String>, DbError> {
        let row = sqlx::query(
            "SELECT prune_id FROM prune_jobs WHERE vm_name = ? AND status IN \
             ('pending', 'preparing', 'running', 'finalizing', 'cancelling') \
             ORDER BY created_at LIMIT 1",
        )
        .bind(vm)
        .fetch_optional(self.pool())
        .await
        .map_err(q("looking for a running prune job"))?;
        row.map(|r| col::<String>(&r, "prune_id")).transpose()
    }

    /// Compare-and-set of a prune job's status (as [`Db::transition_backup`]).
    pub async fn transition_prune(
        &self,
        id: &str,
        from: &[JobStatus],
        to: JobStatus,
        error: Option<&str>,
    ) -> Result<bool, DbError> {
        const PRUNE: super::backups::JobTable =
            super::backups::job_table!("prune_jobs", "prune_id", "prune job");
        self.transition_job(&PRUNE, id, from, to, error).await
    }

    pub async fn set_prune_progress(
        &self,
        id: &str,
        steps_done: u32,
        bytes_done: u64,
    ) -> Result<(), DbError> {
        sqlx::query("UPDATE prune_jobs SET steps_done = ?, bytes_done = ? WHERE prune_id = ?")
            .bind(i64::from(steps_done))
            .bind(to_db_u64("bytes_done", bytes_done)?)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(q("recording a prune job's progress"))?;
        Ok(())
    }

    /// The journal of a job, in step order.
    pub async fn prune_steps(&self, id: &str) -> Result<Vec<StepRow>, DbError> {
        sqlx::query(
            "SELECT prune_id, seq, kind, phase, step_json, pid, bytes_copied, bytes_freed \
             FROM prune_steps WHERE prune_id = ? ORDER BY seq",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(q("reading a prune job's journal"))?
        .iter()
        .map(step_row)
        .collect()
    }

    /// Moves a step to `phase` (no catalog change goes with it).
    pub async fn set_step_phase(&self, id: &str, seq: u32, phase: &str) -> Result<(), DbError> {
        let mut tx = self.begin_write("recording a prune step's phase").await?;
        set_phase(&mut tx, self.now_us(), id, seq, phase).await?;
        tx.commit()
            .await
            .map_err(q("recording a prune step's phase"))
    }

    /// Records (or clears) the qemu-img a step runs, before it writes anything.
    pub async fn set_step_pid(&self, id: &str, seq: u32, pid: Option<u32>) -> Result<(), DbError> {
        sqlx::query("UPDATE prune_steps SET pid = ? WHERE prune_id = ? AND seq = ?")
            .bind(pid.map(i64::from))
            .bind(id)
            .bind(i64::from(seq))
            .execute(self.pool())
            .await
            .map_err(q("recording a prune step's qemu-img"))?;
        Ok(())
    }

    /// One transaction: `points` leave the catalog and the step moves to `phase`.
    pub async fn step_drop_points(
        &self,
        id: &str,
        seq: u32,
        points: &[BackupId],
        phase: &str,
    ) -> Result<(), DbError> {
        let doing = "dropping pruned points";
        let mut tx = self.begin_write(doing).await?;
        delete_points(&mut tx, points).await?;
        set_phase(&mut tx, self.now_us(), id, seq, phase).await?;
        tx.commit().await.map_err(q(doing))
    }

    /// One transaction after a rebase: `child`'s disks name their new parent and backing file,
    /// `points` (the rebased-over ones) leave the catalog, the step moves to `phase`.
    pub async fn step_rebased(
        &self,
        id: &str,
        seq: u32,
        child: &BackupId,
        disks: &[(DiskKey, Option<BackupId>, Option<String>)],
        points: &[BackupId],
        phase: &str,
    ) -> Result<(), DbError> {
        let doing = "recording a rebased point";
        let mut tx = self.begin_write(doing).await?;
        for (key, parent, backing) in disks {
            sqlx::query(
                "UPDATE backup_disks SET parent_backup_id = ?, backing_path = ? \
                 WHERE backup_id = ? AND disk_key = ?",
            )
            .bind(parent.as_ref().map(|p| p.0.as_str()))
            .bind(backing.as_deref())
            .bind(&child.0)
            .bind(key.0)
            .execute(&mut *tx)
            .await
            .map_err(q(doing))?;
        }
        delete_points(&mut tx, points).await?;
        set_phase(&mut tx, self.now_us(), id, seq, phase).await?;
        tx.commit().await.map_err(q(doing))
    }

    /// One transaction after a merge: `child` is a self-contained full, the step moves to
    /// `phase`.
    pub async fn step_merged(
        &self,
        id: &str,
        seq: u32,
        child: &BackupId,
        phase: &str,
    ) -> Result<(), DbError> {
        let doing = "recording a merged point";
        let mut tx = self.begin_write(doing).await?;
        sqlx::query("UPDATE backup_jobs SET backup_type = 'full' WHERE backup_id = ?")
            .bind(&child.0)
            .execute(&mut *tx)
            .await
            .map_err(q(doing))?;
        sqlx::query(
            "UPDATE backup_disks SET parent_backup_id = NULL, backing_path = NULL \
             WHERE backup_id = ?",
        )
        .bind(&child.0)
        .execute(&mut *tx)
        .await
        .map_err(q(doing))?;
        set_phase(&mut tx, self.now_us(), id, seq, phase).await?;
        tx.commit().await.map_err(q(doing))
    }

    /// Bytes the prune steps that ended since `since_us` freed (the space forecast).
    pub async fn bytes_pruned_since(&self, since_us: i64) -> Result<u64, DbError> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT SUM(bytes_freed) FROM prune_steps WHERE phase = 'done' AND updated_at >= ?",
        )
        .bind(since_us)
        .fetch_one(self.pool())
        .await
        .map_err(q("summing what prunes freed"))?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    /// Sets a point's protected flag.
    pub async fn set_protected(&self, id: &BackupId, protected: bool) -> Result<(), DbError> {
        let res = sqlx::query("UPDATE backup_jobs SET protected = ? WHERE backup_id = ?")
            .bind(i32::from(protected))
            .bind(&id.0)
            .execute(self.pool())
            .await
            .map_err(q("protecting a point"))?;
        if res.rows_affected() == 0 {
            return Err(DbError::NotFound {
                what: format!("backup '{id}'"),
            });
        }
        Ok(())
    }

    /// Every policy's selector, time zone and retention, oldest first.
    pub async fn policy_retentions(&self) -> Result<Vec<PolicyRetention>, DbError> {
        sqlx::query(
            "SELECT policy_id, name, vms_json, timezone, retention_json, priority, enabled, \
             created_at FROM policies ORDER BY created_at, policy_id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(q("reading the policies' retention"))?
        .iter()
        .map(|r| {
            Ok(PolicyRetention {
                policy_id: col(r, "policy_id")?,
                name: col(r, "name")?,
                vms_json: col(r, "vms_json")?,
                timezone: col(r, "timezone")?,
                retention_json: col(r, "retention_json")?,
                priority: col(r, "priority")?,
                enabled: col::<i64>(r, "enabled")? != 0,
                created_at: col(r, "created_at")?,
            })
        })
        .collect()
    }
}
