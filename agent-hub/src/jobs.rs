//! Backup jobs: the life of one VM backup on the hub.
//!
//! - [`prepare`]: `POST /backups`: ports, target images and one qemu-nbd per disk, for ALL disks
//!   of the VM or none.
//! - [`finish`]: the one unwinding path (stop qemu-nbd, release ports, delete partial images,
//!   set the terminal status) and the verification after a completion report.
//! - verification reads the written ranges back through the job's qemu-nbd and compares
//!   checksums with [`sendense_shared::nbd::verify`], the routine the node's restores use too.
//! - [`node`]: calls to the node that owns the VM (start, cancel).
//! - [`fallback`]: an incremental the node refuses ("bitmap missing") becomes a full backup.
//!
//! Invariants:
//! - A job's resources (exports, ports, created images) live in one [`Resources`] behind the
//!   job's mutex; every step that adds or removes one holds it, so a cancel, a qemu-nbd death
//!   and a completion report never unwind the same thing twice.
//! - Status moves only by compare-and-set in the database ([`crate::db::Db::transition_backup`]),
//!   so a cancel racing a completion has exactly one winner; the loser unwinds to what the
//!   winner decided.
//! - The terminal status is written after the resources are released: a job seen `failed`,
//!   `cancelled` or `completed` holds no port and no qemu-nbd.
//! - Images of a `failed` or `cancelled` job are deleted (a partial image is never a restore
//!   point); a `completed` job's images stay and become the next incremental's backing files.
//!   Only images this job created are deleted, never a backing file.

pub mod fallback;
pub mod finish;
pub mod node;
pub mod prepare;

use crate::db::{Db, DbError};
use crate::ports::PortAllocator;
use crate::qemu_nbd::{QemuNbd, QemuNbdConfig};
use sendense_shared::api::{
    Backup, BackupRequest, CompletionReport, CompletionStatus, DiskResult, DiskStatus, HubEvent,
    JobStatus, ProgressReport,
};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest change id the database keeps (`backup_disks.change_id`); vSphere's are about 50.
const CHANGE_ID_MAX: usize = 255;

/// A change id is handed back to the hypervisor by the next incremental: it must come back
/// exactly as it was given, so one the database could not store whole is refused.
fn validate_change_id(i: usize, c: &str) -> Result<(), JobError> {
    let why = if c.is_empty() {
        "is empty (leave it out when the disk has none)".to_string()
    } else if c.len() > CHANGE_ID_MAX {
        format!("is {} bytes long, more than {CHANGE_ID_MAX}", c.len())
    } else if c.chars().any(char::is_control) {
        "contains a control character".to_string()
    } else {
        return Ok(());
    };
    Err(JobError::Invalid {
        detail: format!("disks[{i}].change_id {why}"),
    })
}

/// The disk `key` of backup `b` that a writer's report names as `disks[i]`.
fn reported_disk(b: &Backup, i: usize, key: DiskKey) -> Result<&DiskResult, JobError> {
    b.disk_results
        .iter()
        .find(|r| r.disk_key == key)
        .ok_or_else(|| JobError::Invalid {
            detail: format!(
                "disks[{i}].disk_key: {key} is not a disk of backup {}",
                b.backup_id
            ),
        })
}

/// A writer's `disks[i].bytes_transferred` cannot exceed the disk's `bytes_total`.
fn check_transferred(i: usize, written: Option<u64>, bytes_total: u64) -> Result<(), JobError> {
    match written {
        Some(w) if w > bytes_total => Err(JobError::Invalid {
            detail: format!("disks[{i}].bytes_transferred: {w} exceeds bytes_total {bytes_total}"),
        }),
        _ => Ok(()),
    }
}

/// States a job may be cancelled from.
pub const CANCELLABLE: &[JobStatus] = &[
    JobStatus::Pending,
    JobStatus::Preparing,
    JobStatus::Running,
    JobStatus::Finalizing,
];

