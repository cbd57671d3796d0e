//! Unattended operation: backup policies ([`Policy`]) that schedule backups and keep chains
//! short, their runs ([`PolicyRun`]), retention rules ([`Retention`]), prune plans and prune
//! jobs ([`PrunePlan`], [`PruneJob`]), and a repository's space with its forecast
//! ([`RepositorySpace`]).
//!
//! Endpoints (hub, admin scope):
//! - `GET|POST /api/v1/policies`, `GET|PUT|DELETE /api/v1/policies/{id}`,
//!   `POST /api/v1/policies/{id}/run-now`, `GET /api/v1/policies/{id}/runs`;
//! - `GET /api/v1/vms/{name}/points` (the VM's points with the rule that keeps each);
//! - `POST /api/v1/backups/{id}/protect`, `POST /api/v1/backups/{id}/unprotect`;
//! - `POST /api/v1/prune[?dry_run=true]` ([`PruneRequest`] → [`PruneJob`], or [`PrunePlan`]
//!   for a dry run), `GET /api/v1/prune`, `GET /api/v1/prune/{id}`,
//!   `POST /api/v1/prune/{id}/cancel`;
//! - `GET /api/v1/repositories/{id}/space`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{BackupType, JobStatus};
use crate::ids::BackupId;

/// Which VMs a policy covers: the union of explicit names, glob patterns (`*`, `?`, `[...]`)
/// over VM names, and every VM of the named nodes. At least one entry overall.
///
/// A VM named explicitly by two policies is refused (409 naming the other policy). A VM that
/// two policies reach only through patterns or nodes is backed up by the one with the highest
/// `priority`, ties going to the policy created first; the other skips it and says so in its
/// run records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmSelector {
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// When a scheduled run is a full backup instead of an incremental. All `None`: always an
/// incremental (the first backup of a VM, or one after a corrupt point, is a full anyway).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BackupRule {
    /// A full when the VM's newest full is at least this many days old.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_every_days: Option<u32>,
    /// A full after this many incrementals in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_every_runs: Option<u32>,
    /// A full on runs planned on this weekday (in the policy's time zone): `"mon"` … `"sun"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly_full_on: Option<String>,
}

/// Keep rules as Proxmox Backup Server applies them: keep-last, then keep-hourly, -daily,
/// -weekly (ISO weeks), -monthly, -yearly, each over the points no earlier rule kept, counting
/// only periods that hold a point and keeping the newest point of each. `None` (or 0): the rule
/// is not used. All unused: nothing is pruned.
#[derive(
    Debug,
    Clone,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    utoipa::IntoParams,
)]
#[into_params(parameter_in = Query)]
// utoipa writes `u32` as format int32 (up to 2^31-1); the counts go to 2^32-1, said exactly.
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    #[param(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    #[param(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    #[param(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    #[param(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    #[param(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    #[param(format = Int64, minimum = 0, maximum = 4294967295_u64)]
    pub keep_yearly: Option<u32>,
}

/// What happens when a chain would grow past `max_chain_length` points.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChainLimit {
    /// The next backup is a full (reads the whole VM again).
    #[default]
    Full,
    /// The oldest points are merged on the hub into a synthetic full (no VM read).
    Synthetic,
}

/// A stored policy, as the API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Policy {
    pub id: String,
    pub name: String,
    pub vms: VmSelector,
    pub repository_id: String,
    /// Five-field cron expression (minute hour day-of-month month day-of-week).
    pub schedule: String,
    /// IANA time zone the schedule is read in, e.g. `Europe/London`.
    pub timezone: String,
    pub backup_rule: BackupRule,
    pub retention: Retention,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chain_length: Option<u32>,
    #[serde(default)]
    pub chain_limit: ChainLimit,
    pub enabled: bool,
    /// Higher runs first when queued runs compete.
    pub priority: i32,
    /// How long a queued run waits for resources before it gives up.
    pub queue_window_secs: u64,
    /// Boot-check each new point (a verify job that also boots it as a throwaway VM on the
    /// hub) before the retention prune; a point that does not boot keeps every older point
    /// (the run's prune is skipped, with an event saying why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_check: Option<super::BootCheckSpec>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The next planned run (absent when disabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<DateTime<Utc>>,
    /// The most recent run record of any of its VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<PolicyRun>,
    /// Runs of this policy waiting in the queue now.
    #[serde(default)]
    pub queued: u32,
}

