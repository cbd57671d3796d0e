//! QEMU/KVM source driver over QMP.
//!
//! # Snapshot method: image fleecing (copy-before-write), not external overlays
//!
//! Both give a frozen view of every disk from one QMP `transaction`. Fleecing is chosen because
//! the VM's own image chain is never touched: `blockdev-backup sync=none` inserts QEMU's
//! copy-before-write filter above each disk, so a guest write first copies the old block into a
//! throw-away qcow2 (the fleecing node, whose backing is the live disk), and the fleecing node
//! reads as the disk at the transaction's instant. Release is `block-export-del`,
//! `block-job-cancel`, `blockdev-del` and deleting a temporary file: nothing to merge back, so a
//! crashed or cancelled backup can never leave the VM running on an overlay that must be
//! committed (the external-overlay method needs a `block-commit` of the overlay into the base on
//! every release, and a crash between snapshot and commit leaves the VM's chain changed until
//! someone commits it). The cost of fleecing is that guest writes during the copy are slower
//! (one extra read+write for the first write of each cluster), bounded by the copy's duration.
//!
//! # Names of what the node creates in QEMU
//!
//! Every node name, job id, export, file and socket of a snapshot is derived from a short tag of
//! the backup id (`tags`); start-up recovery removes everything with these prefixes. The QMP
//! log (`<run_dir>/qmp.log`, one JSON line per command) shows what was done.
//!
//! # Change tracking (bitmap rotation)
//!
//! Each disk carries at most one *recording* persistent bitmap `sendense-<backup id>`, meaning
//! "blocks written since the snapshot of that backup". In the snapshot transaction:
//! - full backup `Y`: `block-dirty-bitmap-add sendense-Y` (recording) per disk;
//! - incremental `Y` on base `X`: `block-dirty-bitmap-add sendense-Y` and
//!   `block-dirty-bitmap-disable sendense-X` per disk; `sendense-X` (now frozen at the instant of
//!   the snapshot) is exported as `qemu:dirty-bitmap:sendense-X` and is the incremental's
//!   changed-block map.
//!
//! On release after success every other `sendense-*` bitmap of the disk is removed, so the
//! next incremental starts at `Y`. After failure or cancel: a full removes `sendense-Y` (base
//! `X`, still recording, stays valid); an incremental merges `sendense-Y` into `sendense-X`,
//! re-enables `sendense-X` and removes `sendense-Y` in one transaction, so `sendense-X` again
//! covers every write since `X`. A node crash between snapshot and release is undone at start-up
//! (or before the next snapshot of the VM, if a release could not finish) from a journal
//! (`<run_dir>/journal-<vm>.json`, written atomically before the transaction, `journal`) with
//! the same failure rotation. The hub names the base (`previous_backup_id`); when the recording
//! bitmap is not exactly that one on every disk (lost, inconsistent after a QEMU crash, a new
//! disk, a backup the hub did not keep), the incremental is refused with "bitmap missing" and
//! the hub falls back to a full backup.
//!
//! Persistent bitmaps need qcow2 images; disks in other formats get non-persistent bitmaps
//! (they survive a node restart, not a QEMU restart, which then reads as "bitmap missing").
//!
//! # Guest consistency
//!
//! A VM with a guest agent channel ([`QemuDriver::with_guest_agents`]) has its file systems
//! frozen right before the transaction and thawed right after (`freeze`); the point records
//! `application` or `crash` consistency and why ([`Snapshot::consistency`]).
//!
//! # Submodules
//!
//! `tags` (names), `disks` (the VM's block devices and their bitmaps), `bitmaps` (the
//! incremental's base check and the rotation on release), `journal` (the crash journal),
//! `freeze` (the guest freeze and its journal), `release` (undoing a snapshot step by step),
//! `recovery` (start-up cleanup from the names and the journals).

mod bitmaps;
mod disks;
mod freeze;
mod hardware;
mod journal;
mod recovery;
mod release;
mod tags;

