//! Instant recoveries (issue 15): a backup point booted at once as a new QEMU VM on a node.
//! The hub serves every chosen disk's chain read-only over NBD; the node starts QEMU on local
//! overlays backed by those exports and pulls every block home while the guest runs.
//!
//! A recovery is a job like a restore ([`crate::restores`]): rows in `recovery_jobs` and
//! `recovery_disks` whose status moves only by compare-and-set, events in the point's log
//! (tagged with the recovery's id), reports pushed by the node, cancel, one unwinding path
//! ([`Recoveries`]'s `finish`), the start-up reconciler and shutdown draining.
//!
//! `POST /api/v1/recoveries` ([`sendense_shared::api::RecoveryRequest`]):
//! 1. the point must be readable as a restore's ([`crate::restores::unreadable`]), its images
//!    on disk, the node registered, `vm_name` of the contract's pattern and not the name of
//!    another active recovery on that node, `disks` a subset of the point's without
//!    duplicates; no prune job may be changing the VM's chain (and prune waits for an active
//!    recovery of the VM, as for a restore);
//! 2. the VM's configuration: each request field over the point's recorded hardware
//!    (`Backup::hardware`) over the defaults (512 MiB, 1 vCPU);
//! 3. per disk one NBD port (recorded under the point's id, so `GET /api/v1/ports` shows which
//!    point is served) and one `qemu-nbd --read-only` of the disk's image with the recovery's
//!    TLS identity ([`crate::nbd_ca::recovery_identity`]), recorded like a backup's; then
//!    `running`, then `POST /api/v1/recovery/start` of the node, whose first state is the
//!    answer's;
//! 4. while it runs, each export is supervised ([`exports`]): a qemu-nbd that exits is started
//!    again on the same port or socket, with the same export name and identity (the node's
//!    QEMU reconnects by itself), a bounded number of times in a row, then the recovery fails
//!    naming the disk and the cause;
//! 5. the node pushes its state about once a second and its end once; a node silent for the
//!    watch interval is asked (`GET /api/v1/recovery/{id}`), one unreachable for
//!    `node_lost_after` fails it ([`node`]);
//! 6. the end, whatever caused it: every qemu-nbd stopped, every port released, then the
//!    terminal status ([`finish`]): a recovery seen `completed`, `failed` or `cancelled` holds
//!    nothing on the hub. `completed` means every disk is home and the VM no longer references
//!    the hub: it keeps running on the node.
//!
//! - `request`: the checks of a request and the VM's configuration.
//! - [`exports`]: the exports and their supervision.
//! - [`node`]: the node's side: start, watch, cancel.
//! - `reports`: the node's progress and end.
//! - [`finish`]: the one unwinding path, the shutdown drain, the reconciler's leftovers.

use crate::db::{Db, DbError};
use crate::events::{JobLog, Level};
use crate::node_client::{NodeAddr, NodeCallError, NodeClient};
use crate::ports::{PortAllocator, PortError};
use crate::qemu_nbd::{QemuNbd, QemuNbdConfig, QemuNbdError};
use sendense_shared::api::{
    HubEvent, JobEvent, JobStatus, NodeRecoveryStart, Recovery, RecoveryDisk, RecoveryRequest,
};
use sendense_shared::errors::chain;
use sendense_shared::ids::{BackupId, DiskKey, NbdPort};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub mod exports;
pub mod finish;
pub mod node;
mod reports;
mod request;
mod resume;

/// States a recovery may be cancelled from.
const CANCELLABLE: &[JobStatus] = &[JobStatus::Preparing, JobStatus::Running];

/// Non-terminal states (the reconciler's, the admission's and prune's view).
pub const ACTIVE: &[JobStatus] = &[
    JobStatus::Pending,
    JobStatus::Preparing,
    JobStatus::Running,
    JobStatus::Cancelling,
];

