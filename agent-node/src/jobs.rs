//! Jobs on the node. Backups: one snapshot of all disks, a parallel copy of every disk into
//! its hub target, progress to the hub about once a second, the completion report, and the
//! release of the snapshot on every path (success, failure, cancel). Restores
//! ([`crate::restore`]) run on the same [`JobContext`]: one task tracker drained on shutdown,
//! one cancel token, one hub client, one tunnel routing.
//!
//! - [`plan`]: validation of a start without I/O ([`plan::validate`] → [`plan::BackupPlan`]).
//! - [`state`]: one job's state and its views (API, progress, completion).
//! - `settle`: the copies' results → each disk's and the job's terminal state, without I/O.
//!
//! Invariants:
//! - at most one non-terminal job per VM (a second start is refused, the same backup id again
//!   is answered with the running job: the hub may retry a start whose answer it lost);
//! - a job that took a snapshot releases it before it reaches a terminal state;
//! - the terminal state is reported to the hub (progress, then completion) with retries until
//!   the hub answers; a 4xx answer ends the retries (the hub does not want it).

pub mod plan;
mod settle;
pub mod state;

use crate::copy::{CopyOptions, ExtentSource, copy_disk};
use crate::hub_client::deliver_end;
use crate::source::{ReleaseOutcome, Snapshot, SnapshotRequest, SourceDriver, SourceError};
use plan::key_list;
pub use plan::{BackupPlan, StartError};
use sendense_shared::api::{
    BackupType, Consistency, ConsistencyLevel, DiskStatus, JobStatus, NodeBackupStart,
};
use sendense_shared::client::HubClient;
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::nbd::NbdAddr;
use settle::{Circumstances, DiskResult};
pub use state::Job;
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Finished jobs kept for `GET /api/v1/backup/{id}`.
const KEEP_FINISHED: usize = 200;
/// How long a cancelled copy may take to stop before it is dropped.
pub(crate) const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// Progress push interval.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What every job of the node (backup or restore) runs on.
pub struct JobContext {
    pub(crate) hub: Option<HubClient>,
    pub(crate) copy_options: CopyOptions,
    /// Every job task; [`Jobs::drain`] waits for all of them.
    pub(crate) tracker: TaskTracker,
    /// The node's shutdown; each job's cancel token is a child of it.
    pub(crate) shutdown: CancellationToken,
    /// With a tunnel, exports on the hub's loopback are reached through its forwards.
    tunnel: OnceLock<Arc<crate::tunnel::Tunnel>>,
}

impl JobContext {
    /// `addr` as this node reaches it: through the tunnel's forward when the tunnel carries the
    /// hub's port (e.g. `127.0.0.1:10100` → `127.0.0.2:10100` with `--tunnel-bind 127.0.0.2`).
    pub fn route(&self, addr: NbdAddr) -> NbdAddr {
        match self.tunnel.get() {
            Some(t) => t.route(addr),
            None => addr,
        }
    }

    pub(crate) fn tunnel(&self) -> Option<&Arc<crate::tunnel::Tunnel>> {
        self.tunnel.get()
    }

    /// Why a job was cancelled, in the words its error message uses.
    pub(crate) fn cancel_cause(&self) -> &'static str {
        if self.shutdown.is_cancelled() {
            "cancelled: the node is shutting down"
        } else {
            "cancelled"
        }
    }
}

/// All backup jobs of this node.
pub struct Jobs {
    driver: Arc<dyn SourceDriver>,
    ctx: Arc<JobContext>,
    jobs: Mutex<VecDeque<Arc<Job>>>,
}

impl Jobs {
    pub fn new(
        driver: Arc<dyn SourceDriver>,
        hub: Option<HubClient>,
        copy_options: CopyOptions,
        shutdown: CancellationToken,
    ) -> Arc<Jobs> {
        Arc::new(Jobs {
            driver,
            ctx: Arc::new(JobContext {
                hub,
                copy_options,
                tracker: TaskTracker::new(),
                shutdown,
                tunnel: OnceLock::new(),
            }),
            jobs: Mutex::new(VecDeque::new()),
        })
    }

    /// Routes NBD targets through `tunnel`'s forwards from now on (set once, at start-up).
    pub fn use_tunnel(&self, tunnel: Arc<crate::tunnel::Tunnel>) {
        let _ = self.ctx.tunnel.set(tunnel);
    }

    /// The context restores share with the backups.
    pub fn context(&self) -> &Arc<JobContext> {
        &self.ctx
    }

    pub fn driver(&self) -> &Arc<dyn SourceDriver> {
        &self.driver
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &BackupId) -> Option<Arc<Job>> {
        self.lock().iter().find(|j| &j.backup_id == id).cloned()
    }

