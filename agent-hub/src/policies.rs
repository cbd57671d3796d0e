//! Backup policies: which VMs, when (cron in a time zone), which backup type, how long a run
//! may wait; and the scheduler that runs them through the same job system as a manual backup.
//!
//! - [`validate`]: the rules of a request (every refusal names its field).
//! - [`schedule`]: cron expressions and time zones (`croner`, `chrono-tz`; why there).
//! - [`select`]: which VMs a slot backs up; the overlap rule between policies.
//! - [`kind`]: full or incremental ([`sendense_shared::api::BackupRule`], `max_chain_length`).
//! - [`scheduler`]: [`Policies::tick`] (slots claimed, runs queued, admitted, followed) and the
//!   loop the hub spawns ([`scheduler::spawn`]).
//! - [`admission`]: whether a queued run can start now, and why not.
//!
//! # Endpoints (admin scope: a node's credential gets `403` naming scope `admin`)
//! - `GET /api/v1/policies`: every policy with `next_run`, `last_run`, `queued`.
//! - `POST /api/v1/policies` ([`PolicyRequest`]) → `201` [`Policy`]. `422 invalid_field` naming
//!   the field for: a name that is empty or too long, an invalid cron expression (`schedule`,
//!   five fields), an unknown time zone (`timezone`), a selector naming no VM (`vms`), an
//!   unknown VM or node named (`vms.names[i]`, `vms.nodes[i]`), a malformed glob
//!   (`vms.patterns[i]`), an unknown repository (`repository_id`), a bad weekday
//!   (`backup_rule.weekly_full_on`), a 0 where at least 1 is meant (`full_every_days`,
//!   `full_every_runs`, `max_chain_length`), a retention whose every given rule is 0
//!   (`retention`: it would keep nothing; no rule at all means no pruning), a negative number
//!   (the JSON extractor names the field). `409 already_exists`: the name is taken, or a VM
//!   named explicitly is named by another policy (the detail names that policy).
//! - `GET|PUT|DELETE /api/v1/policies/{id}`: one policy; `PUT` replaces it whole (same rules);
//!   `DELETE` answers `204` and removes its slots and runs (its backups stay).
//! - `POST /api/v1/policies/{id}/run-now` → `202` with one run per VM (queued, or skipped with
//!   the reason), also for a disabled policy.
//! - `GET /api/v1/policies/{id}/runs[?limit=N]` (default 50, at most 1000): newest first.
//!
//! # Runs
//! A slot (a schedule time of a policy) is claimed once by a `policy_slots` row; each VM of it
//! gets a `policy_runs` row, `queued`, then `running` (its backup job started), then
//! `completed` or `failed` as its job ended; `gave_up` when it waited the policy's
//! `queue_window_secs` without starting (the reason says for what); `skipped` when the VM
//! belongs to another policy or is gone. Manual backups (`POST /api/v1/backups`) do not queue:
//! they keep their immediate answers (503 `ports_exhausted`, 409 `vm_busy`, ...).
//!
//! After retention or a chain limit of `synthetic`, the [`AfterRun`] hook is called with each
//! completed backup of a policy ([`NoAfterRun`] by default).

pub mod admission;
pub mod kind;
pub mod schedule;
pub mod scheduler;
pub mod select;
pub mod validate;

use crate::db::{Db, DbError, QueuedRun};
use crate::events::EventBus;
use crate::jobs::JobManager;
use sendense_shared::api::{Backup, HubEvent, Policy, PolicyRequest, PolicyRun};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Called after each completed backup of a policy (retention, synthetic fulls). It should
/// start its work and return: the scheduler waits for it.
pub trait AfterRun: Send + Sync {
    fn after_backup<'a>(
        &'a self,
        policy: &'a Policy,
        backup: &'a Backup,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// The default hook: nothing after a run.
pub struct NoAfterRun;

impl AfterRun for NoAfterRun {
    fn after_backup<'a>(
        &'a self,
        _policy: &'a Policy,
        _backup: &'a Backup,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async {})
    }
}

/// How many backups may run at once (scheduled runs wait for a free place; manual backups
/// are not limited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `max_concurrent_backups`: on the whole hub.
    pub per_hub: usize,
    /// `max_concurrent_backups_per_node`: VMs of one node.
    pub per_node: usize,
}

