//! Backup policies (`policies`), the claims of their schedule slots (`policy_slots`) and each
//! VM's run of a slot (`policy_runs`), schema 0006. A run's status moves only by
//! compare-and-set ([`Db::update_run`]), so two hubs admitting the same queued run cannot both
//! start it; a slot is claimed by its primary key ([`Db::claim_slot`]), so it runs once.

use super::{DbError, col, from_db_u64, from_us, is_foreign_key_violation, is_unique_violation};
use super::{q, to_db_u64};
use crate::db::Db;
use chrono::{DateTime, Utc};
use sendense_shared::api::{
    BackupRule, BackupType, ChainLimit, Policy, PolicyRun, Retention, RunStatus, VmSelector,
};
use sendense_shared::ids::BackupId;
use sqlx::any::AnyRow;

/// `SELECT <every column> FROM policies <rest>`, as one static string.
macro_rules! select_policy {
    ($rest:literal) => {
        concat!(
            "SELECT policy_id, name, vms_json, repository_id, schedule, timezone, \
             backup_rule_json, retention_json, max_chain_length, chain_limit, enabled, priority, \
             queue_window_secs, boot_check_json, created_at, updated_at FROM policies ",
            $rest
        )
    };
}

/// `SELECT <every column> FROM policy_runs <rest>`, as one static string.
macro_rules! select_run {
    ($rest:literal) => {
        concat!(
            "SELECT run_id, policy_id, planned_at, vm_name, late, manual, status, priority, \
             backup_type, backup_id, queued_at, give_up_at, started_at, ended_at, reason \
             FROM policy_runs ",
            $rest
        )
    };
}

/// A run as the queue sees it: the wire record plus its queue order and deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedRun {
    pub run: PolicyRun,
    /// The policy's priority when the run was queued (higher starts first).
    pub priority: i32,
    /// A run still queued then gives up.
    pub give_up_at: DateTime<Utc>,
}

/// A change of one run, applied only when its status is one of the expected ones. `None`
/// leaves a column as it is; `reason: Some(None)` clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunChange {
    pub status: Option<RunStatus>,
    pub backup_type: Option<BackupType>,
    pub backup_id: Option<BackupId>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub reason: Option<Option<String>>,
    pub give_up_at: Option<DateTime<Utc>>,
}

/// One completed point of a VM as the backup type rule reads its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointSummary {
    pub backup_type: BackupType,
    pub created_at: DateTime<Utc>,
}

fn json<T: serde::de::DeserializeOwned>(column: &'static str, v: String) -> Result<T, DbError> {
    serde_json::from_str(&v).map_err(|_| DbError::Corrupt { column, value: v })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("policy parts serialise")
}

fn chain_limit_str(c: ChainLimit) -> &'static str {
    match c {
        ChainLimit::Full => "full",
        ChainLimit::Synthetic => "synthetic",
    }
}

fn policy_row(r: &AnyRow) -> Result<Policy, DbError> {
    let chain_limit: String = col(r, "chain_limit")?;
    let chain_limit = match chain_limit.as_str() {
        "full" => ChainLimit::Full,
        "synthetic" => ChainLimit::Synthetic,
        _ => {
            return Err(DbError::Corrupt {
                column: "policies.chain_limit",
                value: chain_limit,
            });
        }
    };
    let priority: i64 = col(r, "priority")?;
    Ok(Policy {
        id: col(r, "policy_id")?,
        name: col(r, "name")?,
        vms: json::<VmSelector>("policies.vms_json", col(r, "vms_json")?)?,
        repository_id: col(r, "repository_id")?,
        schedule: col(r, "schedule")?,
        timezone: col(r, "timezone")?,
        backup_rule: json::<BackupRule>("policies.backup_rule_json", col(r, "backup_rule_json")?)?,
        retention: json::<Retention>("policies.retention_json", col(r, "retention_json")?)?,
        max_chain_length: col::<Option<i64>>(r, "max_chain_length")?
            .map(|v| {
                u32::try_from(v).map_err(|_| DbError::Corrupt {
                    column: "policies.max_chain_length",
                    value: v.to_string(),
                })
            })
            .transpose()?,
        chain_limit,
        enabled: col::<i64>(r, "enabled")? != 0,
        priority: i32::try_from(priority).map_err(|_| DbError::Corrupt {
            column: "policies.priority",
            value: priority.to_string(),
        })?,
        queue_window_secs: from_db_u64("policies.queue_window_secs", col(r, "queue_window_secs")?)?,
        boot_check: col::<Option<String>>(r, "boot_check_json")?
            .map(|j| json("policies.boot_check_json", j))
            .transpose()?,
        created_at: from_us(col(r, "created_at")?),
        updated_at: from_us(col(r, "updated_at")?),
        next_run: None,
        last_run: None,
        queued: 0,
    })
}