    /// Every job still known (running and recent finished ones).
    pub fn list(&self) -> Vec<Arc<Job>> {
        self.lock().iter().cloned().collect()
    }

    /// Validates a start request and starts the job. `Ok((job, false))` when the same backup
    /// id is already running (an idempotent retry of the hub). The steps: the node's own state
    /// (shutdown, the id), the driver's view of the VM, [`plan::validate`] (pure), the
    /// incremental base (driver), then [`Jobs::apply`].
    pub async fn start(
        self: &Arc<Self>,
        req: NodeBackupStart,
    ) -> Result<(Arc<Job>, bool), StartError> {
        if self.ctx.shutdown.is_cancelled() {
            return Err(StartError::ShuttingDown);
        }
        if req.backup_id.0.trim().is_empty() {
            return Err(StartError::EmptyId);
        }
        if let Some(j) = self.get(&req.backup_id) {
            let status = j.status();
            if !status.is_terminal() && j.vm_name == req.vm_name {
                return Ok((j, false));
            }
            return Err(StartError::DuplicateId {
                backup_id: req.backup_id,
                status: status.as_str(),
            });
        }
        let vm = self.driver.vm(&req.vm_name).await.map_err(|e| match e {
            SourceError::UnknownVm { vm } => StartError::UnknownVm { vm },
            e => StartError::Source(e),
        })?;
        let plan = plan::validate(&req, &vm, |a| self.ctx.route(a))?;
        if plan::needs_base_check(&plan) {
            self.check_base(&plan.request).await?;
        }
        Ok((self.apply(plan)?, true))
    }

    /// `POST /api/v1/backup/check`: would [`Jobs::start`] take this incremental? Only the VM and
    /// the driver's side-effect-free base check: no snapshot, no export, no targets needed (the
    /// hub asks before it prepares any). A full always would.
    pub async fn check(&self, req: &NodeBackupStart) -> Result<(), StartError> {
        if self.ctx.shutdown.is_cancelled() {
            return Err(StartError::ShuttingDown);
        }
        self.driver.vm(&req.vm_name).await.map_err(|e| match e {
            SourceError::UnknownVm { vm } => StartError::UnknownVm { vm },
            e => StartError::Source(e),
        })?;
        if req.backup_type != BackupType::Incremental {
            return Ok(());
        }
        self.check_base(&plan::snapshot_request(req)).await
    }

    async fn check_base(&self, request: &SnapshotRequest) -> Result<(), StartError> {
        self.driver
            .check_incremental_base(request)
            .await
            .map_err(|e| match e {
                e @ SourceError::IncrementalBase { .. } => StartError::BitmapMissing(e),
                e => StartError::Source(e),
            })
    }

    /// Registers a validated plan's job and spawns it on the tracker.
    fn apply(self: &Arc<Self>, plan: BackupPlan) -> Result<Arc<Job>, StartError> {
        let req = &plan.request;
        let job = Arc::new(Job::new(
            req.backup_id.clone(),
            req.vm_name.clone(),
            req.backup_type,
            &plan.disks,
            self.ctx.shutdown.child_token(),
        ));
        {
            // Checked again under the lock: two starts for one VM may race through the awaits.
            let mut jobs = self.lock();
            if let Some(busy) = jobs
                .iter()
                .find(|j| j.vm_name == req.vm_name && !j.status().is_terminal())
            {
                return Err(StartError::VmBusy {
                    vm: req.vm_name.clone(),
                    backup_id: busy.backup_id.clone(),
                });
            }
            if jobs.iter().any(|j| j.backup_id == req.backup_id) {
                return Err(StartError::DuplicateId {
                    backup_id: req.backup_id.clone(),
                    status: "running",
                });
            }
            jobs.push_back(job.clone());
            while jobs.len() > KEEP_FINISHED {
                match jobs.iter().position(|j| j.status().is_terminal()) {
                    Some(i) => {
                        jobs.remove(i);
                    }
                    None => break,
                }
            }
        }
        let this = self.clone();
        let j = job.clone();
        self.ctx
            .tracker
            .spawn(async move { this.run(j, plan).await });
        Ok(job)
    }

    /// Asks a job to stop; it releases its snapshot and ends `cancelled`.
    pub fn cancel(&self, id: &BackupId) -> Option<Arc<Job>> {
        let job = self.get(id)?;
        {
            let mut st = job.lock();
            if !st.status.is_terminal() {
                st.status = JobStatus::Cancelling;
            }
        }
        job.cancel.cancel();
        Some(job)
    }