pub use disks::FIRST_DISK_KEY;
pub use tags::{BITMAP_PREFIX, EXPORT_PREFIX, JOB_PREFIX, NODE_PREFIX};

use super::{
    BoxFuture, RecoveryReport, ReleaseOutcome, Snapshot, SnapshotDisk, SnapshotRequest,
    SourceDriver, SourceError, SourceVm,
};
use crate::qmp::{QmpClient, QmpLog};
use bitmaps::incremental_base;
use disks::QemuDisk;
use freeze::FreezeAttempt;
use journal::{SnapshotState, StateDisk};
use release::ids_of;
use sendense_shared::api::{BackupType, Consistency, ConsistencyLevel};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One configured VM.
struct QemuVm {
    name: String,
    socket: PathBuf,
    /// The guest agent's channel (unix socket of its `org.qemu.guest_agent.0` port), if any.
    agent: Option<PathBuf>,
    client: tokio::sync::Mutex<Option<Arc<QmpClient>>>,
    /// Snapshot state while a snapshot of this VM is held (one at a time).
    held: Mutex<Option<SnapshotState>>,
}

/// The QEMU/KVM driver: VMs by name → QMP socket.
pub struct QemuDriver {
    vms: BTreeMap<String, QemuVm>,
    run_dir: PathBuf,
    log: Arc<QmpLog>,
    /// Bound of every guest agent command (and so of the freeze's own duration).
    agent_timeout: std::time::Duration,
}