/// `POST /api/v1/policies` and `PUT /api/v1/policies/{id}` (a whole replacement).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyRequest {
    pub name: String,
    pub vms: VmSelector,
    pub repository_id: String,
    pub schedule: String,
    #[serde(default = "utc")]
    pub timezone: String,
    #[serde(default)]
    pub backup_rule: BackupRule,
    #[serde(default)]
    pub retention: Retention,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_chain_length: Option<u32>,
    #[serde(default)]
    pub chain_limit: ChainLimit,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub priority: i32,
    #[serde(default = "default_queue_window")]
    pub queue_window_secs: u64,
    /// See [`Policy::boot_check`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_check: Option<super::BootCheckSpec>,
}

fn utc() -> String {
    "UTC".to_string()
}

fn yes() -> bool {
    true
}

/// A queued run gives up after six hours by default.
pub const DEFAULT_QUEUE_WINDOW_SECS: u64 = 6 * 3600;

fn default_queue_window() -> u64 {
    DEFAULT_QUEUE_WINDOW_SECS
}

/// Where one VM's run of one planned time is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Waiting for ports, the VM, the node or a concurrency slot.
    Queued,
    /// Its backup job is running.
    Running,
    /// The backup job completed.
    Completed,
    /// The backup job failed or was cancelled (see `reason`).
    Failed,
    /// Waited the policy's queue window without starting (see `reason`).
    GaveUp,
    /// Not started on purpose (the VM belongs to a higher-priority policy, the VM is gone).
    Skipped,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::GaveUp => "gave_up",
            RunStatus::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => RunStatus::Queued,
            "running" => RunStatus::Running,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "gave_up" => RunStatus::GaveUp,
            "skipped" => RunStatus::Skipped,
            _ => return None,
        })
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

/// One VM's run of one planned time of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyRun {
    pub run_id: String,
    pub policy_id: String,
    pub vm_name: String,
    /// The schedule's time this run belongs to.
    pub planned_at: DateTime<Utc>,
    /// Started after its planned time had passed by more than a minute (e.g. after hub
    /// downtime: one late run, never one per missed slot).
    pub late: bool,
    /// `run-now` instead of the schedule.
    #[serde(default)]
    pub manual: bool,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_type: Option<BackupType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<BackupId>,
    pub queued_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// Why it waits, failed, gave up or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Why a point is kept (or that it is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeepReason {
    Protected,
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

/// What a prune does with one point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneAction {
    Keep,
    /// No point depends on it: its images are deleted.
    Delete,
    /// The oldest point of its chain with a kept child: merged into that child, which becomes
    /// the chain's self-contained base.
    MergeIntoChild,
    /// A middle point: its child is rebased onto the point below, then it is deleted.
    RebaseChild,
}

/// One point of a VM as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PrunePoint {
    pub backup_id: BackupId,
    pub backup_type: BackupType,
    pub created_at: DateTime<Utc>,
    pub protected: bool,
    /// The first rule that keeps it; `None` when it is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_by: Option<KeepReason>,
    pub action: PruneAction,
    /// Bytes the repository gets back when this point goes (0 for a kept point).
    pub bytes_freed: u64,
    /// Bytes its images use now.
    pub bytes_used: u64,
}

/// Which points of a VM a prune keeps, which it removes and how; newest first. A dry run
/// answers this and changes nothing; a prune job carries the plan it executes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PrunePlan {
    pub vm_name: String,
    pub retention: Retention,
    pub points: Vec<PrunePoint>,
    pub bytes_freed: u64,
}

/// `POST /api/v1/prune`: prune one VM's points with the given rules, or with those of the
/// policy that covers it when `retention` is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PruneRequest {
    #[schema(pattern = r"^(\.?[A-Za-z0-9_-])+\.?$", max_length = 128)]
    pub vm_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Answer the plan only (also `?dry_run=true`).
    #[serde(default)]
    pub dry_run: bool,
}

/// A prune (or synthetic-full merge) job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PruneJob {
    pub prune_id: String,
    pub vm_name: String,
    /// `prune` (retention) or `synthetic` (a chain merged into a synthetic full).
    pub kind: String,
    pub status: JobStatus,
    pub plan: PrunePlan,
    pub steps_total: u32,
    pub steps_done: u32,
    /// Bytes the merges have to copy, and have copied.
    pub bytes_total: u64,
    pub bytes_done: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
}

/// Space one VM's chain uses in a repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VmSpace {
    pub vm_name: String,
    pub points: u32,
    pub bytes: u64,
}

/// `GET /api/v1/repositories/{id}/space`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RepositorySpace {
    pub repository_id: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
    pub vms: Vec<VmSpace>,
    /// Growth of the bytes its points use over the last 14 days, per day (negative: shrinking).
    pub growth_bytes_per_day: f64,
    /// Days until free space runs out at that growth; absent when not growing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_in_days: Option<f64>,
}
