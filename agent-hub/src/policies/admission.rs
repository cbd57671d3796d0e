//! The admission queue: a queued run starts when its VM is idle, its node answers, the hub and
//! the node are under their concurrency limits (`max_concurrent_backups`,
//! `max_concurrent_backups_per_node`) and the NBD range has a free, bindable port for each of
//! its disks; otherwise it stays `queued` with the reason, and gives up (`gave_up`) once its
//! queue window has passed, saying what it waited for. Runs are taken in queue order (priority,
//! then planned time); one that must wait does not hold back the ones behind it.
//!
//! The checks run before the job is created, so a run that waits leaves no failed backup
//! behind. A refusal the checks could not foresee (a port taken in between) puts the run back
//! in the queue; a refusal that waiting will not cure (the repository is gone or full, a
//! qemu-nbd that would not start) fails the run with the job's words.

use super::kind;
use super::scheduler::TickReport;
use super::{Policies, PolicyError};
use crate::db::{QueuedRun, RunChange};
use crate::jobs::{ACTIVE, JobError};
use crate::node_client::NodeAddr;
use sendense_shared::api::{Backup, BackupRequest, RunStatus, Vm};
use std::collections::HashMap;

/// Why a run cannot start now (kept as its reason while it waits).
type Wait = String;

/// What an attempt to start a run came to.
enum Start {
    Started,
    /// It must wait (the reason).
    Wait(Wait),
    /// It ended without a job (failed to start, or another hub took it).
    Ended,
}

/// The hub's state for one admission pass.
struct Snapshot {
    active: Vec<Backup>,
    vms: HashMap<String, Vm>,
    /// Node name → reachable (asked once per pass).
    nodes: HashMap<String, Result<(), String>>,
}