/// Why a recovery operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// A field of the request or report; `detail` starts with the field's name.
    #[error("{detail}")]
    Invalid { detail: String },
    #[error("no backup with id {id}")]
    BackupNotFound { id: BackupId },
    #[error("no node named {node:?} is registered (GET /api/v1/nodes lists them)")]
    NodeNotFound { node: String },
    #[error("no recovery with id {id}")]
    NotFound { id: String },
    /// Not completed, or its integrity forbids reading it; `reason` says which.
    #[error("backup {id} {reason}")]
    NotRecoverable { id: BackupId, reason: String },
    #[error(
        "vm_name: node {node} runs VM {vm_name:?} of recovery {recovery_id} already; choose \
         another name or cancel that recovery"
    )]
    VmNameTaken {
        node: String,
        vm_name: String,
        recovery_id: String,
    },
    #[error("backup {id}: prune job {prune_id} is changing its VM's chain; wait for it to end")]
    Pruning { id: BackupId, prune_id: String },
    #[error("image {path} of backup {id} is missing")]
    ImageMissing { id: BackupId, path: String },
    #[error("recovery {id} is {status}: {what}")]
    WrongState {
        id: String,
        status: &'static str,
        what: &'static str,
    },
    #[error("recovery {id}: allocating NBD ports")]
    Ports {
        id: String,
        #[source]
        source: Box<PortError>,
    },
    #[error("recovery {id}: serving disk {disk} failed")]
    Export {
        id: String,
        disk: DiskKey,
        #[source]
        source: Box<QemuNbdError>,
    },
    #[error("recovery {id}: the node did not change the streams' speed")]
    NodeSpeed {
        id: String,
        #[source]
        source: Box<NodeCallError>,
    },
    #[error("recovery {id}: the node did not start the VM")]
    NodeRefused {
        id: String,
        #[source]
        source: Box<NodeCallError>,
    },
    /// A bug (the start task panicked); logged, answered vaguely.
    #[error("{detail}")]
    Internal { detail: String },
    #[error("recovery {id}: {doing}")]
    Db {
        id: String,
        doing: &'static str,
        #[source]
        source: Box<DbError>,
    },
}

/// Everything the recovery service needs, given by the hub's wiring.
pub struct RecoveryDeps {
    pub db: Db,
    pub ports: Arc<PortAllocator>,
    pub qemu_nbd: QemuNbdConfig,
    pub log: JobLog,
    pub nodes: NodeClient,
    pub tasks: TaskTracker,
    /// A node silent this long is asked about the recovery.
    pub node_watch_interval: Duration,
    /// A node unreachable this long fails the recovery.
    pub node_lost_after: Duration,
    /// How a lost export is started again.
    pub restarts: exports::RestartPolicy,
}

/// How a recovery ends, as its finisher sees it.
#[derive(Debug, Clone)]
enum Outcome {
    /// Every disk home on the node.
    Completed,
    /// With the cause, which becomes the recovery's `error_message`.
    Failed(String),
    /// A cancel from the API, confirmed (or not answered) by the node.
    Cancelled,
}

/// One disk's export while the recovery holds it.
struct Export {
    disk: DiskKey,
    port: NbdPort,
    server: QemuNbd,
}

/// What a live recovery holds on the hub; released only by `finish`.
#[derive(Default)]
struct Held {
    exports: Vec<Export>,
    ports: Vec<NbdPort>,
    finished: bool,
}

impl Held {
    fn export_mut(&mut self, disk: DiskKey) -> Option<&mut Export> {
        self.exports.iter_mut().find(|e| e.disk == disk)
    }
}

/// A recovery this hub process is running.
struct LiveRecovery {
    id: String,
    backup_id: BackupId,
    node: NodeAddr,
    vm_name: String,
    /// When the request came (the time to a running VM is measured from it).
    requested: Instant,
    /// Fired once `finish` has run: the watcher and the supervisors stop.
    ended: CancellationToken,
    last_report: Mutex<Instant>,
    /// A report came from the node (the start's answer is then older than what is recorded).
    reported: std::sync::atomic::AtomicBool,
    /// Serialises the node's reports, so a stall is announced once.
    reports: tokio::sync::Mutex<()>,
    held: tokio::sync::Mutex<Held>,
}

impl LiveRecovery {
    fn touch(&self) {
        *self.last_report.lock().expect("last_report") = Instant::now();
    }

    fn since_last_report(&self) -> Duration {
        self.last_report.lock().expect("last_report").elapsed()
    }
}

struct Inner {
    deps: RecoveryDeps,
    live: Mutex<HashMap<String, Arc<LiveRecovery>>>,
    /// Serialises the busy checks with the recovery's creation.
    admission: tokio::sync::Mutex<()>,
}

/// The recovery service; cheap to clone.
#[derive(Clone)]
pub struct Recoveries {
    inner: Arc<Inner>,
}

