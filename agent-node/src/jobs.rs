//! Backup jobs on the node: one snapshot of all disks, a parallel copy of every disk into its
//! hub target, progress to the hub about once a second, the completion report, and the release
//! of the snapshot on every path (success, failure, cancel).
//!
//! Invariants:
//! - at most one non-terminal job per VM (a second start is refused, the same backup id again
//!   is answered with the running job: the hub may retry a start whose answer it lost);
//! - a job that took a snapshot releases it before it reaches a terminal state;
//! - the terminal state is reported to the hub (progress, then completion) with retries until
//!   the hub answers; a 4xx answer ends the retries (the hub does not want it).

use crate::copy::{CopyOptions, DiskCounters, ExtentSource, copy_disk};
use crate::hub_client::{HubClient, HubError, backoff};
use crate::source::{ReleaseOutcome, Snapshot, SnapshotRequest, SourceDriver, SourceError};
use sendense_shared::api::{
    BackupType, ChunkChecksums, CompletionReport, CompletionStatus, DiskCompletion, DiskProgress,
    DiskStatus, JobStatus, NodeBackupStart, NodeBackupState, NodeDiskState, ProgressReport,
};
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::nbd::NbdAddr;
use sendense_shared::targets::parse_targets;
use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Finished jobs kept for `GET /api/v1/backup/{id}`.
const KEEP_FINISHED: usize = 200;
/// Attempts at the final report once the node is shutting down.
const SHUTDOWN_ATTEMPTS: u32 = 3;
/// How long a cancelled copy may take to stop before it is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(5);
/// Progress push interval.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Why a start was refused.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("unknown VM {vm:?}")]
    UnknownVm { vm: String },
    #[error("backup_id is empty")]
    EmptyId,
    #[error("nbd_targets: {0}")]
    Targets(#[from] sendense_shared::targets::TargetsError),
    #[error("nbd_targets misses disk(s) {} of VM {vm}: a VM is backed up whole", key_list(.missing))]
    MissingDisks { vm: String, missing: Vec<DiskKey> },
    #[error("nbd_targets names disk key(s) {} that VM {vm} does not have", key_list(.unknown))]
    UnknownDisks { vm: String, unknown: Vec<DiskKey> },
    #[error("nbd_targets: {0}")]
    TargetAddr(#[from] sendense_shared::nbd::NbdError),
    #[error("VM {vm} already has a running backup {backup_id}")]
    VmBusy { vm: String, backup_id: BackupId },
    #[error("backup id {backup_id} was already used (status {status})")]
    DuplicateId {
        backup_id: BackupId,
        status: &'static str,
    },
    /// The incremental has no valid changed-block map: do a full backup.
    #[error("{0}")]
    BitmapMissing(SourceError),
    #[error("{0}")]
    Source(SourceError),
    #[error("node is shutting down")]
    ShuttingDown,
}

fn key_list(keys: &[DiskKey]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

struct DiskEntry {
    disk_key: DiskKey,
    size: u64,
    counters: Arc<DiskCounters>,
    status: DiskStatus,
    error: Option<String>,
    /// From the copy outcome, for the hub's verification.
    checksums: Option<ChunkChecksums>,
    /// The snapshot's change id for this disk (vSphere CBT), reported once it is copied.
    change_id: Option<String>,
    /// (time, bytes read) samples of the last few seconds, for the rate.
    samples: VecDeque<(Instant, u64)>,
}

impl DiskEntry {
    fn processed(&self) -> (u64, u64) {
        let c = self.counters.snapshot();
        let transferred = c.bytes_written + c.bytes_zeroed;
        let done = (transferred + c.bytes_skipped).min(self.size);
        (done, transferred)
    }
}

struct JobState {
    status: JobStatus,
    error: Option<String>,
    disks: Vec<DiskEntry>,
}

/// One backup job.
pub struct Job {
    pub backup_id: BackupId,
    pub vm_name: String,
    pub backup_type: BackupType,
    cancel: CancellationToken,
    state: Mutex<JobState>,
}

impl Job {
    fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// The job as `GET /api/v1/backup/{id}` shows it.
    pub fn view(&self) -> NodeBackupState {
        let st = self.lock();
        NodeBackupState {
            backup_id: self.backup_id.clone(),
            vm_name: self.vm_name.clone(),
            backup_type: self.backup_type,
            status: st.status,
            error_message: st.error.clone(),
            disks: st
                .disks
                .iter()
                .map(|d| {
                    let c = d.counters.snapshot();
                    NodeDiskState {
                        disk_key: d.disk_key,
                        status: d.status,
                        bytes_total: d.size,
                        bytes_read: c.bytes_read,
                        bytes_written: c.bytes_written + c.bytes_zeroed,
                        bytes_skipped: c.bytes_skipped,
                        rate_bps: rate(&d.samples),
                        error_message: d.error.clone(),
                    }
                })
                .collect(),
        }
    }

    fn progress(&self) -> ProgressReport {
        let st = self.lock();
        ProgressReport {
            disks: st
                .disks
                .iter()
                .map(|d| {
                    let (done, transferred) = d.processed();
                    DiskProgress {
                        disk_key: d.disk_key,
                        bytes_done: if d.status == DiskStatus::Completed {
                            d.size
                        } else {
                            done
                        },
                        bytes_total: d.size,
                        status: d.status,
                        bytes_transferred: Some(transferred),
                    }
                })
                .collect(),
        }
    }

    fn sample(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        for d in &mut st.disks {
            // The rate is of data moved: skipped holes would make it meaningless.
            let read = d.counters.snapshot().bytes_read;
            d.samples.push_back((now, read));
            while d.samples.len() > 6 {
                d.samples.pop_front();
            }
        }
    }

    fn set_status(&self, status: JobStatus) {
        let mut st = self.lock();
        // Once cancelling, only a terminal state replaces it.
        if st.status == JobStatus::Cancelling && !status.is_terminal() {
            return;
        }
        st.status = status;
    }

    fn set_disks(&self, status: DiskStatus) {
        for d in &mut self.lock().disks {
            d.status = status;
        }
    }
}

fn rate(samples: &VecDeque<(Instant, u64)>) -> u64 {
    match (samples.front(), samples.back()) {
        (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
            ((b1.saturating_sub(*b0)) as f64 / (*t1 - *t0).as_secs_f64()) as u64
        }
        _ => 0,
    }
}

/// All jobs of this node.
pub struct Jobs {
    driver: Arc<dyn SourceDriver>,
    hub: Option<HubClient>,
    copy_options: CopyOptions,
    jobs: Mutex<VecDeque<Arc<Job>>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// With a tunnel, targets on the hub's loopback are reached through its forwards.
    tunnel: std::sync::OnceLock<Arc<crate::tunnel::Tunnel>>,
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
            hub,
            copy_options,
            jobs: Mutex::new(VecDeque::new()),
            tracker: TaskTracker::new(),
            shutdown,
            tunnel: std::sync::OnceLock::new(),
        })
    }

    /// Routes NBD targets through `tunnel`'s forwards from now on (set once, at start-up).
    pub fn use_tunnel(&self, tunnel: Arc<crate::tunnel::Tunnel>) {
        let _ = self.tunnel.set(tunnel);
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
    /// id is already running (an idempotent retry of the hub).
    pub async fn start(
        self: &Arc<Self>,
        req: NodeBackupStart,
    ) -> Result<(Arc<Job>, bool), StartError> {
        if self.shutdown.is_cancelled() {
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
        let targets = parse_targets(&req.nbd_targets)?;
        let vm_keys: BTreeSet<DiskKey> = vm.disks.iter().map(|d| d.disk_key).collect();
        let given: BTreeSet<DiskKey> = targets.iter().map(|t| t.disk_key).collect();
        let unknown: Vec<DiskKey> = given.difference(&vm_keys).copied().collect();
        if !unknown.is_empty() {
            return Err(StartError::UnknownDisks {
                vm: vm.vm_name,
                unknown,
            });
        }
        let missing: Vec<DiskKey> = vm_keys.difference(&given).copied().collect();
        if !missing.is_empty() {
            return Err(StartError::MissingDisks {
                vm: vm.vm_name,
                missing,
            });
        }
        let mut addrs = Vec::new();
        for t in &targets {
            let addr = NbdAddr::parse(&t.uri.to_string())?;
            let addr = match self.tunnel.get() {
                Some(tunnel) => tunnel.route(addr),
                None => addr,
            };
            addrs.push((t.disk_key, addr));
        }
        let request = SnapshotRequest {
            backup_id: req.backup_id.clone(),
            vm_name: req.vm_name.clone(),
            backup_type: req.backup_type,
            previous_backup_id: req.previous_backup_id.clone(),
            previous_change_ids: req
                .previous_change_ids
                .iter()
                .map(|c| (c.disk_key, c.change_id.clone()))
                .collect(),
        };
        if req.backup_type == BackupType::Incremental {
            self.driver
                .check_incremental_base(&request)
                .await
                .map_err(|e| match e {
                    e @ SourceError::IncrementalBase { .. } => StartError::BitmapMissing(e),
                    e => StartError::Source(e),
                })?;
        }
        let job = Arc::new(Job {
            backup_id: req.backup_id.clone(),
            vm_name: req.vm_name.clone(),
            backup_type: req.backup_type,
            cancel: self.shutdown.child_token(),
            state: Mutex::new(JobState {
                status: JobStatus::Preparing,
                error: None,
                disks: vm
                    .disks
                    .iter()
                    .map(|d| DiskEntry {
                        disk_key: d.disk_key,
                        size: d.size_bytes,
                        counters: Arc::new(DiskCounters::default()),
                        status: DiskStatus::Preparing,
                        error: None,
                        checksums: None,
                        change_id: None,
                        samples: VecDeque::new(),
                    })
                    .collect(),
            }),
        });
        {
            // Checked again under the lock: two starts for one VM may race through the awaits.
            let mut jobs = self.lock();
            if let Some(busy) = jobs
                .iter()
                .find(|j| j.vm_name == req.vm_name && !j.status().is_terminal())
            {
                return Err(StartError::VmBusy {
                    vm: req.vm_name,
                    backup_id: busy.backup_id.clone(),
                });
            }
            if jobs.iter().any(|j| j.backup_id == req.backup_id) {
                return Err(StartError::DuplicateId {
                    backup_id: req.backup_id,
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

        self.tracker
            .spawn(async move { this.run(j, addrs, request).await });
        Ok((job, true))
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
    pub async fn drain(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    async fn run(
        self: Arc<Self>,
        job: Arc<Job>,
        targets: Vec<(DiskKey, NbdAddr)>,
        request: SnapshotRequest,
    ) {
        let ticker_stop = CancellationToken::new();
        let ticker = tokio::spawn(progress_loop(
            job.clone(),
            self.hub.clone(),
            ticker_stop.clone(),
        ));
        tracing::info!(backup_id = %job.backup_id, vm = %job.vm_name,
            backup_type = job.backup_type.as_str(), "backup starts");
        let final_status = match self.driver.snapshot(&request).await {
            Err(e) => {
                tracing::warn!(backup_id = %job.backup_id, error = %e, "snapshot failed");
                let mut st = job.lock();
                st.error = Some(format!("snapshot: {e}"));
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
                let status = self.copy_all(&job, &snapshot, &targets).await;
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
        if let Some(hub) = &self.hub {
            self.report_final(hub, &job).await;
        }
    }

    async fn copy_all(
        &self,
        job: &Arc<Job>,
        snapshot: &Snapshot,
        targets: &[(DiskKey, NbdAddr)],
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
            let mut opts = self.copy_options.clone();
            opts.target_is_zero = job.backup_type == BackupType::Full;
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
        let results = futures_util::future::join_all(copies).await;
        let failed_key = results
            .iter()
            .find(|(_, _, r)| matches!(r, Err(e) if !is_cancel(e)))
            .map(|(k, _, _)| *k);
        // A copy through the tunnel that failed: what the tunnel says about it (it may need a
        // moment to notice that ssh died, hence before the job's lock is taken).
        let tunnel_note = match self.tunnel.get() {
            Some(t) if results.iter().any(|(_, tg, r)| r.is_err() && t.carries(tg)) => {
                Some(t.explain_failure().await)
            }
            _ => None,
        };
        // A copy that failed because the VM itself was deleted meanwhile (its disks vanish
        // under the reader, which sees only I/O errors): the job says so first.
        let vm_gone = if failed_key.is_some() && !job.cancel.is_cancelled() {
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
        let mut st = job.lock();
        let mut all_ok = true;
        let mut first_error = None;
        for (key, target, r) in results {
            let Some(d) = st.disks.iter_mut().find(|d| d.disk_key == key) else {
                continue;
            };
            match r {
                Ok(outcome) => {
                    d.status = DiskStatus::Completed;
                    tracing::info!(backup_id = %job.backup_id, disk_key = %key,
                        written = outcome.bytes_written, zeroed = outcome.bytes_zeroed,
                        skipped = outcome.bytes_skipped, elapsed = ?outcome.elapsed, "disk copied");
                    d.checksums = Some(outcome.checksums);
                    d.change_id = snapshot
                        .disks
                        .iter()
                        .find(|sd| sd.disk_key == key)
                        .and_then(|sd| sd.change_id.clone());
                }
                Err(e) => {
                    all_ok = false;
                    if job.cancel.is_cancelled() {
                        d.status = DiskStatus::Cancelled;
                        d.error = Some("cancelled".to_string());
                    } else if Some(key) != failed_key && is_cancel(&e) {
                        d.status = DiskStatus::Cancelled;
                        d.error = Some(format!(
                            "stopped because disk {} failed",
                            failed_key.map(|k| k.to_string()).unwrap_or_default()
                        ));
                    } else {
                        d.status = DiskStatus::Failed;
                        let mut msg = format!("copy to {target}: {}", crate::error_chain(&e));
                        if let Some(note) = tunnel_note
                            .as_ref()
                            .filter(|_| self.tunnel.get().is_some_and(|t| t.carries(&target)))
                        {
                            msg.push_str(&format!(" ({note})"));
                        }
                        first_error.get_or_insert_with(|| format!("disk {key}: {msg}"));
                        d.error = Some(msg);
                    }
                }
            }
        }
        if job.cancel.is_cancelled() {
            let why = if self.shutdown.is_cancelled() {
                "cancelled: the node is shutting down"
            } else {
                "cancelled"
            };
            st.error.get_or_insert_with(|| why.to_string());
            JobStatus::Cancelled
        } else if all_ok {
            JobStatus::Completed
        } else {
            st.error = match (vm_gone, first_error) {
                (Some(gone), Some(first)) => Some(format!("{gone}; {first}")),
                (gone, first) => gone.or(first),
            };
            JobStatus::Failed
        }
    }

    async fn report_final(&self, hub: &HubClient, job: &Arc<Job>) {
        let progress = job.progress();
        let completion = job.completion();
        let id = &job.backup_id;
        let mut attempt = 0;
        // Progress first (the final per-disk figures), then the completion; each retried
        // until the hub takes it, or refuses it with a 4xx, or the node shuts down.
        let mut progress_sent = false;
        loop {
            let r = if progress_sent {
                hub.complete(id, &completion).await
            } else {
                hub.progress(id, &progress).await
            };
            match r {
                Ok(()) if progress_sent => {
                    tracing::info!(backup_id = %id, "completion reported to the hub");
                    return;
                }
                Ok(()) => {
                    progress_sent = true;
                    continue;
                }
                Err(HubError::Status { status, body, .. }) if (400..500).contains(&status) => {
                    tracing::warn!(backup_id = %id, status, body, "hub refused the final report");
                    if progress_sent {
                        return;
                    }
                    progress_sent = true;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(backup_id = %id, error = %e, attempt, "final report failed; retrying");
                }
            }
            // While the node shuts down a few quick attempts still go out (the job was just
            // cancelled by the shutdown, and the hub should hear it), then it gives up.
            if self.shutdown.is_cancelled() && attempt >= SHUTDOWN_ATTEMPTS {
                tracing::error!(backup_id = %id, "shutting down before the hub took the final report");
                return;
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }
}

fn is_cancel(e: &crate::copy::CopyError) -> bool {
    matches!(e, crate::copy::CopyError::Cancelled)
}

impl Job {
    fn completion(&self) -> CompletionReport {
        let st = self.lock();
        CompletionReport {
            status: if st.status == JobStatus::Completed {
                CompletionStatus::Completed
            } else {
                CompletionStatus::Failed
            },
            error_message: st.error.clone(),
            disks: st
                .disks
                .iter()
                .map(|d| DiskCompletion {
                    disk_key: d.disk_key,
                    status: d.status,
                    error_message: d.error.clone(),
                    checksums: d.checksums.clone(),
                    bytes_transferred: Some(d.processed().1),
                    change_id: d.change_id.clone(),
                })
                .collect(),
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
                r = hub.progress(&job.backup_id, &report) => if let Err(e) = r {
                    tracing::debug!(backup_id = %job.backup_id, error = %e, "progress push failed");
                },
                _ = stop.cancelled() => return,
            }
        }
    }
}