/// Default bound of a guest agent command.
pub const DEFAULT_AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl QemuDriver {
    /// `vms`: VM name → QMP socket. `run_dir` holds fleecing files, NBD sockets and journals
    /// (QEMU must be able to open files there). Every QMP command is recorded in `log`.
    pub fn new(
        vms: impl IntoIterator<Item = (String, PathBuf)>,
        run_dir: PathBuf,
        log: Arc<QmpLog>,
    ) -> Self {
        let vms = vms
            .into_iter()
            .map(|(name, socket)| {
                (
                    name.clone(),
                    QemuVm {
                        name,
                        socket,
                        agent: None,
                        client: tokio::sync::Mutex::new(None),
                        held: Mutex::new(None),
                    },
                )
            })
            .collect();
        QemuDriver {
            vms,
            run_dir,
            log,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
        }
    }

    /// Guest agent channels: VM name → unix socket of its `org.qemu.guest_agent.0` port
    /// (names of unknown VMs are ignored); `timeout` bounds each agent command.
    pub fn with_guest_agents(
        mut self,
        agents: impl IntoIterator<Item = (String, PathBuf)>,
        timeout: std::time::Duration,
    ) -> Self {
        for (name, socket) in agents {
            if let Some(vm) = self.vms.get_mut(&name) {
                vm.agent = Some(socket);
            }
        }
        self.agent_timeout = timeout;
        self
    }

    /// The QMP command log.
    pub fn qmp_log(&self) -> &Arc<QmpLog> {
        &self.log
    }

    fn vm_entry(&self, name: &str) -> Result<&QemuVm, SourceError> {
        self.vms.get(name).ok_or_else(|| SourceError::UnknownVm {
            vm: name.to_string(),
        })
    }

    async fn client(&self, vm: &QemuVm) -> Result<Arc<QmpClient>, SourceError> {
        let mut slot = vm.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(
            QmpClient::connect(&vm.socket, &vm.name, self.log.clone())
                .await
                .map_err(|source| SourceError::Qmp {
                    vm: vm.name.clone(),
                    source,
                })?,
        );
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn exec(&self, vm: &QemuVm, command: &str, args: Value) -> Result<Value, SourceError> {
        let c = self.client(vm).await?;
        c.execute(command, args)
            .await
            .map_err(|source| SourceError::Qmp {
                vm: vm.name.clone(),
                source,
            })
    }

    async fn vm_info(&self, vm: &QemuVm) -> Result<SourceVm, SourceError> {
        let disks = self.disks(vm).await?;
        let uuid = self.exec(vm, "query-uuid", json!({})).await?;
        let vm_id = uuid
            .get("UUID")
            .and_then(Value::as_str)
            .filter(|u| !u.chars().all(|c| c == '0' || c == '-'))
            .map(str::to_string)
            .unwrap_or_else(|| vm.name.clone());
        Ok(SourceVm {
            vm_name: vm.name.clone(),
            vm_id,
            disks: disks.into_iter().map(|d| d.disk).collect(),
            driver: "qemu",
            change_tracking: None,
        })
    }

    fn journal_path(&self, vm: &str) -> PathBuf {
        journal::path(&self.run_dir, vm)
    }

    async fn snapshot_inner(
        &self,
        vm: &QemuVm,
        request: &SnapshotRequest,
    ) -> Result<Snapshot, SourceError> {
        self.finish_earlier_release(vm).await?;
        let disks = self.disks(vm).await?;
        if disks.is_empty() {
            return Err(SourceError::NoDisks {
                vm: vm.name.clone(),
            });
        }
        let base_bitmap = match request.backup_type {
            BackupType::Full => None,
            BackupType::Incremental => Some(incremental_base(
                &vm.name,
                &disks,
                request.previous_backup_id.as_ref(),
            )?),
        };
        std::fs::create_dir_all(&self.run_dir).map_err(|source| SourceError::Io {
            what: "creating run directory",
            path: self.run_dir.clone(),
            source,
        })?;
        let state = self.state_of(vm, request, &disks, base_bitmap);
        // Held before the journal exists, so that no one mistakes this journal for a leftover.
        *vm.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.clone());
        // The journal goes first: whatever happens after this line, a restarted node can undo.
        let journal = self.journal_path(&vm.name);
        if let Err(source) = journal::write(&journal, &state) {
            *vm.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(SourceError::Io {
                what: "writing snapshot journal",
                path: journal,
                source,
            });
        }
        match self.build_snapshot(vm, request, &state, &disks).await {
            Ok(snapshot) => Ok(snapshot),
            Err(e) => {
                tracing::warn!(vm = %vm.name, backup_id = %state.backup_id, error = %e,
                    "snapshot failed; releasing what was created");
                if let Err(re) = self
                    .release_state(vm, &state, ReleaseOutcome::Failure)
                    .await
                {
                    tracing::error!(vm = %vm.name, error = %re, "release after failed snapshot");
                }
                Err(e)
            }
        }
    }

    /// Names everything the snapshot of `disks` will create ([`tags`]).
    fn state_of(
        &self,
        vm: &QemuVm,
        request: &SnapshotRequest,
        disks: &[QemuDisk],
        base_bitmap: Option<String>,
    ) -> SnapshotState {
        let tag = tags::tag_of(&request.backup_id);
        SnapshotState {
            backup_id: request.backup_id.clone(),
            vm_name: vm.name.clone(),
            backup_type: request.backup_type,
            base_bitmap,
            new_bitmap: tags::bitmap_of(&request.backup_id),
            socket: tags::nbd_socket(&self.run_dir, &tag),
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, d)| StateDisk {
                    disk_key: d.disk.disk_key,
                    size_bytes: d.disk.size_bytes,
                    format_node: d.format_node.clone(),
                    fleece_node: tags::fleece_node(&tag, i),
                    job_id: tags::job_id(&tag, i),
                    export_id: tags::export_id(&tag, i),
                    export_name: tags::export_name(&vm.name, d.disk.disk_key),
                    file: tags::fleece_file(&self.run_dir, &tag, i),
                })
                .collect(),
            tag,
        }
    }

    async fn build_snapshot(
        &self,
        vm: &QemuVm,
        request: &SnapshotRequest,
        state: &SnapshotState,
        disks: &[QemuDisk],
    ) -> Result<Snapshot, SourceError> {
        // Before any fleece node exists, so the disks are the guest's alone.
        let hardware = self.hardware(vm, disks).await;
        for d in &state.disks {
            create_fleece_file(&d.file, d.size_bytes).await?;
            self.exec(
                vm,
                "blockdev-add",
                json!({
                    "driver": "qcow2",
                    "node-name": d.fleece_node,
                    "file": {"driver": "file", "filename": d.file},
                    "backing": d.format_node,
                    "discard": "unmap",
                }),
            )
            .await?;
        }
        // The one transaction: every disk's copy-before-write and bitmap change at one instant.
        let mut actions = Vec::new();
        for (d, qd) in state.disks.iter().zip(disks) {
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": d.format_node, "name": state.new_bitmap,
                "persistent": qd.driver == "qcow2",
            }}));
            if let Some(base) = &state.base_bitmap {
                actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {
                    "node": d.format_node, "name": base,
                }}));
            }
            actions.push(json!({"type": "blockdev-backup", "data": {
                "job-id": d.job_id, "device": d.format_node, "target": d.fleece_node,
                "sync": "none", "auto-dismiss": true,
            }}));
        }
        // The guest's file systems are frozen for the transaction only: nothing between the
        // freeze and the thaw but the one QMP command.
        let frozen = match self.freeze(vm, &state.backup_id).await {
            FreezeAttempt::Frozen(f) => Ok(f),
            FreezeAttempt::NotFrozen(reason) if request.require_application_consistency => {
                return Err(SourceError::ConsistencyRequired {
                    vm: vm.name.clone(),
                    cause: reason,
                });
            }
            FreezeAttempt::NotFrozen(reason) => Err(reason),
        };
        let taken = self
            .exec(vm, "transaction", json!({ "actions": actions }))
            .await;
        let consistency = match frozen {
            Ok(f) => match f.thaw().await {
                Ok(c) => c,
                // Frozen at the instant, so still application-consistent; the thaw goes on
                // being retried (freeze's drop guard, then start-up recovery).
                Err(e) => Consistency {
                    level: ConsistencyLevel::Application,
                    reason: format!(
                        "guest file systems frozen; the thaw failed and is retried: {}",
                        sendense_shared::errors::chain(&e)
                    ),
                    freeze_ms: None,
                },
            },
            Err(reason) => Consistency {
                level: ConsistencyLevel::Crash,
                reason,
                freeze_ms: None,
            },
        };
        taken?;
        tracing::info!(vm = %vm.name, backup_id = %state.backup_id, disks = state.disks.len(),
            consistency = consistency.level.as_str(), reason = %consistency.reason,
            freeze_ms = ?consistency.freeze_ms, "snapshot taken in one QMP transaction");

        let start = json!({"addr": {"type": "unix", "data": {"path": state.socket}}});
        if let Err(e) = self.exec(vm, "nbd-server-start", start.clone()).await {
            // A server left by a crashed run of this node: stop it when it serves nothing else.
            if !is_already_running(&e) || !self.only_our_exports(vm).await? {
                return Err(e);
            }
            self.exec(vm, "nbd-server-stop", json!({})).await?;
            self.exec(vm, "nbd-server-start", start).await?;
        }
        let mut out = Vec::new();
        for d in &state.disks {
            let mut args = json!({
                "type": "nbd", "id": d.export_id, "node-name": d.fleece_node,
                "name": d.export_name, "writable": false,
            });
            if let Some(base) = &state.base_bitmap {
                args["bitmaps"] = json!([base]);
            }
            self.exec(vm, "block-export-add", args).await?;
            out.push(SnapshotDisk {
                disk_key: d.disk_key,
                size_bytes: d.size_bytes,
                socket: state.socket.clone(),
                export: d.export_name.clone(),
                dirty_bitmap: state.base_bitmap.clone(),
                areas: None,
                change_id: None,
            });
        }
        Ok(Snapshot {
            backup_id: state.backup_id.clone(),
            vm_name: state.vm_name.clone(),
            backup_type: state.backup_type,
            disks: out,
            consistency: Some(consistency),
            hardware,
        })
    }

    async fn only_our_exports(&self, vm: &QemuVm) -> Result<bool, SourceError> {
        let exports = self.exec(vm, "query-block-exports", json!({})).await?;
        Ok(ids_of(&exports, "id")
            .iter()
            .all(|id| id.starts_with(EXPORT_PREFIX)))
    }
}

