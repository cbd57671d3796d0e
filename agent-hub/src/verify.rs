//! Verify jobs: re-read completed backup points and compare them with their stored whole-disk
//! checksums, on demand (`POST /api/v1/verify`) or on a schedule per repository
//! ([`schedule`]).
//!
//! A job reads its points one after another (oldest first, so a corrupt parent is found before
//! its incrementals are read), each point's disks at once ([`run`]). A mismatch, or a sidecar
//! that is not the one the catalog recorded, marks the point `corrupt` and every point that
//! depends on it too; the VM's next backup is then a full (`jobs::prepare::kind`). A clean read
//! sets the point's `verified_at` and keeps its level (`hub_computed` stays `hub_computed`). A
//! `legacy` point (no sidecar) gets checksums the hub computes, stored as its sidecar.
//!
//! Events go to the log of each point read, tagged with the verify job's id (`job_id`), as a
//! restore's do; progress is published as [`HubEvent::Verify`].

pub mod run;
pub mod schedule;

use crate::db::{Db, DbError};
use crate::events::JobLog;
use crate::readback::ReadBack;
use sendense_shared::api::{HubEvent, Integrity, JobEvent, JobStatus, VerifyJob, VerifyRequest};
use sendense_shared::ids::BackupId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The time as the verify jobs and their scheduler see it (the hub's one clock; tests drive
/// it).
pub use crate::clock::{Clock, SystemClock};

/// What starts a verify job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Manual,
    Schedule,
    /// A policy's boot check of its new point.
    Policy,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Schedule => "schedule",
            Trigger::Policy => "policy",
        }
    }
}

/// Why a verify request or a cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{detail}")]
    Invalid { detail: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("verify job {id} is {status}: {what}")]
    WrongState {
        id: String,
        status: &'static str,
        what: &'static str,
    },
    #[error("VM {vm:?}: prune job {prune_id} is changing its chain; verify it once the prune ends")]
    Pruning { vm: String, prune_id: String },
    #[error("backup {id} is {status}: only completed points are verified")]
    NotCompleted { id: BackupId, status: &'static str },
    #[error("database while {doing}")]
    Db {
        doing: &'static str,
        #[source]
        source: DbError,
    },
}

fn db_err(doing: &'static str) -> impl FnOnce(DbError) -> VerifyError {
    move |source| match source {
        DbError::NotFound { what } => VerifyError::NotFound { what },
        source => VerifyError::Db { doing, source },
    }
}

/// What a verify job needs.
#[derive(Clone)]
pub struct VerifyDeps {
    pub db: Db,
    pub readback: ReadBack,
    pub log: JobLog,
    pub tasks: TaskTracker,
    pub clock: Arc<dyn Clock>,
    /// Where boot checks put their work directories ([`crate::bootcheck::root`]).
    pub boot_root: std::path::PathBuf,
}

/// The verify jobs of this hub. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    deps: VerifyDeps,
    /// The cancel token of every job running in this process.
    live: Mutex<HashMap<String, CancellationToken>>,
}

/// Statuses a verify job can be cancelled from.
const CANCELLABLE: &[JobStatus] = &[JobStatus::Pending, JobStatus::Running];

