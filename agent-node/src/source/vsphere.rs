//! VMware vSphere source driver: VMs of a vCenter or ESXi over SOAP ([`sendense_vsphere`]), one
//! VM snapshot per backup, changed block tracking (CBT) for the areas to copy, and each disk
//! of the snapshot exported over NBD by an nbdkit ([`super::nbdkit`]).
//!
//! # A backup, step by step
//! 1. The VM is looked up by name (only names in `[vsphere] vms` when that list is given, and
//!    only names that pass [`validate_name`]: others are left out of the inventory with a
//!    warning). A VM with a disk that a snapshot does not freeze (disk mode
//!    `independent_persistent` / `independent_nonpersistent`, or a raw device mapping) is
//!    refused, naming the disk and why: its copy would not be of one instant. The inventory
//!    says so in that disk's label rather than in a new field: the label already reaches the
//!    hub and the console unchanged, no API, database or QEMU-driver change is needed, and
//!    nothing but a person acts on it (the driver itself refuses the backup).
//! 2. This node's snapshots ([`Ownership`]) that it does not hold are leftovers (a release
//!    that failed, a crash): they are removed first. Without VDDK, a VM with other snapshots
//!    (another node's included) is refused: the HTTPS file access reads flat files, not
//!    snapshot delta chains.
//! 3. A journal entry (`<run_dir>/vsphere-snapshot-<backup>.json`, [`journal`]) is written, then
//!    ONE `CreateSnapshot_Task` named `sendense-<node>-<backup id>`, its description naming the
//!    node, covers every disk (memory off, quiesce per config).
//! 4. Per disk of the snapshot: the areas to copy from `QueryChangedDiskAreas` (looped over
//!    `startOffset`): change id `"*"` (the allocated areas) for a full backup when CBT is on,
//!    the previous backup's change id for an incremental; with CBT off a full reads every
//!    block (`areas = None`). The disk's change id in the snapshot is reported to the hub.
//! 5. One nbdkit per disk: the `vddk` plugin when `vddk_libdir` is set and the plugin is
//!    installed, else `curl` on the datastore file URL with the session cookie.
//!
//! Any failure after the snapshot exists stops the nbdkits and removes the snapshot before the
//! error is returned. [`SourceDriver::release`] does the same after the copy; a VM or snapshot
//! that is gone (`ManagedObjectNotFound`) counts as released.
//!
//! # Incrementals
//! The hub sends each disk's change id of the previous backup. The incremental is refused with
//! [`SourceError::IncrementalBase`] (the hub then runs a full backup) when a disk has none, CBT
//! is off, or the change id's epoch (the uuid before `/`) differs from the disk's current one:
//! vSphere starts a new epoch when tracking is reset. A `FileFault` from
//! `QueryChangedDiskAreas` (the change id is unknown to the host) is refused the same way.
//!
//! # Recovery, and several nodes on one vCenter
//! At start-up the node holds nothing, so every snapshot of ITS OWN on the VMs it may back up
//! (all VMs, or the `vms` list) is a leftover and is removed, as are the journal's entries and
//! nbdkits recorded in pid files. What cannot be removed is listed in the report.
//!
//! A snapshot is this node's when its name starts with `sendense-<node name>-` AND its
//! description says `Sendense node "<node name>"`: the name alone is ambiguous, as node names
//! may contain `-` (node `a` must not take `sendense-a-b-7` of node `a-b`). Another node's
//! snapshots are left alone, whatever the `vms` lists say: that node may be copying from one
//! right now.
//!
//! Snapshots of older versions (`sendense-<backup id>`, a description that names no node) are
//! removed when this node's journal records them; the others are left and listed in the
//! report's errors for an operator to remove. Nothing in such a snapshot says which node took
//! it, and removing a snapshot another node is reading breaks that node's backup, while a
//! leftover snapshot only costs datastore space until someone looks at the report.
//!
//! # Certificates on the data path
//! nbdkit's curl checks the datastore's HTTPS like the SOAP client does: the system store, the
//! configured CA file, or for a pinned certificate that very certificate as its only CA (curl
//! then still wants the certificate to name the host in the URL, which a pin alone does not).
//!
//! # Session
//! One SOAP session, opened on first use; a `NotAuthenticated` fault (the session expired) logs
//! in again once and repeats the call. nbdkit's curl plugin reads with the session's cookie
//! from a file; while a snapshot is held the session is kept alive and, after a new login,
//! the file rewritten for nbdkit to read again ([`session`]). Reads made between the session's
//! end and the next keepalive still fail (HTTP 401, EIO in the copy).
//!
//! # Modules
//! - `inventory`: a VM as the hub sees it ([`SourceVm`]), disks a snapshot does not freeze.
//! - `snapshots`: taking, removing and releasing the snapshot; whose a snapshot is.
//! - `areas`: the incremental base check and the areas of each disk from CBT.
//! - [`cbt`]: the CBT rules as pure functions (epochs, area normalization).
//! - `exports`: one nbdkit per disk (curl or vddk plugin arguments).
//! - `recovery`: leftovers of a crash removed at start-up.
//! - [`journal`]: the crash journal of snapshots taken or held.
//! - [`session`]: the SOAP session and its keepalive while a snapshot is held.

