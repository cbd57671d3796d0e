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

pub mod cbt;
pub mod journal;
pub mod session;

use super::nbdkit::{self, CaInfo, Nbdkit, NbdkitSpec, Plugin, VddkArgs};
use super::{
    BoxFuture, RecoveryReport, ReleaseOutcome, Snapshot, SnapshotDisk, SnapshotRequest, SourceDisk,
    SourceDriver, SourceError, SourceVm,
};
use crate::config::VsphereConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use sendense_shared::api::BackupType;
use sendense_shared::ids::{BackupId, DiskKey};
use sendense_shared::names::validate_name;
use sendense_vsphere::{
    Client, DiskInfo, Endpoint, MoRef, SnapshotInfo, TlsPolicy, VmInfo, VsphereError,
};
use session::{KeepAlive, Session};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Prefix of every snapshot a node creates: `sendense-<node>-<backup id>`.
pub const SNAPSHOT_PREFIX: &str = "sendense-";
/// In a snapshot's description, before the quoted node name.
const OWNER_MARK: &str = "Sendense node \"";
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

    /// Removes a snapshot; one that is gone (or whose VM is) counts as removed.
    async fn remove_snapshot(&self, vm_name: &str, snapshot: &MoRef) -> Result<(), SourceError> {
        match self
            .call(|c| async move { c.remove_snapshot(snapshot).await })
            .await
        {
            Ok(()) => {
                tracing::info!(vm = %vm_name, snapshot = %snapshot.value, "snapshot removed");
                Ok(())
            }
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => {
                tracing::info!(vm = %vm_name, snapshot = %snapshot.value, "snapshot already gone");
                Ok(())
            }
            Err(e) => Err(self.error(vm_name, "RemoveSnapshot_Task", e)),
        }
    }

    /// Removes every snapshot of `vm` named `name` (after a create task whose answer was lost).
    async fn remove_named(&self, vm: &MoRef, vm_name: &str, name: &str) -> Result<(), SourceError> {
        let info = match self.call(|c| async move { c.vm(vm).await }).await {
            Ok(info) => info,
            Err(e) if e.fault() == Some("ManagedObjectNotFound") => return Ok(()),
            Err(e) => return Err(self.error(vm_name, "reading the VM's snapshots", e)),
        };
        for s in info.snapshots.iter().filter(|s| s.name == name) {
            self.remove_snapshot(vm_name, &s.moref).await?;
        }
        Ok(())
    }

    fn stem(&self, backup_id: &BackupId) -> String {
        file_stem(&self.run_dir, backup_id)
    }

    async fn take(&self, request: &SnapshotRequest) -> Result<(Snapshot, Holding), SourceError> {
        let vm_name = request.vm_name.as_str();
        let mut vm = self.find(vm_name, "snapshot").await?;
        if vm.disks.is_empty() {
            return Err(SourceError::NoDisks { vm: vm.name });
        }
        check_frozen(&vm)?;
        if request.backup_type == BackupType::Incremental {
            check_base(&vm, request)?;
        }
        let stale: Vec<MoRef> = vm
            .snapshots
            .iter()
            .filter(|s| ownership(&self.node, s) == Some(Ownership::Mine))
            .map(|s| s.moref.clone())
            .collect();
        for s in &stale {
            tracing::warn!(vm = %vm_name, snapshot = %s.value, "removing a Sendense snapshot an earlier run left");
            self.remove_snapshot(vm_name, s).await?;
        }
        // RemoveSnapshot_Task runs with removeChildren=false: exactly the removed ones are gone
        // from the (flattened) tree, so the list is brought up to date here instead of listing
        // the whole inventory of every datacenter again.
        vm.snapshots.retain(|s| !stale.contains(&s.moref));
        if !self.uses_vddk() {
            let foreign: Vec<&str> = vm.snapshots.iter().map(|s| s.name.as_str()).collect();
            if !foreign.is_empty() {
                tracing::warn!(vm = %vm_name, snapshots = ?foreign, "VM has snapshots; HTTPS file access cannot read delta disks");
                return Err(SourceError::Unsupported {
                    vm: vm.name,
                    driver: DRIVER,
                    what: "backing up a VM that already has snapshots without VDDK (set vddk_libdir, or remove the snapshots)",
                });
            }
        }
        std::fs::create_dir_all(&self.run_dir).map_err(|source| SourceError::Io {
            what: "creating run directory",
            path: self.run_dir.clone(),
            source,
        })?;
        let stem = self.stem(&request.backup_id);
        let journal_path = journal::path(&self.run_dir, &stem);
        let name = snapshot_name(&self.node, &request.backup_id);
        let mut entry = journal::Entry {
            backup_id: request.backup_id.0.clone(),
            vm_name: vm.name.clone(),
            vm_moref: vm.moref.value.clone(),
            snapshot_name: name.clone(),
            snapshot_moref: None,
        };
        // The journal goes first: whatever happens after this line, a restarted node can undo.
        journal::write(&journal_path, &entry).map_err(|source| SourceError::Io {
            what: "writing snapshot journal",
            path: journal_path.clone(),
            source,
        })?;
        let description = format!(
            "Taken by {OWNER_MARK}{}\" for backup {} at {}. Sendense removes it when the backup ends, or at the node's next start-up.",
            self.node,
            request.backup_id,
            chrono::Utc::now().to_rfc3339()
        );
        let (vm_ref, desc, quiesce) = (&vm.moref, description.as_str(), self.quiesce);
        let created = self
            .call(|c| {
                let name = name.as_str();
                async move { c.create_snapshot(vm_ref, name, desc, quiesce).await }
            })
            .await;
        let snapshot = match created {
            Ok(s) => s,
            Err(e) => {
                let err = self.error(vm_name, "CreateSnapshot_Task", e);
                // The task may have made the snapshot before its answer was lost.
                match self.remove_named(&vm.moref, vm_name, &name).await {
                    Ok(()) => {
                        let _ = journal::remove(&journal_path);
                    }
                    Err(re) => {
                        tracing::error!(vm = %vm_name, error = %re, "cleanup after a failed snapshot")
                    }
                }
                return Err(err);
            }
        };
        tracing::info!(vm = %vm_name, backup_id = %request.backup_id, snapshot = %snapshot.value,
            disks = vm.disks.len(), "snapshot taken (one CreateSnapshot_Task)");
        entry.snapshot_moref = Some(snapshot.value.clone());
        if let Err(e) = journal::write(&journal_path, &entry) {
            // The first entry (by name) still lets a restart find it.
            tracing::warn!(path = %journal_path.display(), error = %e, "cannot update snapshot journal");
        }
        match self.export(&vm, &snapshot, request, &stem).await {
            Ok((disks, exports)) => Ok((
                Snapshot {
                    backup_id: request.backup_id.clone(),
                    vm_name: vm.name.clone(),
                    backup_type: request.backup_type,
                    disks,
                },
                Holding {
                    backup_id: request.backup_id.clone(),
                    snapshot,
                    journal: journal_path,
                    keepalive: KeepAlive::start(
                        self.session.clone(),
                        vm.name.clone(),
                        exports.iter().filter_map(Nbdkit::cookie_file).collect(),
                        self.keepalive,
                    ),
                    exports,
                },
            )),
            Err(e) => {
                tracing::warn!(vm = %vm_name, backup_id = %request.backup_id, error = %e,
                    "exporting the snapshot failed; removing it");
                match self.remove_snapshot(vm_name, &snapshot).await {
                    Ok(()) => {
                        let _ = journal::remove(&journal_path);
                    }
                    Err(re) => {
                        tracing::error!(vm = %vm_name, error = %re, "removing the snapshot after a failure")
                    }
                }
                Err(e)
            }
        }
    }

    /// Areas, change ids and one nbdkit per disk of the snapshot. On failure, the nbdkits
    /// started so far are stopped.
    async fn export(
        &self,
        vm: &VmInfo,
        snapshot: &MoRef,
        request: &SnapshotRequest,
        stem: &str,
    ) -> Result<(Vec<SnapshotDisk>, Vec<Nbdkit>), SourceError> {
        let disks = self
            .call(|c| async move { c.snapshot_disks(snapshot).await })
            .await
            .map_err(|e| self.error(&vm.name, "reading the snapshot's disks", e))?;
        if disks.is_empty() {
            return Err(SourceError::NoDisks {
                vm: vm.name.clone(),
            });
        }
        let mut exports: Vec<Nbdkit> = Vec::new();
        let built = async {
            let mut out = Vec::new();
            for d in &disks {
                let areas = self.areas(vm, snapshot, d, request).await?;
                let client = self
                    .session()
                    .await
                    .map_err(|e| self.error(&vm.name, "nbdkit session", e))?;
                let spec = NbdkitSpec {
                    run_dir: self.run_dir.clone(),
                    stem: format!("{stem}-{}", d.key),
                    export: format!("{}-disk-{}", vm.name, d.key),
                    plugin: self.plugin(&client, vm, snapshot, d)?,
                };
                let nbd =
                    Nbdkit::start(&self.nbdkit, spec)
                        .await
                        .map_err(|e| SourceError::Tool {
                            command: format!("nbdkit for disk {} of VM {}", d.key, vm.name),
                            detail: e.to_string(),
                        })?;
                out.push(SnapshotDisk {
                    disk_key: DiskKey(d.key as i64),
                    size_bytes: d.capacity_bytes,
                    socket: nbd.socket(),
                    export: nbd.export().to_string(),
                    dirty_bitmap: None,
                    areas,
                    change_id: d.change_id.clone(),
                });
                exports.push(nbd);
            }
            Ok::<_, SourceError>(out)
        }
        .await;
        match built {
            Ok(out) => Ok((out, exports)),
            Err(e) => {
                for n in &exports {
                    n.stop().await;
                }
                Err(e)
            }
        }
    }

    /// What to copy of one disk: `QueryChangedDiskAreas` looped over the disk.
    async fn areas(
        &self,
        vm: &VmInfo,
        snapshot: &MoRef,
        disk: &DiskInfo,
        request: &SnapshotRequest,
    ) -> Result<Option<Vec<(u64, u64)>>, SourceError> {
        let key = DiskKey(disk.key as i64);
        let incremental = request.backup_type == BackupType::Incremental;
        let change_id = if incremental {
            request
                .previous_change_ids
                .get(&key)
                .cloned()
                .ok_or_else(|| SourceError::IncrementalBase {
                    vm: vm.name.clone(),
                    disk_key: key,
                    detail: "no change id of the previous backup (the hub sent none for this disk)"
                        .into(),
                })?
        } else if vm.cbt_enabled {
            "*".to_string()
        } else {
            return Ok(None);
        };
        let capacity = disk.capacity_bytes;
        let mut areas = Vec::new();
        let mut start = 0u64;
        while start < capacity {
            let (vm_ref, cid) = (&vm.moref, change_id.as_str());
            let answer = self
                .call(|c| async move {
                    c.query_changed_disk_areas(vm_ref, snapshot, disk.key, start, cid)
                        .await
                })
                .await;
            let r = match answer {
                Ok(r) => r,
                Err(e) if incremental && e.fault() == Some("FileFault") => {
                    return Err(SourceError::IncrementalBase {
                        vm: vm.name.clone(),
                        disk_key: key,
                        detail: format!("the host does not know change id {change_id:?}: {e}"),
                    });
                }
                Err(e) if !incremental && e.fault().is_some() => {
                    // A full is correct without the map, only slower.
                    tracing::warn!(vm = %vm.name, disk_key = %key, error = %e,
                        "QueryChangedDiskAreas(\"*\") failed; reading every block of the disk");
                    return Ok(None);
                }
                Err(e) => return Err(self.error(&vm.name, "QueryChangedDiskAreas", e)),
            };
            let next = r.start_offset.saturating_add(r.length);
            areas.extend(r.areas);
            if next <= start {
                return Err(SourceError::Hypervisor {
                    vm: vm.name.clone(),
                    operation: "QueryChangedDiskAreas",
                    detail: format!(
                        "disk {key}: the answer for offset {start} covers nothing (startOffset {}, length {})",
                        r.start_offset, r.length
                    ),
                });
            }
            start = next;
        }
        Ok(Some(cbt::normalize(areas, capacity)))
    }

    fn plugin(
        &self,
        client: &Client,
        vm: &VmInfo,
        snapshot: &MoRef,
        disk: &DiskInfo,
    ) -> Result<Plugin, SourceError> {
        let no_cert = || SourceError::Endpoint {
            endpoint: self.endpoint.url.clone(),
            detail: "the server certificate was not captured in the TLS handshake".into(),
        };
        if let Some(libdir) = &self.vddk_libdir {
            let pem = client.server_certificate_pem().ok_or_else(no_cert)?;
            let (server, port) = host_port(&self.endpoint.url);
            return Ok(Plugin::Vddk(VddkArgs {
                libdir: libdir.clone(),
                server,
                port,
                user: self.endpoint.user.clone(),
                password: self.endpoint.password.expose().to_string(),
                thumbprint: sha1_thumbprint(&pem).ok_or_else(no_cert)?,
                vm_moref: vm.moref.value.clone(),
                snapshot_moref: snapshot.value.clone(),
                file: disk.file_name.clone(),
            }));
        }
        let url = client
            .datastore_file_url(&vm.datacenter, &disk.file_name)
            .map_err(|e| self.error(&vm.name, "datastore file URL", e))?;
        let cainfo = match &self.endpoint.tls {
            TlsPolicy::System | TlsPolicy::Insecure => None,
            TlsPolicy::CaFile(p) => Some(CaInfo::File(p.clone())),
            TlsPolicy::Pinned(_) => Some(CaInfo::Pem(
                client.server_certificate_pem().ok_or_else(no_cert)?,
            )),
        };
        Ok(Plugin::Curl {
            url,
            cookie: client.session_cookie(),
            // Within a keepalive period of a new login, nbdkit reads with the new cookie.
            cookie_renew_secs: Some(self.keepalive.as_secs().clamp(1, 30) as u32),
            cainfo,
            insecure: self.endpoint.tls == TlsPolicy::Insecure,
        })
    }

    async fn release_holding(&self, vm_name: &str, h: Holding) -> Result<(), SourceError> {
        // First, so that no cookie file is written after nbdkit's files are removed.
        h.keepalive.stop().await;
        for n in &h.exports {
            n.stop().await;
        }
        self.remove_snapshot(vm_name, &h.snapshot).await?;
        journal::remove(&h.journal).map_err(|source| SourceError::Io {
            what: "removing snapshot journal",
            path: h.journal.clone(),
            source,
        })
    }

    /// Removes the snapshot of a journal entry (by reference, or by name when the create task
    /// never answered), then the entry.
    async fn release_entry(&self, path: &Path, e: &journal::Entry) -> Result<String, SourceError> {
        let what = match &e.snapshot_moref {
            Some(m) => {
                self.remove_snapshot(&e.vm_name, &MoRef::new(SNAPSHOT_KIND, m.clone()))
                    .await?;
                format!("VM {}: snapshot {} ({m})", e.vm_name, e.snapshot_name)
            }
            None => {
                self.remove_named(
                    &MoRef::new(VM_KIND, e.vm_moref.clone()),
                    &e.vm_name,
                    &e.snapshot_name,
                )
                .await?;
                format!("VM {}: snapshot {}", e.vm_name, e.snapshot_name)
            }
        };
        journal::remove(path).map_err(|source| SourceError::Io {
            what: "removing snapshot journal",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(what)
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
            check_base(&vm, request)
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
        Box::pin(async move {
            let mut report = RecoveryReport::default();
            let left = nbdkit::stop_leftovers(&self.run_dir).await;
            report.exports_removed.extend(left.stopped);
            report.files_removed.extend(left.files_removed);
            report.errors.extend(left.errors);
            // Unreachable (or refusing the login): say so once, rather than wait out a connect
            // timeout per journal entry; the entries stay for the next start or snapshot.
            if let Err(e) = self.session().await {
                let e = self.error("", "log in", e);
                report.errors.push(format!(
                    "cannot look for leftover Sendense snapshots ({} journal entries kept): {e}",
                    journal::all(&self.run_dir).len()
                ));
                return report;
            }
            for entry in journal::all(&self.run_dir) {
                match entry {
                    Err(e) => report.errors.push(e),
                    Ok((_, e)) if self.holds(&e.vm_name) => {}
                    Ok((path, e)) => match self.release_entry(&path, &e).await {
                        Ok(what) => report.snapshots_removed.push(what),
                        Err(err) => report.errors.push(format!(
                            "snapshot {} of VM {} (journal {}): {err}",
                            e.snapshot_name,
                            e.vm_name,
                            path.display()
                        )),
                    },
                }
            }
            // The node holds nothing it did not take in this run: every other snapshot of its
            // own on the VMs it may back up is a leftover. Other nodes' are theirs to remove.
            match self.call(|c| async move { c.list_vms().await }).await {
                Ok(vms) => {
                    for vm in vms
                        .iter()
                        .filter(|vm| self.allow.as_ref().is_none_or(|a| a.contains(&vm.name)))
                        .filter(|vm| !self.holds(&vm.name))
                    {
                        for s in &vm.snapshots {
                            match ownership(&self.node, s) {
                                Some(Ownership::Mine) => {}
                                Some(Ownership::Node(other)) => {
                                    tracing::debug!(vm = %vm.name, snapshot = %s.name, node = %other,
                                        "leaving another node's snapshot");
                                    continue;
                                }
                                Some(Ownership::Unknown) => {
                                    report.errors.push(format!(
                                        "snapshot {} ({}) of VM {}: taken by a Sendense version that did not record the node; not removed, as another node may be reading it (remove it by hand once no backup of the VM runs)",
                                        s.name, s.moref.value, vm.name
                                    ));
                                    continue;
                                }
                                None => continue,
                            }
                            match self.remove_snapshot(&vm.name, &s.moref).await {
                                Ok(()) => report.snapshots_removed.push(format!(
                                    "VM {}: snapshot {} ({})",
                                    vm.name, s.name, s.moref.value
                                )),
                                Err(e) => report.errors.push(format!(
                                    "snapshot {} ({}) of VM {}: {e}",
                                    s.name, s.moref.value, vm.name
                                )),
                            }
                        }
                    }
                }
                Err(e) => report.errors.push(format!(
                    "cannot look for leftover Sendense snapshots: {}",
                    self.error("", "listing VMs", e)
                )),
            }
            report
        })
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

/// `sendense-<node>-<backup id>`.
fn snapshot_name(node: &str, backup_id: &BackupId) -> String {
    format!("{SNAPSHOT_PREFIX}{node}-{backup_id}")
}

/// Which Sendense node took a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// This node: named `sendense-<node>-...` and its description names this node.
    Mine,
    /// The node the description names (not this one).
    Node(String),
    /// Named `sendense-...` but its description names no node (an older version took it), or
    /// names this node under another name.
    Unknown,
}

/// Whose a snapshot is, as seen by the node `node`; `None` when Sendense did not take it.
pub fn ownership(node: &str, s: &SnapshotInfo) -> Option<Ownership> {
    if !s.name.starts_with(SNAPSHOT_PREFIX) {
        return None;
    }
    let owner = s
        .description
        .split_once(OWNER_MARK)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(name, _)| name);
    Some(match owner {
        None => Ownership::Unknown,
        // Renamed by hand, or a node name with a quote: not clearly ours, so not removed.
        Some(o) if o == node && !s.name.starts_with(&format!("{SNAPSHOT_PREFIX}{node}-")) => {
            Ownership::Unknown
        }
        Some(o) if o == node => Ownership::Mine,
        Some(o) => Ownership::Node(o.to_string()),
    })
}

/// A VM as the inventory shows it.
fn source_vm(vm: &VmInfo) -> SourceVm {
    SourceVm {
        vm_name: vm.name.clone(),
        vm_id: vm.uuid.clone(),
        disks: vm
            .disks
            .iter()
            .map(|d| SourceDisk {
                disk_key: DiskKey(d.key as i64),
                unit_number: d.unit_number,
                size_bytes: d.capacity_bytes,
                label: disk_label(d),
                controller: Some(d.controller_label.clone()).filter(|c| !c.is_empty()),
                backing_file: Some(d.file_name.clone()).filter(|f| !f.is_empty()),
                thin_provisioned: d.thin,
            })
            .collect(),
        driver: DRIVER,
        change_tracking: Some(vm.cbt_enabled),
    }
}

/// The inventory label: the disk's own, and for a disk that snapshots do not freeze, what it
/// is and that the VM cannot be backed up (the console and the hub show labels as they are).
fn disk_label(d: &DiskInfo) -> String {
    match (&d.raw_mapping, d.not_frozen_by_snapshots()) {
        (_, None) => d.label.clone(),
        (Some(_), Some(_)) => format!(
            "{} (raw device mapping: not in VM snapshots, VM cannot be backed up)",
            d.label
        ),
        (None, Some(_)) => format!(
            "{} ({}: not in VM snapshots, VM cannot be backed up)",
            d.label,
            d.mode.as_deref().unwrap_or_default()
        ),
    }
}

/// Refuses a VM with a disk a snapshot does not freeze: its copy would be read while the guest
/// writes to it, so the backup would not be consistent (and an independent disk's data would
/// not even be the snapshot's instant).
fn check_frozen(vm: &VmInfo) -> Result<(), SourceError> {
    let problems: Vec<String> = vm
        .disks
        .iter()
        .filter_map(|d| {
            d.not_frozen_by_snapshots()
                .map(|why| format!("disk {} ({}) is {why}", d.key, d.label))
        })
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    Err(SourceError::Hypervisor {
        vm: vm.name.clone(),
        operation: "snapshot",
        detail: format!(
            "refused: {}; a backup of the VM would not be consistent (make the disk persistent, or remove it from the VM)",
            problems.join("; ")
        ),
    })
}

/// Whether an incremental of `vm` may start from the request's change ids.
fn check_base(vm: &VmInfo, request: &SnapshotRequest) -> Result<(), SourceError> {
    if vm.disks.is_empty() {
        return Err(SourceError::NoDisks {
            vm: vm.name.clone(),
        });
    }
    for d in &vm.disks {
        let key = DiskKey(d.key as i64);
        if let Some(detail) = cbt::base_problem(
            request.previous_change_ids.get(&key).map(String::as_str),
            vm.cbt_enabled,
            d.change_id.as_deref(),
        ) {
            return Err(SourceError::IncrementalBase {
                vm: vm.name.clone(),
                disk_key: key,
                detail,
            });
        }
    }
    Ok(())
}

/// The backup id when it is a safe file name and the nbdkit socket path stays short, else a
/// hash of it.
fn file_stem(run_dir: &Path, backup_id: &BackupId) -> String {
    let id = backup_id.0.as_str();
    // "<run_dir>/nbdkit-<stem>-<key>.sock" must fit a unix socket path (107 bytes).
    let fits =
        run_dir.as_os_str().len() + "/nbdkit-".len() + id.len() + "-2147483647.sock".len() <= 107;
    if validate_name("backup id", id).is_ok() && fits {
        id.to_string()
    } else {
        blake3::hash(id.as_bytes()).to_hex()[..16].to_string()
    }
}

/// "https://host:port" → ("host", Some(port)).
fn host_port(url: &str) -> (String, Option<u16>) {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    let rest = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').unwrap_or((v6, ""));
        return (
            host.to_string(),
            after.strip_prefix(':').and_then(|p| p.parse().ok()),
        );
    }
    match rest.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().ok()),
        _ => (rest.to_string(), None),
    }
}

