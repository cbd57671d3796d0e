//! Restore jobs: a backup point served read-only to a node, which writes it into a new image.
//!
//! A restore is a job like a backup: a row in `restore_jobs` whose status moves only by
//! compare-and-set, an event log (in the backup point's log, each event tagged with the
//! restore's id), progress and the result pushed by the node, cancel from the API, one
//! unwinding path ([`Restores`]'s `finish`), the start-up reconciler, and shutdown draining.
//!
//! `POST /api/v1/restores {"backup_id","disk_key"?,"target":{"node","path"}}`:
//! 1. the backup must be `completed`, its integrity one a restore may read (`verified`,
//!    `hub_computed`, `legacy`; never `corrupt` or `unverified`) and its image (with its chain)
//!    on disk; one restore per backup point at a time;
//! 2. one NBD port from the same allocator as backups (recorded under the backup's id, so
//!    `GET /api/v1/ports` shows which backup point is served) and one `qemu-nbd --read-only`
//!    on that image (recorded like a backup's, so the reconciler stops it after a crash);
//! 3. the node is asked to copy it into `target.path` (`POST /api/v1/restore/start` of the
//!    node); it pushes `POST /api/v1/restores/{id}/progress` about once a second and
//!    `.../complete` at its end, after reading the new image back against what it read, with
//!    the whole-disk checksums of what it wrote; the hub compares those with the point's
//!    stored checksums (its sidecar) before it calls the restore completed ([`truth`]);
//! 4. a node silent for the watch interval is asked (`GET /api/v1/restore/{id}`); one that
//!    forgot the restore or stays unreachable for `node_lost_after` fails it;
//! 5. the end, whatever caused it: qemu-nbd stopped, port released, then the terminal status
//!    (so a restore seen `completed`, `failed` or `cancelled` holds nothing on the hub).

use crate::db::{Db, DbError};
use crate::events::{JobLog, Level};
use crate::node_client::{NodeAddr, NodeClient};
use crate::ports::{PortAllocator, PortError};
use crate::qemu_nbd::{ExportSpec, QemuNbd, QemuNbdConfig, QemuNbdError};
use sendense_shared::api::{
    HubEvent, JobStatus, NodeRestoreStart, ProcessInfo, Restore, RestoreRequest, RestoreTarget,
};
use sendense_shared::errors::chain;
use sendense_shared::ids::{BackupId, NbdPort};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// States a restore may be cancelled from.
const CANCELLABLE: &[JobStatus] = &[JobStatus::Preparing, JobStatus::Running];

/// Non-terminal states (the reconciler's and the busy check's view).
pub const ACTIVE: &[JobStatus] = &[
    JobStatus::Pending,
    JobStatus::Preparing,
    JobStatus::Running,
    JobStatus::Cancelling,
];

/// Why a restore operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{detail}")]
    Invalid { detail: String },
    #[error("no backup with id {id}")]
    BackupNotFound { id: BackupId },
    #[error("no node named {node:?} is registered (GET /api/v1/nodes lists them)")]
    NodeNotFound { node: String },
    #[error("no restore with id {id}")]
    NotFound { id: String },
    /// Not completed, or its integrity forbids it (`corrupt`, `unverified`): `reason` says
    /// which, with the stored detail.
    #[error("backup {id} {reason}")]
    NotRestorable { id: BackupId, reason: String },
    #[error("backup {id} is being restored already by {restore_id}; wait for it")]
    Busy { id: BackupId, restore_id: String },
    #[error("backup {id}: prune job {prune_id} is changing its VM's chain; wait for it to end")]
    Pruning { id: BackupId, prune_id: String },
    #[error("image {path} of backup {id} is missing")]
    ImageMissing { id: BackupId, path: String },
    #[error("restore {id} is {status}: {what}")]
    WrongState {
        id: String,
        status: &'static str,
        what: &'static str,
    },
    #[error("restore {id}: allocating an NBD port")]
    Ports {
        id: String,
        #[source]
        source: Box<PortError>,
    },
    #[error("restore {id}: serving the backup point failed")]
    Export {
        id: String,
        #[source]
        source: Box<QemuNbdError>,
    },
    #[error("restore {id}: {doing}")]
    Db {
        id: String,
        doing: &'static str,
        #[source]
        source: Box<DbError>,
    },
}