impl Policies {
    /// Starts what can start, gives up what waited too long (see the module doc).
    pub(crate) async fn admit(&self, report: &mut TickReport) -> Result<(), PolicyError> {
        let db = self.db();
        let queued = db.runs_in(RunStatus::Queued).await?;
        if queued.is_empty() {
            return Ok(());
        }
        let mut snap = Snapshot {
            active: db.list_backups_in(ACTIVE).await?,
            vms: db
                .list_vms()
                .await?
                .into_iter()
                .map(|v| (v.vm_name.clone(), v))
                .collect(),
            nodes: HashMap::new(),
        };
        for r in queued {
            let now = db.clock().now();
            let Some(vm) = snap.vms.get(&r.run.vm_name).cloned() else {
                if self
                    .end(
                        &r,
                        RunStatus::Skipped,
                        Some(format!("VM {} is no longer registered", r.run.vm_name)),
                    )
                    .await?
                {
                    report.ended.push(r.run.run_id.clone());
                }
                continue;
            };
            let outcome = match self.blocked(&vm, &mut snap).await {
                Some(w) => Start::Wait(w),
                None => self.try_start(&r, &vm).await?,
            };
            match outcome {
                Start::Started => {
                    report.started.push(r.run.run_id.clone());
                    snap.active = db.list_backups_in(ACTIVE).await?;
                }
                Start::Ended => report.ended.push(r.run.run_id.clone()),
                Start::Wait(why) if now >= r.give_up_at => {
                    let waited = (now - r.run.queued_at).num_seconds();
                    let reason =
                        format!("gave up after waiting {waited} s (queue_window_secs) for: {why}");
                    if self.end(&r, RunStatus::GaveUp, Some(reason)).await? {
                        report.ended.push(r.run.run_id.clone());
                    }
                }
                Start::Wait(why) => {
                    let reason = with_late_note(r.run.reason.as_deref(), &why);
                    if r.run.reason.as_deref() != Some(reason.as_str()) {
                        let change = RunChange {
                            reason: Some(Some(reason.clone())),
                            ..Default::default()
                        };
                        if db
                            .update_run(&r.run.run_id, &[RunStatus::Queued], &change)
                            .await?
                        {
                            tracing::info!(run_id = %r.run.run_id, vm = %r.run.vm_name,
                                reason = %reason, "policy run waits in the queue");
                            self.publish(&r.run.run_id).await;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Why `vm` cannot start a backup now, if it cannot.
    async fn blocked(&self, vm: &Vm, snap: &mut Snapshot) -> Option<Wait> {
        if let Some(b) = snap.active.iter().find(|b| b.vm_name == vm.vm_name) {
            return Some(format!(
                "VM {} is busy: backup {} is {}",
                vm.vm_name,
                b.backup_id,
                b.status.as_str()
            ));
        }
        let limits = self.deps().limits;
        if snap.active.len() >= limits.per_hub {
            return Some(format!(
                "the hub's limit of concurrent backups (max_concurrent_backups = {}): {} running",
                limits.per_hub,
                snap.active.len()
            ));
        }
        if let Some(node) = &vm.node {
            let on_node = snap
                .active
                .iter()
                .filter(|b| snap.vms.get(&b.vm_name).and_then(|v| v.node.as_ref()) == Some(node))
                .count();
            if on_node >= limits.per_node {
                return Some(format!(
                    "node {node}'s limit of concurrent backups (max_concurrent_backups_per_node \
                     = {}): {on_node} running",
                    limits.per_node
                ));
            }
            if !snap.nodes.contains_key(node) {
                let state = self.node_reachable(node).await;
                snap.nodes.insert(node.clone(), state);
            }
            if let Some(Err(why)) = snap.nodes.get(node) {
                return Some(why.clone());
            }
        }
        self.ports_free(vm.disks.len()).await.err()
    }

    /// The node is registered and answers (any HTTP answer counts: it is up).
    async fn node_reachable(&self, node: &str) -> Result<(), Wait> {
        let n = match self.db().get_node(node).await {
            Ok(n) => n,
            Err(crate::db::DbError::NotFound { .. }) => {
                return Err(format!("node {node} is not registered"));
            }
            Err(e) => return Err(format!("node {node}: cannot read it: {e}")),
        };
        let addr = NodeAddr {
            name: n.name,
            api_url: n.api_url,
        };
        match self.deps().nodes.tunnel(&addr).await {
            Ok(_) => Ok(()),
            Err(e) if e.status().is_some() => Ok(()),
            Err(e) => Err(format!(
                "node {node} is unreachable: {}",
                sendense_shared::errors::chain(&e)
            )),
        }
    }

    /// A free NBD port for each of `disks`: not held by a job, and bindable (not squatted).
    async fn ports_free(&self, disks: usize) -> Result<(), Wait> {
        let ports = &self.deps().ports;
        let range = ports.range();
        let held: Vec<u16> = match ports.view().await {
            Ok(v) => v.allocations.iter().map(|a| a.port.0).collect(),
            Err(e) => return Err(format!("NBD ports: cannot read the allocations: {e}")),
        };
        let bind = self.deps().nbd_bind;
        let mut free = 0;
        let mut squatted = 0;
        for port in range.ports().filter(|p| !held.contains(p)) {
            if std::net::TcpListener::bind((bind, port)).is_ok() {
                free += 1;
                if free >= disks {
                    return Ok(());
                }
            } else {
                squatted += 1;
            }
        }
        Err(format!(
            "NBD ports: {disks} needed, {free} free in range {range} ({} held by jobs, \
             {squatted} bound by other processes)",
            held.iter().filter(|p| range.contains(**p)).count()
        ))
    }

    /// Claims the run and asks the job system for its backup; a refusal that waiting cures
    /// queues the run again.
    async fn try_start(&self, r: &QueuedRun, vm: &Vm) -> Result<Start, PolicyError> {
        let db = self.db();
        let id = &r.run.run_id;
        let now = db.clock().now();
        let claim = RunChange {
            status: Some(RunStatus::Running),
            started_at: Some(now),
            ..Default::default()
        };
        if !db.update_run(id, &[RunStatus::Queued], &claim).await? {
            return Ok(Start::Ended); // another hub took it
        }
        self.publish(id).await;
        let policy = match db.get_policy(&r.run.policy_id).await {
            Ok(p) => p,
            Err(e) => {
                self.end(r, RunStatus::Failed, Some(format!("policy: {e}")))
                    .await?;
                return Ok(Start::Ended);
            }
        };
        let tz = super::schedule::time_zone(&policy.timezone).unwrap_or(chrono_tz::Tz::UTC);
        let points = db.completed_points(&vm.vm_name, 10_000).await?;
        let choice = kind::choose(&policy, tz, r.run.planned_at, &points);
        let req = BackupRequest {
            vm_name: vm.vm_name.clone(),
            repository_id: policy.repository_id.clone(),
            backup_type: choice.backup_type,
            require_application_consistency: false,
        };
        tracing::info!(run_id = %id, policy_id = %policy.id, vm = %vm.vm_name,
            backup_type = choice.backup_type.as_str(), why = %choice.why, "policy run starts its backup");
        match self.deps().jobs.start_for_policy(req, &policy.id).await {
            Ok(b) => {
                let change = RunChange {
                    backup_id: Some(b.backup_id.clone()),
                    backup_type: Some(b.backup_type),
                    ..Default::default()
                };
                db.update_run(id, &[RunStatus::Running], &change).await?;
                self.publish(id).await;
                Ok(Start::Started)
            }
            Err(e) => {
                let why = sendense_shared::errors::chain(&e);
                let again = matches!(
                    e,
                    JobError::Busy { .. }
                        | JobError::PortsExhausted { .. }
                        | JobError::NodeNotFound { .. }
                        | JobError::Db(_)
                );
                if again {
                    let back = RunChange {
                        status: Some(RunStatus::Queued),
                        reason: Some(Some(with_late_note(r.run.reason.as_deref(), &why))),
                        ..Default::default()
                    };
                    db.update_run(id, &[RunStatus::Running], &back).await?;
                    self.publish(id).await;
                    return Ok(Start::Wait(why));
                }
                self.end(
                    r,
                    RunStatus::Failed,
                    Some(format!("the backup could not start: {why}")),
                )
                .await?;
                Ok(Start::Ended)
            }
        }
    }
}

/// A waiting reason, keeping the note of a late run after it.
fn with_late_note(old: Option<&str>, why: &str) -> String {
    let note = old.and_then(|o| o.find("late: ").map(|i| &o[i..]));
    match note {
        Some(n) => format!("waiting for: {why}; {n}"),
        None => format!("waiting for: {why}"),
    }
}
