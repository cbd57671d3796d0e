//! Source drivers: where VMs and their disks come from, and how one consistent snapshot of
//! every disk of a VM is taken, exported over NBD, and released.
//!
//! The contract every driver keeps:
//! - a snapshot covers ALL disks of the VM at one instant (one hypervisor operation);
//! - each disk of the snapshot is readable as an NBD export that answers `base:allocation`, and
//!   for an incremental also the changed-block context named in [`SnapshotDisk::dirty_bitmap`];
//! - [`SourceDriver::release`] always runs (success, failure, cancel), and
//!   [`SourceDriver::recover`] finds what a crashed node left behind and releases it.
//!
//! Drivers: [`qemu`] (QEMU/KVM over QMP) and [`vsphere`] (VMware vCenter/ESXi over SOAP, disks
//! exported by [`nbdkit`]); [`multi`] serves both at once, routing by VM name. A driver with hypervisor change tracking (vSphere CBT) hands the copy
//! an explicit list of areas ([`SnapshotDisk::areas`]) and a change id per disk
//! ([`SnapshotDisk::change_id`]) that the hub keeps for the next incremental.

pub mod multi;
pub mod nbdkit;
pub mod qemu;
pub mod vsphere;

use sendense_shared::api::{BackupType, Consistency};
use sendense_shared::ids::{BackupId, DiskKey};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use thiserror::Error;

/// A boxed future, so that drivers can live behind `Arc<dyn SourceDriver>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One disk as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDisk {
    pub disk_key: DiskKey,
    pub unit_number: i32,
    pub size_bytes: u64,
    /// Human label (QEMU: the device id; vSphere: "Hard disk 1").
    pub label: String,
    /// Controller label (vSphere: "SCSI controller 0").
    pub controller: Option<String>,
    /// File behind the disk (vSphere: "[datastore1] vm1/vm1.vmdk").
    pub backing_file: Option<String>,
    /// Thin or thick, where the hypervisor says.
    pub thin_provisioned: Option<bool>,
}

/// One VM as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceVm {
    pub vm_name: String,
    /// Hypervisor's id of the VM (QEMU: its `-uuid`, or the name when it has none).
    pub vm_id: String,
    pub disks: Vec<SourceDisk>,
    /// Driver name: "qemu", "vsphere".
    pub driver: &'static str,
    /// Whether hypervisor change tracking is on (vSphere CBT); `None`: the driver always can.
    pub change_tracking: Option<bool>,
}

/// What to snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub backup_id: BackupId,
    pub vm_name: String,
    pub backup_type: BackupType,
    /// For an incremental: the backup the hub's chain ends with. When given, the changed-block
    /// map must start exactly at that backup's snapshot, or the snapshot is refused with
    /// [`SourceError::IncrementalBase`].
    pub previous_backup_id: Option<BackupId>,
    /// For an incremental with hypervisor change tracking: each disk's change id at the
    /// previous backup (from the hub). A disk without one, or whose tracking was reset since,
    /// is refused with [`SourceError::IncrementalBase`].
    pub previous_change_ids: BTreeMap<DiskKey, String>,
    /// Refuse ([`SourceError::ConsistencyRequired`]) rather than take a crash-consistent
    /// snapshot when the guest's file systems cannot be frozen.
    pub require_application_consistency: bool,
}

/// Where one disk of a snapshot can be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDisk {
    pub disk_key: DiskKey,
    pub size_bytes: u64,
    /// Unix socket of the NBD server.
    pub socket: PathBuf,
    /// NBD export name.
    pub export: String,
    /// For an incremental: the dirty bitmap exported as `qemu:dirty-bitmap:<name>`, whose set
    /// bits are the blocks changed since the previous backup.
    pub dirty_bitmap: Option<String>,
    /// When set, the only areas to read, as sorted, non-overlapping `(offset, length)` pairs:
    /// for a full backup the allocated areas, for an incremental the changed ones (vSphere:
    /// `QueryChangedDiskAreas`). Everything else is a hole (full) or unchanged (incremental).
    /// Takes precedence over `dirty_bitmap` and `base:allocation`.
    pub areas: Option<Vec<(u64, u64)>>,
    /// The hypervisor's change id of this snapshot's disk (vSphere CBT), reported to the hub.
    pub change_id: Option<String>,
}

impl SnapshotDisk {
    /// The export as an NBD URI (`nbd+unix:///export?socket=/path`).
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.export,
            self.socket.display()
        )
    }
}

/// A taken snapshot: what the copy reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub backup_id: BackupId,
    pub vm_name: String,
    pub backup_type: BackupType,
    pub disks: Vec<SnapshotDisk>,
    /// Whether the guest's file systems were frozen for the snapshot, and why not; `None`: the
    /// driver does not know (vSphere).
    pub consistency: Option<Consistency>,
    /// The VM's hardware at snapshot time (QEMU driver); `None` when the driver does not
    /// record it.
    pub hardware: Option<sendense_shared::api::VmHardware>,
}