impl Verifier {
    pub fn new(deps: VerifyDeps) -> Self {
        Verifier {
            inner: Arc::new(Inner {
                deps,
                live: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn deps(&self) -> &VerifyDeps {
        &self.inner.deps
    }

    /// Jobs a previous hub process left unfinished cannot go on (their reads died with it):
    /// failed, saying so. Run once at start-up, before any job starts.
    pub async fn recover(&self) -> Result<(), VerifyError> {
        let db = &self.deps().db;
        let all = db
            .list_verifies()
            .await
            .map_err(db_err("listing verify jobs"))?;
        self.recover_boot_checks().await;
        for v in all.into_iter().filter(|v| !v.status.is_terminal()) {
            let to = if v.status == JobStatus::Cancelling {
                JobStatus::Cancelled
            } else {
                JobStatus::Failed
            };
            db.transition_verify(
                &v.verify_id,
                &[v.status],
                to,
                Some("the hub stopped during the verify job; start it again"),
            )
            .await
            .map_err(db_err("failing an interrupted verify job"))?;
        }
        Ok(())
    }

    /// Boot checks a previous hub process left running: their QEMU stopped (PID checked in
    /// `/proc`), their overlays removed, the point's check marked `interrupted`; then anything
    /// else under the boot-check root (no check runs in a process that just started).
    async fn recover_boot_checks(&self) {
        let deps = self.deps();
        let live = match deps.db.interrupted_boot_checks().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %sendense_shared::errors::chain(&e),
                    "cannot list the boot checks a previous run left");
                return;
            }
        };
        for c in live {
            let did =
                crate::bootcheck::recover_one(c.qemu_pid, c.work_dir.as_deref(), &deps.boot_root)
                    .await;
            let detail = format!(
                "the hub stopped during the boot check (verify job {}); {did}",
                c.verify_id
            );
            tracing::warn!(backup_id = %c.backup_id, "{detail}");
            if let Err(e) = deps
                .db
                .finish_boot_check(
                    &c.backup_id,
                    sendense_shared::api::BootStatus::Interrupted,
                    &detail,
                    &[],
                    None,
                )
                .await
            {
                tracing::warn!(error = %sendense_shared::errors::chain(&e),
                    "cannot record an interrupted boot check");
            }
            deps.log
                .record(
                    &c.backup_id,
                    Some(&c.verify_id),
                    crate::events::Level::Warn,
                    "boot_check_interrupted",
                    &format!("reconciler: {detail}"),
                    None,
                )
                .await;
        }
        if let Ok(entries) = std::fs::read_dir(&deps.boot_root) {
            for e in entries.flatten() {
                let p = e.path();
                if let Err(err) = std::fs::remove_dir_all(&p) {
                    tracing::warn!(dir = %p.display(), error = %err,
                        "cannot remove a leftover boot-check directory");
                } else {
                    tracing::warn!(dir = %p.display(), "removed a leftover boot-check directory");
                }
            }
        }
    }

    /// Checks the request, picks the points and starts the job in the background; answers it
    /// `pending`.
    pub async fn start(
        &self,
        req: &VerifyRequest,
        trigger: Trigger,
    ) -> Result<VerifyJob, VerifyError> {
        let (scope, points) = self.scope(req).await?;
        if let Some(spec) = &req.boot {
            crate::bootcheck::validate(spec).map_err(|e| VerifyError::Invalid {
                detail: e.to_string(),
            })?;
        }
        // A prune rewrites images in place: a read-back racing it could call a point corrupt.
        let db = &self.deps().db;
        let mut vms: Vec<String> = Vec::new();
        for p in &points {
            let b = db.get_backup(p).await.map_err(db_err("reading a point"))?;
            if !vms.contains(&b.vm_name) {
                vms.push(b.vm_name);
            }
        }
        for vm in vms {
            if let Some(prune_id) = db
                .active_prune_of_vm(&vm)
                .await
                .map_err(db_err("checking for a running prune"))?
            {
                return Err(VerifyError::Pruning { vm, prune_id });
            }
        }
        let job = VerifyJob {
            verify_id: uuid::Uuid::new_v4().to_string(),
            scope,
            trigger: trigger.as_str().into(),
            status: JobStatus::Pending,
            points_total: points.len() as u64,
            points_done: 0,
            bytes_total: 0,
            bytes_read: 0,
            corrupt: Vec::new(),
            created_at: self.deps().clock.now(),
            started_at: None,
            completed_at: None,
            error_message: None,
        };
        let db = &self.deps().db;
        db.create_verify(&job)
            .await
            .map_err(db_err("storing the verify job"))?;
        let cancel = CancellationToken::new();
        self.lock_live()
            .insert(job.verify_id.clone(), cancel.clone());
        tracing::info!(verify_id = %job.verify_id, scope = %job.scope, trigger = %job.trigger,
            points = points.len(), "verify job started");
        let me = self.clone();
        let id = job.verify_id.clone();
        let boot = req.boot.clone();
        self.deps().tasks.spawn(async move {
            run::run(&me, &id, points, boot.as_ref(), &cancel).await;
            me.lock_live().remove(&id);
        });
        self.publish(&job.verify_id).await;
        Ok(job)
    }

    /// Exactly one field names the scope; the points are the completed ones in it whose
    /// integrity a read can confirm (`verified`, `hub_computed`, `legacy`), oldest first.
    async fn scope(&self, req: &VerifyRequest) -> Result<(String, Vec<BackupId>), VerifyError> {
        let given: Vec<&str> = [
            req.backup_id.as_ref().map(|_| "backup_id"),
            req.vm_name.as_ref().map(|_| "vm_name"),
            req.repository_id.as_ref().map(|_| "repository_id"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if given.len() != 1 {
            return Err(VerifyError::Invalid {
                detail: format!(
                    "backup_id, vm_name, repository_id: exactly one is required, {} given{}",
                    given.len(),
                    if given.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", given.join(", "))
                    }
                ),
            });
        }
        let db = &self.deps().db;
        let readable = |b: &sendense_shared::api::Backup| {
            b.status == JobStatus::Completed
                && matches!(
                    b.integrity,
                    Integrity::Verified | Integrity::HubComputed | Integrity::Legacy
                )
        };
        if let Some(id) = &req.backup_id {
            sendense_shared::names::validate_name("backup_id", &id.0).map_err(|e| {
                VerifyError::Invalid {
                    detail: e.to_string(),
                }
            })?;
            let b = db
                .get_backup(id)
                .await
                .map_err(db_err("reading the backup"))?;
            if b.status != JobStatus::Completed {
                return Err(VerifyError::NotCompleted {
                    id: id.clone(),
                    status: b.status.as_str(),
                });
            }
            let points = if readable(&b) {
                vec![id.clone()]
            } else {
                vec![]
            };
            return Ok((format!("backup:{id}"), points));
        }
        let all = db
            .list_backups_in(&[JobStatus::Completed])
            .await
            .map_err(db_err("listing completed points"))?;
        let (scope, picked): (String, Vec<_>) = if let Some(vm) = &req.vm_name {
            db.get_vm(vm).await.map_err(db_err("reading the VM"))?;
            let p = all.iter().filter(|b| &b.vm_name == vm).collect();
            (format!("vm:{vm}"), p)
        } else {
            let repo = req.repository_id.as_deref().unwrap_or_default();
            db.get_repository(repo)
                .await
                .map_err(db_err("reading the repository"))?;
            let p = all.iter().filter(|b| b.repository_id == repo).collect();
            (format!("repository:{repo}"), p)
        };
        let mut points: Vec<_> = picked.into_iter().filter(|b| readable(b)).collect();
        points.sort_by_key(|b| (b.completed_at, b.created_at));
        Ok((
            scope,
            points.into_iter().map(|b| b.backup_id.clone()).collect(),
        ))
    }

    pub async fn list(&self) -> Result<Vec<VerifyJob>, VerifyError> {
        self.deps()
            .db
            .list_verifies()
            .await
            .map_err(db_err("listing verify jobs"))
    }

    pub async fn get(&self, id: &str) -> Result<VerifyJob, VerifyError> {
        self.deps()
            .db
            .get_verify(id)
            .await
            .map_err(db_err("reading the verify job"))
    }

    /// The events of a verify job, on every point it read, oldest first.
    pub async fn events(&self, id: &str) -> Result<Vec<JobEvent>, VerifyError> {
        self.get(id).await?;
        self.deps()
            .db
            .list_job_events(id)
            .await
            .map_err(db_err("reading the verify job's events"))
    }

    /// Moves the job to `cancelling` and stops its reads; the job ends `cancelled`. A job no
    /// task of this process runs is ended at once.
    pub async fn cancel(&self, id: &str) -> Result<VerifyJob, VerifyError> {
        let v = self.get(id).await?;
        if v.status == JobStatus::Cancelling {
            return Ok(v);
        }
        if v.status.is_terminal() {
            return Err(VerifyError::WrongState {
                id: id.into(),
                status: v.status.as_str(),
                what: "a finished verify job cannot be cancelled",
            });
        }
        let db = &self.deps().db;
        if !db
            .transition_verify(id, CANCELLABLE, JobStatus::Cancelling, None)
            .await
            .map_err(db_err("moving the verify job to cancelling"))?
        {
            let now = self.get(id).await?;
            if now.status == JobStatus::Cancelling {
                return Ok(now);
            }
            return Err(VerifyError::WrongState {
                id: id.into(),
                status: now.status.as_str(),
                what: "the verify job ended before the cancel took effect",
            });
        }
        let token = self.lock_live().get(id).cloned();
        match token {
            Some(t) => t.cancel(),
            None => {
                db.transition_verify(id, &[JobStatus::Cancelling], JobStatus::Cancelled, None)
                    .await
                    .map_err(db_err("moving the verify job to cancelled"))?;
            }
        }
        self.publish(id).await;
        self.get(id).await
    }

    /// Fails every job running in this process with `why` and stops its reads (the hub is
    /// stopping).
    pub async fn shutdown(&self, why: &str) {
        let live: Vec<(String, CancellationToken)> = self
            .lock_live()
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        for (id, token) in live {
            let from = [
                JobStatus::Pending,
                JobStatus::Running,
                JobStatus::Cancelling,
            ];
            if let Err(e) = self
                .deps()
                .db
                .transition_verify(&id, &from, JobStatus::Failed, Some(why))
                .await
            {
                tracing::warn!(verify_id = %id, error = %sendense_shared::errors::chain(&e),
                    "cannot fail the verify job at shutdown");
            }
            token.cancel();
        }
    }

    /// Publishes the job as stored.
    pub(crate) async fn publish(&self, id: &str) {
        match self.deps().db.get_verify(id).await {
            Ok(v) => self
                .deps()
                .log
                .bus()
                .publish(HubEvent::Verify { verify: v }),
            Err(e) => tracing::warn!(verify_id = %id, error = %sendense_shared::errors::chain(&e),
                "cannot read the verify job to publish it"),
        }
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a job of `scope` runs in this process (the scheduler starts no second one).
    pub(crate) async fn running_scope(&self, scope: &str) -> Result<bool, VerifyError> {
        let all = self.list().await?;
        Ok(all
            .iter()
            .any(|v| v.scope == scope && !v.status.is_terminal()))
    }
}
