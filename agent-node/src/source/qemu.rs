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
//! QEMU node names and job ids must be at most 31 characters, so each snapshot gets a `tag`
//! (10 hex digits of BLAKE3 of the backup id). Fleecing nodes are `sdfl-<tag>-<i>`, backup jobs
//! `sdjob-<tag>-<i>`, exports `sendense-<tag>-<i>`, temporary files `<run_dir>/sdfl-<tag>-<i>.qcow2`,
//! the NBD socket `<run_dir>/nbd-<tag>.sock`; the NBD export names are `<vm>-disk-<disk key>`.
//! Start-up recovery removes everything with these prefixes: they are the node's and nobody
//! else's. The QMP log (`<run_dir>/qmp.log`, one JSON line per command) shows what was done.
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
//! (`<run_dir>/journal-<vm>.json`, written before the transaction) with the same failure rotation. The hub names the base (`previous_backup_id`); when the recording bitmap
//! is not exactly that one on every disk (lost, inconsistent after a QEMU crash, a new disk, a
//! backup the hub did not keep), the incremental is refused with "bitmap missing" and the hub
//! falls back to a full backup.
//!
//! Persistent bitmaps need qcow2 images; disks in other formats get non-persistent bitmaps
//! (they survive a node restart, not a QEMU restart, which then reads as "bitmap missing").

use super::{
    BoxFuture, RecoveryReport, ReleaseOutcome, Snapshot, SnapshotDisk, SnapshotRequest, SourceDisk,
    SourceDriver, SourceError, SourceVm,
};
use crate::qmp::{QmpClient, QmpError, QmpLog};
use sendense_shared::api::BackupType;
use sendense_shared::ids::{BackupId, DiskKey};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Prefix of every bitmap the node creates.
pub const BITMAP_PREFIX: &str = "sendense-";
/// Prefix of fleecing node names and their files.
pub const NODE_PREFIX: &str = "sdfl-";
/// Prefix of backup job ids.
pub const JOB_PREFIX: &str = "sdjob-";
/// Prefix of export ids.
pub const EXPORT_PREFIX: &str = "sendense-";
/// First disk key of a VM.
pub const FIRST_DISK_KEY: i64 = 2000;

/// How long release waits for QEMU to finish deleting an export or cancelling a job.
const RELEASE_WAIT: Duration = Duration::from_secs(20);

/// One configured VM.
struct QemuVm {
    name: String,
    socket: PathBuf,
    client: tokio::sync::Mutex<Option<Arc<QmpClient>>>,
    /// Snapshot state while a snapshot of this VM is held (one at a time).
    held: Mutex<Option<SnapshotState>>,
}

/// A disk as found in QEMU, with what the driver needs beyond [`SourceDisk`].
#[derive(Debug, Clone)]
struct QemuDisk {
    disk: SourceDisk,
    /// Node the guest writes to (format node): where bitmaps live and what gets fleeced.
    format_node: String,
    driver: String,
    bitmaps: Vec<Bitmap>,
}

#[derive(Debug, Clone)]
struct Bitmap {
    name: String,
    recording: bool,
    inconsistent: bool,
}

/// Everything needed to release a snapshot; also the crash journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotState {
    backup_id: BackupId,
    vm_name: String,
    backup_type: BackupType,
    tag: String,
    /// Incremental: the bitmap exported (frozen) as the changed-block map.
    base_bitmap: Option<String>,
    new_bitmap: String,
    socket: PathBuf,
    disks: Vec<StateDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateDisk {
    disk_key: DiskKey,
    size_bytes: u64,
    format_node: String,
    fleece_node: String,
    job_id: String,
    export_id: String,
    export_name: String,
    file: PathBuf,
}

