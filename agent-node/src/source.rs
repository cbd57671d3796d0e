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
//! Drivers: [`qemu`] (QEMU/KVM over QMP). A VMware driver would implement the same trait.

pub mod qemu;

use sendense_shared::api::BackupType;
use sendense_shared::ids::{BackupId, DiskKey};
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
    /// Human label (QEMU: the device id).
    pub label: String,
}

/// One VM as the driver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceVm {
    pub vm_name: String,
    /// Hypervisor's id of the VM (QEMU: its `-uuid`, or the name when it has none).
    pub vm_id: String,
    pub disks: Vec<SourceDisk>,
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
    /// Backups whose change tracking was rolled back to their base.
    pub bitmaps_rolled_back: Vec<String>,
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
}

/// A hypervisor the node takes snapshots from.
pub trait SourceDriver: Send + Sync + 'static {
    /// Every reachable VM with its disks (queried live); unreachable ones are left out.
    fn list_vms(&self) -> BoxFuture<'_, Result<Vec<SourceVm>, SourceError>>;

    /// One VM with its disks.
    fn vm<'a>(&'a self, vm_name: &'a str) -> BoxFuture<'a, Result<SourceVm, SourceError>>;

    /// Checks, without changing anything, that an incremental of `vm_name` could start from
    /// `previous` (or from whatever base the driver tracks when `None`).
    fn check_incremental_base<'a>(
        &'a self,
        vm_name: &'a str,
        previous: Option<&'a BackupId>,
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
}