fn run_row(r: &AnyRow) -> Result<QueuedRun, DbError> {
    let status: String = col(r, "status")?;
    let status = RunStatus::parse(&status).ok_or(DbError::Corrupt {
        column: "policy_runs.status",
        value: status,
    })?;
    let backup_type = match col::<Option<String>>(r, "backup_type")?.as_deref() {
        None => None,
        Some("full") => Some(BackupType::Full),
        Some("incremental") => Some(BackupType::Incremental),
        Some(v) => {
            return Err(DbError::Corrupt {
                column: "policy_runs.backup_type",
                value: v.to_string(),
            });
        }
    };
    let priority: i64 = col(r, "priority")?;
    Ok(QueuedRun {
        run: PolicyRun {
            run_id: col(r, "run_id")?,
            policy_id: col(r, "policy_id")?,
            vm_name: col(r, "vm_name")?,
            planned_at: from_us(col(r, "planned_at")?),
            late: col::<i64>(r, "late")? != 0,
            manual: col::<i64>(r, "manual")? != 0,
            status,
            backup_type,
            backup_id: col::<Option<String>>(r, "backup_id")?.map(BackupId),
            queued_at: from_us(col(r, "queued_at")?),
            started_at: col::<Option<i64>>(r, "started_at")?.map(from_us),
            ended_at: col::<Option<i64>>(r, "ended_at")?.map(from_us),
            reason: col(r, "reason")?,
        },
        priority: i32::try_from(priority).unwrap_or(0),
        give_up_at: from_us(col(r, "give_up_at")?),
    })
}