/// Non-terminal states (the reconciler's and the busy check's view).
pub const ACTIVE: &[JobStatus] = &[
    JobStatus::Pending,
    JobStatus::Preparing,
    JobStatus::Running,
    JobStatus::Finalizing,
    JobStatus::Cancelling,
];

/// Why a job operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("no VM named {vm:?} is registered (GET /api/v1/vms lists them)")]
    VmNotFound { vm: String },
    #[error("no repository with id {id:?} (GET /api/v1/repositories lists them)")]
    RepositoryNotFound { id: String },
    #[error("no backup with id {id}")]
    BackupNotFound { id: BackupId },
    #[error("VM {vm:?} belongs to node {node:?}, which is not registered")]
    NodeNotFound { vm: String, node: String },
    #[error("VM {vm:?} already has an active backup {backup_id} ({status}); cancel it or wait")]
    Busy {
        vm: String,
        backup_id: BackupId,
        status: &'static str,
    },
    #[error("backup {id} is {status}: {what}")]
    WrongState {
        id: BackupId,
        status: &'static str,
        what: String,
    },
    #[error("backup {id} was cancelled while it was being prepared")]
    Cancelled { id: BackupId },
    #[error("{detail}")]
    Invalid { detail: String },
    #[error(
        "repository {path} has {free} bytes free ({reserved} more reserved by running jobs), \
         backup {backup_id} may need {needed} bytes (sum of the disks' virtual sizes); free \
         space or use another repository"
    )]
    InsufficientSpace {
        backup_id: BackupId,
        path: String,
        needed: u64,
        free: u64,
        reserved: u64,
    },
    #[error("backup {backup_id}: {detail}")]
    PortsExhausted { backup_id: BackupId, detail: String },
    #[error("backup {backup_id} failed while {step}: {cause}")]
    Prepare {
        backup_id: BackupId,
        step: &'static str,
        cause: String,
    },
    #[error("database")]
    Db(#[from] DbError),
}

/// What a job holds right now. Everything here is released by [`finish`].
#[derive(Default)]
pub struct Resources {
    /// Ports were allocated (released as a whole by backup id).
    pub ports_held: bool,
    /// Images this job created, by disk.
    pub images: Vec<(DiskKey, PathBuf)>,
    /// Running exports.
    pub exports: Vec<Export>,
    /// [`finish`] ran: nothing more to unwind.
    pub finished: bool,
}

/// One disk's running qemu-nbd.
pub struct Export {
    pub disk_key: DiskKey,
    pub port: NbdPort,
    pub export_name: String,
    pub path: PathBuf,
    pub server: QemuNbd,
}

pub use crate::node_client::NodeAddr;

/// A job this hub process is running.
pub struct LiveJob {
    pub id: BackupId,
    pub vm_name: String,
    pub node: Option<NodeAddr>,
    pub disks: Vec<DiskKey>,
    /// Fired by cancel and shutdown; checked between the steps of preparation and verification.
    pub cancel: CancellationToken,
    /// Fired once [`finish`] has run: watchers stop.
    pub ended: CancellationToken,
    /// When the writer last reported (progress or completion).
    pub last_report: Mutex<std::time::Instant>,
    /// Repository directory and the bytes this job may still write there, for the space check
    /// of jobs that start while it runs.
    pub repository_path: String,
    pub reserved_bytes: u64,
    pub res: tokio::sync::Mutex<Resources>,
}

impl LiveJob {
    pub fn touch(&self) {
        *self.last_report.lock().expect("last_report") = std::time::Instant::now();
    }

    pub fn since_last_report(&self) -> std::time::Duration {
        self.last_report.lock().expect("last_report").elapsed()
    }
}

/// Everything the job manager needs from the hub.
pub struct JobDeps {
    pub db: Db,
    pub ports: Arc<PortAllocator>,
    pub qemu_nbd: QemuNbdConfig,
    /// The job event log (and through it the event stream).
    pub log: crate::events::JobLog,
    /// Every call to a node.
    pub nodes: crate::node_client::NodeClient,
    pub tasks: TaskTracker,
    /// A node job silent this long is checked with its node.
    pub node_watch_interval: std::time::Duration,
    /// A node unreachable this long fails its job.
    pub node_lost_after: std::time::Duration,
}