impl Recoveries {
    pub fn new(deps: RecoveryDeps) -> Self {
        Recoveries {
            inner: Arc::new(Inner {
                deps,
                live: Mutex::new(HashMap::new()),
                admission: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn deps(&self) -> &RecoveryDeps {
        &self.inner.deps
    }

    fn live(&self, id: &str) -> Option<Arc<LiveRecovery>> {
        self.inner.live.lock().expect("live map").get(id).cloned()
    }

    fn db_err(id: &str, doing: &'static str) -> impl FnOnce(DbError) -> RecoveryError {
        let id = id.to_string();
        move |source| RecoveryError::Db {
            id,
            doing,
            source: Box::new(source),
        }
    }

    /// One recovery, or [`RecoveryError::NotFound`].
    pub async fn get(&self, id: &str) -> Result<Recovery, RecoveryError> {
        match self.deps().db.get_recovery(id).await {
            Ok(r) => Ok(r),
            Err(DbError::NotFound { .. }) => Err(RecoveryError::NotFound { id: id.to_string() }),
            Err(e) => Err(Self::db_err(id, "reading the recovery")(e)),
        }
    }

    /// Newest first.
    pub async fn list(&self) -> Result<Vec<Recovery>, RecoveryError> {
        self.deps()
            .db
            .list_recoveries()
            .await
            .map_err(Self::db_err("*", "listing recoveries"))
    }

    /// The recovery's own events, oldest first.
    pub async fn events(&self, id: &str) -> Result<Vec<JobEvent>, RecoveryError> {
        self.get(id).await?;
        self.deps()
            .db
            .list_job_events(id)
            .await
            .map_err(Self::db_err(id, "reading the recovery's events"))
    }

    async fn event(
        &self,
        r: &LiveRecovery,
        level: Level,
        step: &str,
        msg: String,
        disk: Option<DiskKey>,
    ) {
        self.deps()
            .log
            .record(&r.backup_id, Some(&r.id), level, step, &msg, disk)
            .await;
    }

    /// The recovery as it is now, on the event stream ([`HubEvent::Recovery`]).
    pub(crate) async fn publish(&self, id: &str) {
        match self.deps().db.get_recovery(id).await {
            Ok(r) => self
                .deps()
                .log
                .bus()
                .publish(HubEvent::Recovery { recovery: r }),
            Err(e) => tracing::warn!(recovery_id = id, error = %e, "cannot publish a recovery"),
        }
    }

    async fn publish_resources(&self) {
        if let Ok(p) = self.deps().ports.view().await {
            self.deps().log.bus().publish(HubEvent::Ports { ports: p });
        }
        if let Ok(p) = self.deps().db.list_processes().await {
            self.deps()
                .log
                .bus()
                .publish(HubEvent::Processes { processes: p });
        }
    }

    /// Checks the request, exports every chosen disk and asks the node to start the VM;
    /// answers the recovery `running` with the node's first state (or the refusal).
    pub async fn start(&self, req: RecoveryRequest) -> Result<Recovery, RecoveryError> {
        let db = &self.deps().db;
        request::check_fields(&req)?;
        let backup = match db.get_backup(&req.backup_id).await {
            Ok(b) => b,
            Err(DbError::NotFound { .. }) => {
                return Err(RecoveryError::BackupNotFound { id: req.backup_id });
            }
            Err(e) => return Err(Self::db_err("-", "reading the backup point")(e)),
        };
        if let Some(reason) = crate::restores::unreadable(&backup) {
            return Err(RecoveryError::NotRecoverable {
                id: backup.backup_id,
                reason,
            });
        }
        let plan = request::plan(&backup, &req)?;
        if let Some(d) = plan
            .disks
            .iter()
            .find(|d| !Path::new(&d.qcow2_path).is_file())
        {
            return Err(RecoveryError::ImageMissing {
                id: backup.backup_id.clone(),
                path: d.qcow2_path.clone(),
            });
        }
        let node = match db.get_node(&req.node).await {
            Ok(n) => NodeAddr::from(&n),
            Err(DbError::NotFound { .. }) => {
                return Err(RecoveryError::NodeNotFound { node: req.node });
            }
            Err(e) => return Err(Self::db_err("-", "reading the node")(e)),
        };
        let id = uuid::Uuid::new_v4().to_string();
        let row = Recovery {
            recovery_id: id.clone(),
            backup_id: backup.backup_id.clone(),
            source_vm: backup.vm_name.clone(),
            node: node.name.clone(),
            vm_name: req.vm_name.clone(),
            status: JobStatus::Preparing,
            disks: plan
                .disks
                .iter()
                .map(|d| RecoveryDisk {
                    disk_key: d.disk_key,
                    source_qcow2: d.qcow2_path.clone(),
                    nbd_port: None,
                    nbd_export_name: format!("recovery-{}-{}", &id[..8], d.disk_key),
                    qemu_nbd_pid: None,
                    overlay: None,
                    bytes_done: 0,
                    bytes_total: d.bytes_total,
                    rate_bps: 0,
                    stream: "pending".into(),
                })
                .collect(),
            vm_state: None,
            qemu_pid: None,
            qmp_socket: None,
            serial_log: None,
            stalled: None,
            created_at: db.clock().now(),
            vm_started_at: None,
            completed_at: None,
            error_message: None,
        };
        self.admit(&row).await?;
        let live = Arc::new(LiveRecovery {
            id: id.clone(),
            backup_id: backup.backup_id.clone(),
            node,
            vm_name: req.vm_name.clone(),
            requested: Instant::now(),
            ended: CancellationToken::new(),
            last_report: Mutex::new(Instant::now()),
            reported: std::sync::atomic::AtomicBool::new(false),
            reports: tokio::sync::Mutex::new(()),
            held: tokio::sync::Mutex::new(Held::default()),
        });
        self.inner
            .live
            .lock()
            .expect("live map")
            .insert(id.clone(), live.clone());
        let disks: Vec<String> = row
            .disks
            .iter()
            .map(|d| format!("{} ({})", d.disk_key, d.source_qcow2))
            .collect();
        self.event(
            &live,
            Level::Info,
            "recovery_created",
            format!(
                "recovery {id} of point {} (VM {}) requested: VM {} on node {} with disk(s) {}; \
                 {}",
                row.backup_id,
                row.source_vm,
                row.vm_name,
                row.node,
                disks.join(", "),
                plan.describe()
            ),
            None,
        )
        .await;
        // The rest runs in its own task: a client that hangs up must not drop the recovery
        // half-way (exports started, nobody watching them).
        let me = self.clone();
        let launched = self
            .deps()
            .tasks
            .spawn(async move { me.launch(live, row, plan).await })
            .await;
        match launched {
            Ok(r) => r,
            Err(e) => Err(RecoveryError::Internal {
                detail: format!("recovery {id}: its start panicked ({e})"),
            }),
        }
    }

    /// The busy checks and the rows in one step: two requests cannot both pass.
    async fn admit(&self, row: &Recovery) -> Result<(), RecoveryError> {
        let db = &self.deps().db;
        let id = &row.recovery_id;
        let _admission = self.inner.admission.lock().await;
        if let Some(prune_id) = db
            .active_prune_of_vm(&row.source_vm)
            .await
            .map_err(Self::db_err(id, "checking for a running prune"))?
        {
            return Err(RecoveryError::Pruning {
                id: row.backup_id.clone(),
                prune_id,
            });
        }
        let active = db
            .list_recoveries_in(ACTIVE)
            .await
            .map_err(Self::db_err(id, "checking for running recoveries"))?;
        if let Some(busy) = active
            .iter()
            .find(|r| r.node == row.node && r.vm_name == row.vm_name)
        {
            return Err(RecoveryError::VmNameTaken {
                node: row.node.clone(),
                vm_name: row.vm_name.clone(),
                recovery_id: busy.recovery_id.clone(),
            });
        }
        db.create_recovery(row)
            .await
            .map_err(Self::db_err(id, "storing the recovery"))
    }

    /// Exports, then the node; any failure unwinds through `finish`.
    async fn launch(
        &self,
        live: Arc<LiveRecovery>,
        row: Recovery,
        plan: request::Plan,
    ) -> Result<Recovery, RecoveryError> {
        let mut held = live.held.lock().await;
        let disks = match self.export(&live, &mut held, &row).await {
            Ok(d) => d,
            Err(e) => {
                // A cancel that came while the exports were prepared wins: the recovery ends
                // `cancelled`, not `failed`.
                let outcome = match &e {
                    RecoveryError::WrongState { .. } => Outcome::Cancelled,
                    e => Outcome::Failed(chain(e)),
                };
                self.finish(&live, &mut held, outcome).await;
                return Err(e);
            }
        };
        drop(held);
        let keys: Vec<DiskKey> = row.disks.iter().map(|d| d.disk_key).collect();
        self.supervise_exports(&live, &keys);
        let body = NodeRecoveryStart {
            recovery_id: live.id.clone(),
            vm_name: row.vm_name.clone(),
            memory_mib: plan.memory_mib,
            cpus: plan.cpus,
            machine: plan.machine.clone(),
            kernel: plan.kernel.clone(),
            initrd: plan.initrd.clone(),
            append: plan.append.clone(),
            speed_bps: plan.speed_bps,
            overlay_dir: plan.overlay_dir.clone(),
            disks,
        };
        self.start_on_node(&live, &body).await?;
        let me = self.clone();
        let watched = live.clone();
        self.deps()
            .tasks
            .spawn(async move { me.watch_node(watched).await });
        self.get(&live.id).await
    }

    /// `POST /api/v1/recoveries/{id}/speed`: the node bounds every disk's stream anew.
    pub async fn set_speed(
        &self,
        id: &str,
        speed: sendense_shared::api::RecoverySpeed,
    ) -> Result<Recovery, RecoveryError> {
        let r = self.get(id).await?;
        let Some(live) = self.live(id).filter(|_| r.status == JobStatus::Running) else {
            return Err(RecoveryError::WrongState {
                id: id.to_string(),
                status: r.status.as_str(),
                what: "only a running recovery's streams have a speed",
            });
        };
        self.deps()
            .nodes
            .recovery_speed(&live.node, id, &speed)
            .await
            .map_err(|source| RecoveryError::NodeSpeed {
                id: id.to_string(),
                source: Box::new(source),
            })?;
        let words = match speed.speed_bps {
            0 => "unbounded".to_string(),
            n => format!("at most {n} bytes/s per disk"),
        };
        self.event(
            &live,
            Level::Info,
            "recovery_speed",
            format!(
                "the streams of node {} run {words} from now",
                live.node.name
            ),
            None,
        )
        .await;
        self.get(id).await
    }

    /// Moves the recovery to `cancelling`, tells the node (which stops the VM and removes its
    /// overlays, then reports the end), and unwinds in the background once that report came
    /// or `node_lost_after` passed; answers the recovery as it is after the move.
    pub async fn cancel(&self, id: &str) -> Result<Recovery, RecoveryError> {
        let r = self.get(id).await?;
        if r.status == JobStatus::Cancelling {
            return Ok(r);
        }
        if r.status.is_terminal() {
            return Err(RecoveryError::WrongState {
                id: id.to_string(),
                status: r.status.as_str(),
                what: "a finished recovery cannot be cancelled",
            });
        }
        let db = &self.deps().db;
        if !db
            .transition_recovery(id, CANCELLABLE, JobStatus::Cancelling, None)
            .await
            .map_err(Self::db_err(id, "moving to cancelling"))?
        {
            let now = self.get(id).await?;
            if now.status == JobStatus::Cancelling {
                return Ok(now);
            }
            return Err(RecoveryError::WrongState {
                id: id.to_string(),
                status: now.status.as_str(),
                what: "the recovery ended before the cancel took effect",
            });
        }
        self.publish(id).await;
        match self.live(id) {
            Some(live) => {
                self.event(
                    &live,
                    Level::Warn,
                    "recovery_cancel_requested",
                    format!(
                        "cancel requested while the recovery was {}: node {} stops VM {} and \
                         removes its overlays (what the guest wrote is lost)",
                        r.status.as_str(),
                        live.node.name,
                        live.vm_name
                    ),
                    None,
                )
                .await;
                let me = self.clone();
                self.deps().tasks.spawn(async move {
                    if me.forward_cancel(&live).await {
                        me.await_node_end(&live).await;
                    }
                    let mut held = live.held.lock().await;
                    me.finish(&live, &mut held, Outcome::Cancelled).await;
                });
            }
            None => {
                // Nothing of it runs in this process: nothing to unwind.
                db.transition_recovery(id, &[JobStatus::Cancelling], JobStatus::Cancelled, None)
                    .await
                    .map_err(Self::db_err(id, "moving to cancelled"))?;
                self.publish(id).await;
            }
        }
        self.get(id).await
    }
}