impl Db {
    /// Stores a new policy as given (`id`, times and all); a name already taken is
    /// [`DbError::Conflict`], an unknown repository [`DbError::NotFound`].
    pub async fn insert_policy(&self, p: &Policy) -> Result<(), DbError> {
        let doing = "storing a policy";
        sqlx::query(
            "INSERT INTO policies (policy_id, name, vms_json, repository_id, schedule, timezone, \
             backup_rule_json, retention_json, max_chain_length, chain_limit, enabled, priority, \
             queue_window_secs, boot_check_json, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&p.id)
        .bind(&p.name)
        .bind(to_json(&p.vms))
        .bind(&p.repository_id)
        .bind(&p.schedule)
        .bind(&p.timezone)
        .bind(to_json(&p.backup_rule))
        .bind(to_json(&p.retention))
        .bind(p.max_chain_length.map(i64::from))
        .bind(chain_limit_str(p.chain_limit))
        .bind(i32::from(p.enabled))
        .bind(i64::from(p.priority))
        .bind(to_db_u64("queue_window_secs", p.queue_window_secs)?)
        .bind(p.boot_check.as_ref().map(to_json))
        .bind(p.created_at.timestamp_micros())
        .bind(p.updated_at.timestamp_micros())
        .execute(self.pool())
        .await
        .map_err(|e| policy_write_error(e, p, doing))?;
        Ok(())
    }

    /// Replaces every stored field of policy `p.id` but its creation time.
    pub async fn update_policy(&self, p: &Policy) -> Result<(), DbError> {
        let doing = "updating a policy";
        let res = sqlx::query(
            "UPDATE policies SET name = ?, vms_json = ?, repository_id = ?, schedule = ?, \
             timezone = ?, backup_rule_json = ?, retention_json = ?, max_chain_length = ?, \
             chain_limit = ?, enabled = ?, priority = ?, queue_window_secs = ?, \
             boot_check_json = ?, updated_at = ? WHERE policy_id = ?",
        )
        .bind(&p.name)
        .bind(to_json(&p.vms))
        .bind(&p.repository_id)
        .bind(&p.schedule)
        .bind(&p.timezone)
        .bind(to_json(&p.backup_rule))
        .bind(to_json(&p.retention))
        .bind(p.max_chain_length.map(i64::from))
        .bind(chain_limit_str(p.chain_limit))
        .bind(i32::from(p.enabled))
        .bind(i64::from(p.priority))
        .bind(to_db_u64("queue_window_secs", p.queue_window_secs)?)
        .bind(p.boot_check.as_ref().map(to_json))
        .bind(p.updated_at.timestamp_micros())
        .bind(&p.id)
        .execute(self.pool())
        .await
        .map_err(|e| policy_write_error(e, p, doing))?;
        if res.rows_affected() == 0 {
            self.get_policy(&p.id).await?;
        }
        Ok(())
    }

    /// Deletes a policy with its slots and runs (its backups stay, `policy_id` kept).
    pub async fn delete_policy(&self, id: &str) -> Result<(), DbError> {
        let doing = "deleting a policy";
        let mut tx = self.begin_write(doing).await?;
        for sql in [
            "DELETE FROM policy_runs WHERE policy_id = ?",
            "DELETE FROM policy_slots WHERE policy_id = ?",
        ] {
            sqlx::query(sql)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(q(doing))?;
        }
        let res = sqlx::query("DELETE FROM policies WHERE policy_id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q(doing))?;
        if res.rows_affected() == 0 {
            return Err(DbError::NotFound {
                what: format!("policy '{id}'"),
            });
        }
        tx.commit().await.map_err(q(doing))
    }

    pub async fn get_policy(&self, id: &str) -> Result<Policy, DbError> {
        let row = sqlx::query(select_policy!("WHERE policy_id = ?"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(q("reading a policy"))?
            .ok_or_else(|| DbError::NotFound {
                what: format!("policy '{id}'"),
            })?;
        policy_row(&row)
    }

    /// Every policy, oldest first (the order the overlap rule breaks ties in).
    pub async fn list_policies(&self) -> Result<Vec<Policy>, DbError> {
        sqlx::query(select_policy!("ORDER BY created_at, policy_id"))
            .fetch_all(self.pool())
            .await
            .map_err(q("listing policies"))?
            .iter()
            .map(policy_row)
            .collect()
    }

    /// Claims slot `planned_at` of a policy: `true` when this call inserted the claim, `false`
    /// when someone (this hub before a restart, another hub) already had.
    pub async fn claim_slot(
        &self,
        policy_id: &str,
        planned_at: DateTime<Utc>,
        late: bool,
        manual: bool,
    ) -> Result<bool, DbError> {
        let res = sqlx::query(
            "INSERT INTO policy_slots (policy_id, planned_at, claimed_at, late, manual) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(policy_id)
        .bind(planned_at.timestamp_micros())
        .bind(self.now_us())
        .bind(i32::from(late))
        .bind(i32::from(manual))
        .execute(self.pool())
        .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) if is_foreign_key_violation(&e) => Err(DbError::NotFound {
                what: format!("policy '{policy_id}'"),
            }),
            Err(e) => Err(q("claiming a policy slot")(e)),
        }
    }

    /// The newest scheduled (not manual) slot claimed for a policy.
    pub async fn last_scheduled_slot(
        &self,
        policy_id: &str,
    ) -> Result<Option<DateTime<Utc>>, DbError> {
        let v: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(planned_at) FROM policy_slots WHERE policy_id = ? AND manual = 0",
        )
        .bind(policy_id)
        .fetch_one(self.pool())
        .await
        .map_err(q("reading a policy's last slot"))?;
        Ok(v.map(from_us))
    }

    /// Stores a new run as given.
    pub async fn insert_run(&self, r: &QueuedRun) -> Result<(), DbError> {
        let run = &r.run;
        sqlx::query(
            "INSERT INTO policy_runs (run_id, policy_id, planned_at, vm_name, late, manual, \
             status, priority, backup_type, backup_id, queued_at, give_up_at, started_at, \
             ended_at, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&run.run_id)
        .bind(&run.policy_id)
        .bind(run.planned_at.timestamp_micros())
        .bind(&run.vm_name)
        .bind(i32::from(run.late))
        .bind(i32::from(run.manual))
        .bind(run.status.as_str())
        .bind(i64::from(r.priority))
        .bind(run.backup_type.map(|t| t.as_str()))
        .bind(run.backup_id.as_ref().map(|b| b.0.as_str()))
        .bind(run.queued_at.timestamp_micros())
        .bind(r.give_up_at.timestamp_micros())
        .bind(run.started_at.map(|t| t.timestamp_micros()))
        .bind(run.ended_at.map(|t| t.timestamp_micros()))
        .bind(run.reason.as_deref())
        .execute(self.pool())
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                DbError::Conflict {
                    what: format!(
                        "run of VM '{}' for slot {} of policy '{}'",
                        run.vm_name, run.planned_at, run.policy_id
                    ),
                }
            } else {
                q("storing a policy run")(e)
            }
        })?;
        Ok(())
    }