/// Runs the jobs; cheap to clone.
#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) deps: JobDeps,
    live: Mutex<HashMap<BackupId, Arc<LiveJob>>>,
    /// Serialises the "is the VM busy / is there space" checks with the job's creation, so two
    /// requests at once cannot both pass them.
    pub(crate) admission: tokio::sync::Mutex<()>,
}

pub use crate::events::Level;

impl JobManager {
    pub fn new(deps: JobDeps) -> Self {
        JobManager {
            inner: Arc::new(Inner {
                deps,
                live: Mutex::new(HashMap::new()),
                admission: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub(crate) fn deps(&self) -> &JobDeps {
        &self.inner.deps
    }

    fn live(&self, id: &BackupId) -> Option<Arc<LiveJob>> {
        self.inner.live.lock().expect("live map").get(id).cloned()
    }

    pub(crate) fn insert_live(&self, job: Arc<LiveJob>) {
        self.inner
            .live
            .lock()
            .expect("live map")
            .insert(job.id.clone(), job);
    }

    pub(crate) fn remove_live(&self, id: &BackupId) {
        self.inner.live.lock().expect("live map").remove(id);
    }

    /// Bytes that live jobs may still write into the repository at `path`.
    pub(crate) fn reserved_in(&self, path: &str) -> u64 {
        self.inner
            .live
            .lock()
            .expect("live map")
            .values()
            .filter(|j| j.repository_path == path)
            .map(|j| j.reserved_bytes)
            .sum()
    }

    /// One backup, or [`JobError::BackupNotFound`].
    pub async fn get(&self, id: &BackupId) -> Result<Backup, JobError> {
        match self.deps().db.get_backup(id).await {
            Ok(b) => Ok(b),
            Err(DbError::NotFound { .. }) => Err(JobError::BackupNotFound { id: id.clone() }),
            Err(e) => Err(e.into()),
        }
    }

    /// `POST /api/v1/backups`; see [`prepare`].
    pub async fn start(&self, req: BackupRequest) -> Result<Backup, JobError> {
        prepare::start(self, req).await
    }

    /// Appends a job event (database + event stream + log). A failure to record is logged and
    /// otherwise ignored: losing a log line must not fail a backup.
    pub async fn event(
        &self,
        id: &BackupId,
        level: Level,
        step: &str,
        message: impl Into<String>,
        disk: Option<DiskKey>,
    ) {
        self.deps()
            .log
            .record(id, None, level, step, &message.into(), disk)
            .await;
    }

    /// Publishes the job's current state on the event stream.
    pub async fn publish(&self, id: &BackupId) {
        match self.deps().db.get_backup(id).await {
            Ok(b) => self
                .deps()
                .log
                .bus()
                .publish(HubEvent::Backup { backup: b }),
            Err(e) => tracing::warn!(backup_id = %id, error = %e, "cannot publish job state"),
        }
    }

    pub async fn publish_ports(&self) {
        if let Ok(p) = self.deps().ports.view().await {
            self.deps().log.bus().publish(HubEvent::Ports { ports: p });
        }
    }

    pub async fn publish_processes(&self) {
        if let Ok(p) = self.deps().db.list_processes().await {
            self.deps()
                .log
                .bus()
                .publish(HubEvent::Processes { processes: p });
        }
    }

    /// Moves the job to `cancelling`, stops its writer (node) and unwinds in the background;
    /// answers the job as it is after the move.
    pub async fn cancel(&self, id: &BackupId) -> Result<Backup, JobError> {
        let b = self.get(id).await?;
        if b.status == JobStatus::Cancelling {
            return Ok(b);
        }
        if b.status.is_terminal() {
            return Err(JobError::WrongState {
                id: id.clone(),
                status: b.status.as_str(),
                what: "a finished job cannot be cancelled".into(),
            });
        }
        let db = &self.deps().db;
        if !db
            .transition_backup(id, CANCELLABLE, JobStatus::Cancelling, None)
            .await?
        {
            // Lost a race against another transition: answer what won.
            let now = self.get(id).await?;
            if now.status == JobStatus::Cancelling {
                return Ok(now);
            }
            return Err(JobError::WrongState {
                id: id.clone(),
                status: now.status.as_str(),
                what: "the job ended before the cancel took effect".into(),
            });
        }
        self.event(
            id,
            Level::Warn,
            "cancel_requested",
            format!("cancel requested while the job was {}", b.status.as_str()),
            None,
        )
        .await;
        self.publish(id).await;
        match self.live(id) {
            Some(job) => {
                job.cancel.cancel();
                let me = self.clone();
                self.deps().tasks.spawn(async move {
                    if let Some(n) = &job.node {
                        node::forward_cancel(&me, &job.id, n).await;
                    }
                    let mut res = job.res.lock().await;
                    finish::finish(&me, &job, &mut res, finish::Outcome::Cancelled).await;
                });
            }
            None => {
                // Nothing of it runs in this process (e.g. left `pending` by a crash that the
                // reconciler has not seen): there is nothing to unwind here.
                db.transition_backup(id, &[JobStatus::Cancelling], JobStatus::Cancelled, None)
                    .await?;
                self.event(
                    id,
                    Level::Warn,
                    "cancelled",
                    "no live resources in this hub process; marked cancelled",
                    None,
                )
                .await;
                self.publish(id).await;
            }
        }
        self.get(id).await
    }

    /// A writer's report the database did not take becomes an event naming the database's own
    /// cause (kept by the event log until the database answers again); the writer gets the
    /// error and retries.
    async fn note_db_failure<T>(
        &self,
        id: &BackupId,
        what: &str,
        r: Result<T, JobError>,
    ) -> Result<T, JobError> {
        let Err(JobError::Db(e)) = r else {
            return r;
        };
        let e = self.deps().db.diagnose(e).await;
        self.event(
            id,
            Level::Error,
            "database_error",
            format!(
                "{what} not recorded, the writer will retry: {}",
                sendense_shared::errors::chain(&e)
            ),
            None,
        )
        .await;
        Err(JobError::Db(e))
    }

    /// A writer's progress: bytes and per-disk status.
    pub async fn progress(
        &self,
        id: &BackupId,
        report: ProgressReport,
    ) -> Result<Backup, JobError> {
        let r = self.record_progress(id, report).await;
        self.note_db_failure(id, "progress report", r).await
    }

    async fn record_progress(
        &self,
        id: &BackupId,
        report: ProgressReport,
    ) -> Result<Backup, JobError> {
        let b = self.get(id).await?;
        // A report overtaken by the completion report is stale, not an error: the writer must
        // not read "stop writing" into it.
        if matches!(b.status, JobStatus::Finalizing | JobStatus::Completed) {
            return Ok(b);
        }
        if b.status != JobStatus::Running {
            return Err(JobError::WrongState {
                id: id.clone(),
                status: b.status.as_str(),
                what: "progress is accepted only while the job is running; stop writing".into(),
            });
        }
        if let Some(job) = self.live(id) {
            job.touch();
        }
        let mut reported = Vec::with_capacity(report.disks.len());
        for (i, d) in report.disks.iter().enumerate() {
            let cur = reported_disk(&b, i, d.disk_key)?;
            if d.bytes_done > d.bytes_total {
                return Err(JobError::Invalid {
                    detail: format!(
                        "disks[{i}].bytes_done: {} exceeds bytes_total {}",
                        d.bytes_done, d.bytes_total
                    ),
                });
            }
            check_transferred(i, d.bytes_transferred, d.bytes_total)?;
            reported.push((d, cur));
        }
        for (d, cur) in reported {
            // A disk the hub already failed (its qemu-nbd died) keeps that verdict.
            let status = if cur.status == DiskStatus::Failed {
                None
            } else {
                Some(d.status)
            };
            self.deps()
                .db
                .update_disk(
                    id,
                    d.disk_key,
                    &crate::db::DiskUpdate {
                        status,
                        bytes_done: Some(d.bytes_done),
                        bytes_total: Some(d.bytes_total),
                        bytes_transferred: d.bytes_transferred,
                        ..Default::default()
                    },
                )
                .await?;
            if status.is_some() && cur.status != d.status {
                self.event(
                    id,
                    Level::Info,
                    "disk_status",
                    format!(
                        "disk {}: {} -> {} ({} of {} bytes)",
                        d.disk_key,
                        cur.status.as_str(),
                        d.status.as_str(),
                        d.bytes_done,
                        d.bytes_total
                    ),
                    Some(d.disk_key),
                )
                .await;
            }
        }
        let b = self.get(id).await?;
        self.deps()
            .log
            .bus()
            .publish(HubEvent::Backup { backup: b.clone() });
        Ok(b)
    }

    /// The writer says it is done. `failed` unwinds at once; `completed` moves to `finalizing`
    /// and verifies in the background (see [`finish::finalize`]).
    pub async fn complete(
        &self,
        id: &BackupId,
        report: CompletionReport,
    ) -> Result<Backup, JobError> {
        let r = self.record_completion(id, report).await;
        self.note_db_failure(id, "completion report", r).await
    }

    async fn record_completion(
        &self,
        id: &BackupId,
        report: CompletionReport,
    ) -> Result<Backup, JobError> {
        let b = self.get(id).await?;
        // A repeated `completed` report (a writer retrying after a timeout) gets the same answer.
        if report.status == CompletionStatus::Completed
            && matches!(b.status, JobStatus::Finalizing | JobStatus::Completed)
        {
            return Ok(b);
        }
        if b.status != JobStatus::Running {
            return Err(JobError::WrongState {
                id: id.clone(),
                status: b.status.as_str(),
                what: "a completion report is accepted only while the job is running".into(),
            });
        }
        for (i, d) in report.disks.iter().enumerate() {
            let cur = reported_disk(&b, i, d.disk_key)?;
            check_transferred(i, d.bytes_transferred, cur.bytes_total)?;
            if let Some(c) = &d.change_id {
                validate_change_id(i, c)?;
            }
            if let Some(c) = &d.checksums
                && (c.chunk_size == 0 || c.ranges.iter().any(|r| r.length == 0))
            {
                return Err(JobError::Invalid {
                    detail: format!("disks[{i}].checksums: chunk_size and lengths must be > 0"),
                });
            }
        }
        if report.status == CompletionStatus::Completed {
            if let Some(missing) = b
                .disk_results
                .iter()
                .find(|r| !report.disks.iter().any(|d| d.disk_key == r.disk_key))
            {
                return Err(JobError::Invalid {
                    detail: format!(
                        "disks: disk {} of backup {id} is missing from a completed report \
                         (a VM is backed up as one unit)",
                        missing.disk_key
                    ),
                });
            }
            if let Some(d) = report
                .disks
                .iter()
                .find(|d| d.status != DiskStatus::Completed)
            {
                return Err(JobError::Invalid {
                    detail: format!(
                        "disks: disk {} is {} in a report whose status is completed",
                        d.disk_key,
                        d.status.as_str()
                    ),
                });
            }
        }
        let Some(job) = self.live(id) else {
            return Err(JobError::WrongState {
                id: id.clone(),
                status: b.status.as_str(),
                what: "this hub process holds no exports for it".into(),
            });
        };
        job.touch();
        match report.status {
            CompletionStatus::Failed => {
                let cause = report
                    .error_message
                    .clone()
                    .or_else(|| {
                        report.disks.iter().find_map(|d| {
                            d.error_message
                                .as_ref()
                                .map(|m| format!("disk {}: {m}", d.disk_key))
                        })
                    })
                    .unwrap_or_else(|| "the writer reported failure without a message".into());
                let me = self.clone();
                let handle = self.deps().tasks.spawn(async move {
                    // Under the job's lock, and only if nothing ended the job meanwhile: the
                    // hub's own diagnosis of a disk (its qemu-nbd died, with stderr) is the root
                    // cause; the writer's view of it ("connection closed") does not replace it.
                    let mut res = job.res.lock().await;
                    if res.finished {
                        return;
                    }
                    let id = &job.id;
                    if let Ok(now) = me.get(id).await {
                        for d in &report.disks {
                            let diagnosed = now.disk_results.iter().any(|r| {
                                r.disk_key == d.disk_key
                                    && r.status == DiskStatus::Failed
                                    && r.error_message.is_some()
                            });
                            if diagnosed
                                || !(d.status == DiskStatus::Failed || d.error_message.is_some())
                            {
                                continue;
                            }
                            let upd = crate::db::DiskUpdate {
                                status: Some(DiskStatus::Failed),
                                error_message: Some(d.error_message.clone()),
                                ..Default::default()
                            };
                            if let Err(e) = me.deps().db.update_disk(id, d.disk_key, &upd).await {
                                tracing::error!(backup_id = %id, error = %e, "cannot record disk failure");
                            }
                        }
                    }
                    me.event(
                        id,
                        Level::Error,
                        "writer_failed",
                        format!("the writer reported failure: {cause}"),
                        None,
                    )
                    .await;
                    finish::finish(
                        &me,
                        &job,
                        &mut res,
                        finish::Outcome::Failed(format!("writer reported failure: {cause}")),
                    )
                    .await;
                });
                let _ = handle.await;
            }
            CompletionStatus::Completed => {
                for d in &report.disks {
                    // Kept with the backup: the next incremental asks the hypervisor for the
                    // blocks changed since this change id. Stored before the move to
                    // `finalizing`, so that a database error leaves the job running for the
                    // writer to retry rather than finalizing without a verifier; on a job that
                    // then loses a race (cancelled) they are harmless: only completed backups
                    // are built on.
                    self.deps()
                        .db
                        .update_disk(
                            id,
                            d.disk_key,
                            &crate::db::DiskUpdate {
                                bytes_transferred: d.bytes_transferred,
                                change_id: d.change_id.clone(),
                                ..Default::default()
                            },
                        )
                        .await?;
                    if let Some(c) = &d.change_id {
                        self.event(
                            id,
                            Level::Info,
                            "change_id",
                            format!(
                                "disk {}: copied at change id {c}{}",
                                d.disk_key,
                                d.bytes_transferred
                                    .map(|w| format!(", {w} bytes written"))
                                    .unwrap_or_default()
                            ),
                            Some(d.disk_key),
                        )
                        .await;
                    }
                }
                if !self
                    .deps()
                    .db
                    .transition_backup(id, &[JobStatus::Running], JobStatus::Finalizing, None)
                    .await?
                {
                    let now = self.get(id).await?;
                    return Err(JobError::WrongState {
                        id: id.clone(),
                        status: now.status.as_str(),
                        what: "the job changed state before the completion report".into(),
                    });
                }
                let ranges: usize = report
                    .disks
                    .iter()
                    .filter_map(|d| d.checksums.as_ref().map(|c| c.ranges.len()))
                    .sum();
                self.event(
                    id,
                    Level::Info,
                    "finalizing",
                    format!(
                        "writer reported completion of {} disk(s) with {ranges} checksum range(s); \
                         verifying",
                        report.disks.len()
                    ),
                    None,
                )
                .await;
                self.publish(id).await;
                let me = self.clone();
                self.deps().tasks.spawn(async move {
                    finish::finalize(&me, job, report).await;
                });
            }
        }
        self.get(id).await
    }

    /// Fails every live job (the hub is stopping): their qemu-nbd stop, ports are released,
    /// partial images deleted.
    pub async fn shutdown(&self, reason: &str) {
        let jobs: Vec<Arc<LiveJob>> = self
            .inner
            .live
            .lock()
            .expect("live map")
            .values()
            .cloned()
            .collect();
        for job in jobs {
            job.cancel.cancel();
            let mut res = job.res.lock().await;
            finish::finish(
                self,
                &job,
                &mut res,
                finish::Outcome::Failed(reason.to_string()),
            )
            .await;
        }
    }
}