mod areas;
pub mod cbt;
mod exports;
mod inventory;
pub mod journal;
mod recovery;
pub mod session;
mod snapshots;

pub use exports::sha1_thumbprint;
pub use snapshots::{Ownership, SNAPSHOT_PREFIX, ownership};

use super::nbdkit::Nbdkit;
use super::{
    BoxFuture, RecoveryReport, ReleaseOutcome, Snapshot, SnapshotRequest, SourceDriver,
    SourceError, SourceVm,
};
use crate::config::VsphereConfig;
use exports::vddk_plugin_installed;
use inventory::source_vm;
use sendense_shared::ids::BackupId;
use sendense_shared::names::validate_name;
use sendense_vsphere::{Client, Endpoint, MoRef, VmInfo, VsphereError};
use session::{KeepAlive, Session};
use snapshots::file_stem;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DRIVER: &str = "vsphere";
const SNAPSHOT_KIND: &str = "VirtualMachineSnapshot";
const VM_KIND: &str = "VirtualMachine";

/// A snapshot the node holds.
struct Holding {
    backup_id: BackupId,
    snapshot: MoRef,
    journal: PathBuf,
    exports: Vec<Nbdkit>,
    /// Keeps the session (whose cookie the exports read with) alive.
    keepalive: KeepAlive,
}

enum Held {
    /// A snapshot is being taken.
    Taking(BackupId),
    Holding(Holding),
}

impl Held {
    fn backup_id(&self) -> &BackupId {
        match self {
            Held::Taking(id) => id,
            Held::Holding(h) => &h.backup_id,
        }
    }
}

/// The vSphere driver.
pub struct VsphereDriver {
    /// This node's name: in the name and description of every snapshot it takes.
    node: String,
    endpoint: Endpoint,
    quiesce: bool,
    allow: Option<BTreeSet<String>>,
    nbdkit: PathBuf,
    /// Set only when configured AND nbdkit's vddk plugin is installed.
    vddk_libdir: Option<PathBuf>,
    run_dir: PathBuf,
    session: Arc<Session>,
    /// How often the session is touched while a snapshot is held.
    keepalive: Duration,
    /// VM name → what the node holds of it.
    held: Mutex<HashMap<String, Held>>,
    /// VM names already warned about (not valid as Sendense names), so the log says it once.
    warned: Mutex<HashSet<String>>,
}

