//! Prune and synthetic-full jobs: retention ([`crate::retention`]) turned into a plan of chain
//! operations ([`plan`]), run step by step as a job with a journal ([`journal`], [`engine`]),
//! progress as [`HubEvent::Prune`] and events on the kept points it rewrites (tagged with the
//! job's id), cancel between steps; protected points; the space of a repository ([`space`]).
//!
//! - [`plan`]: runs of removed points → delete / rebase / merge steps, per disk.
//! - [`engine`]: runs a step from any phase (first run and start-up recovery alike); why
//!   qemu-img commit/rebase; the crash-safety argument; the test knob.
//! - [`journal`]: the steps as stored, and their phases.
//! - [`qemu`]: the qemu-img commands.
//! - `run`: admission (the busy checks) and the job runner, step by step.
//! - [`policy`]: the retention of the policy covering a VM.
//! - [`space`]: free/total, bytes per VM, growth and forecast.
//! - [`after_run`]: a policy's synthetic full and retention prune after each completed run.
//!
//! A prune never touches a chain that a running backup, restore, instant recovery or
//! verification uses: it is refused (409 naming the job) while one runs on the VM, and a
//! backup, restore, recovery or verify asked while a prune runs on the VM is refused naming the
//! prune job. Before each step the
//! runner checks again (a backup admitted in the instant between the two checks fails the
//! prune before that step, never in the middle of one).

pub mod after_run;
pub mod engine;
pub mod journal;
pub mod plan;
pub mod policy;
pub mod qemu;
mod run;
pub mod space;

use crate::db::{Db, DbError};
use crate::events::JobLog;
use crate::readback::ReadBack;
use crate::retention::{self, Candidate};
use engine::Knob;
use journal::Step;
use plan::{ChainPoint, PointDisk};
use sendense_shared::api::{
    Backup, HubEvent, Integrity, JobEvent, JobStatus, PruneAction, PruneJob, PrunePlan,
    PruneRequest, Retention,
};
use sendense_shared::ids::BackupId;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why a prune request, a cancel or a protect was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error("{detail}")]
    Invalid { detail: String },
    #[error("{what} not found")]
    NotFound { what: String },
    /// Another job uses the VM's chain; names it.
    #[error("VM {vm:?}: {job} is using its chain; wait for it to end or cancel it")]
    Busy { vm: String, job: String },
    #[error("prune job {id} is {status}: {what}")]
    WrongState {
        id: String,
        status: &'static str,
        what: &'static str,
    },
    /// A point in a status the operation does not apply to (409, as documented).
    #[error("backup {id} is {status}: {what}")]
    PointState {
        id: BackupId,
        status: &'static str,
        what: &'static str,
    },
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    #[error("estimating the prune of VM {vm:?}")]
    Estimate {
        vm: String,
        #[source]
        source: crate::repository::RepoError,
    },
    #[error("database while {doing}")]
    Db {
        doing: &'static str,
        #[source]
        source: DbError,
    },
}

fn db_err(doing: &'static str) -> impl FnOnce(DbError) -> PruneError {
    move |source| match source {
        DbError::NotFound { what } => PruneError::NotFound { what },
        source => PruneError::Db { doing, source },
    }
}

/// What the prune jobs need.
#[derive(Clone)]
pub struct PruneDeps {
    pub db: Db,
    pub readback: ReadBack,
    pub log: JobLog,
    pub tasks: TaskTracker,
    pub knob: Knob,
}

/// The prune jobs of this hub. Cheap to clone.
#[derive(Clone)]
pub struct Pruner {
    inner: Arc<Inner>,
}

struct Inner {
    deps: PruneDeps,
    live: Mutex<HashMap<String, CancellationToken>>,
    /// Serialises the busy checks with the job's creation.
    admission: tokio::sync::Mutex<()>,
}

/// A prune request's answer: the plan of a dry run, or the job started.
#[derive(Debug, Clone)]
pub enum Started {
    DryRun(PrunePlan),
    Job(Box<PruneJob>),
}

/// Statuses a prune job can be cancelled from.
const CANCELLABLE: &[JobStatus] = &[JobStatus::Pending, JobStatus::Running];