/// What the policy service needs from the hub.
pub struct PolicyDeps {
    pub db: Db,
    pub jobs: JobManager,
    pub bus: EventBus,
    pub nodes: crate::node_client::NodeClient,
    pub ports: Arc<crate::ports::PortAllocator>,
    /// Where qemu-nbd binds (the port check's bind test).
    pub nbd_bind: std::net::IpAddr,
    pub limits: Limits,
    pub after_run: Arc<dyn AfterRun>,
}

/// Why a policy operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Bad input; the detail starts with the field.
    #[error("{0}")]
    Invalid(String),
    #[error("no policy with id {id:?} (GET /api/v1/policies lists them)")]
    NotFound { id: String },
    #[error("a policy named {name:?} exists already ({id})")]
    NameTaken { name: String, id: String },
    #[error(
        "vms.names: VM {vm:?} is named by policy {name:?} ({id}) already; a VM is named by one \
         policy at most (patterns and nodes may overlap)"
    )]
    VmClaimed {
        vm: String,
        name: String,
        id: String,
    },
    #[error("database")]
    Db(#[from] DbError),
}

/// The policy service; cheap to clone.
#[derive(Clone)]
pub struct Policies {
    inner: Arc<Inner>,
}

struct Inner {
    deps: PolicyDeps,
    /// One tick at a time in this process (slots, admission, follow).
    tick: tokio::sync::Mutex<()>,
    /// Wakes the scheduler loop (run-now, a job that ended).
    wake: tokio::sync::Notify,
}

impl Policies {
    pub fn new(deps: PolicyDeps) -> Self {
        Policies {
            inner: Arc::new(Inner {
                deps,
                tick: tokio::sync::Mutex::new(()),
                wake: tokio::sync::Notify::new(),
            }),
        }
    }

    pub(crate) fn deps(&self) -> &PolicyDeps {
        &self.inner.deps
    }

    fn db(&self) -> &Db {
        &self.inner.deps.db
    }

    /// Asks the scheduler loop for a tick now.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// `POST /api/v1/policies`.
    pub async fn create(&self, req: &PolicyRequest) -> Result<Policy, PolicyError> {
        let now = self.db().clock().now();
        let p = self
            .checked(req, uuid::Uuid::new_v4().to_string(), now, now)
            .await?;
        self.db()
            .insert_policy(&p)
            .await
            .map_err(|e| self.write_error(e, &p))?;
        tracing::info!(policy_id = %p.id, name = %p.name, schedule = %p.schedule,
            timezone = %p.timezone, "policy created");
        self.get(&p.id).await
    }

    /// `PUT /api/v1/policies/{id}`: a whole replacement.
    pub async fn update(&self, id: &str, req: &PolicyRequest) -> Result<Policy, PolicyError> {
        let old = self.stored(id).await?;
        let p = self
            .checked(req, old.id.clone(), old.created_at, self.db().clock().now())
            .await?;
        self.db()
            .update_policy(&p)
            .await
            .map_err(|e| self.write_error(e, &p))?;
        tracing::info!(policy_id = %p.id, name = %p.name, enabled = p.enabled, "policy updated");
        self.get(id).await
    }

    pub async fn delete(&self, id: &str) -> Result<(), PolicyError> {
        match self.db().delete_policy(id).await {
            Ok(()) => {
                tracing::info!(policy_id = %id, "policy deleted");
                Ok(())
            }
            Err(DbError::NotFound { .. }) => Err(PolicyError::NotFound { id: id.into() }),
            Err(e) => Err(e.into()),
        }
    }

    /// One policy with its next run, last run and queue length.
    pub async fn get(&self, id: &str) -> Result<Policy, PolicyError> {
        let p = self.stored(id).await?;
        self.decorate(p).await
    }

    pub async fn list(&self) -> Result<Vec<Policy>, PolicyError> {
        let mut out = Vec::new();
        for p in self.db().list_policies().await? {
            out.push(self.decorate(p).await?);
        }
        Ok(out)
    }

    /// A policy's runs, newest first.
    pub async fn runs(&self, id: &str, limit: u32) -> Result<Vec<PolicyRun>, PolicyError> {
        self.stored(id).await?;
        Ok(self
            .db()
            .list_runs(id, limit)
            .await?
            .into_iter()
            .map(|r| r.run)
            .collect())
    }