/// The QEMU/KVM driver: VMs by name → QMP socket.
pub struct QemuDriver {
    vms: BTreeMap<String, QemuVm>,
    run_dir: PathBuf,
    log: Arc<QmpLog>,
}

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
                        client: tokio::sync::Mutex::new(None),
                        held: Mutex::new(None),
                    },
                )
            })
            .collect();
        QemuDriver { vms, run_dir, log }
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

    async fn disks(&self, vm: &QemuVm) -> Result<Vec<QemuDisk>, SourceError> {
        let blocks = self.exec(vm, "query-block", json!({})).await?;
        let nodes = self
            .exec(vm, "query-named-block-nodes", json!({"flat": true}))
            .await?;
        parse_disks(&vm.name, &blocks, &nodes)
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
        self.run_dir.join(format!("journal-{vm}.json"))
    }

    /// An earlier release that did not finish (QEMU was unreachable, say) is finished first,
    /// so that its change tracking is rolled back before a new snapshot looks at it.
    async fn finish_earlier_release(&self, vm: &QemuVm) -> Result<(), SourceError> {
        if !self.journal_path(&vm.name).exists() {
            return Ok(());
        }
        let mut report = RecoveryReport::default();
        self.recover_vm(vm, &mut report).await;
        tracing::info!(vm = %vm.name, ?report, "released a snapshot left by an earlier run");
        if !self.journal_path(&vm.name).exists() {
            return Ok(());
        }
        Err(SourceError::Tool {
            command: "release of an earlier snapshot".to_string(),
            detail: report.errors.join("; "),
        })
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
        let tag = tag_of(&request.backup_id);
        let state = SnapshotState {
            backup_id: request.backup_id.clone(),
            vm_name: vm.name.clone(),
            backup_type: request.backup_type,
            tag: tag.clone(),
            base_bitmap,
            new_bitmap: format!("{BITMAP_PREFIX}{}", request.backup_id),
            socket: self.run_dir.join(format!("nbd-{tag}.sock")),
            disks: disks
                .iter()
                .enumerate()
                .map(|(i, d)| StateDisk {
                    disk_key: d.disk.disk_key,
                    size_bytes: d.disk.size_bytes,
                    format_node: d.format_node.clone(),
                    fleece_node: format!("{NODE_PREFIX}{tag}-{i}"),
                    job_id: format!("{JOB_PREFIX}{tag}-{i}"),
                    export_id: format!("{EXPORT_PREFIX}{tag}-{i}"),
                    export_name: format!("{}-disk-{}", vm.name, d.disk.disk_key),
                    file: self.run_dir.join(format!("{NODE_PREFIX}{tag}-{i}.qcow2")),
                })
                .collect(),
        };
        // Held before the journal exists, so that no one mistakes this journal for a leftover.
        *vm.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(state.clone());
        // The journal goes first: whatever happens after this line, a restarted node can undo.
        let journal = self.journal_path(&vm.name);
        let text = serde_json::to_vec_pretty(&state).unwrap_or_default();
        if let Err(source) = std::fs::write(&journal, text) {
            *vm.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Err(SourceError::Io {
                what: "writing snapshot journal",
                path: journal,
                source,
            });
        }
        match self.build_snapshot(vm, &state, &disks).await {
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

    async fn build_snapshot(
        &self,
        vm: &QemuVm,
        state: &SnapshotState,
        disks: &[QemuDisk],
    ) -> Result<Snapshot, SourceError> {
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
        self.exec(vm, "transaction", json!({ "actions": actions }))
            .await?;
        tracing::info!(vm = %vm.name, backup_id = %state.backup_id, disks = state.disks.len(),
            "snapshot taken in one QMP transaction");

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
        })
    }

    async fn only_our_exports(&self, vm: &QemuVm) -> Result<bool, SourceError> {
        let exports = self.exec(vm, "query-block-exports", json!({})).await?;
        Ok(ids_of(&exports, "id")
            .iter()
            .all(|id| id.starts_with(EXPORT_PREFIX)))
    }

    /// Undoes a snapshot; keeps going after errors and returns the first one.
    async fn release_state(
        &self,
        vm: &QemuVm,
        state: &SnapshotState,
        outcome: ReleaseOutcome,
    ) -> Result<(), SourceError> {
        let mut first_err: Option<SourceError> = None;
        let mut note = |r: Result<(), SourceError>| {
            if let Err(e) = r {
                tracing::warn!(vm = %vm.name, error = %e, "release step failed");
                first_err.get_or_insert(e);
            }
        };
        let exports: Vec<String> = state.disks.iter().map(|d| d.export_id.clone()).collect();
        let jobs: Vec<String> = state.disks.iter().map(|d| d.job_id.clone()).collect();
        let nodes: Vec<String> = state.disks.iter().map(|d| d.fleece_node.clone()).collect();
        note(self.remove_exports(vm, &exports).await);
        note(self.cancel_jobs(vm, &jobs).await);
        note(self.delete_nodes(vm, &nodes).await);
        note(self.stop_nbd_server_if_idle(vm).await);
        for d in &state.disks {
            note(remove_file(&d.file));
        }
        note(remove_file(&state.socket));
        note(self.rotate_bitmaps(vm, state, outcome).await);
        // The journal stays when something could not be undone, so start-up recovery retries.
        if first_err.is_none() {
            first_err = remove_file(&self.journal_path(&vm.name)).err();
        }
        let mut held = vm.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.as_ref().map(|h| &h.backup_id) == Some(&state.backup_id) {
            *held = None;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn remove_exports(&self, vm: &QemuVm, ids: &[String]) -> Result<(), SourceError> {
        let present = ids_of(
            &self.exec(vm, "query-block-exports", json!({})).await?,
            "id",
        );
        for id in ids.iter().filter(|id| present.contains(id)) {
            // `hard` drops connected clients (a copy being cancelled) instead of waiting.
            ignore_not_found(
                self.exec(vm, "block-export-del", json!({"id": id, "mode": "hard"}))
                    .await,
            )?;
        }
        // Deletion is asynchronous (BLOCK_EXPORT_DELETED); the node stays busy until then.
        self.wait_gone(vm, "query-block-exports", "id", ids, "export deletion")
            .await
    }

    async fn cancel_jobs(&self, vm: &QemuVm, ids: &[String]) -> Result<(), SourceError> {
        let present = ids_of(
            &self.exec(vm, "query-block-jobs", json!({})).await?,
            "device",
        );
        for id in ids.iter().filter(|id| present.contains(id)) {
            ignore_not_found(
                self.exec(vm, "block-job-cancel", json!({"device": id, "force": true}))
                    .await,
            )?;
        }
        // A job that ended on its own but was not dismissed (auto-dismiss off by a crash-time
        // variant) would block the fleecing node; dismiss it.
        for j in self
            .exec(vm, "query-jobs", json!({}))
            .await?
            .as_array()
            .into_iter()
            .flatten()
        {
            let id = j.get("id").and_then(Value::as_str).unwrap_or_default();
            if ids.iter().any(|i| i == id)
                && j.get("status").and_then(Value::as_str) == Some("concluded")
            {
                ignore_not_found(self.exec(vm, "job-dismiss", json!({"id": id})).await)?;
            }
        }
        self.wait_gone(vm, "query-block-jobs", "device", ids, "block job cancel")
            .await
    }

    async fn delete_nodes(&self, vm: &QemuVm, names: &[String]) -> Result<(), SourceError> {
        let present = ids_of(
            &self
                .exec(vm, "query-named-block-nodes", json!({"flat": true}))
                .await?,
            "node-name",
        );
        for n in names.iter().filter(|n| present.contains(n)) {
            ignore_not_found(self.exec(vm, "blockdev-del", json!({"node-name": n})).await)?;
        }
        Ok(())
    }

    async fn stop_nbd_server_if_idle(&self, vm: &QemuVm) -> Result<(), SourceError> {
        let exports = self.exec(vm, "query-block-exports", json!({})).await?;
        if exports.as_array().is_some_and(|a| !a.is_empty()) {
            return Ok(()); // someone else's exports still use the server
        }
        match self.exec(vm, "nbd-server-stop", json!({})).await {
            Err(SourceError::Qmp { source, .. })
                if source
                    .desc()
                    .is_some_and(|d| d.contains("not running") || d.contains("No NBD server")) =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    async fn wait_gone(
        &self,
        vm: &QemuVm,
        query: &str,
        field: &str,
        ids: &[String],
        what: &str,
    ) -> Result<(), SourceError> {
        let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
        loop {
            let present = ids_of(&self.exec(vm, query, json!({})).await?, field);
            if !ids.iter().any(|id| present.contains(id)) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(SourceError::Timeout {
                    vm: vm.name.clone(),
                    what: what.to_string(),
                    secs: RELEASE_WAIT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn rotate_bitmaps(
        &self,
        vm: &QemuVm,
        state: &SnapshotState,
        outcome: ReleaseOutcome,
    ) -> Result<(), SourceError> {
        let disks = self.disks(vm).await?;
        let by_node: HashMap<&str, &QemuDisk> =
            disks.iter().map(|d| (d.format_node.as_str(), d)).collect();
        let mut actions = Vec::new();
        for d in &state.disks {
            let Some(qd) = by_node.get(d.format_node.as_str()) else {
                continue; // disk gone (hot-unplugged): nothing to rotate
            };
            let has = |name: &str| qd.bitmaps.iter().any(|b| b.name == name);
            match (outcome, &state.base_bitmap) {
                (ReleaseOutcome::Success, _) => {
                    for b in qd
                        .bitmaps
                        .iter()
                        .filter(|b| b.name.starts_with(BITMAP_PREFIX) && b.name != state.new_bitmap)
                    {
                        actions.push(json!({"type": "block-dirty-bitmap-remove",
                            "data": {"node": d.format_node, "name": b.name}}));
                    }
                }
                (ReleaseOutcome::Failure, None) => {
                    if has(&state.new_bitmap) {
                        actions.push(json!({"type": "block-dirty-bitmap-remove",
                            "data": {"node": d.format_node, "name": state.new_bitmap}}));
                    }
                }
                (ReleaseOutcome::Failure, Some(base)) => {
                    if !has(base) {
                        // Nothing to roll back into; the next incremental will say "missing".
                        if has(&state.new_bitmap) {
                            actions.push(json!({"type": "block-dirty-bitmap-remove",
                                "data": {"node": d.format_node, "name": state.new_bitmap}}));
                        }
                        continue;
                    }
                    if has(&state.new_bitmap) {
                        actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                            "node": d.format_node, "target": base, "bitmaps": [state.new_bitmap]}}));
                    }
                    if !qd.bitmaps.iter().any(|b| &b.name == base && b.recording) {
                        actions.push(json!({"type": "block-dirty-bitmap-enable",
                            "data": {"node": d.format_node, "name": base}}));
                    }
                    if has(&state.new_bitmap) {
                        actions.push(json!({"type": "block-dirty-bitmap-remove",
                            "data": {"node": d.format_node, "name": state.new_bitmap}}));
                    }
                }
            }
        }
        if actions.is_empty() {
            return Ok(());
        }
        self.exec(vm, "transaction", json!({ "actions": actions }))
            .await
            .map(|_| ())
    }

    /// Removes every `sendense-*` bitmap of the snapshot's disks (best effort); returns names.
    async fn drop_tracking(&self, vm: &QemuVm, state: &SnapshotState) -> Vec<String> {
        let mut dropped = Vec::new();
        let Ok(disks) = self.disks(vm).await else {
            return dropped;
        };
        for d in disks
            .iter()
            .filter(|d| state.disks.iter().any(|s| s.format_node == d.format_node))
        {
            for b in d
                .bitmaps
                .iter()
                .filter(|b| b.name.starts_with(BITMAP_PREFIX))
            {
                let args = json!({"node": d.format_node, "name": b.name});
                if self
                    .exec(vm, "block-dirty-bitmap-remove", args)
                    .await
                    .is_ok()
                {
                    dropped.push(b.name.clone());
                }
            }
        }
        dropped
    }

    async fn recover_vm(&self, vm: &QemuVm, report: &mut RecoveryReport) {
        let journal_path = self.journal_path(&vm.name);
        let journal: Option<SnapshotState> = std::fs::read(&journal_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let res: Result<(), SourceError> = async {
            let exports: Vec<String> = ids_of(
                &self.exec(vm, "query-block-exports", json!({})).await?,
                "id",
            )
            .into_iter()
            .filter(|id| id.starts_with(EXPORT_PREFIX))
            .collect();
            self.remove_exports(vm, &exports).await?;
            report.exports_removed.extend(exports);
            let jobs: Vec<String> = ids_of(&self.exec(vm, "query-jobs", json!({})).await?, "id")
                .into_iter()
                .filter(|id| id.starts_with(JOB_PREFIX))
                .collect();
            self.cancel_jobs(vm, &jobs).await?;
            report.jobs_cancelled.extend(jobs);
            let nodes: Vec<String> = ids_of(
                &self
                    .exec(vm, "query-named-block-nodes", json!({"flat": true}))
                    .await?,
                "node-name",
            )
            .into_iter()
            .filter(|n| n.starts_with(NODE_PREFIX))
            .collect();
            self.delete_nodes(vm, &nodes).await?;
            report.nodes_removed.extend(nodes);
            self.stop_nbd_server_if_idle(vm).await?;
            if let Some(state) = &journal {
                match self
                    .rotate_bitmaps(vm, state, ReleaseOutcome::Failure)
                    .await
                {
                    Ok(()) => report.bitmaps_rolled_back.push(state.new_bitmap.clone()),
                    // QEMU answered but refused the rollback (e.g. a bitmap left inconsistent
                    // by a QEMU crash): change tracking cannot be trusted, so it is dropped and
                    // the next incremental says "bitmap missing" (a full follows). Keeping the
                    // journal instead would block every later snapshot of this VM.
                    Err(SourceError::Qmp {
                        source: QmpError::Command { .. },
                        ..
                    }) => {
                        let dropped = self.drop_tracking(vm, state).await;
                        report.errors.push(format!(
                            "VM {}: rollback of change tracking refused; dropped bitmaps {dropped:?}, next incremental falls back to full",
                            vm.name
                        ));
                    }
                    Err(e) => return Err(e),
                }
                for d in &state.disks {
                    if remove_file(&d.file).is_ok() {
                        report.files_removed.push(d.file.clone());
                    }
                }
                remove_file(&state.socket)?;
                remove_file(&journal_path)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = res {
            report.errors.push(e.to_string());
        }
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
                    let path = self.journal_path(&vm.name);
                    match std::fs::read(&path)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<SnapshotState>(&b).ok())
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
                self.recover_vm(vm, &mut report).await;
            }
            // Files of snapshots whose journal was lost.
            if let Ok(dir) = std::fs::read_dir(&self.run_dir) {
                for entry in dir.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let ours = (name.starts_with(NODE_PREFIX) && name.ends_with(".qcow2"))
                        || (name.starts_with("nbd-") && name.ends_with(".sock"));
                    if ours && std::fs::remove_file(entry.path()).is_ok() {
                        report.files_removed.push(entry.path());
                    }
                }
            }
            report
        })
    }
}

/// Short, QEMU-name-safe tag of a backup id.
fn tag_of(backup_id: &BackupId) -> String {
    blake3::hash(backup_id.0.as_bytes()).to_hex()[..10].to_string()
}

/// The bitmap an incremental starts from, checked on every disk.
fn incremental_base(
    vm: &str,
    disks: &[QemuDisk],
    previous: Option<&BackupId>,
) -> Result<String, SourceError> {
    let missing = |d: &QemuDisk, detail: String| SourceError::IncrementalBase {
        vm: vm.to_string(),
        disk_key: d.disk.disk_key,
        detail,
    };
    let mut chosen: Option<String> = None;
    for d in disks {
        let ours: Vec<&Bitmap> = d
            .bitmaps
            .iter()
            .filter(|b| b.name.starts_with(BITMAP_PREFIX))
            .collect();
        let name = match previous {
            Some(prev) => {
                let want = format!("{BITMAP_PREFIX}{prev}");
                if !ours.iter().any(|b| b.name == want) {
                    return Err(missing(
                        d,
                        format!(
                            "no bitmap {want} (changes since backup {prev}); found {:?}",
                            ours.iter().map(|b| &b.name).collect::<Vec<_>>()
                        ),
                    ));
                }
                want
            }
            None => {
                let recording: Vec<&&Bitmap> = ours.iter().filter(|b| b.recording).collect();
                match recording.as_slice() {
                    [one] => one.name.clone(),
                    [] => return Err(missing(d, "no recording sendense bitmap".to_string())),
                    many => {
                        return Err(missing(
                            d,
                            format!(
                                "{} recording sendense bitmaps, cannot tell the base",
                                many.len()
                            ),
                        ));
                    }
                }
            }
        };
        let b = ours.iter().find(|b| b.name == name).copied();
        if let Some(b) = b {
            if b.inconsistent {
                return Err(missing(
                    d,
                    format!("bitmap {name} is inconsistent (QEMU did not save it cleanly)"),
                ));
            }
            if !b.recording {
                return Err(missing(
                    d,
                    format!("bitmap {name} is not recording (held by another snapshot?)"),
                ));
            }
        }
        match &chosen {
            None => chosen = Some(name),
            Some(c) if *c != name => {
                return Err(missing(
                    d,
                    format!("disks disagree on the base: {c} vs {name}"),
                ));
            }
            Some(_) => {}
        }
    }
    chosen.ok_or_else(|| SourceError::NoDisks { vm: vm.to_string() })
}

/// Disks from `query-block` (order = QEMU's device order, which follows the command line and
/// hot-plug order, so keys stay stable while the VM's configuration does) with their bitmaps
/// from `query-named-block-nodes`. Removable drives (CD-ROM) and read-only disks are skipped.
fn parse_disks(vm: &str, blocks: &Value, nodes: &Value) -> Result<Vec<QemuDisk>, SourceError> {
    let bad = |detail: String| SourceError::Answer {
        vm: vm.to_string(),
        command: "query-block",
        detail,
    };
    let blocks = blocks
        .as_array()
        .ok_or_else(|| bad("not an array".to_string()))?;
    let mut bitmaps: HashMap<String, Vec<Bitmap>> = HashMap::new();
    for n in nodes.as_array().into_iter().flatten() {
        let Some(name) = n.get("node-name").and_then(Value::as_str) else {
            continue;
        };
        let list = n
            .get("dirty-bitmaps")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|b| {
                Some(Bitmap {
                    name: b.get("name")?.as_str()?.to_string(),
                    recording: b.get("recording").and_then(Value::as_bool).unwrap_or(false),
                    inconsistent: b
                        .get("inconsistent")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                })
            })
            .collect();
        bitmaps.insert(name.to_string(), list);
    }
    let mut out = Vec::new();
    for b in blocks {
        let Some(inserted) = b.get("inserted") else {
            continue;
        };
        if b.get("removable").and_then(Value::as_bool) == Some(true)
            || inserted.get("ro").and_then(Value::as_bool) == Some(true)
        {
            continue;
        }
        let qdev = b.get("qdev").and_then(Value::as_str).unwrap_or_default();
        let device = b.get("device").and_then(Value::as_str).unwrap_or_default();
        if qdev.is_empty() && device.is_empty() {
            continue; // not attached to a guest device
        }
        let format_node = inserted
            .get("node-name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("disk {qdev}{device} has no node-name")))?
            .to_string();
        let size_bytes = inserted
            .get("image")
            .and_then(|i| i.get("virtual-size"))
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("disk {qdev}{device} has no virtual-size")))?;
        let driver = inserted
            .get("drv")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let label = qdev
            .strip_prefix("/machine/peripheral/")
            .map(|rest| rest.split('/').next().unwrap_or(rest).to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| {
                if device.is_empty() {
                    qdev.to_string()
                } else {
                    device.to_string()
                }
            });
        let index = out.len();
        out.push(QemuDisk {
            disk: SourceDisk {
                disk_key: DiskKey(FIRST_DISK_KEY + index as i64),
                unit_number: index as i32,
                size_bytes,
                label,
                controller: None,
                backing_file: None,
                thin_provisioned: None,
            },
            bitmaps: bitmaps.remove(&format_node).unwrap_or_default(),
            format_node,
            driver,
        });
    }
    Ok(out)
}