impl Pruner {
    pub fn new(deps: PruneDeps) -> Self {
        Pruner {
            inner: Arc::new(Inner {
                deps,
                live: Mutex::new(HashMap::new()),
                admission: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn deps(&self) -> &PruneDeps {
        &self.inner.deps
    }

    fn db(&self) -> &Db {
        &self.inner.deps.db
    }

    /// The VM's completed points, newest first, with their chains.
    async fn points(&self, vm: &str) -> Result<Vec<ChainPoint>, PruneError> {
        let db = self.db();
        db.get_vm(vm).await.map_err(db_err("reading the VM"))?;
        let all = db
            .list_backups_in(&[JobStatus::Completed])
            .await
            .map_err(db_err("listing the VM's points"))?;
        let mut out = Vec::new();
        for b in all.into_iter().filter(|b| b.vm_name == vm) {
            out.push(self.chain_point(b).await?);
        }
        out.sort_by_key(|p| std::cmp::Reverse(p.created_at));
        Ok(out)
    }

    async fn chain_point(&self, b: Backup) -> Result<ChainPoint, PruneError> {
        let rows = self
            .db()
            .backup_disks(&b.backup_id)
            .await
            .map_err(db_err("reading a point's disks"))?;
        let disks: Vec<PointDisk> = rows
            .iter()
            .map(|r| PointDisk {
                disk_key: r.result.disk_key,
                image: PathBuf::from(&r.result.qcow2_path),
                parent: r.parent_backup_id.clone(),
            })
            .collect();
        let bytes_used = disks
            .iter()
            .map(|d| {
                qemu::allocated(&d.image)
                    + qemu::allocated(&crate::manifest::sidecar_path(&d.image))
            })
            .sum();
        Ok(ChainPoint {
            backup_id: b.backup_id,
            backup_type: b.backup_type,
            created_at: b.created_at,
            protected: b.protected,
            corrupt: b.integrity == Integrity::Corrupt,
            disks,
            bytes_used,
        })
    }

    /// The retention and time zone for `vm`: the request's (periods in UTC), else the covering
    /// policy's, else `None`.
    async fn retention_for(
        &self,
        vm: &str,
        given: Option<&Retention>,
    ) -> Result<Option<(Retention, chrono_tz::Tz)>, PruneError> {
        let db = self.db();
        let v = db.get_vm(vm).await.map_err(db_err("reading the VM"))?;
        let policies = db
            .policy_retentions()
            .await
            .map_err(db_err("reading the policies"))?;
        let covering = policy::covering(&policies, vm, v.node.as_deref());
        Ok(match (given, covering) {
            // The policy's time zone still places the periods when the request gives only
            // the counts.
            (Some(r), Some((_, tz, _))) => Some((r.clone(), tz)),
            (Some(r), None) => Some((r.clone(), chrono_tz::UTC)),
            (None, Some((r, tz, _))) => Some((r, tz)),
            (None, None) => None,
        })
    }

    /// The VM's points with the rule that keeps each and what a prune would do, changing
    /// nothing (`GET /api/v1/vms/{name}/points`, dry runs). Without any retention every point
    /// is kept (`kept_by` absent unless protected).
    pub async fn plan(&self, vm: &str, given: Option<&Retention>) -> Result<PrunePlan, PruneError> {
        let (retention, tz) = self
            .retention_for(vm, given)
            .await?
            .unwrap_or((Retention::default(), chrono_tz::UTC));
        let points = self.points(vm).await?;
        let (plan, _) = self.plan_of(vm, &retention, &tz, &points, None).await?;
        Ok(plan)
    }

    /// `kept`: a fixed verdict (synthetic fulls) instead of the retention's.
    async fn plan_of(
        &self,
        vm: &str,
        retention: &Retention,
        tz: &chrono_tz::Tz,
        points: &[ChainPoint],
        kept: Option<&(dyn Fn(&ChainPoint) -> bool + Sync)>,
    ) -> Result<(PrunePlan, Vec<(Step, u64, u64)>), PruneError> {
        let verdicts = match kept {
            None => {
                let c: Vec<Candidate<BackupId>> = points
                    .iter()
                    .map(|p| Candidate {
                        key: p.backup_id.clone(),
                        at: p.created_at,
                        protected: p.protected,
                        countable: !p.corrupt,
                    })
                    .collect();
                retention::apply(&c, retention, tz)
            }
            Some(f) => points
                .iter()
                .map(|p| retention::Verdict {
                    key: p.backup_id.clone(),
                    at: p.created_at,
                    kept_by: if p.protected {
                        Some(sendense_shared::api::KeepReason::Protected)
                    } else if f(p) {
                        Some(sendense_shared::api::KeepReason::Last)
                    } else {
                        None
                    },
                })
                .collect(),
        };
        let removing = kept.is_some() || retention::keeps_something(retention);
        let planned = plan::build(points, &verdicts, removing)?;
        let by_id: HashMap<&BackupId, &ChainPoint> =
            points.iter().map(|p| (&p.backup_id, p)).collect();
        let mut pp = planned.points;
        let mut steps = Vec::new();
        for s in planned.steps {
            let (copy, freed) =
                space::estimate(&s, &by_id)
                    .await
                    .map_err(|source| PruneError::Estimate {
                        vm: vm.to_string(),
                        source,
                    })?;
            // The step's freed bytes go to the point whose action is the merge or rebase; its
            // Delete points already carry their own.
            let own: u64 = pp
                .iter()
                .filter(|p| s.removes().contains(&p.backup_id) && p.action == PruneAction::Delete)
                .map(|p| p.bytes_freed)
                .sum();
            if let Some(p) = pp.iter_mut().find(|p| {
                s.removes().contains(&p.backup_id)
                    && matches!(
                        p.action,
                        PruneAction::MergeIntoChild | PruneAction::RebaseChild
                    )
            }) {
                p.bytes_freed = freed.saturating_sub(own);
            }
            steps.push((s, copy, freed));
        }
        let total = pp.iter().map(|p| p.bytes_freed).sum();
        Ok((
            PrunePlan {
                vm_name: vm.to_string(),
                retention: retention.clone(),
                points: pp,
                bytes_freed: total,
            },
            steps,
        ))
    }

    /// `POST /api/v1/prune`: a dry run answers the plan; otherwise the job starts in the
    /// background and is answered `pending`.
    pub async fn start(&self, req: &PruneRequest) -> Result<Started, PruneError> {
        sendense_shared::names::validate_name("vm_name", &req.vm_name).map_err(|e| {
            PruneError::Invalid {
                detail: e.to_string(),
            }
        })?;
        let Some((retention, tz)) = self
            .retention_for(&req.vm_name, req.retention.as_ref())
            .await?
        else {
            return Err(PruneError::Invalid {
                detail: format!(
                    "retention: the request gives none and no policy covers VM {:?}",
                    req.vm_name
                ),
            });
        };
        if !retention::keeps_something(&retention) {
            return Err(PruneError::Invalid {
                detail: "retention: no keep rule is set (all absent or 0): a prune would keep nothing; set at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly".into(),
            });
        }
        let points = self.points(&req.vm_name).await?;
        let (plan, steps) = self
            .plan_of(&req.vm_name, &retention, &tz, &points, None)
            .await?;
        if req.dry_run {
            return Ok(Started::DryRun(plan));
        }
        self.launch(&req.vm_name, "prune", plan, steps)
            .await
            .map(|j| Started::Job(Box::new(j)))
    }

    /// A synthetic full: merges the oldest points of `vm`'s newest chain into the point above
    /// them so the chain is at most `max_chain_length` points long, without reading the VM
    /// (same journal and job as a prune; protected points stay, so the chain may stay longer
    /// by as many). `None` when the chain is already short enough.
    pub async fn synthetic(
        &self,
        vm: &str,
        max_chain_length: u32,
    ) -> Result<Option<PruneJob>, PruneError> {
        if max_chain_length == 0 {
            return Err(PruneError::Invalid {
                detail: "max_chain_length: must be at least 1".into(),
            });
        }
        let points = self.points(vm).await?;
        let by_id: HashMap<&BackupId, &ChainPoint> =
            points.iter().map(|p| (&p.backup_id, p)).collect();
        // The newest chain, newest first.
        let mut chain: Vec<&BackupId> = Vec::new();
        let mut at = points.first().map(|p| &p.backup_id);
        while let Some(id) = at {
            chain.push(id);
            at = by_id
                .get(id)
                .and_then(|p| p.parent())
                .filter(|p| by_id.contains_key(p));
        }
        if chain.len() <= max_chain_length as usize {
            return Ok(None);
        }
        let keep: std::collections::HashSet<&BackupId> =
            chain[..max_chain_length as usize].iter().copied().collect();
        let old: std::collections::HashSet<&BackupId> =
            chain[max_chain_length as usize..].iter().copied().collect();
        let f = |p: &ChainPoint| keep.contains(&p.backup_id) || !old.contains(&p.backup_id);
        let (plan, steps) = self
            .plan_of(
                vm,
                &Retention::default(),
                &chrono_tz::UTC,
                &points,
                Some(&f),
            )
            .await?;
        self.launch(vm, "synthetic", plan, steps).await.map(Some)
    }

    pub async fn list(&self) -> Result<Vec<PruneJob>, PruneError> {
        self.db()
            .list_prunes()
            .await
            .map_err(db_err("listing prune jobs"))
    }

    pub async fn get(&self, id: &str) -> Result<PruneJob, PruneError> {
        self.db()
            .get_prune(id)
            .await
            .map_err(db_err("reading the prune job"))
    }

    /// The job's events on the points it rewrote, oldest first.
    pub async fn events(&self, id: &str) -> Result<Vec<JobEvent>, PruneError> {
        self.get(id).await?;
        self.db()
            .list_job_events(id)
            .await
            .map_err(db_err("reading the prune job's events"))
    }

    /// Moves the job to `cancelling`; it stops before its next step (a step is never left
    /// half done) and ends `cancelled`.
    pub async fn cancel(&self, id: &str) -> Result<PruneJob, PruneError> {
        let j = self.get(id).await?;
        if j.status == JobStatus::Cancelling {
            return Ok(j);
        }
        if j.status.is_terminal() {
            return Err(PruneError::WrongState {
                id: id.into(),
                status: j.status.as_str(),
                what: "a finished prune job cannot be cancelled",
            });
        }
        let db = self.db();
        db.transition_prune(id, CANCELLABLE, JobStatus::Cancelling, None)
            .await
            .map_err(db_err("moving the prune job to cancelling"))?;
        let token = self.lock_live().get(id).cloned();
        match token {
            Some(t) => t.cancel(),
            None => {
                db.transition_prune(id, &[JobStatus::Cancelling], JobStatus::Cancelled, None)
                    .await
                    .map_err(db_err("moving the prune job to cancelled"))?;
            }
        }
        self.publish(id).await;
        self.get(id).await
    }

    /// Sets or clears a point's protected flag (a protected point is never pruned nor merged).
    pub async fn protect(&self, id: &BackupId, protected: bool) -> Result<Backup, PruneError> {
        sendense_shared::names::validate_name("backup_id", &id.0).map_err(|e| {
            PruneError::Invalid {
                detail: e.to_string(),
            }
        })?;
        let db = self.db();
        let b = db
            .get_backup(id)
            .await
            .map_err(db_err("reading the backup"))?;
        if protected && b.status != JobStatus::Completed {
            return Err(PruneError::PointState {
                id: id.clone(),
                status: b.status.as_str(),
                what: "only completed points are protected",
            });
        }
        db.set_protected(id, protected)
            .await
            .map_err(db_err("protecting the point"))?;
        db.get_backup(id)
            .await
            .map_err(db_err("reading the backup"))
    }

    /// Jobs running in this process when the hub stops: they stop between steps (the step in
    /// progress, if any, is finished by the next start's recovery if the process dies first).
    pub async fn shutdown(&self) {
        for t in self.lock_live().values() {
            t.cancel();
        }
    }

    pub(crate) async fn publish(&self, id: &str) {
        if let Ok(j) = self.db().get_prune(id).await {
            self.deps().log.bus().publish(HubEvent::Prune { prune: j });
        }
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }
}