    /// Waits for every job task to end (after the shutdown token fired they cancel).
    /// Restores run on the same tracker, so this waits for them too.
    pub async fn drain(&self) {
        self.ctx.tracker.close();
        self.ctx.tracker.wait().await;
    }

    async fn run(self: Arc<Self>, job: Arc<Job>, plan: BackupPlan) {
        let BackupPlan {
            targets,
            request,
            checksum_grid,
            target_tls,
            ..
        } = plan;
        let ticker_stop = CancellationToken::new();
        let ticker = tokio::spawn(progress_loop(
            job.clone(),
            self.ctx.hub.clone(),
            ticker_stop.clone(),
        ));
        tracing::info!(backup_id = %job.backup_id, vm = %job.vm_name,
            backup_type = job.backup_type.as_str(), "backup starts");
        let final_status = match self.driver.snapshot(&request).await {
            Err(e) => {
                tracing::warn!(backup_id = %job.backup_id, error = %e, "snapshot failed");
                let mut st = job.lock();
                st.error = Some(format!("snapshot: {e}"));
                if let SourceError::ConsistencyRequired { cause, .. } = &e {
                    st.consistency = Some(Consistency {
                        level: ConsistencyLevel::Crash,
                        reason: cause.clone(),
                        freeze_ms: None,
                    });
                }
                for d in &mut st.disks {
                    d.status = DiskStatus::Failed;
                    d.error = Some(format!("snapshot: {e}"));
                }
                if job.cancel.is_cancelled() {
                    JobStatus::Cancelled
                } else {
                    JobStatus::Failed
                }
            }
            Ok(snapshot) => {
                {
                    let mut st = job.lock();
                    st.consistency = snapshot.consistency.clone();
                    st.hardware = snapshot.hardware.clone();
                }
                let status = self
                    .copy_all(&job, &snapshot, &targets, &target_tls, checksum_grid)
                    .await;
                job.set_status(JobStatus::Finalizing);
                let outcome = if status == JobStatus::Completed {
                    ReleaseOutcome::Success
                } else {
                    ReleaseOutcome::Failure
                };
                if let Err(e) = self.driver.release(&snapshot, outcome).await {
                    // The copy is what the backup is; a release problem is reported, and the
                    // journal makes the next start-up retry it.
                    tracing::error!(backup_id = %job.backup_id, error = %e, "release failed");
                    let mut st = job.lock();
                    let msg = format!("release of the snapshot: {e}");
                    st.error = Some(match st.error.take() {
                        Some(prev) => format!("{prev}; {msg}"),
                        None => msg,
                    });
                }
                status
            }
        };
        job.set_status(final_status);
        ticker_stop.cancel();
        let _ = ticker.await;
        tracing::info!(backup_id = %job.backup_id, status = final_status.as_str(), "backup ends");
        if let Some(hub) = &self.ctx.hub {
            self.report_final(hub, &job).await;
        }
    }