    async fn stored(&self, id: &str) -> Result<Policy, PolicyError> {
        match self.db().get_policy(id).await {
            Ok(p) => Ok(p),
            Err(DbError::NotFound { .. }) => Err(PolicyError::NotFound { id: id.into() }),
            Err(e) => Err(e.into()),
        }
    }

    async fn decorate(&self, mut p: Policy) -> Result<Policy, PolicyError> {
        if p.enabled
            && let Ok(s) = schedule::Schedule::parse(&p.schedule, &p.timezone)
        {
            p.next_run = s.next_after(self.db().clock().now());
        }
        let (last, queued) = self.db().policy_run_summary(&p.id).await?;
        p.last_run = last;
        p.queued = queued;
        Ok(p)
    }

    fn write_error(&self, e: DbError, p: &Policy) -> PolicyError {
        match e {
            DbError::Conflict { .. } => PolicyError::NameTaken {
                name: p.name.clone(),
                id: p.id.clone(),
            },
            DbError::NotFound { .. } => PolicyError::Invalid(format!(
                "repository_id: no repository {:?} (GET /api/v1/repositories lists them)",
                p.repository_id
            )),
            e => e.into(),
        }
    }

    /// The request checked (also against the database) and made a stored policy.
    async fn checked(
        &self,
        req: &PolicyRequest,
        id: String,
        created_at: chrono::DateTime<chrono::Utc>,
        updated_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Policy, PolicyError> {
        validate::check(req).map_err(|e| PolicyError::Invalid(e.0))?;
        let db = self.db();
        match db.get_repository(&req.repository_id).await {
            Ok(_) => {}
            Err(DbError::NotFound { .. }) => {
                return Err(PolicyError::Invalid(format!(
                    "repository_id: no repository {:?} (GET /api/v1/repositories lists them)",
                    req.repository_id
                )));
            }
            Err(e) => return Err(e.into()),
        }
        let vms = db.list_vms().await?;
        for (i, n) in req.vms.names.iter().enumerate() {
            if !vms.iter().any(|v| &v.vm_name == n) {
                return Err(PolicyError::Invalid(format!(
                    "vms.names[{i}]: no VM named {n:?} is registered (GET /api/v1/vms lists them)"
                )));
            }
        }
        let nodes = db.list_nodes().await?;
        for (i, n) in req.vms.nodes.iter().enumerate() {
            if !nodes.iter().any(|x| &x.name == n) {
                return Err(PolicyError::Invalid(format!(
                    "vms.nodes[{i}]: no node named {n:?} is registered (GET /api/v1/nodes lists them)"
                )));
            }
        }
        for other in db.list_policies().await?.iter().filter(|o| o.id != id) {
            if let Some(vm) = req.vms.names.iter().find(|n| other.vms.names.contains(n)) {
                return Err(PolicyError::VmClaimed {
                    vm: vm.clone(),
                    name: other.name.clone(),
                    id: other.id.clone(),
                });
            }
            if other.name == req.name {
                return Err(PolicyError::NameTaken {
                    name: other.name.clone(),
                    id: other.id.clone(),
                });
            }
        }
        Ok(Policy {
            id,
            name: req.name.clone(),
            vms: req.vms.clone(),
            repository_id: req.repository_id.clone(),
            schedule: req.schedule.clone(),
            timezone: req.timezone.clone(),
            backup_rule: req.backup_rule.clone(),
            retention: req.retention.clone(),
            max_chain_length: req.max_chain_length,
            chain_limit: req.chain_limit,
            enabled: req.enabled,
            priority: req.priority,
            queue_window_secs: req.queue_window_secs,
            boot_check: req.boot_check.clone(),
            created_at,
            updated_at,
            next_run: None,
            last_run: None,
            queued: 0,
        })
    }

    /// Re-reads a run and publishes it ([`HubEvent::PolicyRun`]).
    pub(crate) async fn publish(&self, run_id: &str) {
        match self.db().get_run(run_id).await {
            Ok(QueuedRun { run, .. }) => self.deps().bus.publish(HubEvent::PolicyRun { run }),
            Err(e) => tracing::warn!(run_id, error = %e, "cannot publish a policy run"),
        }
    }
}