impl SourceDriver for QemuDriver {
    fn list_vms(&self) -> BoxFuture<'_, Result<Vec<SourceVm>, SourceError>> {
        Box::pin(async move {
            // A powered-off VM (QMP socket gone) is a normal state: it is left out and logged,
            // so that it does not hide the others (the hub keeps what it knew of it).
            let mut out = Vec::new();
            for vm in self.vms.values() {
                match self.vm_info(vm).await {
                    Ok(v) => out.push(v),
                    Err(e) => {
                        tracing::warn!(vm = %vm.name, error = %e, "VM left out of the inventory")
                    }
                }
            }
            Ok(out)
        })
    }

    fn vm<'a>(&'a self, vm_name: &'a str) -> BoxFuture<'a, Result<SourceVm, SourceError>> {
        Box::pin(async move { self.vm_info(self.vm_entry(vm_name)?).await })
    }

    fn check_incremental_base<'a>(
        &'a self,
        request: &'a SnapshotRequest,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let (vm_name, previous) = (&request.vm_name, request.previous_backup_id.as_ref());
            let vm = self.vm_entry(vm_name)?;
            if vm.held.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
                self.finish_earlier_release(vm).await?;
            }
            let disks = self.disks(vm).await?;
            incremental_base(vm_name, &disks, previous).map(|_| ())
        })
    }

    fn snapshot<'a>(
        &'a self,
        request: &'a SnapshotRequest,
    ) -> BoxFuture<'a, Result<Snapshot, SourceError>> {
        Box::pin(async move {
            let vm = self.vm_entry(&request.vm_name)?;
            if let Some(h) = vm.held.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                return Err(SourceError::SnapshotHeld {
                    vm: vm.name.clone(),
                    backup_id: h.backup_id.clone(),
                });
            }
            self.snapshot_inner(vm, request).await
        })
    }

    fn release<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        outcome: ReleaseOutcome,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let vm = self.vm_entry(&snapshot.vm_name)?;
            let held = vm.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let state = match held.filter(|h| h.backup_id == snapshot.backup_id) {
                Some(s) => s,
                None => {
                    // Released already, or held by a previous run: the journal knows.
                    match journal::read(&self.journal_path(&vm.name))
                        .filter(|s| s.backup_id == snapshot.backup_id)
                    {
                        Some(s) => s,
                        None => return Ok(()),
                    }
                }
            };
            self.release_state(vm, &state, outcome).await
        })
    }

    fn recover(&self) -> BoxFuture<'_, RecoveryReport> {
        Box::pin(async move {
            let mut report = RecoveryReport::default();
            for vm in self.vms.values() {
                // A guest a crashed run left frozen is thawed before anything else.
                match self.thaw_leftover(vm).await {
                    Ok(true) => report.guests_thawed.push(vm.name.clone()),
                    Ok(false) => {}
                    Err(e) => report.errors.push(format!(
                        "VM {}: thaw of a guest left frozen: {}",
                        vm.name,
                        sendense_shared::errors::chain(&e)
                    )),
                }
                self.recover_vm(vm, &mut report).await;
            }
            self.remove_leftover_files(&mut report);
            report
        })
    }
}

fn is_already_running(e: &SourceError) -> bool {
    matches!(e, SourceError::Qmp { source, .. }
        if source.refusal() == Some(crate::qmp::Refusal::AlreadyRunning))
}

async fn create_fleece_file(path: &Path, size: u64) -> Result<(), SourceError> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| SourceError::Tool {
            command: format!("qemu-img create {}", path.display()),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SourceError::Tool {
            command: format!("qemu-img create {}", path.display()),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