/// Everything the restore service needs, given by the hub's wiring.
pub struct RestoreDeps {
    pub db: Db,
    pub ports: Arc<PortAllocator>,
    pub qemu_nbd: QemuNbdConfig,
    pub log: JobLog,
    pub nodes: NodeClient,
    pub tasks: TaskTracker,
    /// A node silent this long is asked about the restore.
    pub node_watch_interval: Duration,
    /// A node unreachable this long fails the restore.
    pub node_lost_after: Duration,
}

/// How a restore ends, as its finisher sees it.
#[derive(Debug, Clone)]
enum Outcome {
    /// Copied and read back equal on the node.
    Completed {
        bytes_written: u64,
        verified_ranges: u64,
    },
    /// With the cause, which becomes the restore's `error_message`.
    Failed(String),
    /// A cancel from the API.
    Cancelled,
}

/// What a live restore holds on the hub; released only by `finish`.
#[derive(Default)]
struct Held {
    server: Option<(QemuNbd, NbdPort)>,
    port: Option<NbdPort>,
    finished: bool,
}

/// A restore this hub process is running.
struct LiveRestore {
    id: String,
    backup_id: BackupId,
    node: NodeAddr,
    /// Into a VM's disk: that VM's name on the node.
    replace_vm: Option<String>,
    /// Fired once `finish` has run: the watcher stops.
    ended: CancellationToken,
    last_report: Mutex<Instant>,
    held: tokio::sync::Mutex<Held>,
}

impl LiveRestore {
    fn touch(&self) {
        *self.last_report.lock().expect("last_report") = Instant::now();
    }

    fn since_last_report(&self) -> Duration {
        self.last_report.lock().expect("last_report").elapsed()
    }
}

struct Inner {
    deps: RestoreDeps,
    live: Mutex<HashMap<String, Arc<LiveRestore>>>,
    /// Serialises the busy check with the restore's creation.
    admission: tokio::sync::Mutex<()>,
}

/// The restore service; cheap to clone.
#[derive(Clone)]
pub struct Restores {
    inner: Arc<Inner>,
}

mod finish;
mod node;
mod reports;
mod request;
mod truth;

pub(crate) use request::unreadable;
use request::{check_restorable, check_target_path, pick_disk, replace_target};