    pub async fn get_run(&self, run_id: &str) -> Result<QueuedRun, DbError> {
        let row = sqlx::query(select_run!("WHERE run_id = ?"))
            .bind(run_id)
            .fetch_optional(self.pool())
            .await
            .map_err(q("reading a policy run"))?
            .ok_or_else(|| DbError::NotFound {
                what: format!("policy run '{run_id}'"),
            })?;
        run_row(&row)
    }

    /// A policy's runs, newest first (by queue time), at most `limit`.
    pub async fn list_runs(&self, policy_id: &str, limit: u32) -> Result<Vec<QueuedRun>, DbError> {
        sqlx::query(select_run!(
            "WHERE policy_id = ? ORDER BY queued_at DESC, planned_at DESC, vm_name LIMIT ?"
        ))
        .bind(policy_id)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(q("listing a policy's runs"))?
        .iter()
        .map(run_row)
        .collect()
    }

    /// Every run in `status`, in queue order: priority (highest first), then planned time, then
    /// VM name (the runs of one slot in a stable order, whatever order they were queued in),
    /// then queue time.
    pub async fn runs_in(&self, status: RunStatus) -> Result<Vec<QueuedRun>, DbError> {
        sqlx::query(select_run!(
            "WHERE status = ? ORDER BY priority DESC, planned_at, vm_name, queued_at, run_id"
        ))
        .bind(status.as_str())
        .fetch_all(self.pool())
        .await
        .map_err(q("listing policy runs by status"))?
        .iter()
        .map(run_row)
        .collect()
    }