/// VDDK's thumbprint of a PEM certificate: SHA-1 of the DER, "AA:BB:.." (what
/// `openssl x509 -fingerprint -sha1` prints).
pub fn sha1_thumbprint(pem: &str) -> Option<String> {
    use sha1::Digest;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let digest = sha1::Sha1::digest(der.as_ref());
    Some(
        digest
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// Whether nbdkit's vddk plugin is installed (in nbdkit's plugin directory).
fn vddk_plugin_installed(nbdkit: &Path) -> bool {
    let Ok(out) = std::process::Command::new(nbdkit)
        .arg("--dump-config")
        .output()
    else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("plugindir="))
        .is_some_and(|dir| Path::new(dir).join("nbdkit-vddk-plugin.so").exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(key: i32, change_id: Option<&str>) -> DiskInfo {
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

    fn vm(cbt: bool, disks: Vec<DiskInfo>) -> VmInfo {
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

    fn incremental(ids: &[(i64, &str)]) -> SnapshotRequest {
        SnapshotRequest {
            backup_id: BackupId::from("b2"),
            vm_name: "vm1".into(),
            backup_type: BackupType::Incremental,
            previous_backup_id: Some(BackupId::from("b1")),
            previous_change_ids: ids
                .iter()
                .map(|(k, c)| (DiskKey(*k), c.to_string()))
                .collect(),
        }
    }

    #[test]
    fn inventory_maps_device_keys_units_and_cbt() {
        let v = source_vm(&vm(true, vec![disk(2000, None), disk(2001, None)]));
        assert_eq!(v.driver, "vsphere");
        assert_eq!(v.vm_id, "5029-uuid");
        assert_eq!(v.change_tracking, Some(true));
        let d = &v.disks[1];
        assert_eq!(d.disk_key, DiskKey(2001));
        assert_eq!(d.unit_number, 1);
        assert_eq!(d.controller.as_deref(), Some("SCSI controller 0"));
        assert_eq!(
            d.backing_file.as_deref(),
            Some("[LocalDS_0] vm1/vm1_2001.vmdk")
        );
        assert_eq!(d.thin_provisioned, Some(true));
    }

    #[test]
    fn incremental_base_names_the_disk_and_the_reason() {
        let a = "52 aa/4";
        let v = vm(
            true,
            vec![disk(2000, Some("52 aa/9")), disk(2001, Some("52 bb/2"))],
        );
        let e = check_base(&v, &incremental(&[(2000, a)])).unwrap_err();
        assert!(
            matches!(&e, SourceError::IncrementalBase { disk_key, detail, .. }
                if *disk_key == DiskKey(2001) && detail.contains("hub sent none")),
            "{e}"
        );
        let e = check_base(&v, &incremental(&[(2000, a), (2001, "52 cc/1")])).unwrap_err();
        assert!(e.to_string().contains("reset"), "{e}");
        assert!(check_base(&v, &incremental(&[(2000, a), (2001, "52 bb/1")])).is_ok());
        let off = vm(false, v.disks.clone());
        let e = check_base(&off, &incremental(&[(2000, a), (2001, "52 bb/1")])).unwrap_err();
        assert!(e.to_string().contains("off"), "{e}");
    }

    #[test]
    fn a_snapshot_is_mine_only_by_name_and_description() {
        let snap = |name: &str, description: &str| SnapshotInfo {
            moref: MoRef::new(SNAPSHOT_KIND, "snapshot-1"),
            name: name.into(),
            description: description.into(),
        };
        let by = |node: &str| format!("Taken by {OWNER_MARK}{node}\" for backup b at t.");
        let name = snapshot_name("a", &BackupId::from("b-1"));
        assert_eq!(name, "sendense-a-b-1");
        assert_eq!(
            ownership("a", &snap(&name, &by("a"))),
            Some(Ownership::Mine)
        );
        // Node "a-b" took "sendense-a-b-7": not node a's, although the name fits.
        assert_eq!(
            ownership("a", &snap("sendense-a-b-7", &by("a-b"))),
            Some(Ownership::Node("a-b".into()))
        );
        assert_eq!(
            ownership("a", &snap("sendense-x-1", &by("a"))),
            Some(Ownership::Unknown)
        );
        assert_eq!(
            ownership(
                "a",
                &snap("sendense-5f1c", "Taken by Sendense for backup 5f1c at t.")
            ),
            Some(Ownership::Unknown)
        );
        assert_eq!(ownership("a", &snap("before upgrade", &by("a"))), None);
    }

    #[test]
    fn file_stems_are_safe_and_short() {
        let run = Path::new("/run/sendense-node");
        assert_eq!(file_stem(run, &BackupId::from("b-1")), "b-1");
        let odd = file_stem(run, &BackupId::from("a/b"));
        assert_eq!(odd.len(), 16);
        let long = file_stem(Path::new(&"/x".repeat(45)), &BackupId::from("b-1"));
        assert_eq!(long.len(), 16);
    }

    #[test]
    fn host_and_port_of_the_url() {
        assert_eq!(host_port("https://vc.example"), ("vc.example".into(), None));
        assert_eq!(
            host_port("https://127.0.0.1:8989"),
            ("127.0.0.1".into(), Some(8989))
        );
        assert_eq!(host_port("https://[::1]:443"), ("::1".into(), Some(443)));
    }
}