impl Restores {
    pub fn new(deps: RestoreDeps) -> Self {
        Restores {
            inner: Arc::new(Inner {
                deps,
                live: Mutex::new(HashMap::new()),
                admission: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn deps(&self) -> &RestoreDeps {
        &self.inner.deps
    }

    fn live(&self, id: &str) -> Option<Arc<LiveRestore>> {
        self.inner.live.lock().expect("live map").get(id).cloned()
    }

    fn db_err(id: &str, doing: &'static str) -> impl FnOnce(DbError) -> RestoreError {
        let id = id.to_string();
        move |source| RestoreError::Db {
            id,
            doing,
            source: Box::new(source),
        }
    }

    /// One restore, or [`RestoreError::NotFound`].
    pub async fn get(&self, id: &str) -> Result<Restore, RestoreError> {
        match self.deps().db.get_restore(id).await {
            Ok(r) => Ok(r),
            Err(DbError::NotFound { .. }) => Err(RestoreError::NotFound { id: id.to_string() }),
            Err(e) => Err(Self::db_err(id, "reading the restore")(e)),
        }
    }

    /// Newest first.
    pub async fn list(&self) -> Result<Vec<Restore>, RestoreError> {
        self.deps()
            .db
            .list_restores()
            .await
            .map_err(Self::db_err("*", "listing restores"))
    }

    /// The restore's own events, oldest first.
    pub async fn events(
        &self,
        id: &str,
    ) -> Result<Vec<sendense_shared::api::JobEvent>, RestoreError> {
        self.get(id).await?;
        self.deps()
            .db
            .list_job_events(id)
            .await
            .map_err(Self::db_err(id, "reading the restore's events"))
    }

    async fn event(&self, r: &LiveRestore, level: Level, step: &str, msg: String) {
        self.deps()
            .log
            .record(&r.backup_id, Some(&r.id), level, step, &msg, None)
            .await;
    }

    async fn publish(&self, id: &str) {
        match self.deps().db.get_restore(id).await {
            Ok(r) => self
                .deps()
                .log
                .bus()
                .publish(HubEvent::Restore { restore: r }),
            Err(e) => {
                tracing::warn!(restore_id = %id, error = %chain(&e), "cannot publish restore state")
            }
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

    /// Checks the request, exports the backup point and asks the node to copy it; answers the
    /// restore `running` (or the refusal).
    pub async fn start(&self, req: RestoreRequest) -> Result<Restore, RestoreError> {
        let db = &self.deps().db;
        sendense_shared::names::validate_name("target.node", &req.target.node).map_err(|e| {
            RestoreError::Invalid {
                detail: e.to_string(),
            }
        })?;
        if req.target.vm.is_none() {
            check_target_path(&req.target.path)?;
        }
        let backup = match db.get_backup(&req.backup_id).await {
            Ok(b) => b,
            Err(DbError::NotFound { .. }) => {
                return Err(RestoreError::BackupNotFound { id: req.backup_id });
            }
            Err(e) => return Err(Self::db_err("-", "reading the backup point")(e)),
        };
        check_restorable(&backup)?;
        let disk = pick_disk(&backup, &req)?;
        if !Path::new(&disk.qcow2_path).is_file() {
            return Err(RestoreError::ImageMissing {
                id: backup.backup_id.clone(),
                path: disk.qcow2_path.clone(),
            });
        }
        let (target, replace_vm) = match &req.target.vm {
            None => (req.target.clone(), None),
            Some(name) => {
                let vm = match db.get_vm(name).await {
                    Ok(v) => v,
                    Err(DbError::NotFound { .. }) => {
                        return Err(RestoreError::Invalid {
                            detail: format!(
                                "target.vm: no VM named {name:?} (GET /api/v1/vms lists them)"
                            ),
                        });
                    }
                    Err(e) => return Err(Self::db_err("-", "reading the target VM")(e)),
                };
                let (path, on_node) = replace_target(&backup, &disk, &req.target, &vm)?;
                let target = RestoreTarget {
                    path,
                    ..req.target.clone()
                };
                (target, Some(on_node))
            }
        };
        let node = match db.get_node(&req.target.node).await {
            Ok(n) => NodeAddr::from(&n),
            Err(DbError::NotFound { .. }) => {
                return Err(RestoreError::NodeNotFound {
                    node: req.target.node,
                });
            }
            Err(e) => return Err(Self::db_err("-", "reading the target node")(e)),
        };
        let restore_id = uuid::Uuid::new_v4().to_string();
        let row = Restore {
            restore_id: restore_id.clone(),
            backup_id: backup.backup_id.clone(),
            vm_name: backup.vm_name.clone(),
            disk_key: disk.disk_key,
            target: target.clone(),
            status: JobStatus::Preparing,
            source_qcow2: disk.qcow2_path.clone(),
            nbd_port: None,
            nbd_export_name: format!("restore-{}", &restore_id[..8]),
            bytes_done: 0,
            bytes_total: disk.bytes_total,
            created_at: db.clock().now(),
            completed_at: None,
            error_message: None,
        };
        {
            // The busy check and the row in one step: two requests cannot both pass.
            let _admission = self.inner.admission.lock().await;
            let active = db
                .list_restores_in(ACTIVE)
                .await
                .map_err(Self::db_err(&restore_id, "checking for a running restore"))?;
            if let Some(prune_id) = db
                .active_prune_of_vm(&backup.vm_name)
                .await
                .map_err(Self::db_err(&restore_id, "checking for a running prune"))?
            {
                return Err(RestoreError::Pruning {
                    id: backup.backup_id.clone(),
                    prune_id,
                });
            }
            if let Some(busy) = active.iter().find(|r| r.backup_id == backup.backup_id) {
                return Err(RestoreError::Busy {
                    id: backup.backup_id.clone(),
                    restore_id: busy.restore_id.clone(),
                });
            }
            db.create_restore(&row)
                .await
                .map_err(Self::db_err(&restore_id, "storing the restore"))?;
        }
        let live = Arc::new(LiveRestore {
            id: restore_id.clone(),
            backup_id: backup.backup_id.clone(),
            node,
            replace_vm,
            ended: CancellationToken::new(),
            last_report: Mutex::new(Instant::now()),
            held: tokio::sync::Mutex::new(Held::default()),
        });
        self.inner
            .live
            .lock()
            .expect("live map")
            .insert(restore_id.clone(), live.clone());
        self.event(
            &live,
            Level::Info,
            "restore_created",
            format!(
                "restore {restore_id} of disk {} ({}) requested; node {} writes it into {}{}",
                disk.disk_key,
                disk.qcow2_path,
                target.node,
                target.path,
                match &target.vm {
                    Some(vm) => format!(" (the disk of VM {vm}, replaced once read back equal)"),
                    None => String::new(),
                }
            ),
        )
        .await;
        let mut held = live.held.lock().await;
        match self.export(&live, &mut held, &row).await {
            Ok(source) => {
                drop(held);
                let me = self.clone();
                let live2 = live.clone();
                self.deps().tasks.spawn(async move {
                    me.run_on_node(&live2, source).await;
                    me.watch_node(live2).await;
                });
                self.get(&restore_id).await
            }
            Err(e) => {
                // A cancel that came while the export was prepared wins: the restore ends
                // `cancelled`, not `failed`.
                let outcome = match &e {
                    RestoreError::WrongState { .. } => Outcome::Cancelled,
                    e => Outcome::Failed(chain(e)),
                };
                self.finish(&live, &mut held, outcome).await;
                Err(e)
            }
        }
    }

    /// Port, qemu-nbd and its record, then `running`; answers what the node is to read.
    async fn export(
        &self,
        live: &LiveRestore,
        held: &mut Held,
        row: &Restore,
    ) -> Result<NodeRestoreStart, RestoreError> {
        let d = self.deps();
        let id = &live.id;
        let ports = d
            .ports
            .allocate(&live.backup_id, &[row.disk_key])
            .await
            .map_err(|source| RestoreError::Ports {
                id: id.clone(),
                source: Box::new(source),
            })?;
        let port = ports[0].1;
        held.port = Some(port);
        d.db.set_restore_port(id, Some(port))
            .await
            .map_err(Self::db_err(id, "recording the port"))?;
        let spec = ExportSpec {
            qcow2_path: row.source_qcow2.clone().into(),
            export_name: row.nbd_export_name.clone(),
            port: port.0,
            read_only: true,
            socket: None,
            client: Some(crate::nbd_ca::restore_identity(id)),
        };
        let server =
            QemuNbd::start(&d.qemu_nbd, spec)
                .await
                .map_err(|source| RestoreError::Export {
                    id: id.clone(),
                    source: Box::new(source),
                })?;
        let pid = server.pid();
        let mut export = server.nbd_export();
        export.tls = server
            .client_tls(d.qemu_nbd.tls.as_ref())
            .map_err(|source| RestoreError::Export {
                id: id.clone(),
                source: Box::new(source),
            })?;
        let cmdline = sendense_shared::child::shell_words(server.command_line());
        let started_at = server.started_at();
        held.server = Some((server, port));
        d.db.record_process(
            &ProcessInfo {
                pid,
                port,
                export_name: row.nbd_export_name.clone(),
                qcow2_path: row.source_qcow2.clone(),
                backup_id: live.backup_id.clone(),
                disk_key: row.disk_key,
                alive: true,
                started_at,
            },
            &cmdline,
        )
        .await
        .map_err(Self::db_err(id, "recording the qemu-nbd process"))?;
        self.publish_resources().await;
        if !d
            .db
            .transition_restore(id, &[JobStatus::Preparing], JobStatus::Running, None)
            .await
            .map_err(Self::db_err(id, "moving to running"))?
        {
            return Err(RestoreError::WrongState {
                id: id.clone(),
                status: JobStatus::Cancelling.as_str(),
                what: "cancelled while the export was prepared",
            });
        }
        self.event(
            live,
            Level::Info,
            "restore_started",
            format!(
                "restore {id}: disk {} ({}) served read-only by qemu-nbd pid {pid} on port {port} \
                 as export {export}; node {} writes it into {}",
                row.disk_key, row.source_qcow2, live.node.name, row.target.path
            ),
        )
        .await;
        self.publish(id).await;
        Ok(NodeRestoreStart {
            restore_id: id.clone(),
            source: export.to_string(),
            source_export: Some(export),
            path: row.target.path.clone(),
            size_bytes: row.bytes_total,
            checksum_grid: Some(sendense_shared::api::DEFAULT_GRID_CELL),
            replace_vm: live.replace_vm.clone(),
        })
    }

    /// Moves the restore to `cancelling`, tells the node, and unwinds in the background;
    /// answers the restore as it is after the move.
    pub async fn cancel(&self, id: &str) -> Result<Restore, RestoreError> {
        let r = self.get(id).await?;
        if r.status == JobStatus::Cancelling {
            return Ok(r);
        }
        if r.status.is_terminal() {
            return Err(RestoreError::WrongState {
                id: id.to_string(),
                status: r.status.as_str(),
                what: "a finished restore cannot be cancelled",
            });
        }
        let db = &self.deps().db;
        if !db
            .transition_restore(id, CANCELLABLE, JobStatus::Cancelling, None)
            .await
            .map_err(Self::db_err(id, "moving to cancelling"))?
        {
            let now = self.get(id).await?;
            if now.status == JobStatus::Cancelling {
                return Ok(now);
            }
            return Err(RestoreError::WrongState {
                id: id.to_string(),
                status: now.status.as_str(),
                what: "the restore ended before the cancel took effect",
            });
        }
        self.publish(id).await;
        match self.live(id) {
            Some(live) => {
                self.event(
                    &live,
                    Level::Warn,
                    "restore_cancel_requested",
                    format!(
                        "cancel requested while the restore was {}",
                        r.status.as_str()
                    ),
                )
                .await;
                let me = self.clone();
                let path = r.target.path.clone();
                self.deps().tasks.spawn(async move {
                    // The node deletes its partial image before it reports the end, and that
                    // report finishes the restore: a restore seen `cancelled` left nothing on
                    // the node either. Only a node that does not answer ends it here.
                    if me.forward_cancel(&live).await {
                        me.await_node_end(&live, &path).await;
                    }
                    let mut held = live.held.lock().await;
                    me.finish(&live, &mut held, Outcome::Cancelled).await;
                });
            }
            None => {
                // Nothing of it runs in this process: nothing to unwind.
                db.transition_restore(id, &[JobStatus::Cancelling], JobStatus::Cancelled, None)
                    .await
                    .map_err(Self::db_err(id, "moving to cancelled"))?;
                self.publish(id).await;
            }
        }
        self.get(id).await
    }
}