fn ids_of(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.get(field).and_then(Value::as_str).map(str::to_string))
        .collect()
}

fn is_already_running(e: &SourceError) -> bool {
    matches!(e, SourceError::Qmp { source, .. }
        if source.desc().is_some_and(|d| d.contains("already running")))
}

fn ignore_not_found(r: Result<Value, SourceError>) -> Result<(), SourceError> {
    match r {
        Ok(_) => Ok(()),
        Err(SourceError::Qmp {
            source: QmpError::Command { class, desc, .. },
            ..
        }) if class == "DeviceNotFound"
            || desc.contains("not found")
            || desc.contains("No such")
            || desc.contains("not exist")
            || desc.contains("Cannot find") =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn remove_file(path: &Path) -> Result<(), SourceError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SourceError::Io {
            what: "removing",
            path: path.to_path_buf(),
            source,
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(key: i64, bitmaps: &[(&str, bool)]) -> QemuDisk {
        QemuDisk {
            disk: SourceDisk {
                disk_key: DiskKey(key),
                unit_number: 0,
                size_bytes: 1,
                label: "d".into(),
                controller: None,
                backing_file: None,
                thin_provisioned: None,
            },
            format_node: format!("n{key}"),
            driver: "qcow2".into(),
            bitmaps: bitmaps
                .iter()
                .map(|(n, r)| Bitmap {
                    name: n.to_string(),
                    recording: *r,
                    inconsistent: false,
                })
                .collect(),
        }
    }

    #[test]
    fn base_is_the_named_previous_backup_on_every_disk() {
        let disks = [
            disk(2000, &[("sendense-a", true)]),
            disk(2001, &[("sendense-a", true), ("other", true)]),
        ];
        let prev = BackupId::from("a");
        assert_eq!(
            incremental_base("vm", &disks, Some(&prev)).unwrap(),
            "sendense-a"
        );
        assert_eq!(incremental_base("vm", &disks, None).unwrap(), "sendense-a");
    }

    #[test]
    fn missing_or_ambiguous_base_names_the_disk() {
        let disks = [
            disk(2000, &[("sendense-a", true)]),
            disk(2001, &[("sendense-b", true)]),
        ];
        let e = incremental_base("vm", &disks, Some(&BackupId::from("a")))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("bitmap missing"), "{e}");
        assert!(e.contains("2001"), "{e}");
        let e = incremental_base("vm", &disks, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("disagree"), "{e}");
        let e = incremental_base("vm", &[disk(2000, &[])], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no recording"), "{e}");
    }

    #[test]
    fn disks_in_device_order_skip_cdroms() {
        let blocks = json!([
            {"device": "", "qdev": "/machine/peripheral/sys/virtio-backend", "removable": false,
             "inserted": {"node-name": "fmt0", "drv": "qcow2", "ro": false,
                          "image": {"virtual-size": 67108864}}},
            {"device": "cd", "qdev": "/machine/peripheral/cd0", "removable": true,
             "inserted": {"node-name": "iso", "drv": "raw", "ro": true,
                          "image": {"virtual-size": 1000}}},
            {"device": "", "qdev": "/machine/peripheral/data/virtio-backend", "removable": false,
             "inserted": {"node-name": "fmt1", "drv": "qcow2", "ro": false,
                          "image": {"virtual-size": 134217728}}},
        ]);
        let nodes = json!([{"node-name": "fmt1", "dirty-bitmaps": [
            {"name": "sendense-x", "recording": true}, {"recording": false}]}]);
        let d = parse_disks("vm", &blocks, &nodes).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].disk.disk_key, DiskKey(2000));
        assert_eq!(d[0].disk.label, "sys");
        assert_eq!(d[1].disk.disk_key, DiskKey(2001));
        assert_eq!(d[1].disk.unit_number, 1);
        assert_eq!(d[1].disk.size_bytes, 134217728);
        assert_eq!(d[1].bitmaps.len(), 1);
    }

    #[test]
    fn tags_fit_qemu_node_names() {
        let t = tag_of(&BackupId::from("backup-0123456789abcdef-with-a-long-id"));
        assert_eq!(t.len(), 10);
        assert!(format!("{JOB_PREFIX}{t}-99").len() <= 31);
    }
}