impl VsphereDriver {
    /// The driver for `config` of the node named `node`; nothing is contacted until the first
    /// call. `run_dir` holds nbdkit sockets, pid files, cookie files and the journal.
    pub fn new(config: &VsphereConfig, node: &str, run_dir: PathBuf) -> VsphereDriver {
        let vddk_libdir = config.vddk_libdir.clone().filter(|dir| {
            let found = vddk_plugin_installed(&config.nbdkit);
            if !found {
                tracing::warn!(libdir = %dir.display(),
                    "vddk_libdir is set but nbdkit's vddk plugin is not installed; reading disks over HTTPS (curl plugin)");
            }
            found
        });
        let endpoint = Endpoint {
            url: config.url.clone(),
            user: config.user.clone(),
            password: config.password.clone(),
            tls: config.tls.clone(),
        };
        VsphereDriver {
            node: node.to_string(),
            endpoint: endpoint.clone(),
            quiesce: config.quiesce,
            allow: config.vms.clone(),
            nbdkit: config.nbdkit.clone(),
            vddk_libdir,
            run_dir,
            session: Arc::new(Session::new(endpoint)),
            keepalive: config.session_keepalive,
            held: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// Whether disks are read through VDDK (else over HTTPS with nbdkit's curl plugin).
    pub fn uses_vddk(&self) -> bool {
        self.vddk_libdir.is_some()
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn session(&self) -> Result<Client, VsphereError> {
        self.session.get().await
    }

    /// Runs `f` with the session's client (which logs in again when the session expired).
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, VsphereError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, VsphereError>>,
    {
        self.session.call(f).await
    }

    /// Endpoint problems (unreachable, certificate, login) name the URL and user; the rest
    /// are the hypervisor's answer to `operation` on `vm`.
    fn error(&self, vm: &str, operation: &'static str, e: VsphereError) -> SourceError {
        match e {
            VsphereError::Unreachable { .. }
            | VsphereError::Certificate { .. }
            // The client's message names the URL and the user; the endpoint names the config.
            | VsphereError::Login { .. } => SourceError::Endpoint {
                endpoint: "[vsphere]".to_string(),
                detail: e.to_string(),
            },
            e => SourceError::Hypervisor {
                vm: vm.to_string(),
                operation,
                detail: e.to_string(),
            },
        }
    }

    /// Whether the node may back up a VM of this name (allowlist, and a usable name).
    fn allowed(&self, name: &str) -> bool {
        if self.allow.as_ref().is_some_and(|a| !a.contains(name)) {
            return false;
        }
        if let Err(e) = validate_name("vm name", name) {
            if self
                .warned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_string())
            {
                tracing::warn!(vm = %name, error = %e, "vSphere VM left out of the inventory: its name cannot name backup files");
            }
            return false;
        }
        true
    }

    async fn find(&self, vm_name: &str, operation: &'static str) -> Result<VmInfo, SourceError> {
        if !self.allowed(vm_name) {
            return Err(SourceError::UnknownVm {
                vm: vm_name.to_string(),
            });
        }
        match self.call(|c| async move { c.find_vm(vm_name).await }).await {
            Ok(Some(vm)) => Ok(vm),
            Ok(None) => Err(SourceError::UnknownVm {
                vm: vm_name.to_string(),
            }),
            Err(e) => Err(self.error(vm_name, operation, e)),
        }
    }

    fn stem(&self, backup_id: &BackupId) -> String {
        file_stem(&self.run_dir, backup_id)
    }

    fn holds(&self, vm_name: &str) -> bool {
        self.lock_held().contains_key(vm_name)
    }
}

/// Removes a `Taking` mark if the snapshot future ends without settling it (dropped).
struct Reservation<'a> {
    driver: &'a VsphereDriver,
    vm: String,
    armed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut held = self.driver.lock_held();
            if matches!(held.get(&self.vm), Some(Held::Taking(_))) {
                held.remove(&self.vm);
            }
        }
    }
}