    async fn copy_all(
        &self,
        job: &Arc<Job>,
        snapshot: &Snapshot,
        targets: &[(DiskKey, NbdAddr)],
        target_tls: &std::collections::BTreeMap<DiskKey, sendense_shared::api::NbdTls>,
        checksum_grid: Option<u64>,
    ) -> JobStatus {
        if job.cancel.is_cancelled() {
            job.set_disks(DiskStatus::Cancelled);
            job.lock()
                .error
                .get_or_insert_with(|| "cancelled".to_string());
            return JobStatus::Cancelled;
        }
        // A disk hot-plugged or removed between the start's check and the snapshot: the
        // targets no longer match the VM, and a VM is backed up whole or not at all.
        let snap_keys: BTreeSet<DiskKey> = snapshot.disks.iter().map(|d| d.disk_key).collect();
        let target_keys: BTreeSet<DiskKey> = targets.iter().map(|(k, _)| *k).collect();
        if snap_keys != target_keys {
            let msg = format!(
                "the VM's disks changed before the snapshot: snapshot has {}, targets name {}",
                key_list(&snap_keys.into_iter().collect::<Vec<_>>()),
                key_list(&target_keys.into_iter().collect::<Vec<_>>())
            );
            job.set_disks(DiskStatus::Failed);
            job.lock().error = Some(msg);
            return JobStatus::Failed;
        }
        job.set_status(JobStatus::Running);
        job.set_disks(DiskStatus::Running);
        // One failing disk stops its siblings: the VM is backed up whole or not at all.
        let siblings = job.cancel.child_token();
        let mut copies = Vec::new();
        for sd in &snapshot.disks {
            let Some((_, target)) = targets.iter().find(|(k, _)| *k == sd.disk_key) else {
                continue; // start() checked that every disk has a target
            };
            let source = NbdAddr::Unix {
                path: sd.socket.clone(),
                export: sd.export.clone(),
            };
            // The hypervisor's own list of areas (vSphere CBT) wins over the NBD contexts.
            let extents = match (&sd.areas, &sd.dirty_bitmap) {
                (Some(areas), _) => ExtentSource::Areas(Arc::new(areas.clone())),
                (None, Some(b)) => ExtentSource::DirtyBitmap(b.clone()),
                (None, None) => ExtentSource::Allocation,
            };
            let mut opts = self.ctx.copy_options.clone();
            if self.ctx.tunnel().is_some_and(|t| t.carries(target)) {
                opts.connections = opts.tunnel_connections;
            }
            opts.target_is_zero = job.backup_type == BackupType::Full;
            opts.grid_cell = checksum_grid;
            opts.target_tls = target_tls.get(&sd.disk_key).cloned();
            let counters = job
                .lock()
                .disks
                .iter()
                .find(|d| d.disk_key == sd.disk_key)
                .map(|d| d.counters.clone())
                .unwrap_or_default();
            let token = siblings.clone();
            let key = sd.disk_key;
            let target = target.clone();
            copies.push(async move {
                let copy = copy_disk(&source, &target, extents, &opts, counters, token.clone());
                // The engine stops between requests; a request to a hung target never ends, so
                // after a grace period the copy is dropped (its connections with it), so that
                // the snapshot is released whatever the target does.
                let r = tokio::select! {
                    r = copy => r,
                    _ = async {
                        token.cancelled().await;
                        tokio::time::sleep(CANCEL_GRACE).await;
                    } => {
                        tracing::warn!(disk_key = %key, "copy did not stop within {CANCEL_GRACE:?} of the cancel; dropped");
                        Err(crate::copy::CopyError::Cancelled)
                    }
                };
                if r.is_err() {
                    token.cancel();
                }
                (key, target, r)
            });
        }
        let tunnel = self.ctx.tunnel();
        let results: Vec<DiskResult> = futures_util::future::join_all(copies)
            .await
            .into_iter()
            .map(|(key, target, result)| DiskResult {
                key,
                via_tunnel: tunnel.is_some_and(|t| t.carries(&target)),
                target,
                result,
                change_id: snapshot
                    .disks
                    .iter()
                    .find(|sd| sd.disk_key == key)
                    .and_then(|sd| sd.change_id.clone()),
            })
            .collect();
        // The circumstances that need I/O are gathered first; settle() applies them.
        // A copy through the tunnel that failed: what the tunnel says about it (it may need a
        // moment to notice that ssh died, hence before the job's lock is taken).
        let tunnel_note = match tunnel {
            Some(t) if results.iter().any(|r| r.result.is_err() && r.via_tunnel) => {
                Some(t.explain_failure().await)
            }
            _ => None,
        };
        // A copy that failed because the VM itself was deleted meanwhile (its disks vanish
        // under the reader, which sees only I/O errors): the job says so first.
        let vm_gone = if settle::failed_key(&results).is_some() && !job.cancel.is_cancelled() {
            match self.driver.vm(&job.vm_name).await {
                Err(e @ SourceError::UnknownVm { .. }) => Some(format!(
                    "VM {} no longer exists on its hypervisor (deleted during the backup?): {e}",
                    job.vm_name
                )),
                _ => None,
            }
        } else {
            None
        };
        let circumstances = Circumstances {
            cancelled: job.cancel.is_cancelled().then(|| self.ctx.cancel_cause()),
            tunnel_note,
            vm_gone,
        };
        settle::settle(&job.backup_id, &mut job.lock(), results, circumstances)
    }

    async fn report_final(&self, hub: &HubClient, job: &Arc<Job>) {
        let progress = job.progress();
        let completion = job.completion();
        let id = &job.backup_id;
        let what = format!("backup {id}");
        // Progress first (the final per-disk figures), then the completion.
        if deliver_end(
            &what,
            &self.ctx.shutdown,
            || hub.backup_progress(id, &progress),
            || hub.backup_complete(id, &completion),
        )
        .await
        {
            tracing::info!(backup_id = %id, "completion reported to the hub");
        }
    }
}

async fn progress_loop(job: Arc<Job>, hub: Option<HubClient>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        job.sample();
        if let Some(hub) = &hub {
            // Intermediate progress may be lost; the final state is sent by report_final.
            let report = job.progress();
            tokio::select! {
                r = hub.backup_progress(&job.backup_id, &report) => if let Err(e) = r {
                    tracing::debug!(backup_id = %job.backup_id, error = %sendense_shared::errors::chain(&e), "progress push failed");
                },
                _ = stop.cancelled() => return,
            }
        }
    }
}