/// How the job that used a snapshot ended; decides what happens to change tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The backup is complete: change tracking now counts from this snapshot.
    Success,
    /// Failed or cancelled: change tracking keeps counting from the previous backup, so that
    /// the next incremental still covers everything written since then.
    Failure,
}

/// What a start-up recovery found and released.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    pub exports_removed: Vec<String>,
    pub jobs_cancelled: Vec<String>,
    pub nodes_removed: Vec<String>,
    pub files_removed: Vec<PathBuf>,
    /// VMs whose guest a crashed run left frozen, thawed.
    pub guests_thawed: Vec<String>,
    /// Backups whose change tracking was rolled back to their base.
    pub bitmaps_rolled_back: Vec<String>,
    /// Hypervisor snapshots removed (vSphere: `"VM vm1: snapshot sendense-<id> (snapshot-43)"`).
    pub snapshots_removed: Vec<String>,
    /// Problems met while recovering (the rest still ran).
    pub errors: Vec<String>,
}

/// Why a driver operation failed.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error("unknown VM {vm:?}")]
    UnknownVm { vm: String },
    #[error("VM {vm}: {source}")]
    Qmp {
        vm: String,
        #[source]
        source: crate::qmp::QmpError,
    },
    #[error("VM {vm}: unexpected QMP answer to {command}: {detail}")]
    Answer {
        vm: String,
        command: &'static str,
        detail: String,
    },
    #[error("VM {vm} has no disk")]
    NoDisks { vm: String },
    /// The changed-block map an incremental needs is not there (or does not start at the
    /// previous backup); the hub falls back to a full backup.
    #[error("bitmap missing: VM {vm}, disk {disk_key}: {detail}")]
    IncrementalBase {
        vm: String,
        disk_key: DiskKey,
        detail: String,
    },
    /// Application consistency was required and the guest could not be frozen.
    #[error(
        "VM {vm}: application consistency required (consistency_required), guest not frozen: {cause}"
    )]
    ConsistencyRequired { vm: String, cause: String },
    #[error("VM {vm}: a snapshot of backup {backup_id} is still held")]
    SnapshotHeld { vm: String, backup_id: BackupId },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running {command}: {detail}")]
    Tool { command: String, detail: String },
    #[error("VM {vm}: {what} did not finish within {secs} s")]
    Timeout { vm: String, what: String, secs: u64 },
    #[error("VM {vm}: {what} is not supported by the {driver} driver")]
    Unsupported {
        vm: String,
        driver: &'static str,
        what: &'static str,
    },
    /// The hypervisor's management endpoint refused or failed an operation.
    #[error("VM {vm}: {operation}: {detail}")]
    Hypervisor {
        vm: String,
        operation: &'static str,
        detail: String,
    },
    /// The hypervisor's management endpoint cannot be reached or refuses the login.
    #[error("{endpoint}: {detail}")]
    Endpoint { endpoint: String, detail: String },
}

/// A hypervisor the node takes snapshots from.
pub trait SourceDriver: Send + Sync + 'static {
    /// Every reachable VM with its disks (queried live); unreachable ones are left out.
    fn list_vms(&self) -> BoxFuture<'_, Result<Vec<SourceVm>, SourceError>>;

    /// One VM with its disks.
    fn vm<'a>(&'a self, vm_name: &'a str) -> BoxFuture<'a, Result<SourceVm, SourceError>>;

    /// Checks, without changing anything, that the incremental `request` could start from its
    /// `previous_backup_id` (or from whatever base the driver tracks when `None`) and, for
    /// drivers with hypervisor change tracking, from its `previous_change_ids`.
    fn check_incremental_base<'a>(
        &'a self,
        request: &'a SnapshotRequest,
    ) -> BoxFuture<'a, Result<(), SourceError>>;

    /// Takes one snapshot of all disks at one instant and exports each disk.
    fn snapshot<'a>(
        &'a self,
        request: &'a SnapshotRequest,
    ) -> BoxFuture<'a, Result<Snapshot, SourceError>>;

    /// Removes exports and snapshot state; rotates change tracking per `outcome`.
    fn release<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        outcome: ReleaseOutcome,
    ) -> BoxFuture<'a, Result<(), SourceError>>;

    /// Finds and releases what a crashed run left behind (all VMs).
    fn recover(&self) -> BoxFuture<'_, RecoveryReport>;

    /// Turns on the hypervisor's change tracking for `vm_name` (vSphere CBT). Drivers that
    /// always track changes answer `Ok`.
    fn enable_change_tracking<'a>(
        &'a self,
        vm_name: &'a str,
    ) -> BoxFuture<'a, Result<(), SourceError>> {
        let _ = vm_name;
        Box::pin(async { Ok(()) })
    }
}
