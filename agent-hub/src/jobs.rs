//! Backup jobs: the life of one VM backup on the hub.
//!
//! - [`prepare`]: `POST /backups`: ports, target images and one qemu-nbd per disk, for ALL disks
//!   of the VM or none.
//! - [`finish`]: the one unwinding path (stop qemu-nbd, release ports, delete partial images,
//!   set the terminal status) and the verification after a completion report.
//! - [`finalize`]: after the writer's completion: the whole-disk checksums stored, the writable
//!   exports stopped (exit status checked) and fsynced, the whole chain read back read-only
//!   against the checksums, `qemu-img check`, then the point's integrity.
//! - [`patience`]: database errors while a job ends are waited out, never taken for failure.
//! - [`node`]: calls to the node that owns the VM (the incremental-base check, start, cancel,
//!   the watch of a silent node), through [`crate::node_client::NodeClient`].
//! - [`fallback`]: an incremental the node refuses at start (`bitmap_missing`, a node without
//!   the check) becomes a full backup in place.
//! - `reports`: the writer's progress and completion reports.
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
pub mod finalize;
pub mod finish;
pub mod node;
pub mod patience;
pub mod prepare;
mod reports;

use crate::db::{Db, DbError};
use crate::ports::PortAllocator;
use crate::qemu_nbd::{QemuNbd, QemuNbdConfig};
use sendense_shared::api::{Backup, BackupRequest, HubEvent, JobStatus};
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    #[error(
        "VM {vm:?}: prune job {prune_id} is changing its chain; wait for it to end or cancel it"
    )]
    Pruning { vm: String, prune_id: String },
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
    /// The name the node knows the VM by (see [`sendense_shared::api::Vm::name_on_node`]).
    pub node_vm_name: String,
    pub node: Option<NodeAddr>,
    pub disks: Vec<DiskKey>,
    /// Fired by cancel and shutdown; checked between the steps of preparation and verification.
    pub cancel: CancellationToken,
    /// Fired once [`finish`] has run: watchers stop.
    pub ended: CancellationToken,
    /// When the writer last reported (progress or completion).
    pub last_report: Mutex<std::time::Instant>,
    /// The bytes the writer last reported done over all disks, and since when they are that
    /// (a node that reports but moves nothing is stuck, not working); `None` until a report
    /// shows a disk copying (preparing a snapshot is not a stall).
    pub last_moved: Mutex<Option<(u64, std::time::Instant)>>,
    /// Repository directory and the bytes this job may still write there, for the space check
    /// of jobs that start while it runs.
    pub repository_path: String,
    pub reserved_bytes: u64,
    /// The request asked for an application-consistent point (the node fails the backup
    /// rather than keep a crash-consistent one).
    pub require_application_consistency: bool,
    pub res: tokio::sync::Mutex<Resources>,
}

impl LiveJob {
    pub fn touch(&self) {
        *self.last_report.lock().expect("last_report") = std::time::Instant::now();
    }

    pub fn since_last_report(&self) -> std::time::Duration {
        self.last_report.lock().expect("last_report").elapsed()
    }

    /// Records the writer's total of bytes done; the clock restarts when it changed, and stays
    /// unset while no disk is copying yet (`copying`: some disk reported `running`).
    pub fn moved(&self, total: u64, copying: bool) {
        let mut m = self.last_moved.lock().expect("last_moved");
        if !copying {
            *m = None;
        } else if m.is_none_or(|(was, _)| was != total) {
            *m = Some((total, std::time::Instant::now()));
        }
    }

    /// How long the writer's total of bytes done has stayed the same while copying (zero
    /// before the copy started).
    pub fn since_last_moved(&self) -> std::time::Duration {
        self.last_moved
            .lock()
            .expect("last_moved")
            .map(|(_, at)| at.elapsed())
            .unwrap_or_default()
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
    /// A running job whose writer reports progress but no byte done for this long fails (the
    /// node's own copy watchdog should have failed it earlier: this is the hub's backstop).
    pub job_stall_after: std::time::Duration,
    /// The hub's own read-only reads of an image chain (verification after the copy).
    pub readback: crate::readback::ReadBack,
    /// How long a job's end waits for an unreachable database before it leaves the job to
    /// the reconciler (images kept).
    pub db_patience: std::time::Duration,
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
        prepare::start(self, req, None).await
    }

    /// A backup started by policy `policy_id` (recorded in `backup_jobs.policy_id` as soon
    /// as the job exists); otherwise as [`JobManager::start`].
    pub async fn start_for_policy(
        &self,
        req: BackupRequest,
        policy_id: &str,
    ) -> Result<Backup, JobError> {
        prepare::start(self, req, Some(policy_id)).await
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