impl SourceDriver for VsphereDriver {
    fn list_vms(&self) -> BoxFuture<'_, Result<Vec<SourceVm>, SourceError>> {
        Box::pin(async move {
            let vms = self
                .call(|c| async move { c.list_vms().await })
                .await
                .map_err(|e| match self.error("", "listing VMs", e) {
                    SourceError::Hypervisor { detail, .. } => SourceError::Endpoint {
                        endpoint: format!("[vsphere] {}", self.endpoint.url),
                        detail: format!("listing VMs: {detail}"),
                    },
                    other => other,
                })?;
            Ok(vms
                .iter()
                .filter(|vm| self.allowed(&vm.name))
                .map(source_vm)
                .collect())
        })
    }

    fn vm<'a>(&'a self, vm_name: &'a str) -> BoxFuture<'a, Result<SourceVm, SourceError>> {
        Box::pin(async move { Ok(source_vm(&self.find(vm_name, "reading the VM").await?)) })
    }

    fn check_incremental_base<'a>(
        &'a self,
        request: &'a SnapshotRequest,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let vm = self
                .find(&request.vm_name, "checking change tracking")
                .await?;
            areas::check_base(&vm, request)
        })
    }

    fn snapshot<'a>(
        &'a self,
        request: &'a SnapshotRequest,
    ) -> BoxFuture<'a, Result<Snapshot, SourceError>> {
        Box::pin(async move {
            {
                let mut held = self.lock_held();
                if let Some(h) = held.get(&request.vm_name) {
                    return Err(SourceError::SnapshotHeld {
                        vm: request.vm_name.clone(),
                        backup_id: h.backup_id().clone(),
                    });
                }
                held.insert(
                    request.vm_name.clone(),
                    Held::Taking(request.backup_id.clone()),
                );
            }
            let mut reservation = Reservation {
                driver: self,
                vm: request.vm_name.clone(),
                armed: true,
            };
            let taken = self.take(request).await;
            reservation.armed = false;
            let mut held = self.lock_held();
            match taken {
                Ok((snapshot, holding)) => {
                    held.insert(request.vm_name.clone(), Held::Holding(holding));
                    Ok(snapshot)
                }
                Err(e) => {
                    held.remove(&request.vm_name);
                    Err(e)
                }
            }
        })
    }

    fn release<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        _outcome: ReleaseOutcome,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        // CBT needs nothing rolled back: the hub keeps the change ids of completed backups only,
        // so after a failure the next incremental asks for changes since the last good one.
        Box::pin(async move {
            let holding = {
                let mut held = self.lock_held();
                match held.get(&snapshot.vm_name) {
                    Some(Held::Holding(h)) if h.backup_id == snapshot.backup_id => {
                        match held.remove(&snapshot.vm_name) {
                            Some(Held::Holding(h)) => Some(h),
                            _ => None,
                        }
                    }
                    _ => None,
                }
            };
            if let Some(h) = holding {
                return self.release_holding(&snapshot.vm_name, h).await;
            }
            // Released already, or held by an earlier run: the journal knows.
            let path = journal::path(&self.run_dir, &self.stem(&snapshot.backup_id));
            let entry = journal::all(&self.run_dir)
                .into_iter()
                .flatten()
                .find(|(p, _)| *p == path);
            match entry {
                Some((p, e)) => self.release_entry(&p, &e).await.map(|_| ()),
                None => Ok(()),
            }
        })
    }

    fn recover(&self) -> BoxFuture<'_, RecoveryReport> {
        Box::pin(self.recover_leftovers())
    }

    fn enable_change_tracking<'a>(
        &'a self,
        vm_name: &'a str,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let vm = self.find(vm_name, "enabling change tracking").await?;
            if vm.cbt_enabled {
                return Ok(());
            }
            let moref = &vm.moref;
            self.call(|c| async move { c.enable_change_tracking(moref).await })
                .await
                .map_err(|e| self.error(vm_name, "ReconfigVM_Task (enable change tracking)", e))?;
            tracing::info!(vm = %vm_name, "changed block tracking enabled");
            Ok(())
        })
    }
}

/// The VM, disks and request the unit tests of the submodules start from.
#[cfg(test)]
mod fixtures {
    use super::SNAPSHOT_KIND;
    use crate::source::SnapshotRequest;
    use sendense_shared::api::BackupType;
    use sendense_shared::ids::{BackupId, DiskKey};
    use sendense_vsphere::{DiskInfo, MoRef, SnapshotInfo, VmInfo};

    pub(super) fn disk(key: i32, change_id: Option<&str>) -> DiskInfo {
        DiskInfo {
            key,
            label: format!("Hard disk {}", key - 1999),
            controller_key: 1000,
            controller_label: "SCSI controller 0".into(),
            unit_number: key - 2000,
            capacity_bytes: 64 << 20,
            file_name: format!("[LocalDS_0] vm1/vm1_{key}.vmdk"),
            datastore: "LocalDS_0".into(),
            thin: Some(true),
            change_id: change_id.map(str::to_string),
            mode: Some("persistent".into()),
            raw_mapping: None,
        }
    }

    pub(super) fn vm(cbt: bool, disks: Vec<DiskInfo>) -> VmInfo {
        VmInfo {
            moref: MoRef::new("VirtualMachine", "vm-42"),
            name: "vm1".into(),
            uuid: "5029-uuid".into(),
            datacenter: "DC0".into(),
            power_state: "poweredOn".into(),
            cbt_enabled: cbt,
            disks,
            snapshots: vec![SnapshotInfo {
                moref: MoRef::new(SNAPSHOT_KIND, "snapshot-1"),
                name: "x".into(),
                description: String::new(),
            }],
        }
    }

    pub(super) fn incremental(ids: &[(i64, &str)]) -> SnapshotRequest {
        SnapshotRequest {
            backup_id: BackupId::from("b2"),
            vm_name: "vm1".into(),
            backup_type: BackupType::Incremental,
            previous_backup_id: Some(BackupId::from("b1")),
            previous_change_ids: ids
                .iter()
                .map(|(k, c)| (DiskKey(*k), c.to_string()))
                .collect(),
            require_application_consistency: false,
        }
    }
}