    /// Applies `change` to run `run_id` only when its status is one of `from`: `true` when it
    /// did (the caller won), `false` when the run is in another state.
    pub async fn update_run(
        &self,
        run_id: &str,
        from: &[RunStatus],
        change: &RunChange,
    ) -> Result<bool, DbError> {
        let mut slots = [""; 6];
        let Some(first) = from.first() else {
            return Ok(false);
        };
        for (i, slot) in slots.iter_mut().enumerate() {
            *slot = from.get(i).unwrap_or(first).as_str();
        }
        let (set_reason, reason) = match &change.reason {
            None => (0, None),
            Some(r) => (1, r.as_deref()),
        };
        let mut query = sqlx::query(
            "UPDATE policy_runs SET status = COALESCE(?, status), \
             backup_type = COALESCE(?, backup_type), backup_id = COALESCE(?, backup_id), \
             started_at = COALESCE(?, started_at), ended_at = COALESCE(?, ended_at), \
             give_up_at = COALESCE(?, give_up_at), \
             reason = CASE WHEN ? = 1 THEN ? ELSE reason END \
             WHERE run_id = ? AND status IN (?, ?, ?, ?, ?, ?)",
        )
        .bind(change.status.map(|s| s.as_str()))
        .bind(change.backup_type.map(|t| t.as_str()))
        .bind(change.backup_id.as_ref().map(|b| b.0.as_str()))
        .bind(change.started_at.map(|t| t.timestamp_micros()))
        .bind(change.ended_at.map(|t| t.timestamp_micros()))
        .bind(change.give_up_at.map(|t| t.timestamp_micros()))
        .bind(set_reason)
        .bind(reason)
        .bind(run_id);
        for s in slots {
            query = query.bind(s);
        }
        let res = query
            .execute(self.pool())
            .await
            .map_err(q("changing a policy run"))?;
        if res.rows_affected() > 0 {
            return Ok(true);
        }
        // MySQL counts changed rows only: a change to the values it already had is a win too.
        let now = self.get_run(run_id).await?;
        Ok(from.contains(&now.run.status) && change.status.is_none_or(|s| s == now.run.status))
    }

    /// The most recent run of a policy, and how many of its runs are queued.
    pub async fn policy_run_summary(
        &self,
        policy_id: &str,
    ) -> Result<(Option<PolicyRun>, u32), DbError> {
        let last = self.list_runs(policy_id, 1).await?.pop().map(|r| r.run);
        let queued: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM policy_runs WHERE policy_id = ? AND status = 'queued'",
        )
        .bind(policy_id)
        .fetch_one(self.pool())
        .await
        .map_err(q("counting a policy's queued runs"))?;
        Ok((last, u32::try_from(queued).unwrap_or(u32::MAX)))
    }

    /// Records that backup `id` was started by policy `policy_id`.
    pub async fn set_backup_policy(&self, id: &BackupId, policy_id: &str) -> Result<(), DbError> {
        sqlx::query("UPDATE backup_jobs SET policy_id = ? WHERE backup_id = ?")
            .bind(policy_id)
            .bind(&id.0)
            .execute(self.pool())
            .await
            .map_err(q("recording a backup's policy"))?;
        Ok(())
    }

    /// A VM's completed points, newest first, at most `limit` (the backup type rule's view of
    /// its chain).
    pub async fn completed_points(
        &self,
        vm_name: &str,
        limit: u32,
    ) -> Result<Vec<PointSummary>, DbError> {
        sqlx::query(
            "SELECT backup_type, created_at FROM backup_jobs \
             WHERE vm_name = ? AND status = 'completed' \
             ORDER BY created_at DESC, backup_id DESC LIMIT ?",
        )
        .bind(vm_name)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await
        .map_err(q("reading a VM's completed points"))?
        .iter()
        .map(|r| {
            let t: String = col(r, "backup_type")?;
            Ok(PointSummary {
                backup_type: match t.as_str() {
                    "full" => BackupType::Full,
                    "incremental" => BackupType::Incremental,
                    _ => {
                        return Err(DbError::Corrupt {
                            column: "backup_jobs.backup_type",
                            value: t,
                        });
                    }
                },
                created_at: from_us(col(r, "created_at")?),
            })
        })
        .collect()
    }
}

fn policy_write_error(e: sqlx::Error, p: &Policy, doing: &'static str) -> DbError {
    if is_unique_violation(&e) {
        DbError::Conflict {
            what: format!("policy named '{}'", p.name),
        }
    } else if is_foreign_key_violation(&e) {
        DbError::NotFound {
            what: format!("repository '{}'", p.repository_id),
        }
    } else {
        q(doing)(e)
    }
}
